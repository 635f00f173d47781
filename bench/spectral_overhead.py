#!/usr/bin/env python
"""What fraction of training time does the spectral monitor cost at its default settings?

For a ViT and a QKFormer (the models of ``configs/digits_vit.yaml`` and ``configs/digits_qkformer.yaml``,
on digits, in-process, one torch thread like a qksweep worker with ``run.cpus_per_worker: 1``), the
monitor is built exactly as ``train_loop`` builds it (``make_monitor``: default targets of the model,
``spectral.every=100``, ``topk=8``, ``interval=2``, subspace cosines on) and called after every
optimizer update the way the loop calls it (``maybe_measure(num_updates)``).

Two estimates, side by side in the same process:

* **amortised** (the reported ``spectral_overhead_<model>``): median time of one training update
  ``t_step``, median time of one measurement ``t_measure`` (``monitor.measure`` right after an update,
  so the spectrum and subspaces really changed), and the cost ``t_call`` of ``maybe_measure`` on a
  step that does not measure; overhead = (t_measure + (every-1)·t_call) / (every·t_step).
  Stable on a noisy machine because every term is a median of many short timings.
* **loop** (``spectral_overhead_<model>_loop``): paired blocks of ``every`` updates with and without
  the monitor (each "with" block contains exactly one measurement), order alternating; the median of
  the per-pair time ratios minus 1. The direct figure, but a shared 2-CPU machine's noise (a few %)
  is of the order of the effect, so it is a cross-check.

    python bench/spectral_overhead.py --quick
    python bench/spectral_overhead.py --smoke    # tiny models, seconds; used by tests/test_bench.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BareLoop, emit, load_yaml, log, median, with_overrides  # noqa: E402

MODELS = {
    "vit": "digits_vit.yaml",
    "qkformer": "digits_qkformer.yaml",
}

SMOKE_MODELS = {
    "vit": {"name": "vit_tiny_patch16_224", "embed_dim": 32, "num_heads": 2, "depth": 2, "patch_size": 4, "mlp_ratio": 2},
    "qkformer": {"name": "qkformer_cifar", "embed_dim": 32, "num_heads": 2, "depth": 2, "mlp_ratio": 2, "time_steps": 1,
                 "patch_size": 4},
}


def spectral_defaults() -> dict:
    from qksweep.config import SpectralConfig

    d = SpectralConfig().model_dump()
    d["enabled"] = True
    return d


def build(kind: str, smoke: bool) -> tuple[BareLoop, object, dict]:
    from qksweep.trainables.extras.spectral import make_monitor

    base = load_yaml(MODELS[kind])
    base.pop("sweep", None)
    base["spectral"] = spectral_defaults()
    if smoke:
        base["model"] = SMOKE_MODELS[kind]
        base["data"] = {**base["data"], "img_size": 8, "batch_size": 32}
    cfg = with_overrides(base)
    loop = BareLoop(cfg)
    monitor = make_monitor(loop.cfg, loop.model, None)
    return loop, monitor, cfg


def batches_forever(loop: BareLoop):
    while True:
        loop.train_batches.set_epoch(loop.epoch)
        loop.model.train()
        yield from loop.train_batches
        loop.epoch += 1


def amortised(loop: BareLoop, monitor, *, steps: int, measures: int) -> dict:
    every = monitor.monitors[0].every
    it = batches_forever(loop)
    for _ in range(2):  # warm-up (allocator, first-call overheads)
        loop.step(*next(it))
    step_t = []
    for _ in range(steps):
        x, y = next(it)
        t = time.perf_counter()
        loop.step(x, y)
        step_t.append(time.perf_counter() - t)
    # baseline measurement (the first one has no previous subspaces: no cosines), then timed ones
    monitor.monitors[0].measure(loop.updates)
    meas_t, n_metrics = [], 0
    for _ in range(measures):
        loop.step(*next(it))
        t = time.perf_counter()
        metrics = monitor.monitors[0].measure(loop.updates)
        meas_t.append(time.perf_counter() - t)
        n_metrics = len(metrics)
    # a non-measuring call: maybe_measure at steps that are not multiples of `every`
    calls = 2000
    base = loop.updates * every + 1
    t = time.perf_counter()
    for i in range(calls):
        s = base + (i % (every - 1)) if every > 1 else base
        monitor.maybe_measure(s)
    call_t = (time.perf_counter() - t) / calls
    t_step, t_meas = median(step_t), median(meas_t)
    overhead = (t_meas + (every - 1) * call_t) / (every * t_step)
    return {"t_step_s": t_step, "t_measure_s": t_meas, "t_call_s": call_t, "every": every,
            "matrices": len(monitor.monitors[0].entries), "metrics_per_measure": n_metrics,
            "overhead": overhead}


def loop_ab(loop: BareLoop, monitor, *, pairs: int) -> dict:
    every = monitor.monitors[0].every
    it = batches_forever(loop)

    def block(with_monitor: bool) -> float:
        t = time.perf_counter()
        for _ in range(every):
            loop.step(*next(it))
            if with_monitor:
                monitor.maybe_measure(loop.updates)
        return time.perf_counter() - t

    # align so that each "with" block holds exactly one measuring update (updates ≡ 0 mod every)
    while loop.updates % every != 0:
        loop.step(*next(it))
    ratios, on, off = [], [], []
    for p in range(pairs):
        if p % 2 == 0:
            a = block(False)
            b = block(True)
        else:
            b = block(True)
            a = block(False)
        off.append(a)
        on.append(b)
        ratios.append(b / a)
        log(f"  pair {p + 1}/{pairs}: {every} updates without {a:.2f}s, with {b:.2f}s")
    return {"pairs": pairs, "block_updates": every, "without_s": off, "with_s": on,
            "overhead": median(ratios) - 1.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats (a couple of minutes on 2 CPUs)")
    ap.add_argument("--smoke", action="store_true", help="tiny models, no loop A/B (seconds; for the test suite)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1, as in a qksweep worker with 1 CPU)")
    ap.add_argument("--pairs", type=int, help="loop A/B pairs of `every` updates per model (0 to skip)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    # loop A/B pairs per model: in --quick only the ViT's (100 QKFormer updates take ~30 s a block on
    # 2 CPUs, and one pair cannot resolve a 2 % effect through this machine's noise anyway)
    if args.smoke:
        steps, measures, pairs = 3, 2, {"vit": 0, "qkformer": 0}
    elif args.quick:
        steps, measures, pairs = 20, 5, {"vit": 2, "qkformer": 0}
    else:
        steps, measures, pairs = 40, 10, {"vit": 4, "qkformer": 4}
    if args.pairs is not None:
        pairs = {k: args.pairs for k in pairs}

    out: dict = {"benchmark": "spectral_overhead", "threads": args.threads, "mode": "smoke" if args.smoke else "quick" if args.quick else "full"}
    details = {}
    for kind in MODELS:
        loop, monitor, cfg = build(kind, args.smoke)
        log(f"{kind}: {cfg['model']['name']} {len(monitor.monitors[0].entries)} matrices, every {monitor.monitors[0].every}")
        am = amortised(loop, monitor, steps=steps, measures=measures)
        d = {"model": cfg["model"], "img_size": cfg["data"]["img_size"], "batch_size": cfg["data"]["batch_size"],
             "amortised": am}
        out[f"spectral_overhead_{kind}"] = am["overhead"]
        log(f"  step {am['t_step_s']:.4f}s, measure {am['t_measure_s']:.4f}s, call {am['t_call_s'] * 1e6:.1f}us "
            f"-> {100 * am['overhead']:.2f}%")
        if pairs[kind]:
            ab = loop_ab(loop, monitor, pairs=pairs[kind])
            d["loop"] = ab
            out[f"spectral_overhead_{kind}_loop"] = ab["overhead"]
            log(f"  loop A/B: {100 * ab['overhead']:+.2f}%")
        details[kind] = d
    out["spectral_overhead"] = max(out["spectral_overhead_vit"], out["spectral_overhead_qkformer"])
    out["settings"] = {k: v for k, v in spectral_defaults().items() if k in ("every", "topk", "interval", "split_qkv", "on_cpu")}
    out["details"] = details
    emit(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
