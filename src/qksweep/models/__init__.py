"""Model zoo: timm ViTs and SpikingJelly spiking transformers behind one registry.

Public API::

    create_model(name, *, num_classes, in_chans=3, img_size=None, **overrides) -> nn.Module
    check_model_args(name, *, num_classes, in_chans=3, img_size=None, **overrides) -> None
    list_models(pattern=None) -> list[str]
    model_info(name) -> ModelInfo
    register_model            # decorator
    default_spectral_targets(model_name) -> list[str]

Override keys (config ``model.*``): see :data:`OVERRIDE_KEYS`; ``None`` values are
ignored, unsupported ones raise :class:`ModelArgError`.  ``pretrained=False`` is accepted
by every model.  Spiking models (``is_spiking = True``, ``time_steps``) take
``[N, C, H, W]``, repeat it over T and return ``[N, num_classes]`` time-averaged logits;
call ``spikingjelly.activation_based.functional.reset_net(model)`` after every batch.

Families: every timm ``vit_*``; ``qkformer_10_384/512/768`` (SpikingJelly QKFormer);
``qkformer_cifar`` (official CIFAR QKFormer); ``qkformer_dvs`` (official event-camera QKFormer);
``spiking_resnet*``, ``sew_resnet*`` and the
other SpikingJelly ResNet variants; ``spikformer_ti``, ``spikformer_s``, ``spikformer_cifar10``.
"""

from __future__ import annotations

from ._registry import (
    OVERRIDE_KEYS,
    ModelArgError,
    ModelInfo,
    check_model_args,
    create_model,
    list_models,
    model_info,
    register_model,
)
from . import vit as _vit  # noqa: F401  (registers the timm ViT provider)
from .qkformer import QKFORMER_SPECTRAL_TARGETS
from . import qkformer_cifar as _qkformer_cifar  # noqa: F401
from . import qkformer_dvs as _qkformer_dvs  # noqa: F401
from .snn_zoo import SPIKFORMER_SPECTRAL_TARGETS
from .vit import VIT_SPECTRAL_TARGETS

__all__ = [
    "OVERRIDE_KEYS",
    "ModelArgError",
    "ModelInfo",
    "QKFORMER_SPECTRAL_TARGETS",
    "SPIKFORMER_SPECTRAL_TARGETS",
    "VIT_SPECTRAL_TARGETS",
    "check_model_args",
    "create_model",
    "default_spectral_targets",
    "frames_batch_first",
    "list_models",
    "model_info",
    "register_model",
    "run_neuron_params",
]


def _time_first(_module, args):
    x = args[0]
    if getattr(x, "ndim", 0) == 5:
        return (x.transpose(0, 1), *args[1:])
    return None


def frames_batch_first(model):
    """Let a spiking model take event frames batch first, ``[N, T, C, H, W]`` (how SpikingJelly's datasets
    batch them): a forward pre-hook hands them on as ``[T, N, C, H, W]``, one time step per frame. The
    weights and their names do not change; an ``[N, C, H, W]`` image still goes in as it is."""
    model.register_forward_pre_hook(_time_first)
    model.frames_batch_first = True
    return model


def default_spectral_targets(model_name: str) -> list[str]:
    """Module-name substrings whose (1x1 conv / linear) weights the spectral monitor tracks.

    Select modules with ``any(t in name for t in targets)`` over ``model.named_modules()``
    and keep those with a weight of >= 2 dims.  Spiking ResNets have no attention/MLP
    matrices: an empty list.
    """
    info = model_info(model_name)  # raises ModelArgError for unknown names
    if info.family == "vit":
        return list(VIT_SPECTRAL_TARGETS)
    if model_name.startswith("qkformer"):
        return list(QKFORMER_SPECTRAL_TARGETS)
    if model_name.startswith("spikformer"):
        return list(SPIKFORMER_SPECTRAL_TARGETS)
    return []


def run_neuron_params(model_cfg) -> tuple[dict, dict]:
    """The resolved ``model.neuron.*`` params and the ``qksweep.neuron`` tag of a run of ``model_cfg``
    (a ``ModelConfig``); empty for a ViT."""
    from . import neurons

    return neurons.run_neuron_params(model_cfg.neuron, model_info(model_cfg.name).neurons)
