"""ImageFolder datasets (ImageNet, ImageNet-100, Tiny ImageNet made by the split tool):

    root/train/<class>/*.JPEG
    root/val/<class>/*.JPEG        (or validation/ or valid/)
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import Subset

from .base import DataBundle, DataError, DataOptions, balanced_indices, check_num_classes, register_dataset
from .transforms import BatchNormalize, timm_eval_transform, timm_train_transform

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # == timm.data.IMAGENET_DEFAULT_MEAN
IMAGENET_STD = (0.229, 0.224, 0.225)  # == timm.data.IMAGENET_DEFAULT_STD
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
VAL_DIR_NAMES = ("val", "validation", "valid")  # first one present wins
_SHOW = 5


def is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def class_dirs(folder: Path) -> list[str]:
    """Sorted names of the (non-hidden) sub-folders of `folder`."""
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def has_image(folder: Path) -> bool:
    """True when `folder` holds an image file at any depth; stops at the first one
    found without listing the rest of the folder (cheap on ImageNet-sized trees)."""
    stack = [str(folder)]
    while stack:
        subdirs = []
        with os.scandir(stack.pop()) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                if is_image(e.name) and e.is_file():
                    return True
                if e.is_dir():
                    subdirs.append(e.path)
        stack.extend(sorted(subdirs, reverse=True))
    return False


def find_val_dir(root: Path) -> Path | None:
    for name in VAL_DIR_NAMES:
        if (root / name).is_dir():
            return root / name
    return None


def _short(names: Sequence[str]) -> str:
    head = ", ".join(names[:_SHOW])
    return head + (f" (+{len(names) - _SHOW} more)" if len(names) > _SHOW else "")


def resolve_layout(opts: DataOptions) -> tuple[Path, Path, list[str]]:
    """Validate root/train + root/<val> and return (train_dir, val_dir, classes). Raises DataError."""
    accepted = ", ".join(f"{n}/" for n in VAL_DIR_NAMES)
    if opts.root is None:
        raise DataError(
            f"data.root is required for dataset {opts.name!r}: set it to a folder with train/ and one of {accepted}"
        )
    root = Path(os.path.abspath(os.path.expanduser(opts.root)))
    if not root.is_dir():
        raise DataError(f"data.root: folder {root} does not exist; set data.root to a folder with train/ and val/")
    train_dir = root / "train"
    if not train_dir.is_dir():
        hint = (" (it looks like a flat <class>/ folder: make train/ and val/ from it with "
                f"`python -m qksweep.data.split --data_dir {root} --output_dir NEW_DIR`)"
                if class_dirs(root) else "")
        raise DataError(f"data.root: {root} has no train/ folder{hint}; expected {train_dir}/<class>/*.jpg")
    val_dir = find_val_dir(root)
    if val_dir is None:
        raise DataError(
            f"data.root: {root} has no validation folder; add one of {accepted} next to train/ "
            f"(or make one with `python -m qksweep.data.split --data_dir {root} --output_dir NEW_DIR`)"
        )
    train_classes, val_classes = class_dirs(train_dir), class_dirs(val_dir)
    if not train_classes:
        raise DataError(f"data.root: {train_dir} has no class folders; expected {train_dir}/<class>/*.jpg")
    if train_classes != val_classes:
        only_t = sorted(set(train_classes) - set(val_classes))
        only_v = sorted(set(val_classes) - set(train_classes))
        tiny = (" (this is the raw Tiny ImageNet val layout: sort val/images/* into val/<wnid>/ "
                "using val_annotations.txt)" if (val_dir / "val_annotations.txt").is_file() else "")
        raise DataError(
            f"data.root: class folders differ between {train_dir} and {val_dir}: "
            f"only in {train_dir.name}/: {_short(only_t) or '-'}; only in {val_dir.name}/: {_short(only_v) or '-'}"
            f"{tiny}; both must hold the same <class>/ folders"
        )
    for split_dir in (train_dir, val_dir):
        empty = [c for c in train_classes if not has_image(split_dir / c)]
        if empty:
            raise DataError(
                f"data.root: no images in {split_dir}/{empty[0]}"
                f"{f' and {len(empty) - 1} other class folders' if len(empty) > 1 else ''}; "
                f"every class folder needs at least one image ({' '.join(IMG_EXTENSIONS)})"
            )
    return train_dir, val_dir, train_classes


def _check(opts: DataOptions) -> None:
    _, _, classes = resolve_layout(opts)
    check_num_classes(opts, len(classes), f"{opts.root}/train")


def _eval_tf(opts: DataOptions, mean: Sequence[float], std: Sequence[float]):
    return timm_eval_transform(opts, mean, std)


def _maybe_subset(ds, n: int | None, seed: int):
    if n is None or n >= len(ds):
        return ds
    return Subset(ds, balanced_indices(np.asarray(ds.targets), n, seed).tolist())


@register_dataset(
    "imagefolder",
    check=_check,
    eval_transform=_eval_tf,
    aliases=("tiny_imagenet", "imagenet", "imagenet100"),
    description="torchvision ImageFolder: data.root/train + data.root/{val,validation,valid}",
)
def build_imagefolder(opts: DataOptions, seed: int = 0) -> DataBundle:
    """ImageFolder train/val with timm transforms (RandomResizedCrop + flip + aa +
    RandomErasing for train; Resize + CenterCrop(crop_pct 0.875) for val) and
    ImageNet mean/std.  train_size/val_size optionally cap each split to a
    class-balanced subset (split_seed).  `seed` is unused.

    Train samples are uint8 [3,H,W] (decoded, cropped, flipped, augmented: the loader workers' part);
    the bundle's ``train_batch_transform`` normalises and erases each batch where it lands, as timm's
    prefetching loader does."""
    from torchvision.datasets import ImageFolder

    train_dir, val_dir, _ = resolve_layout(opts)
    train = ImageFolder(str(train_dir), transform=timm_train_transform(opts, IMAGENET_MEAN, IMAGENET_STD, uint8=True))
    val = ImageFolder(str(val_dir), transform=timm_eval_transform(opts, IMAGENET_MEAN, IMAGENET_STD))
    return DataBundle(
        train=_maybe_subset(train, opts.train_size, opts.split_seed),
        val=_maybe_subset(val, opts.val_size, opts.split_seed),
        num_classes=len(train.classes),
        in_chans=3,
        class_names=list(train.classes),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        in_memory=False,
        train_batch_transform=BatchNormalize(IMAGENET_MEAN, IMAGENET_STD, opts.reprob, opts.remode),
    )
