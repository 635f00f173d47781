#!/usr/bin/env python
"""Does early stopping save compute? ASHA+TPE against random search without early stopping.

Both sweeps run on digits with the main job's config (``configs/digits_qkformer.yaml``) and search
space, the same number of trials and the same searcher seed, one after the other in one local Ray:

* ``asha``:   ``sweep.searcher.sampler: tpe``,    ``sweep.scheduler``: the config's, as ``asha`` (its rung metric,
  grace period and reduction factor, or those given on the command line)
* ``random``: ``sweep.searcher.sampler: random``, ``sweep.scheduler: {name: none}`` (every trial runs all epochs)

The full run takes the main job's own settings from its config (``sweep.num_samples``, ``optim.epochs``,
``data.img_size``, ``sweep.searcher``, ``sweep.scheduler``), so it measures what ``qksweep sweep
configs/digits_qkformer.yaml`` runs.

Trial-seconds are the sum over trials of Tune's ``time_total_s`` (trainable start to its last
report: the trial's Train run start-up plus its epochs), read from Tune's experiment state. The best
score of each sweep is the best ``val/top1`` any trial reached at any epoch.

Keys: ``asha_compute_ratio`` = random trial-seconds ÷ ASHA's (goal ≥ 3), ``asha_best_gap`` = best
random − best ASHA (goal ≤ 0.005), plus the parts that explain them: epochs trained by each
(``asha_epoch_ratio``), the epoch-time ratio without per-trial start-up, and the per-trial fixed
cost (``trial_overhead_s``: ``time_total_s`` minus the trial's summed ``epoch_time_s``), and
``asha_epoch_ratio_ideal``, the most successive halving can save at these settings (1/rf of the trials
passing each rung, no start-up cost).

TPE's first ``n_startup_trials`` trials are exactly what the random sampler with the same seed samples,
so both sweeps start with the same configurations; after them TPE's choices differ.

Every trial's reports are kept in the JSON (``per_trial[].curve``: epoch, ``val/top1``, ``val/loss``,
``epoch_time_s``, ``time_total_s``), with its start time and its start-up cost (``startup_s``: the first
report's time minus the first epoch's), so that ``bench/asha_replay.py`` can replay ASHA offline on the
random arm's curves. ``--arms asha --baseline FILE`` runs the ASHA arm only and takes the random arm
from an earlier result.

    python bench/sweep_efficiency.py --quick     # 6 trials x 8 epochs at 8x8 px, grace 2, rf 3 (~6 min on 2 CPUs)
    python bench/sweep_efficiency.py             # the main job's settings (configs/digits_qkformer.yaml)
    python bench/sweep_efficiency.py --arms random --keep DIR      # record the random arm's curves only
    python bench/sweep_efficiency.py --arms asha --baseline R.json # ASHA against a recorded random arm
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

from _common import emit, load_yaml, log, median, shutdown_ray, trial_curve, tune_trials, with_overrides  # noqa: E402

# --quick: the main job's scheduler (grace 2, rf 3; its warm-up epoch leaves every trial at chance after
# epoch 1, so grace 1 would stop nothing) on fewer, shorter, smaller trials
QUICK = dict(num_samples=6, epochs=8, grace_period=2, reduction_factor=3, img_size=8)
SCHEDULER_KEYS = ("grace_period", "reduction_factor", "metric")


def main_job_settings(base: dict) -> dict:
    """The full run's settings: the main job's own (the scheduler's keys as its config gives them; a key
    left out is derived by qksweep as in the main job)."""
    sw = base.get("sweep", {})
    sch = sw.get("scheduler", {}) or {}
    out = dict(num_samples=sw.get("num_samples", 12), epochs=base["optim"]["epochs"], img_size=base["data"]["img_size"])
    out.update({k: sch.get(k) for k in SCHEDULER_KEYS})
    return out


def sweep_config(base: dict, *, arm: str, tmp: Path, num_samples: int, epochs: int, img_size: int, seed: int,
                 **scheduler) -> dict:
    cfg = with_overrides(base, optim={"epochs": epochs}, data={"img_size": img_size},
                         run={"storage": str(tmp / "results")}, tracking={"uri": f"sqlite:///{tmp / 'mlflow.db'}"})
    sw = dict(cfg["sweep"])
    sw["num_samples"] = num_samples
    if arm == "asha":
        sw["searcher"] = {**sw.get("searcher", {}), "sampler": "tpe", "seed": seed}
        sw["scheduler"] = {**(sw.get("scheduler") or {}), "name": "asha",
                           **{k: v for k, v in scheduler.items() if v is not None}}
    else:
        sw["searcher"] = {**sw.get("searcher", {}), "sampler": "random", "seed": seed}
        sw["scheduler"] = {"name": "none"}
    cfg["sweep"] = sw
    return cfg


def other_rays() -> int | None:
    """How many other local Ray clusters (GCS processes) run beside this one (call while ours runs)."""
    try:
        from ray._private.services import find_gcs_addresses

        find_gcs_addresses.cache_clear()
        return max(0, len(find_gcs_addresses()) - 1)
    except Exception:  # noqa: BLE001
        return None


def ideal_epoch_ratio(epochs: int, grace: int, rf: int) -> float:
    """Epochs of no-stopping ÷ the expected epochs per trial of synchronous successive halving with
    Ray's ASHA rungs (grace·rf^k below max_t) when exactly 1/rf of the trials pass each rung: the
    most ASHA can save with these settings, before per-trial start-up and asynchrony."""
    import math

    k_max = int(math.log(epochs / grace) / math.log(rf) + 1)
    rungs = sorted(grace * rf**k for k in range(k_max) if grace * rf**k < epochs)
    expected, prev = 0.0, 0
    for k, m in enumerate(rungs + [epochs]):
        expected += rf ** (-k) * (m - prev)
        prev = m
    return epochs / expected


def asha_settings(cfg_dict: dict) -> dict:
    """The ASHA arm's scheduler as qksweep builds it: max_t, grace period, reduction factor, rung metric
    and mode, and the sampler's start-up count."""
    from qksweep.api import resolve
    from qksweep.orchestrator.searcher import sampler_kwargs, scheduler_settings

    cfg = resolve(cfg_dict)
    out = scheduler_settings(cfg)
    out["n_startup_trials"] = sampler_kwargs(cfg, []).get("n_startup_trials", 10)
    out["num_samples"] = cfg.sweep.num_samples
    return out


