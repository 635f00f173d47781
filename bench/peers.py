#!/usr/bin/env python
"""qksweep against what a user would write instead (issue 18.1), one invocation, the three in turn:

* ``qksweep``:  ``qksweep.api.sweep`` on the main job's config (``configs/digits_qkformer.yaml``: its
  space, TPE seed 0, ASHA grace 2 / reduction factor 3, 12 epochs), MLflow on.
* ``optuna``:   one Optuna study in this one process: TPE (seed 0, the same ``multivariate`` /
  ``constant_liar`` settings qksweep uses) + ``SuccessiveHalvingPruner(min_resource=2,
  reduction_factor=3)``, ``study.optimize(n_jobs=2)`` (two trials at a time, torch at one thread each as
  qksweep's workers), each epoch logged to MLflow (SQLite) with an ``MlflowClient``.
* ``raytune``:  raw Ray Tune + Train V2 as Ray documents it: a trial function that fits a
  ``TorchTrainer`` with ``TuneReportCallback``, ``OptunaSearch`` (TPE seed 0) + ``ASHAScheduler``
  (grace 2, rf 3), two trials at a time, no MLflow.

The peers train with qksweep's own data, model, optimiser and schedule (``trainables.core.build_core``)
and a plain epoch loop (forward, loss, backward, step, scheduler update; then validation), so all three
do the same work per epoch; spectra are off in all three (``spectral.enabled: false``), as a peer would
not compute them. Figures: wall seconds of each sweep (Ray start included for qksweep and raytune),
trial-seconds (Σ over trials of first-to-last epoch, start-up included where the arm exposes it), best
val/top1 at any epoch, epochs trained, per-trial overhead (trial-seconds − Σ epoch times) ÷ trials.

Keys: ``peer_optuna_wall_ratio`` = qksweep wall ÷ optuna wall (goal ≤ 1.2), ``peer_raytune_wall_ratio``
= qksweep wall ÷ raytune wall (goal ≤ 1.0).

    python bench/peers.py --quick    # 6 trials x 6 epochs at 8x8 px, grace 2, rf 3
    python bench/peers.py            # the main job: 12 trials x 12 epochs at 16x16 px
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CONFIGS, emit, load_yaml, log, shutdown_ray, with_overrides  # noqa: E402

QUICK = dict(num_samples=6, epochs=6, img_size=8)
FULL = dict(num_samples=12, epochs=12, img_size=16)
# raw Ray Tune + Train V2 can wait for ever on 2 CPUs: ASHA stops a trial, its Train controller dies, and
# its worker group's placement group can outlive it (DEVELOPERS.md, issue 22), so later worker groups
# time out (WorkerGroupStartupTimeoutError) or wait. Its sweep is bounded by Tune's own time_budget_s
RAYTUNE_BUDGET_S = {"quick": 300, "full": 1800}
CONCURRENT = 2


def base_config(tmp: Path, *, num_samples: int, epochs: int, img_size: int) -> dict:
    cfg = with_overrides(load_yaml(CONFIGS / "digits_qkformer.yaml"), optim={"epochs": epochs},
                         data={"img_size": img_size}, spectral={"enabled": False},
                         run={"storage": str(tmp / "results")}, tracking={"uri": f"sqlite:///{tmp / 'mlflow.db'}"})
    # every arm stops trials the same way: ASHA on val/top1 at grace 2, rf 3 (the main job ranks on val/loss
    # and derives grace and rf; the Optuna pruner and raw Ray Tune arms take these two numbers)
    cfg["sweep"] = {**cfg["sweep"], "num_samples": num_samples, "max_concurrent": CONCURRENT,
                    "scheduler": {"name": "asha", "grace_period": 2, "reduction_factor": 3}}
    return cfg


# ------------------------------------------------------------------------------------------ the shared epoch


def plain_epochs(cfg_dict: dict, sample: dict, report) -> None:
    """What a user's own loop does with qksweep's core: ``report(epoch, metrics)`` after each epoch;
    ``report`` returns True to stop (a pruned trial)."""
    import torch

    from qksweep.search_spaces import apply_sample
    from qksweep.trainables.core import build_core, maybe_reset, seed_everything

    cfg = apply_sample(cfg_dict, sample)
    seed_everything(cfg.run.seed)
    core = build_core(cfg, rank=0, world=1, device=torch.device("cpu"), ray_train=False)
    updates = 0
    for epoch in range(cfg.optim.epochs):
        t0 = time.perf_counter()
        core.model.train()
        core.train_batches.set_epoch(epoch)
        for x, y in core.train_batches:
            loss = core.criterion(core.model(x), y)
            core.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            maybe_reset(core.model, core.spiking)  # SpikingJelly's neurons keep state between forwards
            core.optimizer.step()
            updates += 1
            core.scheduler.step_update(num_updates=updates)
        core.scheduler.step(epoch + 1)
        val = core.evaluate(core.model)
        metrics = {"val/top1": val["top1"], "val/loss": val["loss"], "epoch": epoch + 1,
                   "epoch_time_s": time.perf_counter() - t0}
        if report(epoch + 1, metrics):
            return


# ------------------------------------------------------------------------------------------ arms


def run_qksweep(cfg: dict) -> dict:
    from qksweep import api

    t0 = time.perf_counter()
    res = api.sweep(cfg, name="peers-qksweep")
    wall = time.perf_counter() - t0
    df = res.trials
    trial_s = float(df["time_total_s"].sum())
    epochs = int(df["epoch"].sum())
    epoch_s = _tune_epoch_seconds(res.storage_path)
    shutdown_ray()
    return dict(wall_s=wall, trial_seconds=trial_s, best=float(res.best_metrics.get("val/top1")), epochs=epochs,
                per_trial_overhead_s=(trial_s - epoch_s) / len(df), trials=len(df))


def _tune_epoch_seconds(storage_path: str) -> float:
    """Σ epoch_time_s over every trial's result.json (Tune's per-trial log)."""
    import json

    total = 0.0
    for f in Path(storage_path).glob("*/result.json"):
        for line in f.read_text().splitlines():
            if line.strip():
                total += float(json.loads(line).get("epoch_time_s", 0.0))
    return total


def _optuna_space(trial, space: dict):
    from qksweep.search_spaces import parse_space

    for spec in parse_space(space):
        spec.suggest(trial)
    return dict(trial.params)


def run_optuna(cfg: dict) -> dict:
    import optuna
    import torch
    from mlflow.tracking import MlflowClient

    torch.set_num_threads(1)  # two trials at a time, one thread each: qksweep's workers hold one CPU each
    client = MlflowClient(cfg["tracking"]["uri"])
    exp = client.create_experiment("peers-optuna")
    epochs_total, epoch_s, trial_s = [0], [0.0], [0.0]
    lock = threading.Lock()

    def objective(trial: optuna.Trial) -> float:
        t0 = time.perf_counter()
        sample = _optuna_space(trial, cfg["sweep"]["space"])
        run = client.create_run(exp, run_name=f"trial-{trial.number}")
        client.log_batch(run.info.run_id, params=[optuna_param(k, v) for k, v in sample.items()])
        best, pruned = [0.0], [False]

        def report(epoch, m):
            client.log_batch(run.info.run_id, metrics=[optuna_metric(k, v, epoch) for k, v in m.items()])
            best[0] = max(best[0], m["val/top1"])
            with lock:
                epochs_total[0] += 1
                epoch_s[0] += m["epoch_time_s"]
            trial.report(m["val/top1"], epoch)
            pruned[0] = epoch < cfg["optim"]["epochs"] and trial.should_prune()
            return pruned[0]

        try:
            plain_epochs(cfg, sample, report)
        finally:
            client.set_terminated(run.info.run_id)
            with lock:
                trial_s[0] += time.perf_counter() - t0
        if pruned[0]:
            raise optuna.TrialPruned()
        return best[0]

    sampler = optuna.samplers.TPESampler(seed=cfg["sweep"]["searcher"].get("seed", 0), multivariate=True,
                                         constant_liar=True)
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=cfg["sweep"]["scheduler"]["grace_period"],
                                                    reduction_factor=cfg["sweep"]["scheduler"]["reduction_factor"])
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)
    t0 = time.perf_counter()
    study.optimize(objective, n_trials=cfg["sweep"]["num_samples"], n_jobs=CONCURRENT)
    wall = time.perf_counter() - t0
    best = max(max(t.intermediate_values.values(), default=0.0) for t in study.trials)
    n = len(study.trials)
    return dict(wall_s=wall, trial_seconds=trial_s[0], best=best, epochs=epochs_total[0],
                per_trial_overhead_s=(trial_s[0] - epoch_s[0]) / n, trials=n)


def optuna_param(k, v):
    from mlflow.entities import Param

    return Param(k, str(v))


def optuna_metric(k, v, step):
    from mlflow.entities import Metric

    return Metric(k, float(v), int(time.time() * 1000), step)


def _raytune_train_func(config: dict) -> None:
    import ray.train

    def report(epoch, m):
        ray.train.report(m)
        return False  # ASHA stops the trial from outside

    plain_epochs(config["base"], config["sample"], report)


def _raytune_trial(config: dict) -> None:
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    base = config.pop("__base")
    trainer = TorchTrainer(
        _raytune_train_func, train_loop_config={"base": base, "sample": config},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=f"peers-raytune-{ray.tune.get_context().get_trial_id()}",
                                       storage_path=base["run"]["storage"], callbacks=[TuneReportCallback()]))
    trainer.fit()


def _raytune_space(trial, *, space: dict, base: dict) -> dict:
    """OptunaSearch's define-by-run space (module level: Tune pickles the searcher); the constants it
    returns reach the trial's config beside the sampled values."""
    _optuna_space(trial, space)
    return {"__base": base}


