#!/usr/bin/env python
"""What does MOASHA buy an accuracy-vs-energy sweep? MOASHA against no early stopping.

Both sweeps run ``configs/digits_qkformer_energy.yaml`` (two objectives: val/top1 max, snn/energy_mj
min; NSGA-II; its space, parameter budget and dead-network rule) with the same sampler seed, one
after the other in one local Ray:

* ``moasha``: ``sweep.scheduler: {name: moasha, grace_period, reduction_factor}``;
* ``none``:   ``sweep.scheduler: {name: none}`` (every trial runs all epochs).

With fewer trials than NSGA-II's population (50), the first generation is the sampler's random
draw, so both sweeps sample the same configurations and the comparison isolates early stopping.

Figures: epochs trained (Σ over trials of the last reported epoch), trial-seconds (Σ Tune
``time_total_s``), and the hypervolume of each sweep's final Pareto front. The front is what
``qksweep best --pareto`` shows: the non-dominated *finished* trials (MOASHA's stopped trials are not
on it), each at its final val/top1 and snn/energy_mj. Hypervolume is computed on (1 − val/top1,
energy) against the reference point (1.0, 1.1 × the largest energy any trial of either sweep reported),
i.e. top-1 0 and 10 % above the costliest network. Goal (issue 15): ``epoch_ratio`` ≥ 2 with
``hypervolume_ratio`` (MOASHA ÷ none) ≥ 0.98.

    python bench/moasha.py --quick     # 8 trials x 6 epochs at 8x8 px (~8 min on 2 CPUs)
    python bench/moasha.py             # the config as shipped: 8 trials x 8 epochs at 16x16 (~20 min)
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

from _common import emit, load_yaml, log, shutdown_ray, tune_trials, with_overrides  # noqa: E402

QUICK = dict(num_samples=8, epochs=6, img_size=8, grace_period=1, reduction_factor=3)
FULL = dict(num_samples=8, epochs=8, img_size=16, grace_period=2, reduction_factor=3)
METRICS = ("val/top1", "snn/energy_mj")


def hypervolume_2d(points: list[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Area dominated by ``points`` (both objectives minimised) and bounded by ``ref``."""
    pts = sorted(p for p in points if p[0] < ref[0] and p[1] < ref[1])
    area, best_y = 0.0, ref[1]
    for i, (x, y) in enumerate(pts):
        if y >= best_y:
            continue
        nxt = next((q[0] for q in pts[i + 1:] if q[1] < y), ref[0])
        area += (nxt - x) * (ref[1] - y)
        best_y = y
    return area


def front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [p for p in points if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in points)]


def summarize(trials: list[dict], wall_s: float, max_epochs: int) -> dict:
    rows = []
    for t in trials:
        lr = t["last_result"]
        epoch = int(lr.get("epoch", 0) or 0)
        finished = epoch >= max_epochs and t["status"] == "TERMINATED"
        vals = [lr.get(m) for m in METRICS]
        rows.append({"trial_id": t["trial_id"], "status": t["status"], "epochs": epoch,
                     "time_total_s": lr.get("time_total_s"), "finished": finished,
                     "stopped_by": lr.get("stopped_by"),
                     "top1": vals[0], "energy_mj": vals[1], "config": t["config"]})
    return {"trials": len(rows), "epochs": sum(r["epochs"] for r in rows),
            "trial_seconds": sum(r["time_total_s"] or 0.0 for r in rows),
            "finished": sum(r["finished"] for r in rows), "wall_s": wall_s, "per_trial": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--num-samples", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", help="keep the sweeps' storage and MLflow store in this folder")
    args = ap.parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    if args.num_samples:
        settings["num_samples"] = args.num_samples

    tmp = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="qksweep-bench-moasha-"))
    tmp.mkdir(parents=True, exist_ok=True)
    os.chdir(tmp)
    base = load_yaml("digits_qkformer_energy.yaml")

    from qksweep import api
    from qksweep.cluster.connect import ensure_ray

    ensure_ray()
    arms = {}
    stamp = time.strftime("%H%M%S")
    for arm in ("moasha", "none"):
        cfg = with_overrides(base, optim={"epochs": settings["epochs"]}, data={"img_size": settings["img_size"]},
                             run={"storage": str(tmp / "results")}, tracking={"uri": f"sqlite:///{tmp / 'mlflow.db'}"})
        sched = ({"name": "moasha", "grace_period": settings["grace_period"],
                  "reduction_factor": settings["reduction_factor"]} if arm == "moasha" else {"name": "none"})
        cfg["sweep"] = {**cfg["sweep"], "num_samples": settings["num_samples"], "scheduler": sched,
                        "searcher": {**cfg["sweep"]["searcher"], "seed": args.seed}}
        t0 = time.perf_counter()
        res = api.sweep(cfg, name=f"mo-{arm}-{stamp}")
        arms[arm] = summarize(tune_trials(Path(res.storage_path)), time.perf_counter() - t0, settings["epochs"])
        log(f"{arm}: {arms[arm]['epochs']} epochs, {arms[arm]['trial_seconds']:.0f} trial-s, "
            f"{arms[arm]['finished']} finished, wall {arms[arm]['wall_s']:.0f}s")
    shutdown_ray()
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)

    energies = [r["energy_mj"] for a in arms.values() for r in a["per_trial"] if r["energy_mj"] is not None]
    ref = (1.0, 1.1 * max(energies)) if energies else (1.0, 1.0)
    for a in arms.values():
        pts = [(1.0 - r["top1"], r["energy_mj"]) for r in a["per_trial"]
               if r["finished"] and r["top1"] is not None and r["energy_mj"] is not None]
        a["front"] = sorted(front(pts))
        a["hypervolume"] = hypervolume_2d(pts, ref)
    m, n = arms["moasha"], arms["none"]

    def ratio(x, y):
        return x / y if x and y else None

    emit({
        "benchmark": "moasha",
        "epoch_ratio": ratio(n["epochs"], m["epochs"]),
        "trial_seconds_ratio": ratio(n["trial_seconds"], m["trial_seconds"]),
        "hypervolume_ratio": ratio(m["hypervolume"], n["hypervolume"]),
        "hypervolume_moasha": m["hypervolume"],
        "hypervolume_none": n["hypervolume"],
        "reference_point": {"one_minus_top1": ref[0], "energy_mj": ref[1]},
        "settings": {**settings, "seed": args.seed, "config": "digits_qkformer_energy.yaml", "quick": args.quick,
                     "cpus": os.cpu_count()},
        "arms": arms,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