def summarize_arm(trials: list[dict], wall_s: float, metric: str = "val/top1", sweep_dir: Path | None = None) -> dict:
    rows = []
    for t in sorted(trials, key=lambda t: t.get("start_time") or 0.0):
        lr = t["last_result"]
        ma = t["metric_analysis"]
        epochs = int(lr.get("epoch", 0) or 0)
        ep_avg = (ma.get("epoch_time_s") or {}).get("avg")
        ep_sum = ep_avg * epochs if ep_avg is not None else None
        total = lr.get("time_total_s")
        curve = trial_curve(sweep_dir, t["trial_id"]) if sweep_dir is not None else []
        first = curve[0] if curve else {}
        startup = (first["time_total_s"] - first["epoch_time_s"]
                   if first.get("time_total_s") is not None and first.get("epoch_time_s") is not None else None)
        rows.append({
            "trial_id": t["trial_id"],
            "status": t["status"],
            "start_time": t.get("start_time"),
            "epochs": epochs,
            "time_total_s": total,
            "epoch_time_sum_s": ep_sum,
            "startup_s": startup,
            "best": (ma.get(metric) or {}).get("max"),
            "config": t["config"],
            "curve": curve,
        })
    total_s = sum(r["time_total_s"] or 0.0 for r in rows)
    ep_s = sum(r["epoch_time_sum_s"] or 0.0 for r in rows)
    bests = [r["best"] for r in rows if r["best"] is not None]
    return {
        "trials": len(rows),
        "trial_seconds": total_s,
        "epoch_seconds": ep_s,
        "epochs": sum(r["epochs"] for r in rows),
        "best": max(bests) if bests else None,
        "wall_s": wall_s,
        "trial_overhead_s": median((r["time_total_s"] or 0) - (r["epoch_time_sum_s"] or 0) for r in rows),
        "stopped_early": sum(1 for r in rows if r["epochs"] < max((x["epochs"] for x in rows), default=0)),
        "per_trial": rows,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="6 trials x 8 epochs at 8x8 px (a few minutes on 2 CPUs)")
    ap.add_argument("--num-samples", type=int)
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--grace-period", type=int)
    ap.add_argument("--reduction-factor", type=float)
    ap.add_argument("--metric", help="ASHA's rung metric (sweep.scheduler.metric), e.g. val/loss")
    ap.add_argument("--n-startup-trials", type=int, help="the ASHA arm's TPE start-up count (sweep.searcher.n_startup_trials)")
    ap.add_argument("--img-size", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default="digits_qkformer.yaml", help="a config under configs/ (default: the main job)")
    ap.add_argument("--keep", help="keep the sweeps' storage and MLflow store in this folder")
    ap.add_argument("--arms", default="asha,random", help="which sweeps to run: asha,random (default), asha or random")
    ap.add_argument("--baseline", help="an earlier result of this benchmark whose random arm stands in for one not run here")
    args = ap.parse_args(argv)

    base = load_yaml(args.config)
    settings = dict(QUICK, metric=None) if args.quick else main_job_settings(base)
    for k in settings:
        v = getattr(args, k)
        if v is not None:
            settings[k] = v
    if args.n_startup_trials is not None:
        base = with_overrides(base, sweep={"searcher": {**base["sweep"].get("searcher", {}),
                                                        "n_startup_trials": args.n_startup_trials}})
    run_arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not set(run_arms) <= {"asha", "random"} or not run_arms:
        ap.error(f"--arms: asha, random or both, not {args.arms!r}")

    baseline = Path(args.baseline).resolve() if args.baseline else None  # read after the chdir below
    if baseline is not None and not baseline.is_file():
        ap.error(f"--baseline {args.baseline}: no such file")
    tmp = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="qksweep-bench-sweep-"))
    tmp.mkdir(parents=True, exist_ok=True)
    os.chdir(tmp)  # MLflow puts a SQLite store's artifacts under ./mlruns of the working directory

    from qksweep import api
    from qksweep.cluster.connect import ensure_ray

    t0 = time.perf_counter()
    ensure_ray()
    log(f"ray started in {time.perf_counter() - t0:.1f}s; settings {settings}; storage {tmp}")

    arms = {}
    stamp = time.strftime("%H%M%S")
    effective = None
    for arm in run_arms:
        cfg = sweep_config(base, arm=arm, tmp=tmp, seed=args.seed, **settings)
        if arm == "asha":
            effective = asha_settings(cfg)
        name = f"bench-{arm}-{stamp}"
        t = time.perf_counter()
        res = api.sweep(cfg, name=name)
        wall = time.perf_counter() - t
        trials = tune_trials(Path(res.storage_path))
        arms[arm] = summarize_arm(trials, wall, sweep_dir=Path(res.storage_path))
        arms[arm]["best_reported"] = (res.best_metrics or {}).get("val/top1")
        log(f"{arm}: {arms[arm]['trials']} trials, {arms[arm]['epochs']} epochs, "
            f"{arms[arm]['trial_seconds']:.0f} trial-s, best {arms[arm]['best']}, wall {wall:.0f}s")

    others = other_rays()
    shutdown_ray()
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)

    if baseline is not None:
        import json

        earlier = json.loads(baseline.read_text().strip().splitlines()[-1])
        for arm in ("asha", "random"):
            if arm not in arms and arm in earlier.get("arms", {}):
                arms[arm] = {**earlier["arms"][arm], "from": str(args.baseline)}
    if effective is None:
        effective = asha_settings(sweep_config(base, arm="asha", tmp=tmp, seed=args.seed, **settings))
    empty = {"trial_seconds": None, "epoch_seconds": None, "epochs": None, "best": None, "wall_s": None,
             "trial_overhead_s": None}
    a, r = arms.get("asha", empty), arms.get("random", empty)

    def ratio(x, y):
        return x / y if x and y else None

    out = {
        "benchmark": "sweep_efficiency",
        "asha_compute_ratio": ratio(r["trial_seconds"], a["trial_seconds"]),
        "asha_best_gap": (r["best"] - a["best"]) if a["best"] is not None and r["best"] is not None else None,
        "asha_epoch_ratio": ratio(r["epochs"], a["epochs"]),
        "asha_epoch_seconds_ratio": ratio(r["epoch_seconds"], a["epoch_seconds"]),
        "asha_epoch_ratio_ideal": ideal_epoch_ratio(effective["max_t"], effective["grace_period"], effective["reduction_factor"]),
        "asha_wall_ratio": ratio(r["wall_s"], a["wall_s"]),
        "asha_trial_seconds": a["trial_seconds"],
        "random_trial_seconds": r["trial_seconds"],
        "asha_best": a["best"],
        "random_best": r["best"],
        "trial_overhead_s": median([a["trial_overhead_s"], r["trial_overhead_s"]]),
        "settings": {**settings, "seed": args.seed, "config": args.config, "quick": args.quick, "arms": run_arms,
                     "asha": effective,
                     "cpus": os.cpu_count(),
                     "other_ray_instances_on_machine": others},
        "arms": arms,
    }
    emit(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
