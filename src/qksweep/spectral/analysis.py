"""Offline spectral analysis of a model's weight matrices (the seed's ``analyze_spectrum.py``).

Example::

    model = timm.create_model("vit_base_patch16_224", pretrained=True)
    report = analyze_model(model, targets=["attn.qkv", "mlp.fc1"], topk=8, save_vectors=True)
    print(summarize(report))
    write_report(report, None, "out", "vit_base_patch16_224", fmt="npz")
    # -> out/vit_base_patch16_224_spectral.json, out/vit_base_patch16_224_spectral_vectors.npz
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .common import layer_type, parse_targets, select_matrices, unwrap_model

__all__ = ["analyze_model", "summarize", "write_report", "load_vectors", "effective_rank", "stable_rank"]

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def effective_rank(s: torch.Tensor) -> float:
    """Entropy effective rank (Roy & Vetterli 2007): ``exp(H(p))`` with ``p = s / sum(s)``."""
    s = s.double().clamp_min(0)
    tot = s.sum()
    if not torch.isfinite(tot) or tot <= 0:
        return float("nan") if not torch.isfinite(tot) else 0.0
    p = s / tot
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def stable_rank(s: torch.Tensor) -> float:
    """``||W||_F^2 / ||W||_2^2 = sum(s^2) / s_max^2`` (0 for a zero matrix)."""
    s = s.double()
    smax = s.max() if s.numel() else torch.tensor(0.0, dtype=torch.float64)
    if not torch.isfinite(smax):
        return float("nan")
    if smax <= 0:
        return 0.0
    return float((s * s).sum() / (smax * smax))


@torch.no_grad()
def analyze_model(
    model: nn.Module,
    *,
    targets: Sequence[str] | str | None = None,
    topk: int = 8,
    split_qkv: bool = False,
    full: bool = False,
    dtype: torch.dtype = torch.float32,
    svd_on_cpu: bool = True,
    save_vectors: bool = False,
) -> dict[str, Any]:
    """SVD every selected matrix (see :mod:`qksweep.spectral.common` for the selection rules).

    Returns ``{"meta": {...}, "layers": {name: {...}}}`` plus ``"vectors"`` when
    ``save_vectors``. Per layer (``s_1 >= ... >= s_r``, ``k = min(topk, r)``):
    ``shape`` [out, in], ``type`` (:func:`layer_type`), ``sv_topk`` = ``s_1..s_k``,
    ``sv_lastk`` = ``s_{r-k+1}..s_r`` (descending), ``sigma_max``, ``sigma_min``,
    ``rank_eff`` (entropy effective rank), ``stable_rank``, ``fro_norm`` and, if
    ``full``, ``spectrum`` (all ``r`` values). ``vectors[name]`` holds CPU tensors
    ``U_top [out,k]``, ``V_top [in,k]``, ``U_last``, ``V_last`` (columns in descending
    singular order), or with ``full`` the thin ``U [out,r]``, ``S [r]``, ``V [in,r]``.
    ``targets=None`` analyses every matrix module.
    """
    if topk < 1:
        raise ValueError("topk must be >= 1")
    t0 = time.perf_counter()
    model = unwrap_model(model)
    pats = parse_targets(targets)
    entries = select_matrices(model, pats, split_qkv=split_qkv)
    layers: "OrderedDict[str, dict[str, Any]]" = OrderedDict()
    vectors: "OrderedDict[str, dict[str, torch.Tensor]]" = OrderedDict()
    for e in entries:
        W = e.matrix()
        W = W.to(device=torch.device("cpu") if svd_on_cpu else W.device, dtype=dtype)
        S, U, V = _svd_of(W, save_vectors)
        layers[e.key] = _layer_info(e, list(W.shape), S, topk, full)
        if save_vectors:
            vectors[e.key] = _layer_vectors(U, S, V, topk, full)
    report: dict[str, Any] = {
        "meta": {
            "model_class": type(model).__name__,
            "num_layers": len(layers),
            "topk": topk,
            "dtype": str(dtype).replace("torch.", ""),
            "targets": pats,
            "split_qkv": split_qkv,
            "full": full,
            "svd_on_cpu": svd_on_cpu,
            "time_s": time.perf_counter() - t0,
            "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "torch_version": torch.__version__,
        },
        "layers": dict(layers),
    }
    if save_vectors:
        report["vectors"] = dict(vectors)
    return report


def _svd_of(W: torch.Tensor, vectors: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(singular values on the CPU, U, V); a matrix with non-finite entries gets NaN singular values."""
    finite = bool(torch.isfinite(W).all())
    if not finite:
        W = torch.nan_to_num(W, nan=0.0, posinf=0.0, neginf=0.0)
    U = V = None
    if vectors:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        V = Vh.mT
    else:
        S = torch.linalg.svdvals(W)
    S = S.cpu()
    if not finite:
        S = torch.full_like(S, float("nan"))
    return S, U, V


def _layer_info(e, shape: list[int], S: torch.Tensor, topk: int, full: bool) -> dict[str, Any]:
    r = S.numel()
    k = min(topk, r)
    info: dict[str, Any] = {
        "shape": shape,
        "type": layer_type(e.key),
        "pattern": e.pattern,
        "sv_topk": S[:k].tolist(),
        "sv_lastk": S[r - k :].tolist(),
        "sigma_max": float(S[0]),
        "sigma_min": float(S[-1]),
        "rank_eff": effective_rank(S),
        "stable_rank": stable_rank(S),
        "fro_norm": float(torch.linalg.vector_norm(S.double())),
    }
    if full:
        info["spectrum"] = S.tolist()
    return info


