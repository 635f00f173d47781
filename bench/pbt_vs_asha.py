#!/usr/bin/env python
"""Population-based training against ASHA at the same compute, on digits (issue 16.4).

The main job's config and space (``configs/digits_qkformer.yaml``: QKFormer heads, head width, time steps
and lr), one local Ray, the arms one after the other:

* ``asha``: the main job's sweep (TPE + ASHA, its grace period and reduction factor), run first;
* ``pbt`` / ``pb2``: a population of ``P`` trials that all train every epoch, where ``P`` is ASHA's
  trial-seconds divided by what one of ASHA's trials that trained every epoch cost (their mean), rounded:
  the same compute as ASHA's, as near as whole trials allow; ``perturbation_interval`` 2,
  ``quantile_fraction`` 0.25, ``synch`` (qksweep's default). PBT perturbs ``optim.lr`` (the one key of the
  space a running trial can change) and samples the model keys once per trial;
* ``pbt-budget``: PBT with as many trials as ASHA's sweep and ``sweep.time_budget_s`` = ASHA's wall time, so
  that both sweeps hold the same 2 slots for the same time (the budget ends PBT wherever it is).

Figures per arm: trials, epochs, trial-seconds (Σ Tune ``time_total_s``: the trial's process start to its last
report, pauses excluded), epoch-seconds (Σ ``epoch_time_s``), wall, best val/top1 at any epoch, copies made
(``qksweep.pbt.exploit.*`` tags). Keys: ``pbt_best_minus_asha``, ``pb2_best_minus_asha`` (> 0: PBT better),
``pbt_trial_seconds_ratio`` (PBT ÷ ASHA trial-seconds, ~1 when the budgets match).

    python bench/pbt_vs_asha.py --quick     # 8x8 px, 6 ASHA trials x 8 epochs (a few minutes on 2 CPUs)
    python bench/pbt_vs_asha.py             # the main job's settings: 12 trials x 12 epochs at 16x16
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

QUICK = dict(num_samples=6, epochs=8, img_size=8)
FULL = dict(num_samples=12, epochs=12, img_size=16)


def arm_config(base: dict, tmp: Path, *, arm: str, num_samples: int, epochs: int, img_size: int, seed: int) -> dict:
    cfg = with_overrides(base, optim={"epochs": epochs}, data={"img_size": img_size},
                         run={"storage": str(tmp / "results")}, tracking={"uri": f"sqlite:///{tmp / 'mlflow.db'}"},
                         spectral={"enabled": False})
    sw = dict(cfg["sweep"])
    sw["num_samples"] = num_samples
    sw["searcher"] = {**sw.get("searcher", {}), "seed": seed}
    if arm.startswith("pb"):
        sw["searcher"] = {"seed": seed}
        sw["scheduler"] = {"name": arm.split("-")[0], "perturbation_interval": 2, "quantile_fraction": 0.25}
    cfg["sweep"] = sw
    return cfg


def full_trial_seconds(trials: list[dict], epochs: int) -> float | None:
    """What a trial that trained every epoch cost (mean of ASHA's such trials)."""
    full = [t["last_result"].get("time_total_s") for t in trials if int(t["last_result"].get("epoch", 0) or 0) >= epochs]
    full = [x for x in full if x]
    return sum(full) / len(full) if full else None


def summarize(trials: list[dict], wall_s: float) -> dict:
    epochs = [int(t["last_result"].get("epoch", 0) or 0) for t in trials]
    ep_s = [((t["metric_analysis"].get("epoch_time_s") or {}).get("avg") or 0.0) * e for t, e in zip(trials, epochs)]
    bests = [(t["metric_analysis"].get("val/top1") or {}).get("max") for t in trials]
    bests = [b for b in bests if b is not None]
    return {"trials": len(trials), "epochs": sum(epochs), "epoch_seconds": sum(ep_s),
            "trial_seconds": sum(t["last_result"].get("time_total_s") or 0.0 for t in trials),
            "best": max(bests) if bests else None, "wall_s": wall_s}


def copies(uri: str, sweep: str) -> int:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("qkformer-digits")
    found = c.search_runs([exp.experiment_id], f"tags.`qksweep.sweep` = '{sweep}' and tags.`qksweep.kind` = 'trial'")
    return sum(1 for r in found for k in r.data.tags if k.startswith("qksweep.pbt.exploit."))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arms", default="asha,pbt,pb2,pbt-budget", help="asha first (it sets the population size)")
    ap.add_argument("--keep", help="keep the sweeps' storage and MLflow store in this folder")
    args = ap.parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    tmp = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="qksweep-bench-pbt-"))
    tmp.mkdir(parents=True, exist_ok=True)
    os.chdir(tmp)
    base = load_yaml("digits_qkformer.yaml")

    from qksweep import api
    from qksweep.cluster.connect import ensure_ray

    ensure_ray()
    arms: dict[str, dict] = {}
    stamp = time.strftime("%H%M%S")
    population = settings["num_samples"]
    for arm in [a.strip() for a in args.arms.split(",") if a.strip()]:
        n = population if arm in ("pbt", "pb2") else settings["num_samples"]
        cfg = arm_config(base, tmp, arm=arm, seed=args.seed, **{**settings, "num_samples": n})
        if arm == "pbt-budget":
            cfg["sweep"]["time_budget_s"] = arms["asha"]["wall_s"]
        name = f"bench-{arm}-{stamp}"
        t = time.perf_counter()
        res = api.sweep(cfg, name=name)
        trials = tune_trials(Path(res.storage_path))
        arms[arm] = summarize(trials, time.perf_counter() - t)
        if arm == "asha":  # the population that costs what ASHA's sweep did
            full = full_trial_seconds(trials, settings["epochs"])
            arms[arm]["full_trial_seconds"] = full
            population = max(2, round(arms[arm]["trial_seconds"] / full)) if full else settings["num_samples"]
        else:
            arms[arm]["copies"] = copies(cfg["tracking"]["uri"], name)
        log(f"{arm}: {arms[arm]}")
    shutdown_ray()
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)

    a = arms.get("asha", {})

    def minus(arm):
        x = arms.get(arm, {})
        return x["best"] - a["best"] if x.get("best") is not None and a.get("best") is not None else None

    def ratio(arm, key):
        x = arms.get(arm, {})
        return x[key] / a[key] if x.get(key) and a.get(key) else None

    emit({"benchmark": "pbt_vs_asha", "pbt_best_minus_asha": minus("pbt"), "pb2_best_minus_asha": minus("pb2"),
          "pbt_budget_best_minus_asha": minus("pbt-budget"), "pbt_budget_wall_ratio": ratio("pbt-budget", "wall_s"),
          "pbt_trial_seconds_ratio": ratio("pbt", "trial_seconds"), "pb2_trial_seconds_ratio": ratio("pb2", "trial_seconds"),
          "pbt_epoch_ratio": ratio("pbt", "epochs"), "population": population,
          "settings": {**settings, "seed": args.seed, "quick": args.quick, "cpus": os.cpu_count()}, "arms": arms})
    return 0


if __name__ == "__main__":
    sys.exit(main())
