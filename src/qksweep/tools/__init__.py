"""Offline tools over a trained model (a checkpoint path or an MLflow run id):

    load_source(source, tracking_uri=None, which="best") -> LoadedModel     (tools.source)
    validate(source, data_dir=None, out_dir=None, ...)   -> dict            (tools.evaluate)
    predict(source, images, topk=5, ...)                 -> list[dict]      (tools.predict)
    attention_maps(source, image, out="x.png", ...)      -> dict            (tools.attention)
    spectrum(source, topk=8, targets=None, ...)          -> (report, paths)

The CLI (``qksweep validate / predict / attention / spectrum / split-dataset``) lives in
:mod:`qksweep.cli_tools`.  Submodules are imported lazily: ``import qksweep.tools`` is cheap.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Sequence

__all__ = ["LoadedModel", "load_source", "validate", "predict", "attention_maps", "spectrum"]

_LAZY = {
    "LoadedModel": "source",
    "load_source": "source",
    "preprocessing": "source",
    "validate": "evaluate",
    "predict": "predict",
    "attention_maps": "attention",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


DTYPES = ("float32", "float64")


def spectrum(
    source: Any,
    *,
    topk: int = 8,
    targets: Sequence[str] | str | None = None,
    split_qkv: bool = False,
    save_vectors: bool = False,
    fmt: str = "json",
    save_dir: str | Path = ".",
    full: bool = False,
    dtype: str = "float32",
    svd_on_cpu: bool = True,
    pretrained: bool = False,
    tracking_uri: str | None = None,
    which: str = "best",
    use_ema: bool = False,
    device: str | None = "cpu",
) -> tuple[dict[str, Any], list[Path]]:
    """Offline weight spectra (seed 001's ``analyze_spectrum.py``) of SOURCE: a checkpoint, a run
    id, or a timm model name with ``pretrained=True``.  ``targets`` defaults to the model's
    :func:`qksweep.models.default_spectral_targets` (every matrix when that list is empty).
    Writes ``<model>_spectral.json`` (and, with ``save_vectors``, the singular vectors as
    ``fmt`` npz/pt) into ``save_dir``; returns (report, written paths)."""
    import torch

    from ..config import ConfigError
    from ..models import default_spectral_targets
    from ..spectral import analyze_model, write_report
    from .source import LoadedModel, load_source

    if topk < 1:
        raise ConfigError(f"--topk must be >= 1, got {topk}")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if fmt not in ("json", "npz", "pt"):
        raise ConfigError(f"--format must be json, npz or pt, got {fmt!r}")
    loaded = source if isinstance(source, LoadedModel) else load_source(
        source, tracking_uri=tracking_uri, which=which, pretrained=pretrained, use_ema=use_ema, device=device)
    if targets is None:
        targets = default_spectral_targets(loaded.name) or None
    elif isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
        if not targets:
            raise ConfigError("--targets is empty: give comma-separated module-name patterns, e.g. attn.qkv,mlp.fc1")
    report = analyze_model(loaded.model, targets=targets, topk=topk, split_qkv=split_qkv, full=full,
                           dtype=getattr(torch, dtype), svd_on_cpu=svd_on_cpu, save_vectors=save_vectors)
    if not report["layers"]:
        raise ConfigError(f"--targets {','.join(targets or [])} selects no weight matrix of {loaded.name}")
    report["meta"].update({"model": loaded.name, "source": loaded.label, "run_id": loaded.run_id,
                           "epoch": loaded.state.get("epoch"), "ema": use_ema})
    paths = write_report(report, None, save_dir, loaded.name, fmt)
    return report, paths
