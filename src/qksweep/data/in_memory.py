"""In-memory datasets that need no disk and no network: `digits` and `synthetic`.

Both are preprocessed once up front (resize, 3 channels, normalization with the
train-set statistics) and held as TensorDatasets; no per-sample augmentation.
Their data and splits depend only on `split_seed` (default 0), never on the
trial seed, so every trial of a sweep trains and validates on the same images.
"""
from __future__ import annotations

from collections.abc import Sequence
import gzip
import importlib.util
import os
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .base import DataBundle, DataError, DataOptions, balanced_indices, check_num_classes, register_dataset
from .transforms import InMemoryEvalTransform, resize_batch, tensor_mode

DIGITS_CLASSES = 10
DIGITS_SIZE = 1797
SYNTHETIC_DEFAULTS = {"num_classes": 10, "train_size": 512, "val_size": 128}
SYNTHETIC_TEMPLATE_RES = 8
SYNTHETIC_NOISE = 0.25


def normalize_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) std of a batch [N,C,H,W]."""
    return x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3), correction=0).clamp_min(1e-6)


def _normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def _cap(x: torch.Tensor, y: torch.Tensor, n: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if n is None or n >= len(y):
        return x, y
    idx = torch.from_numpy(balanced_indices(y.numpy(), n, seed))
    return x[idx], y[idx]


# --------------------------------------------------------------------------- digits


def _digits_csv() -> str | None:
    """Path of scikit-learn's bundled digits.csv.gz, found without importing
    sklearn (importing it costs ~1 s; reading the file ~20 ms)."""
    spec = importlib.util.find_spec("sklearn")
    for base in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(base, "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            return path
    return None


@lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (images [1797,8,8] float32 in [0,1], target [1797] int64)."""
    path = _digits_csv()
    if path is not None:
        with gzip.open(path, "rt") as f:
            data = np.loadtxt(f, delimiter=",")
        flat, target = data[:, :-1], data[:, -1]
    else:  # layout of the installed sklearn differs: use the public loader
        from sklearn.datasets import load_digits

        d = load_digits()
        flat, target = d.data, d.target
    images = (flat.reshape(-1, 8, 8) / 16.0).astype(np.float32)
    target = target.astype(np.int64)
    images.setflags(write=False)
    target.setflags(write=False)
    return images, target


def stratified_split(y: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train_idx, val_idx): each class's indices are shuffled with `seed` and
    round(n_c * val_fraction) of them (at least 1, at most n_c - 1) go to val."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = min(len(idx) - 1, max(1, int(round(len(idx) * val_fraction))))
        val.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def digits_split(val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The fixed stratified (train_idx, val_idx) of the 1,797 digits."""
    return stratified_split(_digits_raw()[1], val_fraction, seed)


def _check_digits(opts: DataOptions) -> None:
    check_num_classes(opts, DIGITS_CLASSES, "digits")


def _eval_gray(opts: DataOptions, mean: Sequence[float], std: Sequence[float]) -> InMemoryEvalTransform:
    return InMemoryEvalTransform(opts.img_size, mean, std, gray=True, mode=tensor_mode(opts.interpolation))


def _eval_rgb(opts: DataOptions, mean: Sequence[float], std: Sequence[float]) -> InMemoryEvalTransform:
    return InMemoryEvalTransform(opts.img_size, mean, std, gray=False, mode=tensor_mode(opts.interpolation))


@register_dataset(
    "digits",
    check=_check_digits,
    eval_transform=_eval_gray,
    aliases=("sklearn_digits",),
    description="scikit-learn's 1,797 8x8 handwritten digits, 10 classes, offline",
    in_memory=True,
)
def build_digits(opts: DataOptions, seed: int = 0) -> DataBundle:
    """scikit-learn digits: fixed stratified split (split_seed, val_fraction),
    pixels/16, resized once to img_size, replicated to 3 channels (a stride-0
    view, no copy), normalized with the train mean/std.  `train_size`/`val_size`
    optionally cap each split to a class-balanced subset.  `seed` is unused."""
    images, target = _digits_raw()
    train_idx, val_idx = digits_split(opts.val_fraction, opts.split_seed)
    x = resize_batch(torch.from_numpy(images.copy())[:, None], opts.img_size, tensor_mode(opts.interpolation))
    y = torch.from_numpy(target.copy())
    x_tr, y_tr = _cap(x[train_idx], y[train_idx], opts.train_size, opts.split_seed)
    x_va, y_va = _cap(x[val_idx], y[val_idx], opts.val_size, opts.split_seed)
    mean, std = normalize_stats(x_tr)
    x_tr, x_va = (_normalize(t, mean, std).expand(-1, 3, -1, -1) for t in (x_tr, x_va))
    return DataBundle(
        train=TensorDataset(x_tr, y_tr),
        val=TensorDataset(x_va, y_va),
        num_classes=DIGITS_CLASSES,
        in_chans=3,
        class_names=[str(i) for i in range(DIGITS_CLASSES)],
        mean=(float(mean[0]),) * 3,
        std=(float(std[0]),) * 3,
        in_memory=True,
    )


# --------------------------------------------------------------------------- synthetic


def _synthetic_sizes(opts: DataOptions) -> tuple[int, int, int]:
    k = opts.num_classes or SYNTHETIC_DEFAULTS["num_classes"]
    return k, opts.train_size or SYNTHETIC_DEFAULTS["train_size"], opts.val_size or SYNTHETIC_DEFAULTS["val_size"]


def _check_synthetic(opts: DataOptions) -> None:
    k, n_train, _ = _synthetic_sizes(opts)
    if n_train < k:
        raise DataError(
            f"data.train_size={n_train} is smaller than data.num_classes={k}; "
            "raise data.train_size or lower data.num_classes"
        )


def synthetic_arrays(
    num_classes: int, n: int, img_size: int, *, seed: int, stream: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` images [n,3,img,img] in [0,1] and balanced labels: each class is a fixed
    smooth random template (from `seed`) plus Gaussian noise (from `seed`, `stream`)."""
    g = torch.Generator().manual_seed(seed)
    res = min(SYNTHETIC_TEMPLATE_RES, img_size)
    templates = resize_batch(torch.rand(num_classes, 3, res, res, generator=g), img_size)
    g = torch.Generator().manual_seed(seed * 1_000 + stream)
    y = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
    x = templates[y] + SYNTHETIC_NOISE * torch.randn(n, 3, img_size, img_size, generator=g)
    return x.clamp_(0.0, 1.0), y


@register_dataset(
    "synthetic",
    check=_check_synthetic,
    eval_transform=_eval_rgb,
    description="seeded random class templates + noise, in memory (smoke tests)",
    in_memory=True,
)
def build_synthetic(opts: DataOptions, seed: int = 0) -> DataBundle:
    """Learnable random data: num_classes (10), train_size (512), val_size (128)
    images of img_size, normalized with the train mean/std.  Fixed by
    split_seed; `seed` is unused."""
    k, n_train, n_val = _synthetic_sizes(opts)
    x_tr, y_tr = synthetic_arrays(k, n_train, opts.img_size, seed=opts.split_seed, stream=1)
    x_va, y_va = synthetic_arrays(k, n_val, opts.img_size, seed=opts.split_seed, stream=2)
    mean, std = normalize_stats(x_tr)
    return DataBundle(
        train=TensorDataset(_normalize(x_tr, mean, std), y_tr),
        val=TensorDataset(_normalize(x_va, mean, std), y_va),
        num_classes=k,
        in_chans=3,
        class_names=[f"class_{i}" for i in range(k)],
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        in_memory=True,
    )
