"""Event-camera datasets through ``spikingjelly.datasets``: CIFAR10-DVS, DVS128 Gesture and N-MNIST as
frames.

SpikingJelly reads the raw archives and integrates the event stream into ``data.frames`` frames per sample
(``data.split_by``: equal event counts or equal time slices), caching them on disk under ``data.root``
(``frames_number_<T>_split_by_<how>/``). qksweep does that once per root, in the sweep's driver before Ray
starts (``prepare``) and under a file lock in ``root`` (so two sweeps, or trials that build the data, never
write one cache at the same time). The on-disk layout is SpikingJelly's own:

  <root>/download/<the archives>        the raw files (no download here: put them there by hand)
  <root>/events_np/...                  the converted events, one .npz (t, x, y, p) per sample
  <root>/frames_number_16_split_by_number/...   the cached frames

Splits follow the official DVS training: DVS128 Gesture and N-MNIST have their own train/test folders;
CIFAR10-DVS has none and is split 9:1 per class, the first 90 % of each class (in file order) for
training -- SpikingJelly's ``split_to_train_test_set(0.9, ..., random_split=False)`` as QKFormer's
``cifar10-dvs/train.py`` calls it (no randomness, so no seed).

A sample is a ``[T, 2, H, W]`` float tensor of event counts (ON/OFF polarity channels), not normalised.
``data.img_size`` resizes the frames: a whole-number shrink sums blocks of pixels (event counts stay
counts), any other size takes the nearest pixel. Training adds the official DVS augmentation
(``data.hflip``, then ``data.event_aug: snn_wide``, QKFormer's ``SNNAugmentWide``) and ``data.roll``; all of
it keeps counts whole numbers, and validation gets none of it.
"""
from __future__ import annotations

import fcntl
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from .base import DataBundle, DataError, DataOptions, balanced_indices, check_num_classes, register_dataset

#: event frames are counts: no mean/std normalisation (the official DVS training has none)
EVENT_MEAN = (0.0, 0.0)
EVENT_STD = (1.0, 1.0)
TRAIN_RATIO = 0.9  # CIFAR10-DVS


@dataclass(frozen=True)
class EventInfo:
    name: str
    module: str  # spikingjelly.datasets.<module>
    cls: str  # the dataset class in it
    hw: tuple[int, int]
    num_classes: int
    own_split: bool  # train/test folders of its own (else: 9:1 per class)
    default_frames: int
    default_root: str

    def dataset_cls(self):
        import importlib

        return getattr(importlib.import_module(f"spikingjelly.datasets.{self.module}"), self.cls)

    def archives(self) -> list[str]:
        return [f for f, _url, _md5 in self.dataset_cls().resource_url_md5()]

    def url(self) -> str:
        return self.dataset_cls().resource_url_md5()[0][1]


EVENTS = {
    "cifar10_dvs": EventInfo("cifar10_dvs", "cifar10_dvs", "CIFAR10DVS", (128, 128), 10, False, 16,
                             "./data/cifar10_dvs"),
    "dvs128_gesture": EventInfo("dvs128_gesture", "dvs128_gesture", "DVS128Gesture", (128, 128), 11, True, 16,
                                "./data/dvs128_gesture"),
    "n_mnist": EventInfo("n_mnist", "n_mnist", "NMNIST", (34, 34), 10, True, 10, "./data/n_mnist"),
}


def is_event_dataset(name: str) -> bool:
    return str(name).lower() in EVENTS


def frames_of(opts: DataOptions) -> int:
    """The frames per sample of an event dataset: ``data.frames``, or the dataset's default."""
    return opts.frames or EVENTS[opts.name].default_frames


def event_root(opts: DataOptions) -> Path:
    return Path(os.path.abspath(os.path.expanduser(opts.root or EVENTS[opts.name].default_root)))


def frames_dir(opts: DataOptions) -> Path:
    """Where SpikingJelly caches this frame integration (its ``FrameFixedNumberBuilder.processed_root``)."""
    return event_root(opts) / f"frames_number_{frames_of(opts)}_split_by_{opts.split_by}"


# ------------------------------------------------------------------------------------------ checks


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def _check_events_np(info: EventInfo, events: Path) -> None:
    splits = [events / "train", events / "test"] if info.own_split else [events]
    for split in splits:
        classes = _class_folders(split)
        if not classes:
            where = f"{split}/<class>/*.npz"
            raise DataError(f"{info.name}: {split} has no class folders; SpikingJelly's converted events are "
                            f"expected as {where} (delete {events} to convert the archives in download/ again)")
        empty = [c.name for c in classes if not any(c.glob("*.npz"))]
        if empty:
            raise DataError(f"{info.name}: class folder {split / empty[0]} has no .npz samples; delete {events} "
                            f"to convert the archives in download/ again")