def run_raytune(cfg: dict, budget_s: float) -> dict:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    import optuna

    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    sw = cfg["sweep"]

    search = OptunaSearch(space=functools.partial(_raytune_space, space=sw["space"], base=cfg), metric="val/top1", mode="max",
                          sampler=optuna.samplers.TPESampler(seed=sw["searcher"].get("seed", 0), multivariate=True,
                                                             constant_liar=True))
    sched = ASHAScheduler(time_attr="epoch", max_t=cfg["optim"]["epochs"], grace_period=sw["scheduler"]["grace_period"],
                          reduction_factor=sw["scheduler"]["reduction_factor"])
    tuner = tune.Tuner(tune.with_resources(_raytune_trial, {"cpu": 0, "memory": 64 * 1024**2}),
                       tune_config=tune.TuneConfig(search_alg=search, scheduler=sched, metric="val/top1", mode="max",
                                                   num_samples=sw["num_samples"], max_concurrent_trials=CONCURRENT,
                                                   time_budget_s=budget_s),
                       run_config=tune.RunConfig(name="peers-raytune", storage_path=cfg["run"]["storage"], verbose=0))
    grid = tuner.fit()
    wall = time.perf_counter() - t0
    df = grid.get_dataframe()
    trial_s = float(df["time_total_s"].fillna(0).sum()) if "time_total_s" in df else 0.0
    epochs = int(df["epoch"].fillna(0).sum()) if "epoch" in df else 0
    epoch_s = _tune_epoch_seconds(str(Path(cfg["run"]["storage"]) / "peers-raytune"))
    tops = [float(r.metrics_dataframe["val/top1"].max()) for r in grid
            if r.metrics_dataframe is not None and "val/top1" in r.metrics_dataframe]
    ray.shutdown()
    return dict(wall_s=wall, trial_seconds=trial_s, best=max(tops, default=float("nan")), epochs=epochs,
                per_trial_overhead_s=(trial_s - epoch_s) / max(1, len(df)), trials=len(df),
                errors=int(grid.num_errors), hit_time_budget=wall >= budget_s)


