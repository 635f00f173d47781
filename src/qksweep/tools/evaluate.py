"""``qksweep validate``: top-1, top-5 and loss of a checkpoint on a validation set, a per-class
accuracy table and a confusion-matrix PNG (logged to the source run when it came from MLflow).

    from qksweep.tools.evaluate import validate
    res = validate("checkpoints/best")                 # the checkpoint's own dataset, val split
    res = validate(RUN_ID, data_dir="tiny_imagenet")   # an ImageFolder of your own
    res["top1"], res["top5"], res["loss"], res["per_class"], res["confusion_png"]

The metrics are computed exactly as the training loop's validation (plain cross-entropy,
top-5 capped at the number of classes).  With ``data_dir`` the images go through the
checkpoint's own validation preprocessing (``data.eval_transform`` with its dataset's
normalisation), so a model is judged on what it was trained to see; the folder's class
folders are matched to the model's classes by name when the names agree, else in sorted order.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data import DataError
from .source import LoadedModel, load_source, preprocessing

__all__ = ["validate", "evaluate_batches", "folder_dataset", "format_report", "plot_confusion"]

VAL_DIR_NAMES = ("val", "validation", "valid")


def _reset(model: torch.nn.Module, spiking: bool) -> None:
    if spiking:
        from spikingjelly.activation_based import functional

        functional.reset_net(model)


@torch.no_grad()
def evaluate_batches(model: torch.nn.Module, batches: Iterable, num_classes: int, *,
                     spiking: bool | None = None, device: torch.device | None = None) -> dict[str, Any]:
    """Loss, top-1, top-5 and the confusion matrix (rows: true class, columns: predicted)."""
    model.eval()
    spiking = bool(getattr(model, "is_spiking", False)) if spiking is None else spiking
    device = device or next(model.parameters()).device
    k = min(5, num_classes)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    loss_sum = top1 = top5 = 0.0
    n = 0
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        try:
            out = model(x).float()
        finally:
            _reset(model, spiking)
        pred = out.topk(k, dim=-1).indices
        hit = pred.eq(y.unsqueeze(-1))
        loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
        top1 += float(hit[:, 0].sum())
        top5 += float(hit.any(-1).sum())
        n += len(y)
        confusion += torch.bincount((y * num_classes + pred[:, 0]).cpu(),
                                    minlength=num_classes * num_classes).view(num_classes, num_classes)
    if n == 0:
        raise DataError("the validation set is empty: nothing to evaluate")
    return {"loss": loss_sum / n, "top1": top1 / n, "top5": top5 / n, "n": n, "confusion": confusion.numpy()}


# ---------------------------------------------------------------------------- datasets


def _tensor_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int):
    for i in range(0, len(y), batch_size):
        yield x[i:i + batch_size], y[i:i + batch_size]


def folder_dataset(data_dir: str | os.PathLike, transform, class_names: Sequence[str]):
    """An ImageFolder of ``data_dir/{val,validation,valid}/<class>/`` (or ``data_dir/<class>/``),
    its targets remapped to the model's class indices. Returns (dataset, folder class names)."""
    from torchvision.datasets import ImageFolder

    from ..data.imagefolder import class_dirs, has_image

    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"--data-dir {root} does not exist; pass a folder with val/<class>/ images or <class>/ images")
    folder = next((root / n for n in VAL_DIR_NAMES if (root / n).is_dir()), root)
    classes = class_dirs(folder)
    if not classes:
        raise DataError(f"--data-dir {folder} has no class folders; expected {folder}/<class>/*.jpg")
    empty = [c for c in classes if not has_image(folder / c)]
    if empty:
        raise DataError(f"--data-dir: no images in {folder / empty[0]}; every class folder needs at least one image")
    n_model = len(class_names)
    if set(classes) <= set(class_names):
        mapping = {c: list(class_names).index(c) for c in classes}  # matched by name
    elif len(classes) == n_model:
        mapping = {c: i for i, c in enumerate(classes)}  # sorted order, like training on an ImageFolder
    else:
        raise DataError(
            f"--data-dir {folder} has {len(classes)} class folders but the model has {n_model} classes "
            f"and the folder names are not among its class names ({', '.join(list(class_names)[:5])}...)"
        )
    ds = ImageFolder(str(folder), transform=transform)
    ds.target_transform = _Remap([mapping[c] for c in ds.classes])
    return ds, classes


class _Remap:
    """Folder class index -> model class index (a class, not a lambda: DataLoader workers pickle it)."""

    def __init__(self, table: list[int]):
        self.table = table

    def __call__(self, t: int) -> int:
        return self.table[t]


def _loader(ds, batch_size: int, num_workers: int, device: torch.device):
    from torch.utils.data import DataLoader

    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=device.type == "cuda")


# ---------------------------------------------------------------------------- report


def per_class(confusion: np.ndarray, names: Sequence[str]) -> dict[str, dict[str, float]]:
    support = confusion.sum(1)
    correct = np.diag(confusion)
    out = {}
    for i, name in enumerate(names):
        if support[i]:
            out[name] = {"acc": float(correct[i] / support[i]), "n": int(support[i])}
    return out