def _layer_vectors(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, topk: int, full: bool) -> dict[str, torch.Tensor]:
    if full:
        return {"U": U.cpu().contiguous(), "S": S.clone(), "V": V.cpu().contiguous()}
    r = S.numel()
    k = min(topk, r)
    return {
        "U_top": U[:, :k].cpu().contiguous(),
        "V_top": V[:, :k].cpu().contiguous(),
        "U_last": U[:, r - k :].cpu().contiguous(),
        "V_last": V[:, r - k :].cpu().contiguous(),
    }


def _aggregate(layers: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for name, info in layers.items():
        groups.setdefault(info.get("type") or layer_type(name), []).append(info)
    agg: dict[str, dict[str, float]] = {}
    for typ, infos in groups.items():
        sm = [i["sigma_max"] for i in infos]
        agg[typ] = {
            "count": len(infos),
            "sigma_max_mean": float(np.mean(sm)),
            "sigma_max_min": float(np.min(sm)),
            "sigma_max_max": float(np.max(sm)),
            "stable_rank_mean": float(np.mean([i["stable_rank"] for i in infos])),
            "rank_eff_mean": float(np.mean([i["rank_eff"] for i in infos])),
        }
    return agg


def summarize(report: dict[str, Any]) -> str:
    """Human-readable per-layer table plus an aggregate by layer type."""
    layers = report.get("layers", {})
    meta = report.get("meta", {})
    lines = [
        f"{meta.get('model_class', 'model')}: {len(layers)} matrices, topk={meta.get('topk')}, "
        f"dtype={meta.get('dtype')}"
    ]
    if not layers:
        return "\n".join(lines + ["(no matrix modules selected)"])
    w = max(24, max(len(n) for n in layers))
    hdr = f"{'layer':<{w}}  {'shape':>11}  {'sigma_max':>10}  {'sigma_min':>10}  {'stable_rk':>9}  {'eff_rank':>8}"
    lines += ["", hdr, "-" * len(hdr)]
    for name, i in layers.items():
        shape = "x".join(str(d) for d in i["shape"])
        lines.append(
            f"{name:<{w}}  {shape:>11}  {i['sigma_max']:>10.4g}  {i['sigma_min']:>10.4g}  "
            f"{i['stable_rank']:>9.3f}  {i['rank_eff']:>8.2f}"
        )
    agg = _aggregate(layers)
    tw = max(16, max(len(t) for t in agg))
    hdr2 = (
        f"{'type':<{tw}}  {'n':>3}  {'sigma_max mean':>14}  {'min':>9}  {'max':>9}  "
        f"{'stable_rk mean':>14}  {'eff_rank mean':>13}"
    )
    lines += ["", "aggregate by layer type", hdr2, "-" * len(hdr2)]
    for typ, a in agg.items():
        lines.append(
            f"{typ:<{tw}}  {a['count']:>3d}  {a['sigma_max_mean']:>14.4g}  {a['sigma_max_min']:>9.4g}  "
            f"{a['sigma_max_max']:>9.4g}  {a['stable_rank_mean']:>14.3f}  {a['rank_eff_mean']:>13.2f}"
        )
    return "\n".join(lines)


def write_report(
    report: dict[str, Any],
    vectors: dict[str, dict[str, Any]] | None = None,
    save_dir: str | Path = ".",
    model_name: str = "model",
    fmt: str = "json",
) -> list[Path]:
    """Write ``<model_name>_spectral.json`` and, with vectors, ``<model_name>_spectral_vectors.{npz,pt}``.

    ``vectors`` defaults to ``report.get("vectors")``. The JSON has ``meta``,
    ``layers`` and ``aggregate`` (by layer type) and never the vectors. ``fmt``
    chooses the vector file format: ``"npz"`` (keys ``"<layer>/<U_top|V_top|...>"``),
    ``"pt"`` (``torch.save`` of ``{layer: {name: tensor}}``); ``"json"`` means
    "no particular vector format" and falls back to npz when vectors exist.
    ``model_name`` is sanitised for the file system (``/``, ``:`` -> ``_``).
    """
    if fmt not in ("json", "npz", "pt"):
        raise ValueError(f"fmt must be 'json', 'npz' or 'pt', got {fmt!r}")
    if vectors is None:
        vectors = report.get("vectors")
    out = Path(save_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = _SAFE.sub("_", model_name).strip("_") or "model"
    payload = {k: v for k, v in report.items() if k != "vectors"}
    payload["aggregate"] = _aggregate(report.get("layers", {}))
    jp = out / f"{stem}_spectral.json"
    jp.write_text(json.dumps(payload, indent=2, allow_nan=True))
    paths = [jp]
    if vectors:
        if fmt == "pt":
            vp = out / f"{stem}_spectral_vectors.pt"
            torch.save({n: {k: torch.as_tensor(t) for k, t in d.items()} for n, d in vectors.items()}, vp)
        else:
            vp = out / f"{stem}_spectral_vectors.npz"
            arrays = {
                f"{n}/{k}": (t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t))
                for n, d in vectors.items()
                for k, t in d.items()
            }
            np.savez(vp, **arrays)
        paths.append(vp)
    return paths


def load_vectors(path: str | Path) -> dict[str, dict[str, np.ndarray | torch.Tensor]]:
    """Read a vector file written by :func:`write_report` back into ``{layer: {name: array}}``."""
    path = Path(path)
    if path.suffix == ".pt":
        return torch.load(path, map_location="cpu", weights_only=True)
    out: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path) as z:
        for key in z.files:
            layer, _, name = key.rpartition("/")
            out.setdefault(layer, {})[name] = z[key]
    return out
