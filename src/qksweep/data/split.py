"""Make an ImageFolder train/val split (the seeds' split_dataset.py).

Input, either layout:

    data_dir/<class>/*.jpg              (flat ImageFolder)
    data_dir/train/<class>/*.jpg        (only train/ is read; any val/ is ignored)

Output (never inside or around the source; the source is never modified):

    output_dir/train/<class>/<file>     symlinks (absolute) by default, copies with copy=True
    output_dir/val/<class>/<file>
    output_dir/split_info.json          parameters and counts

Per class the sorted file list is shuffled with a RNG seeded by (seed, class),
so a split is reproducible and a class's split does not depend on the others.
`subset_size`/`val_size` take a class-balanced subset (Tiny ImageNet style:
`subset_size` train images and `val_size` val images in total, spread evenly
over the classes); `num_classes` first picks that many classes (seeded).

    python -m qksweep.data.split --data_dir ./data --output_dir ./mini_data \\
        --subset_size 100000 --val_size 10000
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from .base import DataError
from .imagefolder import is_image

INFO_FILE = "split_info.json"


# --------------------------------------------------------------------------- pure planning


def source_root(data_dir: Path) -> Path:
    """data_dir/train when it exists, else data_dir (flat layout)."""
    return data_dir / "train" if (data_dir / "train").is_dir() else data_dir


def scan_classes(src: Path) -> dict[str, list[str]]:
    """{class: sorted image paths relative to src/<class>} for every non-hidden sub-folder of `src`
    (images at any depth, e.g. Tiny ImageNet's <class>/images/*.JPEG)."""
    out: dict[str, list[str]] = {}
    for cls in sorted(e.name for e in os.scandir(src) if e.is_dir() and not e.name.startswith(".")):
        base = src / cls
        files = []
        for dirpath, dirs, names in os.walk(base, followlinks=True):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            rel = os.path.relpath(dirpath, base)
            files += [n if rel == "." else f"{rel}/{n}".replace(os.sep, "/") for n in names if is_image(n)]
        out[cls] = sorted(files)
    return out


def quotas(total: int, classes: Sequence[str]) -> dict[str, int]:
    """Spread `total` over `classes` as evenly as possible (earlier classes get the remainder)."""
    base, extra = divmod(total, len(classes))
    return {c: base + (i < extra) for i, c in enumerate(classes)}


def plan_split(
    files: Mapping[str, Sequence[str]],
    *,
    val_ratio: float = 0.2,
    seed: int = 42,
    subset_size: int | None = None,
    val_size: int | None = None,
    num_classes: int | None = None,
) -> dict[str, tuple[list[str], list[str]]]:
    """{class: (train_files, val_files)} -- deterministic for its arguments.

    * neither size: per class round(n * val_ratio) files (at least 1, at most n-1) go to val.
    * `val_size` only: val_size files spread evenly over classes; the rest is train.
    * `subset_size`: subset_size train files spread evenly; val gets `val_size`
      (default round(subset_size * val_ratio / (1 - val_ratio)), so val is
      val_ratio of the subset) spread evenly.
    """
    if not 0.0 < val_ratio < 1.0:
        raise DataError(f"val_ratio must be strictly between 0 and 1, got {val_ratio}")
    classes = sorted(c for c, f in files.items() if f)
    if not classes:
        raise DataError(
            "no images found: expected <class>/*.jpg folders (extensions: jpg jpeg png ppm bmp pgm tif tiff webp)"
        )
    if num_classes is not None:
        if not 1 <= num_classes <= len(classes):
            raise DataError(
                f"num_classes must be between 1 and {len(classes)} (classes with images), got {num_classes}"
            )
        classes = sorted(random.Random(f"{seed}:classes").sample(classes, num_classes))
    if subset_size is not None and val_size is None:
        val_size = max(len(classes), round(subset_size * val_ratio / (1.0 - val_ratio)))
    for key, size in (("subset_size", subset_size), ("val_size", val_size)):
        if size is not None and size < len(classes):
            raise DataError(
                f"{key}={size} is smaller than the {len(classes)} classes; every class needs an image "
                "(raise it or pass num_classes)"
            )
    train_q = quotas(subset_size, classes) if subset_size is not None else None
    val_q = quotas(val_size, classes) if val_size is not None else None

    plan: dict[str, tuple[list[str], list[str]]] = {}
    for cls in classes:
        shuffled = list(files[cls])
        random.Random(f"{seed}:{cls}").shuffle(shuffled)
        n = len(shuffled)
        n_val = val_q[cls] if val_q else min(n - 1, max(1, round(n * val_ratio)))
        n_train = train_q[cls] if train_q else n - n_val
        if n < 2 or n_val + n_train > n:
            raise DataError(
                f"class {cls!r} has {n} images but the split needs {max(2, n_val + n_train)} "
                f"({n_train} train + {n_val} val); lower subset_size/val_size or drop the class"
            )
        plan[cls] = (sorted(shuffled[n_val:n_val + n_train]), sorted(shuffled[:n_val]))
    return plan


def _dest_name(rel: str) -> str:
    return rel.replace("/", "_")


def _check_paths(src: Path, out: Path) -> None:
    s, o = src.resolve(), out.resolve()
    if s == o or s in o.parents or o in s.parents:
        raise DataError(f"output_dir {out} overlaps the source {src}; choose a folder outside it")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"output_dir {out} exists and is not empty; remove it or choose a new folder")


