#!/usr/bin/env python
"""Does telling Optuna that a dead network is infeasible keep TPE away from dead regions?

A space that produces silent networks: the main job's QKFormer on digits (``configs/digits_qkformer.yaml``,
8x8 px) with ``model.neuron.v_threshold`` log-uniform over [0.25, 16] (measured before training and
after one and two epochs: threshold 0.5 fires ~0.13-0.25, 1.0 ~0.001-0.02, 2.0 ~1e-5, 4 and above 0),
``optim.lr`` beside it, and ``sweep.stop_on.firing_rate: {low: 1e-4, patience: 1}``, which stops a trial
whose mean firing rate stays below 1e-4 after an epoch. No other early stopping (scheduler ``none``).

Two objectives settings: ``top1`` (``sweep.metric: val/top1``) and ``top1_energy`` (``[val/top1,
snn/energy_mj]``, max/min: a dead network's near-zero energy is what a multi-objective search could
mistake for good), both with TPE. Two arms per seed and setting, same space, same sampler seed, one
after the other in one local Ray:

* ``feedback``: qksweep as shipped: the stopped trial is told to Optuna with a violated ``firing_rate``
  constraint (TPE puts infeasible trials below every feasible one), as PRUNED with one objective, as
  COMPLETE with its last values with several;
* ``plain``: the same with the constraint withheld (``HonestOptunaSearch.dead_violation`` patched to
  None in this process, where Tune's controller and the searcher run): the trial is only PRUNED, with
  its intermediate values, as before issue 15.

A trial counts as dead when the rule stopped it (``stopped_by: firing_rate`` in its last Tune
result). Trials are ordered as the searcher asked for them (their Optuna trial number); the first
``n_startup_trials`` are TPE's random start-up in both arms (same seed: the same configurations), so
the trials after start-up are where the feedback can act. Keys, per setting and summed over seeds:
``dead_{first,second}_half_{feedback,plain}``, ``dead_after_startup_*``, ``dead_ratio_after_startup``
(plain ÷ feedback, > 1: the feedback avoided dead trials), the mean best val/top1 of each arm.

    python bench/dead_feedback.py --quick    # 1 seed, 16 trials per sweep (~10 min on 2 CPUs)
    python bench/dead_feedback.py            # 2 seeds, 20 trials per sweep (~30 min on 2 CPUs)
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

QUICK = dict(seeds=1, num_samples=16, epochs=3, n_startup_trials=4)
FULL = dict(seeds=2, num_samples=20, epochs=3, n_startup_trials=4)
# one objective (TPE), and accuracy vs energy (multi-objective TPE), where a dead network's near-zero
# energy would otherwise look attractive
OBJECTIVES = {"top1": (["val/top1"], ["max"]), "top1_energy": (["val/top1", "snn/energy_mj"], ["max", "min"])}
SPACE = {"model.neuron.v_threshold": {"loguniform": [0.25, 16.0]}, "optim.lr": {"loguniform": [1.0e-3, 6.0e-3]}}
RULE = {"low": 1.0e-4, "high": 0.9, "patience": 1}


def sweep_config(base: dict, *, tmp: Path, objectives: str, seed: int, num_samples: int, epochs: int,
                 n_startup_trials: int) -> dict:
    metrics, modes = OBJECTIVES[objectives]
    cfg = with_overrides(base, optim={"epochs": epochs}, data={"img_size": 8}, spectral={"enabled": False},
                         run={"storage": str(tmp / "results")}, tracking={"uri": f"sqlite:///{tmp / 'mlflow.db'}"})
    cfg["snn"] = {"enabled": True, "val_batches": 2}
    cfg["sweep"] = {**cfg["sweep"], "num_samples": num_samples, "space": dict(SPACE),
                    "metric": metrics if len(metrics) > 1 else metrics[0], "mode": modes if len(modes) > 1 else modes[0],
                    "searcher": {"name": "optuna", "sampler": "tpe", "seed": seed, "n_startup_trials": n_startup_trials},
                    "scheduler": {"name": "none"}, "stop_on": {"firing_rate": dict(RULE)}}
    return cfg


def asked_order(sweep_dir: Path) -> dict[str, int]:
    """Tune trial id -> the Optuna trial number (the order the searcher asked for them)."""
    import optuna

    from qksweep.orchestrator.searcher import TUNE_TRIAL_ATTR

    study = optuna.load_study(study_name=None, storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    return {t.user_attrs[TUNE_TRIAL_ATTR]: t.number for t in study.trials if TUNE_TRIAL_ATTR in t.user_attrs}


def summarize(trials: list[dict], order: dict[str, int], startup: int, wall_s: float) -> dict:
    def trial_number(trial_id: str) -> int:
        return order.get(trial_id, len(order))

    rows = sorted(trials, key=lambda t: trial_number(t["trial_id"]))
    dead = [t["last_result"].get("stopped_by") == "firing_rate" for t in rows]
    half = len(rows) // 2
    bests = [(t["metric_analysis"].get("val/top1") or {}).get("max") for t in rows]
    bests = [b for b in bests if b is not None]
    return {
        "trials": len(rows),
        "dead": sum(dead),
        "dead_first_half": sum(dead[:half]),
        "dead_second_half": sum(dead[half:]),
        "dead_startup": sum(dead[:startup]),
        "dead_after_startup": sum(dead[startup:]),
        "best": max(bests) if bests else None,
        "wall_s": wall_s,
        "per_trial": [{"n": trial_number(t["trial_id"]), "trial_id": t["trial_id"], "dead": d,
                       "v_threshold": (t["config"] or {}).get("model.neuron.v_threshold"),
                       "epochs": t["last_result"].get("epoch"),
                       "best": (t["metric_analysis"].get("val/top1") or {}).get("max")}
                      for t, d in zip(rows, dead)],
    }


def study_summary(arms: dict[str, list[dict]], settings: dict) -> dict:
    def total(arm: str, key: str) -> int:
        return sum(s[key] for s in arms[arm])

    def best(arm: str) -> float | None:
        bs = [s["best"] for s in arms[arm] if s["best"] is not None]
        return sum(bs) / len(bs) if bs else None

    fb, pl = total("feedback", "dead_after_startup"), total("plain", "dead_after_startup")
    return {
        "dead_first_half_feedback": total("feedback", "dead_first_half"),
        "dead_first_half_plain": total("plain", "dead_first_half"),
        "dead_second_half_feedback": total("feedback", "dead_second_half"),
        "dead_second_half_plain": total("plain", "dead_second_half"),
        "dead_after_startup_feedback": fb,
        "dead_after_startup_plain": pl,
        "dead_ratio_after_startup": (pl / fb) if fb else None,
        "trials_after_startup": sum(s["trials"] - settings["n_startup_trials"] for s in arms["feedback"]),
        "best_mean_feedback": best("feedback"),
        "best_mean_plain": best("plain"),
        "arms": arms,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 seed, 16 trials")
    ap.add_argument("--seeds", type=int)
    ap.add_argument("--num-samples", type=int)
    ap.add_argument("--keep", help="keep the sweeps' storage and MLflow store in this folder")
    args = ap.parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    for k in ("seeds", "num_samples"):
        if getattr(args, k) is not None:
            settings[k] = getattr(args, k)

    tmp = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="qksweep-bench-dead-"))
    tmp.mkdir(parents=True, exist_ok=True)
    os.chdir(tmp)
    base = load_yaml("digits_qkformer.yaml")

    from qksweep import api
    from qksweep.cluster.connect import ensure_ray
    from qksweep.orchestrator.searcher import HonestOptunaSearch

    ensure_ray()
    shipped = HonestOptunaSearch.dead_violation
    stamp = time.strftime("%H%M%S")
    out: dict = {"benchmark": "dead_feedback"}
    for objectives in OBJECTIVES:
        arms: dict[str, list[dict]] = {"feedback": [], "plain": []}
        for seed in range(settings["seeds"]):
            for arm in ("feedback", "plain"):
                HonestOptunaSearch.dead_violation = shipped if arm == "feedback" else (lambda self, result: None)
                cfg = sweep_config(base, tmp=tmp, objectives=objectives, seed=seed, num_samples=settings["num_samples"],
                                   epochs=settings["epochs"], n_startup_trials=settings["n_startup_trials"])
                t0 = time.perf_counter()
                res = api.sweep(cfg, name=f"dead-{objectives}-{arm}-s{seed}-{stamp}".replace("_", ""))
                wall = time.perf_counter() - t0
                s = summarize(tune_trials(Path(res.storage_path)), asked_order(Path(res.storage_path)),
                              settings["n_startup_trials"], wall)
                s["seed"] = seed
                arms[arm].append(s)
                log(f"{objectives} seed {seed} {arm}: dead {s['dead']}/{s['trials']} (first half {s['dead_first_half']}, "
                    f"second half {s['dead_second_half']}, after start-up {s['dead_after_startup']}), best {s['best']}")
            HonestOptunaSearch.dead_violation = shipped
        out[objectives] = study_summary(arms, settings)
    shutdown_ray()
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    out["settings"] = {**settings, "space": SPACE, "rule": RULE, "objectives": OBJECTIVES, "cpus": os.cpu_count(),
                       "quick": args.quick}
    emit(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
