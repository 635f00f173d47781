"""Cheap checks before a trial launches: parameter count and activation memory.

Both build the model with its parameters and buffers on the ``meta`` device (no memory,
no initialisation work; the constructor's own CPU code such as ``linspace(...).tolist()``
still runs normally), so a configuration that cannot fit is rejected in well under a
second, without allocating it.

Activation memory (:func:`activation_memory_estimate_gb`) is *measured* on meta tensors,
not guessed: one training-mode forward of a ``[batch, in_chans, img, img]`` input runs on
the meta model under ``torch.autograd.graph.saved_tensors_hooks`` and the estimate is

    bytes = sum over the distinct storages autograd saves for backward, parameters and
            buffers excluded      (x dtype_bytes / element size, if dtype_bytes is given)

which, for these models, is ``sum over layers of widths x tokens x T x batch x bytes``
(every LIF step's membrane/spike tensors, every conv/linear input, attention maps,
BN/dropout saves) plus a few per-channel BN statistics: affine in ``batch`` and in ``T``.
It is the activation part of training memory; weights, gradients and optimizer state
(about 16 bytes per parameter with AdamW in fp32, see :func:`param_count_m`) and the
allocator's workspace come on top.  If a model cannot run on meta tensors, one real CPU
forward at batch 1 is measured the same way and scaled by ``batch``.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator, Mapping, Optional

import torch
import torch.nn as nn

__all__ = [
    "activation_memory_estimate_gb",
    "meta_init",
    "param_count_m",
]

_GIB = float(2**30)
_META_LOCK = threading.RLock()


@contextlib.contextmanager
def meta_init() -> Iterator[None]:
    """Modules built inside get their parameters and buffers on the ``meta`` device
    (the ``accelerate.init_empty_weights`` technique).  Patches ``nn.Module``'s
    ``register_parameter`` / ``register_buffer`` for the duration, under a lock."""
    with _META_LOCK:
        old_param = nn.Module.register_parameter
        old_buffer = nn.Module.register_buffer

        def register_parameter(self, name, param):
            if param is not None and param.device.type != "meta":
                param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            old_param(self, name, param)

        def register_buffer(self, name, tensor, persistent=True):
            if tensor is not None and tensor.device.type != "meta":
                tensor = tensor.to("meta")
            old_buffer(self, name, tensor, persistent)

        nn.Module.register_parameter = register_parameter
        nn.Module.register_buffer = register_buffer
        try:
            yield
        finally:
            nn.Module.register_parameter = old_param
            nn.Module.register_buffer = old_buffer


def _model_request(model_or_cfg: Any) -> tuple[str, dict[str, Any], Optional[int], Optional[int]]:
    """(name, overrides, img_size, num_classes) of a Config / ModelConfig / mapping / name."""
    if isinstance(model_or_cfg, str):
        return model_or_cfg, {}, None, None
    if hasattr(model_or_cfg, "model") and hasattr(model_or_cfg, "data"):  # full Config
        from ..config import known_num_classes

        m, d = model_or_cfg.model, model_or_cfg.data
        return m.name, dict(m.overrides()), d.img_size, known_num_classes(d)
    if hasattr(model_or_cfg, "name") and hasattr(model_or_cfg, "overrides"):  # ModelConfig
        return model_or_cfg.name, dict(model_or_cfg.overrides()), None, None
    if isinstance(model_or_cfg, Mapping):
        over = dict(model_or_cfg)
        if "name" not in over:
            raise ValueError("a model mapping needs a 'name' key")
        name = over.pop("name")
        return name, over, over.pop("img_size", None), over.pop("num_classes", None)
    raise TypeError(f"expected an nn.Module, a Config, a ModelConfig, a mapping or a model name, got {type(model_or_cfg).__name__}")


def _build_meta(name: str, overrides: Mapping[str, Any], img_size: Optional[int], num_classes: int, in_chans: int) -> nn.Module:
    from ..models import create_model

    over = {k: v for k, v in overrides.items() if v is not None and k != "pretrained"}
    with meta_init():
        return create_model(name, num_classes=num_classes, in_chans=in_chans, img_size=img_size, **over)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def param_count_m(
    model_or_cfg: Any,
    *,
    overrides: Optional[Mapping[str, Any]] = None,
    img_size: Optional[int] = None,
    num_classes: Optional[int] = None,
    in_chans: int = 3,
) -> float:
    """Parameters in millions of a model instance, or of the model a ``Config``,
    ``ModelConfig``, mapping (``{'name': ..., **overrides}``) or model name describes (built
    on the meta device; ``num_classes`` defaults to the data set's, else 10)."""
    if isinstance(model_or_cfg, nn.Module):
        return _count(model_or_cfg) / 1e6
    name, over, cfg_img, cfg_classes = _model_request(model_or_cfg)
    over.update(overrides or {})
    model = _build_meta(name, over, img_size or cfg_img, num_classes or cfg_classes or 10, in_chans)
    return _count(model) / 1e6


def _saved_bytes(model: nn.Module, x: torch.Tensor, dtype_bytes: Optional[int]) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in ``model(x)``."""
    from spikingjelly.activation_based import functional

    own = {t.untyped_storage()._cdata for t in list(model.parameters()) + list(model.buffers())}
    seen: set[int] = set()
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in own and key not in seen:
            seen.add(key)
            nbytes = storage.nbytes()
            if dtype_bytes and t.is_floating_point():
                nbytes = nbytes * dtype_bytes // t.element_size()
            total[0] += nbytes
        return t

    model.train()
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
    finally:
        functional.reset_net(model)
    return total[0]


def activation_memory_estimate_gb(
    model_name: str,
    overrides: Optional[Mapping[str, Any]] = None,
    img_size: Optional[int] = None,
    batch_size: int = 1,
    time_steps: Optional[int] = None,
    *,
    num_classes: int = 10,
    in_chans: int = 3,
    dtype_bytes: Optional[int] = None,
) -> float:
    """Training activation memory in GiB (2**30 bytes) of one forward of ``batch_size``
    images (see the module doc for the formula).  ``time_steps`` overrides T of spiking
    models (ignored by ViTs); ``img_size`` defaults to the model's; ``dtype_bytes`` (e.g. 2
    for AMP) rescales floating-point saves, default: as measured in fp32."""
    from ..models import model_info

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be >= 1")
    info = model_info(model_name)
    over = dict(overrides or {})
    if time_steps is not None and "time_steps" in info.supported_overrides:
        over["time_steps"] = int(time_steps)
    size = img_size or over.pop("img_size", None) or info.defaults.get("img_size") or 224
    over.pop("img_size", None)
    model = _build_meta(model_name, over, size, num_classes, in_chans)
    try:
        x = torch.empty(batch_size, in_chans, size, size, device="meta")
        nbytes = _saved_bytes(model, x, dtype_bytes)
    except (NotImplementedError, RuntimeError):  # an op without a meta kernel: measure for real
        from ..models import create_model

        clean = {k: v for k, v in over.items() if k != "pretrained"}
        model = create_model(model_name, num_classes=num_classes, in_chans=in_chans, img_size=size, **clean)
        nbytes = batch_size * _saved_bytes(model, torch.randn(1, in_chans, size, size), dtype_bytes)
    return nbytes / _GIB
