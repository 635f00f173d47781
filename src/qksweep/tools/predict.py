"""``qksweep predict``: class names and probabilities for image files.

    from qksweep.tools.predict import predict
    rows = predict("checkpoints/best", ["cat.png", "dog.jpg"], topk=5)
    rows[0] == {"image": "cat.png", "predictions": [{"class": "cat", "index": 3, "prob": 0.91}, ...]}

Each image goes through the checkpoint's validation preprocessing (``data.eval_transform`` with
its dataset's normalisation), exactly as ``qksweep validate`` sees the validation split.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from ..data import DataError
from .source import LoadedModel, Preprocessing, load_source, preprocessing

__all__ = ["predict", "read_image", "format_predictions"]


def read_image(path: str | os.PathLike):
    """The decoded PIL image, or DataError (one line) naming the file."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise DataError(f"image '{path}' does not exist" if not p.exists() else f"image '{path}' is not a file")
    try:
        with Image.open(p) as img:
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        kind = "is not an image PIL can read" if isinstance(e, UnidentifiedImageError) else f"cannot be decoded ({type(e).__name__})"
        raise DataError(f"'{path}' {kind}: pass PNG/JPEG/... image files") from None


def prepare_batch(images: Sequence[Any], pre: Preprocessing) -> torch.Tensor:
    """PIL images (or paths) -> one preprocessed batch [N, 3, H, W]."""
    if not images:
        raise DataError("no images given: pass one or more image files")
    return torch.stack([pre.transform(read_image(i) if isinstance(i, (str, os.PathLike)) else i) for i in images])


@torch.no_grad()
def predict_tensors(loaded: LoadedModel, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Softmax probabilities [N, num_classes] for a preprocessed batch (SNN state reset per batch)."""
    model, dev = loaded.model, loaded.device
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        try:
            logits = model(x[i:i + batch_size].to(dev)).float()
        finally:
            if loaded.spiking:
                from spikingjelly.activation_based import functional

                functional.reset_net(model)
        out.append(logits.softmax(-1).cpu())
    return torch.cat(out)


def predict(
    source: str | LoadedModel,
    images: Sequence[str | os.PathLike],
    *,
    topk: int = 5,
    tracking_uri: str | None = None,
    which: str = "best",
    overrides: Sequence[str] | None = None,
    use_ema: bool = False,
    device: str | None = "auto",
) -> list[dict[str, Any]]:
    """Top-k classes per image: ``[{"image", "predictions": [{"class", "index", "prob"}]}]``."""
    if topk < 1:
        raise DataError(f"--topk must be >= 1, got {topk}")
    if not images:
        raise DataError("no images given: pass one or more image files")
    pils = [read_image(p) for p in images]  # before the model is built: a bad file is reported at once
    loaded = source if isinstance(source, LoadedModel) else load_source(
        source, tracking_uri=tracking_uri, which=which, overrides=overrides, use_ema=use_ema, device=device)
    pre = preprocessing(loaded)
    probs = predict_tensors(loaded, prepare_batch(pils, pre))
    k = min(topk, probs.shape[1])
    values, indices = probs.topk(k, dim=-1)
    rows = []
    for path, v, idx in zip(images, values.tolist(), indices.tolist()):
        rows.append({"image": str(path),
                     "predictions": [{"class": pre.class_names[i], "index": i, "prob": p} for p, i in zip(v, idx)]})
    return rows


def format_predictions(rows: list[dict[str, Any]], fmt: str = "table") -> str:
    if fmt == "json":
        return json.dumps(rows, indent=1)
    lines = []
    for r in rows:
        lines.append(r["image"])
        w = max(5, max(len(p["class"]) for p in r["predictions"]))
        for rank, p in enumerate(r["predictions"], 1):
            lines.append(f"  {rank}. {p['class']:<{w}}  {p['prob']:.4f}")
    return "\n".join(lines)
