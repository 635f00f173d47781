"""SpikingJelly's spiking ResNets, SEW ResNets and Spikformers.

* ``spiking_*`` / ``sew_*``: every factory function in the ``__all__`` of
  ``spikingjelly.activation_based.model.spiking_resnet`` / ``sew_resnet`` (registered from
  those lists, not by hand).  Neurons: ``LIFNode`` (tau 2) with ``surrogate.ATan()`` and
  ``detach_reset=True``; multi-step mode; SEW connection ``cnf='ADD'``.  Wrapped by
  :class:`TimeRepeat` (``net.`` prefix on module names).  Only ``time_steps`` can be
  overridden; ``img_size`` is unconstrained (adaptive average pooling), ``in_chans != 3``
  replaces the first conv.
* ``spikformer_ti`` / ``spikformer_s`` / ``spikformer_cifar10``: ``model.spikformer.Spikformer``
  built directly with the factory's configuration so that ``embed_dim``, ``num_heads``,
  ``depth``, ``mlp_ratio``, ``patch_size`` (4 or 16, the stem's choices) and ``img_size``
  can be overridden.  Neuron kwargs ``surrogate_function=ATan(), detach_reset=True`` are
  merged over each position's defaults (attention LIF keeps ``v_threshold=0.5``).
All return ``[N, num_classes]`` logits averaged over the ``time_steps`` steps.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, layer, neuron, surrogate
from spikingjelly.activation_based.model import sew_resnet, spiking_resnet
from spikingjelly.activation_based.model.spikformer import Spikformer

from ._registry import ModelArgError, fmt_arg, register_model
from .neurons import model_neurons

#: Spikformer's Q/K/V and projection 1x1 Conv1d (fused, inside SeqToANNContainer) and its
#: MLP convs (``mlp.fc1`` is a SeqToANNContainer(conv, bn) there, hence ``.0``).
SPIKFORMER_SPECTRAL_TARGETS: list[str] = [
    "attn.qkv_conv_bn.0",
    "attn.proj_conv_bn.0",
    "mlp.fc1.0",
    "mlp.fc2.0",
]


def _neuron_kwargs() -> dict[str, Any]:
    return dict(surrogate_function=surrogate.ATan(), detach_reset=True)


class TimeRepeat(nn.Module):
    """Repeat ``[N, C, H, W]`` over ``time_steps``, run a multi-step net, average over T."""

    is_spiking = True

    def __init__(self, net: nn.Module, time_steps: int) -> None:
        super().__init__()
        self.net = net
        self.time_steps = int(time_steps)
        functional.set_step_mode(self.net, "m")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            x = x.unsqueeze(0).repeat(self.time_steps, 1, 1, 1, 1)
        elif x.ndim != 5:
            raise ValueError(f"expected [N, C, H, W] or [T, N, C, H, W] input, got {tuple(x.shape)}")
        return self.net(x).mean(0)


def _resnet_builder(fn: Callable[..., nn.Module], is_sew: bool) -> Callable[..., nn.Module]:
    def build(*, num_classes: int, in_chans: int = 3, img_size: Optional[int] = 224,
              time_steps: int = 4) -> nn.Module:
        extra = dict(cnf="ADD") if is_sew else {}
        net = fn(pretrained=False, num_classes=num_classes, spiking_neuron=neuron.LIFNode,
                 **extra, **_neuron_kwargs())
        if in_chans != 3:
            old = net.conv1
            net.conv1 = layer.Conv2d(in_chans, old.out_channels, kernel_size=old.kernel_size,
                                     stride=old.stride, padding=old.padding, bias=False)
        return TimeRepeat(net, time_steps)

    build.__name__ = fn.__name__
    return build


def _zoo_names(module: Any, prefix: str) -> list[str]:
    return [n for n in module.__all__
            if n.startswith(prefix) and inspect.isfunction(getattr(module, n, None))]


for _mod, _prefix, _sew in ((spiking_resnet, "spiking_", False), (sew_resnet, "sew_", True)):
    for _n in _zoo_names(_mod, _prefix):
        register_model(_resnet_builder(getattr(_mod, _n), _sew), name=_n, family="snn",
                       neurons=model_neurons("atan", 2.0, attention=False))


# --------------------------------------------------------------------------- Spikformer
class SpikformerClassifier(Spikformer):
    """SpikingJelly Spikformer returning ``[N, num_classes]`` (mean over time)."""

    is_spiking = True

    @property
    def time_steps(self) -> int:
        return int(self.T)

    @time_steps.setter
    def time_steps(self, value: int) -> None:
        self.T = int(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).mean(0)


# configurations of spikingjelly's spikformer_ti / spikformer_s / spikformer_cifar10
_SPIKFORMERS = {
    "spikformer_ti": dict(img_size=224, patch_size=16, embed_dim=256, num_heads=8, depth=4),
    "spikformer_s": dict(img_size=224, patch_size=16, embed_dim=384, num_heads=12, depth=6),
    "spikformer_cifar10": dict(img_size=32, patch_size=4, embed_dim=384, num_heads=12, depth=4),
}


def _check_spikformer(name: str, args: dict, given: frozenset) -> None:
    if args["patch_size"] not in (4, 16):
        raise ModelArgError(
            f"{fmt_arg('patch_size', args, given)} is not supported by {name}: "
            "its convolutional stem only does patch_size 4 or 16"
        )
    if args["embed_dim"] % 8:
        raise ModelArgError(
            f"{fmt_arg('embed_dim', args, given)} must be divisible by 8 for {name} (stem widths D/8..D)"
        )
    if args["embed_dim"] % args["num_heads"]:
        raise ModelArgError(
            f"{fmt_arg('num_heads', args, given)} must divide embed_dim {args['embed_dim']} of {name}"
        )
    if args["img_size"] % args["patch_size"]:
        raise ModelArgError(
            f"{fmt_arg('img_size', args, given)} must be divisible by patch_size "
            f"{args['patch_size']} for {name}"
        )


def _build_spikformer(*, num_classes: int, in_chans: int = 3, img_size: int = 224,
                      time_steps: int = 4, embed_dim: int = 256, num_heads: int = 8,
                      depth: int = 4, mlp_ratio: float = 4.0, patch_size: int = 16
                      ) -> SpikformerClassifier:
    return SpikformerClassifier(
        T=time_steps, in_channels=in_chans, img_size_h=img_size, img_size_w=img_size,
        patch_size=patch_size, num_classes=num_classes, embed_dims=embed_dim,
        num_heads=num_heads, mlp_ratio=mlp_ratio, depths=depth, **_neuron_kwargs(),
    )


for _n, _cfg in _SPIKFORMERS.items():
    register_model(
        _build_spikformer,
        name=_n,
        family="snn",
        overrides=("time_steps", "embed_dim", "num_heads", "depth", "mlp_ratio", "patch_size"),
        defaults=dict(_cfg, time_steps=4, mlp_ratio=4.0),
        check=_check_spikformer,
        neurons=model_neurons("atan", 2.0, attention=True),
    )
