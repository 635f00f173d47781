#!/usr/bin/env python
"""Is qksweep's input pipeline for ImageFolder data as fast as timm's? Images/s per loader worker.

An ImageFolder of synthetic 224x224 JPEGs (smooth random colour fields with noise, a few classes) is
written to a temporary folder, then two loaders read its ``train/`` split, with seed 001's training
transforms (``configs/imagenet_vit_base.yaml``: RandAugment ``rand-m9-mstd0.5-inc1``, random erasing
0.25 in ``pixel`` mode, bilinear, 224², batch 64):

* **qksweep**: what a trial builds for ``data.name: imagefolder``: ``qksweep.data.build_data`` on the
  resolved config, then ``trainables.core.build_batches(cfg, bundle, rank=0, world=1, device=cpu,
  ray_train=False)``, the loader of a one-worker trial in its own process (the default launcher),
  iterated as ``train_loop`` iterates it (``set_epoch`` then ``for x, y in batches``).
* **timm**: ``timm.data.create_loader`` on ``timm.data.ImageDataset`` (what timm's ``train.py`` does)
  with the same auto-augment string, re-prob and mode, interpolation, image size, batch size, workers,
  mean/std and its defaults otherwise (``use_prefetcher=True``: uint8 batches from the workers,
  normalised and randomly erased per batch in the consuming process; here ``device=cpu``). Its
  RandAugment gets qksweep's 0-bit posterize fix (``keep_posterize_working``), without which it stops
  with Pillow 13's "bits must be between or equal to 1 and 8" within a few epochs.
* **timm_no_prefetcher** (a diagnostic arm, in the details): the same with ``use_prefetcher=False``, so
  the workers also convert, normalise and erase, as qksweep's do.

Both loaders are built once (persistent workers), warmed up by one epoch each, then timed for whole
epochs in turns (A/B, B/A, ...), nothing but the iteration in the loop. Per epoch: images/s =
images ÷ wall; per loader worker = that ÷ workers; CPU seconds per image of this process and of
its loader workers (psutil). Each figure is the median over the repeats.

* ``loader_vs_timm_ratio`` = qksweep images/s ÷ timm images/s (the same workers on both sides, so this
  is also the per-worker ratio). Goal >= 1.0.
* ``loader_qksweep_img_s_per_worker``, ``loader_timm_img_s_per_worker``, ``loader_workers``.

Workers default to ``cpus - 1`` (at least 1): what ``data.num_workers: auto`` gives a trial that holds
all the CPUs, leaving one core to the consuming process, whose torch ops run on ``cpus - workers``
threads (at least 1; timm's prefetcher normalises and erases there, and with torch's default of one
thread per core it would take CPU from the workers).

    python bench/loader.py --quick      # 768 images, 7 repeats, about 1 min on 2 CPUs
    python bench/loader.py              # 1536 images, 9 repeats
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, log, median  # noqa: E402

AA = "rand-m9-mstd0.5-inc1"  # seed 001 (configs/imagenet_vit_base.yaml)
REPROB, REMODE = 0.25, "pixel"
IMG, BATCH, INTERP = 224, 64, "bilinear"


def make_imagefolder(root: Path, classes: int, train: int, val: int, seed: int = 0) -> dict:
    """root/{train,val}/class_<k>/<i>.jpg: 224x224 RGB JPEGs (quality 90) of a smooth random colour
    field (a 7x7 grid upsampled bicubically) plus pixel noise, so they compress and decode like
    photographs more than like pure noise or flat colour."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes = []
    for split, n in (("train", train), ("val", val)):
        for i in range(n):
            k = i % classes
            d = root / split / f"class_{k}"
            d.mkdir(parents=True, exist_ok=True)
            small = rng.integers(0, 256, (7, 7, 3), dtype=np.uint8)
            small[..., k % 3] = np.clip(small[..., k % 3].astype(int) + 60, 0, 255)  # a class tint
            img = np.asarray(Image.fromarray(small).resize((IMG, IMG), Image.BICUBIC), dtype=np.int16)
            img = np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)
            p = d / f"{i:05d}.jpg"
            Image.fromarray(img).save(p, quality=90)
            sizes.append(p.stat().st_size)
    return {"classes": classes, "train_images": train, "val_images": val, "size": IMG,
            "mean_jpeg_kb": sum(sizes) / len(sizes) / 1024}


def qksweep_loader(root: Path, workers: int):
    """The train batches a one-worker qksweep trial iterates, built by qksweep's own code."""
    import torch

    from qksweep.api import resolve
    from qksweep.data import build_data
    from qksweep.trainables.core import build_batches

    cfg = resolve({
        "experiment": "bench-loader",
        "model": {"name": "vit_tiny_patch16_224"},
        "data": {"name": "imagefolder", "root": str(root), "img_size": IMG, "batch_size": BATCH,
                 "num_workers": workers, "aa": AA, "reprob": REPROB, "remode": REMODE, "interpolation": INTERP},
        "run": {"workers": 1, "storage": str(root.parent / "results")},
        "tracking": {"uri": f"sqlite:///{root.parent / 'mlflow.db'}"},
    })
    bundle = build_data(cfg.data, seed=cfg.run.seed)
    train, _ = build_batches(cfg, bundle, rank=0, world=1, device=torch.device("cpu"), ray_train=False)
    return train