def format_report(res: dict[str, Any], max_rows: int = 100) -> str:
    lines = [f"{res['source']}  ({res['model']}, {res['n']} images from {res['dataset']})",
             f"top1 {res['top1']:.4f}  top5 {res['top5']:.4f}  loss {res['loss']:.4f}", ""]
    rows = list(res["per_class"].items())
    w = max([5] + [len(n) for n, _ in rows])
    if len(rows) > max_rows:
        rows.sort(key=lambda r: r[1]["acc"])
        half = max_rows // 2
        lines.append(f"per-class accuracy: the {half} worst and {half} best of {len(rows)} classes "
                     "(all in validate.json)")
        rows = rows[:half] + [("...", None)] + rows[-half:]
    else:
        lines.append("per-class accuracy")
    lines.append(f"{'class':<{w}}  {'acc':>6}  {'n':>6}")
    lines.append("-" * (w + 16))
    for name, r in rows:
        lines.append(f"{name:<{w}}" if r is None else f"{name:<{w}}  {r['acc']:>6.3f}  {r['n']:>6d}")
    return "\n".join(lines)


def plot_confusion(confusion: np.ndarray, names: Sequence[str], path: str | os.PathLike, title: str = "") -> Path:
    """Row-normalised confusion matrix (true class down, predicted across) as a PNG (Agg, no pyplot)."""
    from matplotlib.figure import Figure

    n = len(names)
    rows = confusion.sum(1, keepdims=True).astype(np.float64)
    norm = np.divide(confusion, rows, out=np.zeros_like(confusion, dtype=np.float64), where=rows > 0)
    size = min(4 + 0.35 * n, 24)
    fig = Figure(figsize=(size + 1.2, size))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if n <= 40:
        ax.set_xticks(range(n), labels=list(names), rotation=90, fontsize=8)
        ax.set_yticks(range(n), labels=list(names), fontsize=8)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if confusion[i, j]:
                    ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def _safe(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


# ---------------------------------------------------------------------------- entry point


def validate(
    source: str | LoadedModel,
    *,
    data_dir: str | os.PathLike | None = None,
    overrides: Sequence[str] | None = None,
    tracking_uri: str | None = None,
    out_dir: str | os.PathLike | None = None,
    which: str = "best",
    use_ema: bool = False,
    device: str | None = "auto",
    batch_size: int | None = None,
    log_to_run: bool = True,
) -> dict[str, Any]:
    """Evaluate SOURCE (checkpoint path, run id or a :class:`LoadedModel`) on the validation split
    of its dataset, or on ``data_dir``.  Writes ``confusion_matrix.png`` and ``validate.json`` to
    ``out_dir`` (default ``./validate_<model>/``) and, for a run id, logs both to the run under
    ``validate/``.  Returns ``{top1, top5, loss, n, per_class: {class: {acc, n}}, confusion
    (list of lists), confusion_png, json, artifact_logged, run_id, model, dataset, source}``."""
    loaded = source if isinstance(source, LoadedModel) else load_source(
        source, tracking_uri=tracking_uri, which=which, overrides=overrides, use_ema=use_ema, device=device)
    cfg, dev = loaded.cfg, loaded.device
    bs = batch_size or cfg.data.eval_batch_size or cfg.data.batch_size * 2

    if data_dir is not None:
        pre = preprocessing(loaded)
        ds, _ = folder_dataset(data_dir, pre.transform, pre.class_names)
        batches, names, dataset = _loader(ds, bs, cfg.loader_workers(False), dev), pre.class_names, str(data_dir)
    else:
        from ..data import build_data

        bundle = build_data(cfg.data)
        if bundle.num_classes != loaded.num_classes:
            raise DataError(f"data.name={cfg.data.name} has {bundle.num_classes} classes but the checkpoint's "
                            f"model has {loaded.num_classes}; pass --data-dir or -s data.* to match")
        if bundle.in_memory:
            vx, vy = bundle.val.tensors
            batches = _tensor_batches(vx, vy, bs)
        else:
            batches = _loader(bundle.val, bs, cfg.loader_workers(False), dev)
        names, dataset = bundle.class_names, f"{cfg.data.name} val"

    m = evaluate_batches(loaded.model, batches, loaded.num_classes, spiking=loaded.spiking, device=dev)
    res: dict[str, Any] = {
        "top1": m["top1"], "top5": m["top5"], "loss": m["loss"], "n": m["n"],
        "per_class": per_class(m["confusion"], names), "confusion": m["confusion"].tolist(),
        "class_names": list(names), "model": loaded.name, "dataset": dataset,
        "source": loaded.label, "run_id": loaded.run_id, "ema": use_ema,
    }
    out = Path(out_dir) if out_dir is not None else Path(f"validate_{_safe(loaded.name)}")
    png = plot_confusion(m["confusion"], names, out / "confusion_matrix.png",
                         title=f"{loaded.name} on {dataset}: top1 {m['top1']:.3f}")
    js = out / "validate.json"
    js.write_text(json.dumps({k: v for k, v in res.items()}, indent=1))
    res["confusion_png"], res["json"] = str(png), str(js)
    res["artifact_logged"] = False
    if loaded.run_id and log_to_run:
        from ..tracking.runs import log_artifact_file

        for f in (png, js):
            log_artifact_file(loaded.tracking_uri, loaded.run_id, f, "validate")
        res["artifact_logged"] = True
    return res
