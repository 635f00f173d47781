"""The protocol every extra of the training loop implements (see :mod:`qksweep.trainables.extras`)."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, ContextManager

import torch


class Extra:
    """One optional feature. ``name``: its key in the checkpoint (empty: it has no state); ``stopped_by``:
    what the run's ``qksweep.stopped_by`` tag says when its stop request ends the run."""

    name: str = ""
    stopped_by: str = ""

    def state_dict(self) -> Any | None:
        """What the checkpoint keeps under ``name`` (None: nothing this epoch)."""
        return None

    def load_state_dict(self, state: Any) -> None:
        """Restore from a checkpoint (after the model's weights, before the optimizer's state)."""

    def before_epoch(self, epoch: int) -> None:
        """Before epoch ``epoch`` (0-based) starts."""

    def loss(self, loss: torch.Tensor, out: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
        """The training loss of one batch of ``n`` samples, under autocast; return it changed or not."""
        return loss

    def after_update(self, step: int) -> None:
        """After optimizer update ``step`` (1-based, counted over the whole run)."""

    def stop_sync_due(self, step: int) -> bool:
        """Whether the workers agree on stop requests after update ``step`` (the same on every rank)."""
        return False

    def measuring(self, batch: int, n_images: int) -> ContextManager:
        """A context around the forward of validation batch ``batch``."""
        return nullcontext()

    def epoch_metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """This epoch's metrics (it sees the core's and the earlier extras' ``metrics``)."""
        return {}

    def stop_request(self) -> str | None:
        """The reason to stop the run now (rank 0 decides; once made, a request stands)."""
        return None

    def after_checkpoint(self, directory: Path, metrics: dict[str, Any]) -> None:
        """Rank 0, after this epoch's checkpoint is written to ``directory`` (before it is reported)."""

    def publish(self, directory: Path) -> dict[str, str]:
        """Rank 0, last epoch: files for the run's MLflow artifacts, written under ``directory`` (inside
        the reported checkpoint). Returns ``{artifact path: folder relative to the checkpoint}``; the
        controller-side epoch logger uploads them with the same pending-file guarantees as the epoch."""
        return {}

    def close(self) -> None:
        """When training ends, however it ends."""