def timm_loader(root: Path, workers: int, prefetcher: bool = True):
    import torch
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageDataset, create_loader

    from qksweep.data.transforms import keep_posterize_working

    ds = ImageDataset(str(root / "train"))
    loader = create_loader(ds, input_size=(3, IMG, IMG), batch_size=BATCH, is_training=True, auto_augment=AA,
                           re_prob=REPROB, re_mode=REMODE, interpolation=INTERP, mean=IMAGENET_DEFAULT_MEAN,
                           std=IMAGENET_DEFAULT_STD, num_workers=workers, device=torch.device("cpu"),
                           use_prefetcher=prefetcher)
    # timm's posterize at 0 bits raises on Pillow >= 13 (see qksweep.data.transforms): the same one-op
    # fix qksweep applies, before the workers start, or timm's loader dies in the first epochs
    keep_posterize_working(ds.transform)
    return loader


class Arm:
    """One loader, iterated epoch by epoch; its worker processes are this process's children."""

    def __init__(self, name: str, loader, workers: int):
        self.name, self.loader, self.workers = name, loader, workers
        self.epoch = 0
        self.rows: list[dict] = []
        self.shape = None

    def _cpu(self) -> tuple[float, float]:
        import psutil

        me = psutil.Process()
        t = me.cpu_times()
        kids = 0.0
        for c in me.children(recursive=True):
            try:
                ct = c.cpu_times()
                kids += ct.user + ct.system
            except psutil.Error:
                pass
        return t.user + t.system, kids

    def epoch_pass(self) -> dict:
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(self.epoch)
        main0, kids0 = self._cpu()
        t0 = time.perf_counter()
        n = 0
        for x, y in self.loader:
            n += len(y)
            self.shape = (tuple(x.shape), str(x.dtype))
        wall = time.perf_counter() - t0
        main1, kids1 = self._cpu()
        self.epoch += 1
        return {"images": n, "wall_s": wall, "img_s": n / wall, "img_s_per_worker": n / wall / max(1, self.workers),
                "main_cpu_s_per_img": (main1 - main0) / n, "worker_cpu_s_per_img": (kids1 - kids0) / n}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="768 images, 7 repeats")
    ap.add_argument("--images", type=int, help="train images (default 768 quick, 1536 full)")
    ap.add_argument("--repeats", type=int, help="timed epochs per loader (default 7 quick, 9 full)")
    ap.add_argument("--workers", type=int, help="loader workers (default: CPUs - 1, at least 1)")
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--no-prefetcher-arm", action="store_true",
                    help="leave out the diagnostic arm: timm's create_loader with use_prefetcher=False")
    ap.add_argument("--keep", help="write the image folder here and keep it")
    args = ap.parse_args(argv)

    images = args.images or (768 if args.quick else 1536)
    repeats = args.repeats or (7 if args.quick else 9)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = args.workers or max(1, cpus - 1)
    tmp = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="qksweep-bench-loader-"))
    root = tmp / "imagefolder"
    import torch

    torch.set_num_threads(max(1, cpus - workers))
    shutil.rmtree(root, ignore_errors=True)

    t = time.perf_counter()
    data = make_imagefolder(root, args.classes, images, max(args.classes, 32))
    data["write_s"] = time.perf_counter() - t
    log(f"wrote {images} train JPEGs ({data['mean_jpeg_kb']:.1f} KiB each) in {data['write_s']:.1f}s; "
        f"{workers} loader worker(s), batch {BATCH}, {repeats} repeats")

    arms = [Arm("qksweep", qksweep_loader(root, workers), workers), Arm("timm", timm_loader(root, workers), workers)]
    if not args.no_prefetcher_arm:
        arms.append(Arm("timm_no_prefetcher", timm_loader(root, workers, prefetcher=False), workers))
    for a in arms:  # worker start-up and first-touch of the files
        t = time.perf_counter()
        a.epoch_pass()
        log(f"warm-up {a.name}: {time.perf_counter() - t:.1f}s, batches {a.shape}")
    for r in range(repeats):
        order = arms if r % 2 == 0 else arms[::-1]
        for a in order:
            row = a.epoch_pass()
            a.rows.append(row)
            log(f"repeat {r + 1}/{repeats} {a.name}: {row['img_s']:.1f} img/s "
                f"(worker CPU {1000 * row['worker_cpu_s_per_img']:.1f} ms/img, "
                f"main {1000 * row['main_cpu_s_per_img']:.1f})")
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)

    def med(a: Arm, k: str) -> float:
        return median(row[k] for row in a.rows)

    q, tm = arms[0], arms[1]
    per_pair = [a["img_s"] / b["img_s"] for a, b in zip(q.rows, tm.rows)]
    out = {
        "benchmark": "loader",
        "loader_vs_timm_ratio": med(q, "img_s") / med(tm, "img_s"),
        "loader_qksweep_img_s_per_worker": med(q, "img_s_per_worker"),
        "loader_timm_img_s_per_worker": med(tm, "img_s_per_worker"),
        "loader_workers": workers,
        "details": {
            "data": data, "batch": BATCH, "img_size": IMG, "aa": AA, "reprob": REPROB, "remode": REMODE,
            "interpolation": INTERP, "repeats": repeats, "cpus": cpus, "consumer_threads": torch.get_num_threads(),
            "ratio_per_repeat": per_pair,
            **{a.name: {"img_s": med(a, "img_s"), "img_s_per_worker": med(a, "img_s_per_worker"),
                        "worker_cpu_ms_per_img": 1000 * med(a, "worker_cpu_s_per_img"),
                        "main_cpu_ms_per_img": 1000 * med(a, "main_cpu_s_per_img"),
                        "batch": a.shape, "raw": a.rows} for a in arms},
        },
    }
    emit(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
