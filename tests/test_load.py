"""Load: 50 tiny trials on 2 CPUs, each a real Tune trial driving a real Train run that logs to MLflow
(SQLite: concurrent writers meet its lock and the bounded retries). Every trial must end with one
FINISHED child run holding every metric once."""

from __future__ import annotations

import time

import pytest
from mlflow.tracking import MlflowClient

from qksweep import api

from .conftest import tiny_config

KEYS = ("train/loss", "train/top1", "val/loss", "val/top1", "val/top5", "lr", "epoch")


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_fifty_tiny_trials_each_one_finished_run_with_every_metric(ray_session, workdir):
    n = 50
    cfg = tiny_config(workdir, optim={"epochs": 1})
    cfg["model"] = {"name": "vit_tiny_patch16_224", "patch_size": 4, "embed_dim": 16, "depth": 1,
                    "num_heads": 2, "mlp_ratio": 2}
    cfg["data"] = {"name": "synthetic", "img_size": 8, "batch_size": 16, "num_classes": 5, "train_size": 16,
                   "val_size": 10}
    # the trial driver asks for no CPU, a worker for half of one: 4 trials at a time on 2 CPUs. Memory is
    # the limit beyond that: a trial is three processes (driver, Train controller, worker), ~2 GB in all
    cfg["run"].update(cpus_per_worker=0.5, max_failures=0)
    cfg["sweep"] = {"num_samples": n, "max_concurrent": 4, "searcher": {"sampler": "random", "seed": 0},
                    "scheduler": {"name": "none"}, "space": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}}
    t0 = time.monotonic()
    res = api.sweep(cfg, name="load50")
    took = time.monotonic() - t0
    print(f"{n} trials in {took:.0f}s ({took / n:.1f}s a trial)")
    assert res.num_errors == 0 and len(res.trials) == n

    c = MlflowClient(cfg["tracking"]["uri"])
    exp = c.get_experiment_by_name("test")
    found = c.search_runs([exp.experiment_id], filter_string="tags.`qksweep.sweep` = 'load50'", max_results=500)
    parent = [r for r in found if r.data.tags.get("qksweep.kind") == "sweep"]
    trials = [r for r in found if r.data.tags.get("qksweep.kind") == "trial"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert len(trials) == n and len({r.data.tags["qksweep.trial_id"] for r in trials}) == n
    assert all(r.data.tags["mlflow.parentRunId"] == parent[0].info.run_id for r in trials)
    assert sorted({r.info.status for r in trials}) == ["FINISHED"]
    for r in trials:
        for key in KEYS:
            steps = [m.step for m in c.get_metric_history(r.info.run_id, key)]
            assert steps == [1], (r.data.tags["qksweep.trial_id"], key, steps)
