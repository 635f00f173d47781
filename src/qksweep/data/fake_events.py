"""Small synthetic event-camera datasets in SpikingJelly's own on-disk layout (``<root>/events_np``: one
``.npz`` of ``t, x, y, p`` arrays per sample, in class folders; DVS128 Gesture and N-MNIST under
``train/`` and ``test/``), as its ``create_raw_from_extracted`` writes them from the real archives.

Each class has its own bright spot, so a tiny model can learn the classes in a few epochs. For the offline
demo (``configs/dvs_demo.yaml``) and the tests; real data comes from SpikingJelly's archives::

    python -m qksweep.data.fake_events ./data/dvs_demo            # a DVS128-Gesture-shaped root
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

SIZES = {"cifar10_dvs": 128, "dvs128_gesture": 128, "n_mnist": 34}
CIFAR10_DVS_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _sample(rng: np.random.Generator, size: int, label: int, n_events: int) -> dict[str, np.ndarray]:
    cx, cy = (size // 4) + (label * size // 3) % (size // 2), size // 2
    near = rng.random(n_events) < 0.25  # a quarter of the events around the class's spot, the rest anywhere
    x = np.where(near, np.clip(rng.normal(cx, size / 10, n_events), 0, size - 1), rng.integers(0, size, n_events))
    y = np.where(near, np.clip(rng.normal(cy, size / 10, n_events), 0, size - 1), rng.integers(0, size, n_events))
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


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m qksweep.data.fake_events",
                                description="write a small synthetic event dataset in SpikingJelly's layout")
    p.add_argument("root", help="the folder to write (its events_np/ must not exist yet)")
    p.add_argument("--name", choices=sorted(SIZES), default="dvs128_gesture")
    p.add_argument("--classes", type=int, default=3, choices=range(2, 11), metavar="2..10")
    p.add_argument("--per-class", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if (Path(a.root) / "events_np").exists():
        p.error(f"{Path(a.root) / 'events_np'} already exists: pick another root or delete it")
    root = make_event_dataset(Path(a.root), a.name, classes=a.classes, per_class=a.per_class,
                              test_per_class=max(2, a.per_class // 4), seed=a.seed)
    print(f"{a.name}-shaped synthetic events: {a.classes} classes under {root / 'events_np'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
