"""Datasets for qksweep.

    bundle = build_data(cfg, seed=0)     # -> DataBundle(train, val, num_classes, ...)
    check_data(cfg)                      # cheap, before anything runs; raises DataError
    data_shape(cfg)                      # (in_chans, frames or None) without loading anything
    prepare_data(cfg)                    # in the driver: check + one-off downloads
    eval_transform(cfg, mean, std)       # validation preprocessing of one PIL image
    list_datasets()                      # registered names

Datasets (aliases in brackets):
  digits      scikit-learn's 1,797 8x8 digits, 10 classes; offline default; in memory
  synthetic   seeded class templates + noise; in memory
  cifar10     torchvision CIFAR-10 under data.root (default ./data)   [torch/cifar10]
  cifar100    torchvision CIFAR-100 under data.root (default ./data)  [torch/cifar100]
  imagefolder data.root/train + data.root/{val,validation,valid}       [tiny_imagenet, imagenet, imagenet100]
  cifar10_dvs, dvs128_gesture, n_mnist
              SpikingJelly's event datasets under data.root as data.frames frames of 2 polarity
              channels ([T, 2, H, W] per sample; see events.py)

`cfg` is any object (or mapping) with the `DataConfig` attributes; absent ones
take the defaults of :class:`DataOptions`:

  name='digits', root=None, img_size=32, download=False, aa=None, reprob=0.0,
  remode='pixel', hflip=0.5, color_jitter=None, val_fraction=0.2,
  num_classes=None, train_size=None, val_size=None, interpolation='bilinear',
  split_seed=0 (optional extra), crop_padding=0 (optional extra)

* `val_fraction` is used by digits only (the others have fixed val sets).
* `num_classes` sets synthetic's class count (default 10); elsewhere it is
  inferred and, when given, must match (DataError otherwise).
* `train_size`/`val_size` set synthetic's sizes (512/128); for every other
  dataset they cap the train/val split to a class-balanced subset.
* Splits, synthetic data and subsets depend only on `split_seed` (0), never on
  the trial `seed`, so every trial of a sweep sees identical data.
* `aa`, `reprob`, `remode`, `hflip`, `color_jitter` only affect the on-disk
  datasets (cifar*, imagefolder); in-memory datasets are not augmented.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base import (
    DEFAULT_SPLIT_SEED,
    DataBundle,
    DataError,
    DataOptions,
    DatasetSpec,
    get_spec,
    list_datasets,
    options,
    register_dataset,
)
from . import in_memory as _in_memory  # noqa: F401  (registers digits, synthetic)
from . import cifar as _cifar  # noqa: F401  (registers cifar10, cifar100)
from . import imagefolder as _imagefolder  # noqa: F401  (registers imagefolder)
from . import events as _events  # noqa: F401  (registers cifar10_dvs, dvs128_gesture, n_mnist)

__all__ = [
    "DEFAULT_SPLIT_SEED",
    "DataBundle",
    "DataError",
    "DataOptions",
    "DatasetSpec",
    "build_data",
    "check_data",
    "data_shape",
    "eval_transform",
    "list_datasets",
    "options",
    "prepare_data",
    "register_dataset",
]


def check_data(cfg: Any) -> None:
    """Cheap validation of the data config and on-disk layout (no images are
    decoded, nothing is downloaded).  Raises DataError with a one-line fix."""
    opts = options(cfg)
    spec = get_spec(opts.name)
    opts = get_spec_options(opts, spec)
    _check_kind(opts, spec)
    if spec.check is not None:
        spec.check(opts)
    if not spec.in_memory:
        _check_augment(opts)


def _check_kind(opts: DataOptions, spec: DatasetSpec) -> None:
    """Event keys on images and image-only augmentation on events are refused, not ignored."""
    if not spec.events:
        extra = [k for k, off in (("frames", None), ("roll", 0)) if getattr(opts, k) != off]
        if extra:
            raise DataError(f"data.{extra[0]} is for event datasets (cifar10_dvs, dvs128_gesture, n_mnist); "
                            f"{spec.name} has images: remove data.{extra[0]}")
        return
    image_only = [k for k, off in (("aa", None), ("reprob", 0.0), ("color_jitter", None)) if getattr(opts, k) != off]
    if image_only:
        raise DataError(f"data.{image_only[0]} augments images; {spec.name} gives event frames: remove it "
                        "(event frames take data.hflip, data.event_aug and data.roll)")


def data_shape(cfg: Any) -> tuple[int, int | None]:
    """What one sample of the dataset is, without reading it: its channels and, for event data, its frames
    (the spiking model's time steps)."""
    opts = options(cfg)
    spec = get_spec(opts.name)
    if not spec.events:
        return spec.in_chans, None
    from .events import frames_of

    return spec.in_chans, frames_of(get_spec_options(opts, spec))


def get_spec_options(opts: DataOptions, spec: DatasetSpec) -> DataOptions:
    """``opts`` under the dataset's canonical name (aliases resolved)."""
    return opts if opts.name == spec.name else opts.model_copy(update={"name": spec.name})


def prepare_data(cfg: Any) -> None:
    """Run once in the driver before trials start: check_data + downloads (when
    data.download is true), so parallel trials never race to download."""
    opts = options(cfg)
    spec = get_spec(opts.name)
    opts = get_spec_options(opts, spec)
    if spec.prepare is not None:
        spec.prepare(opts)
    check_data(opts)


def build_data(cfg: Any, *, seed: int = 0) -> DataBundle:
    """Build the train/val datasets named by `cfg.name`.

    `seed` is the trial seed; it is accepted for API stability but the data never
    depends on it (see `split_seed`)."""
    opts = options(cfg)
    check_data(opts)
    spec = get_spec(opts.name)
    return spec.build(get_spec_options(opts, spec), seed)


def eval_transform(cfg: Any, mean: Sequence[float], std: Sequence[float]):
    """The validation preprocessing as a callable on one PIL image -> [3,H,W] tensor
    (e.g. for `predict`).  Pass the bundle's (or checkpoint's) mean/std."""
    opts = options(cfg)
    spec = get_spec(opts.name)
    if spec.events:
        raise DataError(f"{opts.name} gives event frames, not images: a model trained on them cannot read an "
                        "image file; validate it on its event data (qksweep validate RUN)")
    if spec.eval_transform is None:
        raise DataError(f"data.name: dataset {opts.name!r} has no eval transform")
    return spec.eval_transform(opts, tuple(mean), tuple(std))


def _check_augment(opts: DataOptions) -> None:
    """Build the train transform once so a bad `aa` string fails early."""
    if opts.aa is None:
        return
    from .transforms import timm_train_transform

    try:
        timm_train_transform(opts, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    except Exception as e:  # timm raises AssertionError/KeyError/ValueError on bad strings
        raise DataError(
            f"data.aa: invalid auto-augment {opts.aa!r} ({type(e).__name__}: {e}); "
            "use e.g. 'rand-m9-mstd0.5-inc1', 'original' or null"
        ) from None