def check_events(info: EventInfo, opts: DataOptions) -> None:
    """The root's layout, without reading a sample: converted events, or every raw archive."""
    root = event_root(opts)
    cls = info.cls
    if not root.is_dir():
        raise DataError(f"{info.name}: data.root {root} does not exist; give the folder that holds SpikingJelly's "
                        f"{cls} layout ({', '.join(info.archives())} in <root>/download/)")
    for marker in (root / "events_np.building", frames_dir(opts).with_name(frames_dir(opts).name + ".building")):
        if marker.exists():
            target = marker.with_name(marker.name.removesuffix(".building"))
            raise DataError(f"{info.name}: an earlier conversion under {root} was interrupted ({marker.name} is "
                            f"there); delete {target} and {marker}, then run again")
    events = root / "events_np"
    if events.is_dir():
        _check_events_np(info, events)
        found = len(_class_folders(events / "train" if info.own_split else events))
        check_num_classes(opts, found, f"{info.name} at {events}")
        return
    check_num_classes(opts, info.num_classes, info.name)
    download = root / "download"
    missing = [f for f in info.archives() if not (download / f).is_file()]
    if missing and not (opts.download and info.dataset_cls().downloadable()):
        raise DataError(f"{info.name}: {root} has no events_np/ and {download} lacks {', '.join(missing)}; put "
                        f"the raw archives (from {info.url()}) in {download}/ as SpikingJelly expects")


# ------------------------------------------------------------------------------------------ transforms


