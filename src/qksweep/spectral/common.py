"""Shared helpers of the spectral package: module selection and small linear algebra.

Selection rules (used by both :class:`~qksweep.spectral.monitor.SpectralMonitor`
and :func:`~qksweep.spectral.analysis.analyze_model`):

* the model is unwrapped first: ``DistributedDataParallel`` / ``DataParallel``
  (``.module``), ``torch.compile`` (``._orig_mod``) and timm ``ModelEma*``
  wrappers (``.module``);
* a module is a *matrix module* when it is an ``nn.Linear`` (any subclass), or an
  ``nn.Conv1d`` / ``nn.Conv2d`` with an all-ones kernel size and ``groups == 1``
  (its weight ``[out, in, 1(, 1)]`` is reshaped to ``[out, in]``); everything else
  is skipped (``nn.Embedding``, grouped / spatial convolutions, norms, ...);
* a target pattern matches a qualified module name by substring, or with
  :func:`fnmatch.fnmatchcase` against the whole name when the pattern contains a
  wildcard (``*``, ``?`` or ``[``); the first matching pattern is the module's
  *type* (used to group figures);
* with ``split_qkv`` a fused qkv weight (last name component contains ``qkv`` and
  ``out % 3 == 0``) becomes three matrices ``<name>.q``, ``<name>.k``, ``<name>.v``
  (row blocks ``[0:d]``, ``[d:2d]``, ``[2d:3d]``, timm's layout).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

__all__ = [
    "MatrixEntry",
    "unwrap_model",
    "select_matrices",
    "matrix_of",
    "layer_type",
    "principal_cosines",
    "parse_targets",
]

_WILDCARDS = ("*", "?", "[")


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel / torch.compile / timm ModelEma wrappers."""
    seen = 0
    while seen < 8:
        seen += 1
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(getattr(model, "_orig_mod"), nn.Module):
            model = model._orig_mod  # torch.compile OptimizedModule
        elif type(model).__name__.startswith("ModelEma") and isinstance(
            getattr(model, "module", None), nn.Module
        ):
            model = model.module
        else:
            break
    return model


def parse_targets(targets: str | Iterable[str] | None) -> list[str] | None:
    """Accept a list of patterns or one comma-separated string; ``None`` stays ``None``."""
    if targets is None:
        return None
    if isinstance(targets, str):
        targets = targets.split(",")
    out = [t.strip() for t in targets if t and t.strip()]
    return out


def _match(name: str, pattern: str) -> bool:
    if any(c in pattern for c in _WILDCARDS):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name


def _is_matrix_module(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        return False
    if isinstance(module, nn.Linear):
        return w.dim() == 2
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        ks = module.kernel_size if isinstance(module.kernel_size, tuple) else (module.kernel_size,)
        return all(k == 1 for k in ks) and module.groups == 1
    return False


@dataclass(frozen=True)
class MatrixEntry:
    """One monitored matrix: ``key`` is the metric name component."""

    key: str  # qualified module name, plus ".q"/".k"/".v" for split qkv
    module: nn.Module
    pattern: str  # matching target pattern, or layer_type(name) when no targets
    part: int | None = None  # 0/1/2 for split qkv, else None

    def matrix(self) -> torch.Tensor:
        return matrix_of(self.module, self.part)


def matrix_of(module: nn.Module, part: int | None = None) -> torch.Tensor:
    """The (detached) weight of a matrix module as ``[out, in]``, optionally one qkv third."""
    w = module.weight.detach()
    w = w.reshape(w.shape[0], -1)
    if part is not None:
        d = w.shape[0] // 3
        w = w[part * d : (part + 1) * d]
    return w


def _is_fused_qkv(name: str, module: nn.Module) -> bool:
    last = name.rsplit(".", 1)[-1].lower()
    return "qkv" in last and module.weight.shape[0] % 3 == 0


def select_matrices(
    model: nn.Module,
    targets: Iterable[str] | str | None,
    *,
    split_qkv: bool = False,
) -> list[MatrixEntry]:
    """Matrix modules of ``model`` (after :func:`unwrap_model`) matching ``targets``.

    ``targets=None`` selects every matrix module; the entry's ``pattern`` is then
    :func:`layer_type` of its name. Order follows ``model.named_modules()``.
    """
    model = unwrap_model(model)
    pats = parse_targets(targets)
    entries: list[MatrixEntry] = []
    for name, module in model.named_modules():
        if not name or not _is_matrix_module(module):
            continue
        if pats is None:
            pattern = layer_type(name)
        else:
            pattern = next((p for p in pats if _match(name, p)), None)
            if pattern is None:
                continue
        if split_qkv and _is_fused_qkv(name, module):
            for i, suffix in enumerate("qkv"):
                entries.append(MatrixEntry(f"{name}.{suffix}", module, pattern, i))
        else:
            entries.append(MatrixEntry(name, module, pattern, None))
    return entries


_INDEX = re.compile(r"^\d+$")


def layer_type(name: str) -> str:
    """Layer type of a qualified name: the components after the last numeric index.

    ``blocks.0.attn.qkv`` -> ``attn.qkv``; ``blocks.3.attn.qkv.q`` -> ``attn.qkv.q``;
    ``stages.1.blocks.2.mlp.fc1`` -> ``mlp.fc1``; ``head`` -> ``head``.
    """
    parts = name.split(".")
    last_idx = max((i for i, p in enumerate(parts) if _INDEX.match(p)), default=-1)
    rest = parts[last_idx + 1 :]
    return ".".join(rest) if rest else name


def principal_cosines(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between ``span(A)`` and ``span(B)``.

    ``A``: ``[..., n, k1]``, ``B``: ``[..., n, k2]`` with orthonormal columns.
    Returns the singular values of ``A^T B`` (canonical correlations), clamped
    to ``[0, 1]``, in descending order, shape ``[..., min(k1, k2)]``.
    """
    if A.shape[-2] != B.shape[-2]:
        raise ValueError(f"bases live in different spaces: {tuple(A.shape)} vs {tuple(B.shape)}")
    dtype = torch.promote_types(A.dtype, B.dtype)
    if not dtype.is_floating_point or dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    M = A.to(dtype).mT @ B.to(dtype)
    return torch.linalg.svdvals(M).clamp_(0.0, 1.0)