def run_arm(name: str, quick: bool) -> dict:
    """One arm in this process (``--arm``): a fresh interpreter per arm, so that neither qksweep's Ray
    settings (health-check interval, Tune's logger switches, worker niceness) nor its imports reach a peer."""
    size = QUICK if quick else FULL
    budget = RAYTUNE_BUDGET_S["quick" if quick else "full"]
    arms = {"qksweep": run_qksweep, "optuna": run_optuna, "raytune": lambda cfg: run_raytune(cfg, budget)}
    tmp = Path(tempfile.mkdtemp(prefix=f"peers-{name}-"))
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        return arms[name](base_config(tmp, **size))
    finally:
        os.chdir(cwd)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    import json
    import subprocess

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--arms", default="qksweep,optuna,raytune")
    ap.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one arm here, print its JSON
    args = ap.parse_args()
    if args.arm:
        emit(run_arm(args.arm, args.quick))
        return
    size = QUICK if args.quick else FULL
    out: dict = {"mode": "quick" if args.quick else "full", **{f"setting_{k}": v for k, v in size.items()},
                 "concurrent": CONCURRENT}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "TUNE_"))}
    for name in args.arms.split(","):
        log(f"{name}: {size}")
        cmd = [sys.executable, __file__, "--arm", name] + (["--quick"] if args.quick else [])
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            out[f"{name}_error"] = f"exit {proc.returncode}"
            continue
        res = json.loads(lines[-1])
        log(f"{name}: {res}")
        out.update({f"{name}_{k}": v for k, v in res.items()})
    for peer in ("optuna", "raytune"):
        a, b = out.get("qksweep_wall_s"), out.get(f"{peer}_wall_s")
        if a and b:
            out[f"peer_{peer}_wall_ratio"] = a / b
        a, b = out.get("qksweep_trial_seconds"), out.get(f"{peer}_trial_seconds")
        if a and b:
            out[f"peer_{peer}_trial_seconds_ratio"] = a / b
    emit(out)


if __name__ == "__main__":
    main()