def resize_frames(x: torch.Tensor, size: int) -> torch.Tensor:
    """``[T, C, H, W]`` counts -> ``[T, C, size, size]``: sum pooling for a whole-number shrink (every
    event kept), the nearest pixel otherwise (counts stay whole numbers either way)."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    if h == w and h % size == 0:
        k = h // size
        return F.avg_pool2d(x, k) * (k * k)
    return F.interpolate(x, size=(size, size), mode="nearest-exact")


class SNNAugmentWide:
    """QKFormer's (and SEW-ResNet's) DVS policy ``autoaugment.SNNAugmentWide``: one op per sample, the same
    for every frame -- identity, shear-x (up to 0.3), translate x / y (up to 5 px), rotate (up to 30°) or
    cut-out (``RandomErasing(p=1, scale=(0.001, 0.11), ratio=(1, 1))``), magnitudes from 31 bins, nearest
    interpolation."""

    BINS = 31

    def __init__(self) -> None:
        from torchvision.transforms import RandomErasing

        self.cutout = RandomErasing(p=1, scale=(0.001, 0.11), ratio=(1, 1))
        self.space = {
            "Identity": None,
            "ShearX": torch.linspace(-0.3, 0.3, self.BINS),
            "TranslateX": torch.linspace(-5.0, 5.0, self.BINS),
            "TranslateY": torch.linspace(-5.0, 5.0, self.BINS),
            "Rotate": torch.linspace(-30.0, 30.0, self.BINS),
            "Cutout": None,
        }

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        op = list(self.space)[int(torch.randint(len(self.space), (1,)))]
        mags = self.space[op]
        m = 0.0 if mags is None else float(mags[int(torch.randint(len(mags), (1,)))])
        if mags is not None and int(torch.randint(2, (1,))):
            m = -m
        nearest = InterpolationMode.NEAREST
        if op == "Cutout":
            return self.cutout(x)
        if op == "ShearX":
            return TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=[math.degrees(m), 0.0],
                             interpolation=nearest)
        if op in ("TranslateX", "TranslateY"):
            shift = [int(m), 0] if op == "TranslateX" else [0, int(m)]
            return TF.affine(x, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0], interpolation=nearest)
        if op == "Rotate":
            return TF.rotate(x, m, interpolation=nearest)
        return x

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_magnitude_bins={self.BINS})"


class RandomRoll:
    """Shift every frame of a sample by the same random (dy, dx) in ``[-max_shift, max_shift]``, wrapping."""

    def __init__(self, max_shift: int) -> None:
        self.max_shift = int(max_shift)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        dy, dx = torch.randint(-self.max_shift, self.max_shift + 1, (2,)).tolist()
        return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_shift={self.max_shift})"


class EventFrames:
    """One sample's ``[T, C, H, W]`` numpy frames -> a float tensor at ``size``; in training the flip, the
    policy and the roll, in that order (the official DVS training flips, then applies its policy)."""

    def __init__(self, size: int, *, train: bool, hflip: float = 0.0, policy: str = "none", roll: int = 0):
        self.size, self.train, self.hflip = int(size), train, float(hflip)
        self.policy = SNNAugmentWide() if train and policy == "snn_wide" else None
        self.roll = RandomRoll(roll) if train and roll > 0 else None

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        x = resize_frames(torch.as_tensor(np.asarray(frames, dtype=np.float32)), self.size)
        if not self.train:
            return x
        if self.hflip > 0 and float(torch.rand(())) < self.hflip:
            x = x.flip(-1)
        if self.policy is not None:
            x = self.policy(x)
        if self.roll is not None:
            x = self.roll(x)
        return x

    def __repr__(self) -> str:
        parts = [f"size={self.size}", f"train={self.train}"]
        if self.train:
            parts += [f"hflip={self.hflip}", f"policy={self.policy!r}", f"roll={self.roll!r}"]
        return f"{type(self).__name__}({', '.join(parts)})"


def event_transform(opts: DataOptions, *, train: bool) -> EventFrames:
    return EventFrames(opts.img_size, train=train, hflip=opts.hflip, policy=opts.event_aug, roll=opts.roll)


# ------------------------------------------------------------------------------------------ loading


@contextmanager
def root_lock(root: Path) -> Iterator[None]:
    """An exclusive lock on ``root`` while SpikingJelly converts or integrates there (a read-only root
    cannot be written to anyway: no lock)."""
    try:
        fd = os.open(root / ".qksweep-frames.lock", os.O_CREAT | os.O_RDWR, 0o644)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _open(info: EventInfo, opts: DataOptions, *, train: bool | None, transform=None):
    """SpikingJelly's dataset as frames (converting and integrating on first use, under the root's lock)."""
    root = event_root(opts)
    kw = dict(data_type="frame", frames_number=frames_of(opts), split_by=opts.split_by, transform=transform)
    if info.own_split:
        kw["train"] = bool(train)
    try:
        with root_lock(root):
            return info.dataset_cls()(str(root), **kw)
    except (NotImplementedError, RuntimeError, OSError, ValueError, KeyError) as e:
        text = " ".join(str(e).split())[:200]
        raise DataError(f"{info.name}: SpikingJelly could not read {root} ({type(e).__name__}: {text}); check "
                        f"the archives in {root}/download/ or delete {root}/events_np to convert them again") from None


def split_per_class(targets: Sequence[int], ratio: float = TRAIN_RATIO) -> tuple[list[int], list[int]]:
    """The first ``ceil(ratio * n)`` samples of each class for training, the rest for validation (in
    dataset order): SpikingJelly's ``split_to_train_test_set(ratio, ..., random_split=False)``, read from
    the targets instead of loading every sample."""
    t = np.asarray(targets)
    train: list[int] = []
    val: list[int] = []
    for c in np.unique(t):
        idx = np.flatnonzero(t == c).tolist()
        pos = math.ceil(len(idx) * ratio)
        train += idx[:pos]
        val += idx[pos:]
    return train, val


def _subset(ds, indices: Sequence[int] | None, n: int | None, seed: int):
    targets = np.asarray(ds.targets)
    idx = np.arange(len(targets)) if indices is None else np.asarray(indices, dtype=int)
    if n is not None and n < len(idx):
        idx = idx[balanced_indices(targets[idx], n, seed)]
    return ds if indices is None and len(idx) == len(targets) else Subset(ds, idx.tolist())


def _check(info: EventInfo):
    def check(opts: DataOptions) -> None:
        check_events(info, opts)

    return check


def _prepare(info: EventInfo):
    def prepare(opts: DataOptions) -> None:
        check_events(info, opts)
        for train in ((True, False) if info.own_split else (None,)):
            _open(info, opts, train=train)

    return prepare


def _builder(info: EventInfo):
    def build(opts: DataOptions, seed: int = 0) -> DataBundle:
        train_tf, val_tf = event_transform(opts, train=True), event_transform(opts, train=False)
        if info.own_split:
            train_ds = _open(info, opts, train=True, transform=train_tf)
            val_ds = _open(info, opts, train=False, transform=val_tf)
            train_idx = val_idx = None
        else:
            train_ds = _open(info, opts, train=None, transform=train_tf)
            val_ds = _open(info, opts, train=None, transform=val_tf)
            train_idx, val_idx = split_per_class(train_ds.targets)
        classes = list(train_ds.classes)
        check_num_classes(opts, len(classes), f"{info.name} at {event_root(opts)}")
        return DataBundle(
            train=_subset(train_ds, train_idx, opts.train_size, opts.split_seed),
            val=_subset(val_ds, val_idx, opts.val_size, opts.split_seed),
            num_classes=len(classes),
            in_chans=2,
            class_names=classes,
            mean=EVENT_MEAN,
            std=EVENT_STD,
            in_memory=False,
            frames=frames_of(opts),
        )

    build.__name__ = f"build_{info.name}"
    build.__doc__ = (f"SpikingJelly's {info.cls} under data.root as data.frames frames per sample "
                     f"({'its own train/test split' if info.own_split else '9:1 per class, in file order'}).")
    return build


for _info in EVENTS.values():
    register_dataset(
        _info.name,
        check=_check(_info),
        prepare=_prepare(_info),
        aliases=(_info.cls.lower(),),
        description=f"SpikingJelly {_info.cls} event frames ({_info.num_classes} classes, "
                    f"{_info.hw[0]}x{_info.hw[1]}, 2 polarity channels) under data.root",
        in_chans=2,
        events=True,
    )(_builder(_info))
