"""Magnitude pruning (``prune:`` config section) through ``torch.nn.utils.prune``.

Small functions the shared loop calls:

- :func:`apply_pruning` prunes the Linear/Conv weights (the classifier head kept dense) by
  ``l1_unstructured`` (per layer or global) or ``ln_structured`` (n=2, dim=0: whole output channels);
  the masks stay applied (``weight = weight_orig * weight_mask``) while the model is fine-tuned.
- Checkpoints hold **permanent** weights: :func:`plain_state_dict` gives the model's state dict with
  ``weight = weight_orig * weight_mask`` and no ``weight_orig``/``weight_mask`` keys (what
  ``prune.remove`` leaves), so every checkpoint, ``checkpoints/best``, ``checkpoints/last`` and
  ``qksweep best --export`` load into the plain model for ``validate``/``predict``. The masks ride
  along separately (:func:`masks`), and a restarted worker re-applies them with
  :func:`apply_masks` (``prune.custom_from_mask``) so fine-tuning goes on with the same zeros.
- :func:`sparsity`: the fraction of zeros in the prunable weights (``prune/sparsity``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune as tprune

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def classifier(model: nn.Module) -> nn.Module | None:
    """The model's final classifier (kept dense: structured pruning would delete whole classes)."""
    get = getattr(model, "get_classifier", None)
    if callable(get):
        head = get()
        if isinstance(head, nn.Module):
            return head
    for attr in ("head", "fc", "classifier"):
        head = getattr(model, attr, None)
        if isinstance(head, PRUNABLE):
            return head
    return None


def prunable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every Linear/Conv layer with a weight, except the classifier."""
    head = classifier(model)
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, PRUNABLE) and m is not head and isinstance(getattr(m, "weight", None), torch.Tensor)]


def is_pruned(model: nn.Module) -> bool:
    return any(tprune.is_pruned(m) for _, m in prunable(model)) if model is not None else False


def apply_pruning(model: nn.Module, method: str, amount: float, scope: str = "layer") -> None:
    targets = prunable(model)
    if not targets:
        raise ValueError(f"{type(model).__name__} has no Linear/Conv layers to prune")
    if scope == "global":
        if method != "l1_unstructured":
            raise ValueError("global pruning works with l1_unstructured only")
        tprune.global_unstructured([(m, "weight") for _, m in targets], pruning_method=tprune.L1Unstructured,
                                   amount=amount)
        return
    for _, m in targets:
        if method == "l1_unstructured":
            tprune.l1_unstructured(m, "weight", amount=amount)
        elif method == "ln_structured":
            tprune.ln_structured(m, "weight", amount=amount, n=2, dim=0)
        else:
            raise ValueError(f"unknown pruning method {method!r}")


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{'<module>.weight': bool mask}`` of every pruned layer."""
    return {f"{n}.weight": m.weight_mask.detach().bool().clone() for n, m in prunable(model) if tprune.is_pruned(m)}


def apply_masks(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Re-apply saved masks to a model holding the plain (already zeroed) weights."""
    modules = dict(prunable(model))
    for key, mask in saved.items():
        name = key.removesuffix(".weight")
        if name not in modules:
            raise KeyError(f"pruning mask for '{key}' matches no prunable layer of {type(model).__name__}")
        m = modules[name]
        tprune.custom_from_mask(m, "weight", mask.to(device=m.weight.device, dtype=m.weight.dtype))


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with the pruning made permanent (``weight = weight_orig * weight_mask``; no
    ``weight_orig``/``weight_mask`` keys), without touching the model."""
    sd = model.state_dict()
    for name, m in prunable(model):
        if not tprune.is_pruned(m):
            continue
        prefix = f"{name}." if name else ""
        orig = sd.pop(f"{prefix}weight_orig")
        mask = sd.pop(f"{prefix}weight_mask")
        sd[f"{prefix}weight"] = (orig * mask).detach().clone()
    return sd


def make_permanent(model: nn.Module) -> None:
    """``prune.remove`` on every pruned layer: plain weight tensors with the zeros baked in."""
    for _, m in prunable(model):
        if tprune.is_pruned(m):
            tprune.remove(m, "weight")


@torch.no_grad()
def sparsity(model: nn.Module) -> float:
    """Fraction of zero entries over the prunable weights (masked ones count as zero)."""
    zeros, total = 0, 0
    for _, m in prunable(model):
        w = m.weight_orig * m.weight_mask if tprune.is_pruned(m) else m.weight
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / max(total, 1)


__all__ = ["apply_masks", "apply_pruning", "classifier", "is_pruned", "make_permanent", "masks",
           "plain_state_dict", "prunable", "sparsity"]