# --------------------------------------------------------------------------- side effects


def _materialize(plan, src: Path, out: Path, copy: bool) -> None:
    for cls, parts in plan.items():
        for split, rels in zip(("train", "val"), parts):
            names = [_dest_name(r) for r in rels]
            if len(set(names)) != len(names):
                raise DataError(f"class {cls!r}: nested files flatten to the same name in {split}/; rename them")
            dest = out / split / cls
            dest.mkdir(parents=True, exist_ok=True)
            for rel, name in zip(rels, names):
                target = os.path.abspath(src / cls / rel)
                if copy:
                    shutil.copy2(target, dest / name)
                else:
                    os.symlink(target, dest / name)


def split_dataset(
    data_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    val_ratio: float = 0.2,
    seed: int = 42,
    subset_size: int | None = None,
    val_size: int | None = None,
    num_classes: int | None = None,
    copy: bool = False,
) -> dict:
    """Write output_dir/{train,val}/<class>/ from data_dir (see module doc) and
    return the counts: {"classes", "train", "val", "per_class": {cls: {"train", "val"}},
    "skipped_empty" (class folders without images), "source", "output_dir", "mode"}.
    Raises DataError without touching anything when the source is missing or
    empty, or output_dir is non-empty or overlaps the source.

    The output is assembled in a hidden sibling folder and renamed into place,
    so a failure never leaves a half-written output_dir."""
    data_dir, out = Path(data_dir).expanduser(), Path(output_dir).expanduser()
    if not data_dir.is_dir():
        raise DataError(f"data_dir {data_dir} does not exist; point it at <class>/ folders or a train/ folder")
    src = source_root(data_dir)
    _check_paths(data_dir, out)
    files = scan_classes(src)
    plan = plan_split(
        files, val_ratio=val_ratio, seed=seed,
        subset_size=subset_size, val_size=val_size, num_classes=num_classes,
    )
    per_class = {c: {"train": len(t), "val": len(v)} for c, (t, v) in plan.items()}
    result = {
        "classes": len(plan),
        "train": sum(p["train"] for p in per_class.values()),
        "val": sum(p["val"] for p in per_class.values()),
        "per_class": per_class,
        "skipped_empty": sorted(c for c, f in files.items() if not f),
        "source": str(src.resolve()),
        "output_dir": str(out.resolve()),
        "mode": "copy" if copy else "symlink",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        _materialize(plan, src, tmp, copy)
        params = {"val_ratio": val_ratio, "seed": seed, "subset_size": subset_size,
                  "val_size": val_size, "num_classes": num_classes, "copy": copy}
        (tmp / INFO_FILE).write_text(json.dumps({"params": params, **result}, indent=1, sort_keys=True))
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m qksweep.data.split",
        description="Split an ImageFolder (flat <class>/ or train/<class>/) into output_dir/{train,val}/<class>/.",
    )
    p.add_argument("--data_dir", "--data-dir", required=True, help="flat <class>/ folder or a folder with train/")
    p.add_argument("--output_dir", "--output-dir", required=True, help="new (or empty) folder for train/ and val/")
    p.add_argument("--val_ratio", "--val-ratio", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--subset_size", "--subset-size", type=int, default=None, help="total train images (class-balanced)")
    p.add_argument("--val_size", "--val-size", type=int, default=None, help="total val images (class-balanced)")
    p.add_argument("--num_classes", "--num-classes", type=int, default=None, help="keep this many classes (seeded)")
    p.add_argument("--copy", action="store_true", help="copy files instead of symlinking them")
    a = p.parse_args(argv)
    try:
        r = split_dataset(
            a.data_dir, a.output_dir, val_ratio=a.val_ratio, seed=a.seed, subset_size=a.subset_size,
            val_size=a.val_size, num_classes=a.num_classes, copy=a.copy,
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{r['mode']}: {r['classes']} classes, {r['train']} train + {r['val']} val images -> {r['output_dir']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
