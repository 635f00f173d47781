"""``qksweep attention``: where a model looks in one image.

* ViT (timm): attention rollout (Abnar & Zuidema 2020).  Every block's attention probabilities
  are captured with a forward hook on its ``attn_drop`` input (timm's fused SDPA path is switched
  off for the one forward pass, then restored); per layer the heads are averaged, the identity is
  added (the residual path) and rows are renormalised; the layers are multiplied
  (``R = A_L ... A_1``) and the class token's row over the patch tokens (the mean row for
  models without a class token) is the map, on timm's ``patch_embed.grid_size`` grid.
* QKFormer (``qkformer_cifar``, ``qkformer_10_*``): SpikingJelly's ``QKAttention`` computes a
  binary token mask with its attention neuron (``attn_lif``, output ``[T, N, heads, 1, L]``);
  the hook averages it over time steps and heads, giving each token's Q-K attention firing
  rate, reshaped to the stage's token grid and averaged over the stage's Q-K blocks: one
  panel per stage.  (With ``qka_type: channel`` the mask is per channel, so the panel shows the
  Q-K attention block's output spike rate per token instead.)

    from qksweep.tools.attention import attention_maps
    res = attention_maps("checkpoints/best", "seven.png", out="seven_attn.png")
    res["maps"]  # {"rollout": HxW array} or {"stage1": ..., "stage2": ...}
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..config import ConfigError
from .predict import read_image
from .source import LoadedModel, load_source, preprocessing

__all__ = ["attention_maps", "vit_rollout", "qkformer_token_attention", "is_vit", "qk_attention_modules"]


def _vit_attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules()
            if hasattr(m, "fused_attn") and isinstance(getattr(m, "attn_drop", None), nn.Module)
            and hasattr(m, "qkv")]


def is_vit(model: nn.Module) -> bool:
    return hasattr(model, "patch_embed") and bool(_vit_attention_modules(model))


def qk_attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from spikingjelly.activation_based.layer.attention import QKAttention

    return [(n, m) for n, m in model.named_modules() if isinstance(m, QKAttention)]


# ---------------------------------------------------------------------------- ViT


def rollout(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """Attention rollout of per-layer attention probabilities ``[B, heads, N, N]`` -> ``[B, N, N]``."""
    if not attentions:
        raise ValueError("no attention maps to roll out")
    b, _, n, _ = attentions[0].shape
    eye = torch.eye(n, dtype=torch.float64)
    joint = eye.expand(b, n, n).clone()
    for a in attentions:
        a = a.detach().double().cpu().mean(1)  # average the heads
        a = a + eye
        a = a / a.sum(-1, keepdim=True)
        joint = a @ joint
    return joint


@torch.no_grad()
def vit_rollout(model: nn.Module, x: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """(rollout map [gh, gw] normalised to [0, 1], logits) for one preprocessed image [1, 3, H, W]."""
    mods = _vit_attention_modules(model)
    captured: list[torch.Tensor] = []
    saved = [m.fused_attn for m in mods]
    hooks = [m.attn_drop.register_forward_hook(lambda _m, inp, _out: captured.append(inp[0].detach()))
             for m in mods]
    try:
        for m in mods:
            m.fused_attn = False
        logits = model(x)
    finally:
        for h in hooks:
            h.remove()
        for m, f in zip(mods, saved):
            m.fused_attn = f
    if len(captured) != len(mods):
        raise ConfigError(f"attention: captured {len(captured)} attention maps from {len(mods)} attention layers; "
                          "this ViT variant does not compute its attention through attn_drop")
    joint = rollout(captured)[0]  # [N, N]
    prefix = int(getattr(model, "num_prefix_tokens", 1 if getattr(model, "cls_token", None) is not None else 0))
    has_cls = getattr(model, "cls_token", None) is not None
    row = joint[0, prefix:] if has_cls else joint[prefix:, prefix:].mean(0)
    grid = tuple(getattr(model.patch_embed, "grid_size", ()) or ())
    if len(grid) != 2 or grid[0] * grid[1] != row.numel():
        side = int(round(math.sqrt(row.numel())))
        grid = (side, row.numel() // side) if side * (row.numel() // side) == row.numel() else (1, row.numel())
    m = row.view(*grid).numpy()
    m = (m - m.min()) / (m.max() - m.min()) if m.max() > m.min() else np.zeros_like(m)
    return m.astype(np.float32), logits


# ---------------------------------------------------------------------------- QKFormer


def _grid(length: int) -> tuple[int, int]:
    side = int(round(math.sqrt(length)))
    return (side, side) if side * side == length else (1, length)


@torch.no_grad()
def qkformer_token_attention(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, np.ndarray], torch.Tensor]:
    """({stage: token firing-rate map [h, w] in [0, 1]}, logits) for one image [1, 3, H, W]."""
    mods = qk_attention_modules(model)
    per_stage: dict[str, list[np.ndarray]] = {}
    hooks = []

    def keep(stage: str, rate: torch.Tensor) -> None:  # rate [L]
        per_stage.setdefault(stage, []).append(rate.double().cpu().view(*_grid(rate.numel())).numpy())

    for name, m in mods:
        stage = name.split(".")[0] if "." in name else name
        if getattr(m, "qka_type", "token") == "token":
            # attn_lif output [T, N, heads, 1, L]: mean over T and heads -> [L] (first image)
            hooks.append(m.attn_lif.register_forward_hook(
                lambda _m, _i, out, s=stage: keep(s, out[:, 0].float().mean(dim=(0, 1)).reshape(-1))))
        else:
            # per-channel mask: show the block's output spike rate per token ([T, N, C, L])
            hooks.append(m.register_forward_hook(
                lambda _m, _i, out, s=stage: keep(s, out[:, 0].float().mean(dim=(0, 1)))))
    try:
        logits = model(x)
    finally:
        for h in hooks:
            h.remove()
        from spikingjelly.activation_based import functional

        functional.reset_net(model)
    maps = {s: np.mean(np.stack(v), axis=0).astype(np.float32) for s, v in per_stage.items()}
    return maps, logits


# ---------------------------------------------------------------------------- figure


def _overlay(ax, img: np.ndarray, amap: np.ndarray, title: str, *, vmin=None, vmax=None, smooth: bool = True):
    h, w = img.shape[:2]
    ax.imshow(img, interpolation="nearest")
    im = ax.imshow(amap, cmap="jet", alpha=0.5, extent=(-0.5, w - 0.5, h - 0.5, -0.5),
                   interpolation="bilinear" if smooth else "nearest", vmin=vmin, vmax=vmax)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    return im


def _figure(img: np.ndarray, maps: dict[str, np.ndarray], titles: dict[str, str], suptitle: str,
            out: Path, *, rates: bool) -> Path:
    from matplotlib.figure import Figure

    n = 1 + len(maps)
    fig = Figure(figsize=(3.2 * n, 3.6))
    ax = fig.add_subplot(1, n, 1)
    ax.imshow(img, interpolation="nearest")
    ax.set_title("input (as the model sees it)", fontsize=9)
    ax.axis("off")
    for i, (key, amap) in enumerate(maps.items(), start=2):
        ax = fig.add_subplot(1, n, i)
        im = _overlay(ax, img, amap, titles.get(key, key), vmin=0.0 if rates else None,
                      vmax=1.0 if rates else None, smooth=not rates)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def attention_maps(
    source: str | LoadedModel,
    image: str | os.PathLike,
    *,
    out: str | os.PathLike,
    tracking_uri: str | None = None,
    which: str = "best",
    overrides: Sequence[str] | None = None,
    use_ema: bool = False,
    device: str | None = "auto",
) -> dict[str, Any]:
    """Write the attention PNG for one image; returns ``{"kind", "maps", "png", "prediction"}``."""
    if Path(out).suffix.lower() != ".png":
        raise ConfigError(f"--out {out}: the attention map is written as PNG; give a file name ending in .png")
    pil = read_image(image)
    loaded = source if isinstance(source, LoadedModel) else load_source(
        source, tracking_uri=tracking_uri, which=which, overrides=overrides, use_ema=use_ema, device=device)
    pre = preprocessing(loaded)
    x = pre.transform(pil)[None].to(loaded.device)
    model = loaded.model.eval()
    if is_vit(model):
        amap, logits = vit_rollout(model, x)
        maps, kind = {"rollout": amap}, "vit_rollout"
        titles = {"rollout": f"attention rollout ({len(_vit_attention_modules(model))} layers)"}
        rates = False
    elif qk_attention_modules(model):
        maps, logits = qkformer_token_attention(model, x)
        kind = "qkformer_qk"
        titles = {s: f"{s}: Q-K attention spike rate ({m.shape[0]}x{m.shape[1]} tokens)" for s, m in maps.items()}
        rates = True
    else:
        raise ConfigError(f"attention maps need a ViT or a QKFormer; {loaded.name} has neither "
                          "timm attention blocks nor Q-K attention layers")
    prob = logits.float().softmax(-1)[0].cpu()
    top = int(prob.argmax())
    pred = {"class": pre.class_names[top], "index": top, "prob": float(prob[top])}
    img = pre.denormalize(x[0]).permute(1, 2, 0).numpy()
    png = _figure(img, maps, titles, f"{loaded.name}: {Path(image).name} -> {pred['class']} ({pred['prob']:.2f})",
                  Path(out), rates=rates)
    return {"kind": kind, "maps": maps, "png": str(png), "prediction": pred}
