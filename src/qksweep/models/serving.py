"""The model as MLflow serves it (``mlflow.pytorch`` / ``mlflow.pyfunc``): logits for a batch of inputs as
the checkpoint's validation transform makes them, the same for every call.

A SpikingJelly neuron keeps its membrane potential after a forward pass; qksweep's loop and tools reset
it after every batch, and a served model must too, or each request would start from the last one's
state. :class:`ServingModel` resets before and after each forward."""

from __future__ import annotations

import torch


class ServingModel(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.spiking = bool(getattr(model, "is_spiking", False))

    def _reset(self) -> None:
        if self.spiking:
            from spikingjelly.activation_based import functional

            functional.reset_net(self.model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._reset()
        try:
            return self.model(x)
        finally:
            self._reset()
