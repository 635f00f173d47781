"""Small fake event-camera datasets in SpikingJelly's own on-disk layout (``<root>/events_np``: one
``.npz`` of ``t, x, y, p`` arrays per sample, in class folders; DVS128 Gesture and N-MNIST under
``train/`` and ``test/``), as its ``create_raw_from_extracted`` writes them from the real archives.

Each class has its own bright spot, so a tiny model can learn the classes in an epoch or two."""
from __future__ import annotations

from pathlib import Path

import numpy as np

SIZES = {"cifar10_dvs": 128, "dvs128_gesture": 128, "n_mnist": 34}
CIFAR10_DVS_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _sample(rng: np.random.Generator, size: int, label: int, n_events: int) -> dict[str, np.ndarray]:
    cx, cy = (size // 4) + (label * size // 3) % (size // 2), size // 2
    near = rng.random(n_events) < 0.7  # most events around the class's spot, the rest anywhere
    x = np.where(near, np.clip(rng.normal(cx, size / 16, n_events), 0, size - 1), rng.integers(0, size, n_events))
    y = np.where(near, np.clip(rng.normal(cy, size / 16, n_events), 0, size - 1), rng.integers(0, size, n_events))
    t = np.sort(rng.integers(0, 1_000_000, n_events))
    return dict(t=t.astype(np.int64), x=x.astype(np.int64), y=y.astype(np.int64),
                p=rng.integers(0, 2, n_events).astype(np.int64))


def _class_names(name: str, classes: int) -> list[str]:
    return list(CIFAR10_DVS_CLASSES[:classes]) if name == "cifar10_dvs" else [str(i) for i in range(classes)]


def make_event_dataset(root: Path, name: str, *, classes: int = 3, per_class: int = 10, test_per_class: int = 4,
                       n_events: int = 400, seed: int = 0) -> Path:
    """Write a fake ``name`` dataset under ``root`` (created) and return ``root``."""
    rng = np.random.default_rng(seed)
    size = SIZES[name]
    events = Path(root) / "events_np"
    splits = {"": per_class} if name == "cifar10_dvs" else {"train": per_class, "test": test_per_class}
    for split, count in splits.items():
        for label, cls in enumerate(_class_names(name, classes)):
            folder = events / split / cls if split else events / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                np.savez(folder / f"{cls}_{i}.npz", **_sample(rng, size, label, n_events))
    return Path(root)
