"""CIFAR-10/100 from torchvision's on-disk format under `root` (default ./data)."""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Subset

from .base import DataBundle, DataError, DataOptions, balanced_indices, check_num_classes, register_dataset
from .transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    cifar_train_transform,
    timm_eval_transform,
)

DEFAULT_ROOT = "./data"


@dataclass(frozen=True)
class CifarInfo:
    name: str
    folder: str  # torchvision's base_folder
    files: tuple[str, ...]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def dataset_cls(self):
        from torchvision import datasets

        return datasets.CIFAR10 if self.name == "cifar10" else datasets.CIFAR100


CIFAR = {
    "cifar10": CifarInfo(
        "cifar10", "cifar-10-batches-py",
        ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch", "batches.meta"),
        10, CIFAR10_MEAN, CIFAR10_STD,
    ),
    "cifar100": CifarInfo(
        "cifar100", "cifar-100-python", ("train", "test", "meta"), 100, CIFAR100_MEAN, CIFAR100_STD,
    ),
}


def cifar_root(opts: DataOptions) -> Path:
    return Path(os.path.abspath(os.path.expanduser(opts.root or DEFAULT_ROOT)))


def _missing_files(info: CifarInfo, root: Path) -> list[str]:
    folder = root / info.folder
    return [f for f in info.files if not (folder / f).is_file()]


def _not_found(info: CifarInfo, root: Path, missing: Sequence[str]) -> DataError:
    folder = root / info.folder
    what = f"{folder} is missing" if not folder.is_dir() else f"{folder} lacks {', '.join(missing)}"
    return DataError(
        f"{info.name} not found: {what}; set data.download: true or data.root "
        f"to the folder that contains {info.folder}/"
    )


def _check(info: CifarInfo):
    def check(opts: DataOptions) -> None:
        check_num_classes(opts, info.num_classes, info.name)
        if not opts.download:
            root = cifar_root(opts)
            missing = _missing_files(info, root)
            if missing:
                raise _not_found(info, root, missing)

    return check


def _eval_tf(info: CifarInfo):
    def eval_tf(opts: DataOptions, mean: Sequence[float], std: Sequence[float]):
        return timm_eval_transform(opts, mean, std, crop_pct=1.0)  # full image, no border loss

    return eval_tf


def _load(info: CifarInfo, opts: DataOptions, *, train: bool, transform=None, download: bool | None = None):
    root = cifar_root(opts)
    try:
        return info.dataset_cls()(
            str(root), train=train, transform=transform,
            download=opts.download if download is None else download,
        )
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted ..."
        raise DataError(
            f"{info.name} at {root / info.folder} is incomplete or corrupted ({e}); "
            "set data.download: true to (re)download it or point data.root elsewhere"
        ) from None
    except OSError as e:  # download failed: no network, unwritable root, ...
        raise DataError(
            f"{info.name}: could not download to {root} ({type(e).__name__}: {e}); "
            f"put {info.folder}/ under data.root by hand and set data.download: false"
        ) from None


def _prepare(info: CifarInfo):
    def prepare(opts: DataOptions) -> None:
        if opts.download:
            for train in (True, False):
                _load(info, opts, train=train)

    return prepare


def _maybe_subset(ds, n: int | None, seed: int):
    if n is None or n >= len(ds):
        return ds
    return Subset(ds, balanced_indices(np.asarray(ds.targets), n, seed).tolist())


def _builder(info: CifarInfo):
    def build(opts: DataOptions, seed: int = 0) -> DataBundle:
        train = _load(info, opts, train=True, transform=cifar_train_transform(opts, info.mean, info.std))
        val = _load(info, opts, train=False, transform=timm_eval_transform(opts, info.mean, info.std, crop_pct=1.0))
        return DataBundle(
            train=_maybe_subset(train, opts.train_size, opts.split_seed),
            val=_maybe_subset(val, opts.val_size, opts.split_seed),
            num_classes=info.num_classes,
            in_chans=3,
            class_names=list(train.classes),
            mean=info.mean,
            std=info.std,
            in_memory=False,
        )

    build.__name__ = f"build_{info.name}"
    build.__doc__ = (
        f"torchvision {info.name.upper()} under data.root/{info.folder} (root default ./data), "
        "downloaded only when data.download is true; val is the official test split. "
        "train_size/val_size optionally cap each split to a class-balanced subset (split_seed)."
    )
    return build


for _info in CIFAR.values():
    register_dataset(
        _info.name,
        check=_check(_info),
        eval_transform=_eval_tf(_info),
        prepare=_prepare(_info),
        aliases=(f"torch/{_info.name}",),
        description=f"torchvision {_info.name.upper()} ({_info.num_classes} classes) under data.root",
    )(_builder(_info))
