"""Two sweeps at once on one store (issue 20.4): started together from two shells, as two users on one
machine would, against one SQLite MLflow store and one ``run.storage``, with different names. Each
``qksweep sweep`` starts its own local Ray. Both must finish with every run and every epoch present:
SQLite serialises the two writers (MLflow calls retry a locked database within their deadline), each
sweep keeps its own folder and Optuna study, and neither touches the other's runs."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from .conftest import tiny_config

pytestmark = pytest.mark.slow

NAMES = ("left", "right")


def test_two_sweeps_at_once_on_one_store_both_finish_with_every_run(workdir):
    cfg = tiny_config(workdir, optim={"epochs": 2, "warmup_epochs": 0})
    cfg["sweep"] = {"metric": "val/loss", "mode": "min", "num_samples": 2, "max_concurrent": 1,
                    "searcher": {"sampler": "random", "seed": 0}, "scheduler": {"name": "none"},
                    "space": {"optim.lr": {"loguniform": [1e-3, 1e-2]}}}
    (workdir / "sweep.yaml").write_text(yaml.safe_dump(cfg))
    # each starts its own local Ray; the console is the CLI's own (conftest turns Ray's log dedup off)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_DEDUP_LOGS")}
    procs = {n: subprocess.Popen([sys.executable, "-m", "qksweep.cli", "sweep", "sweep.yaml", "--name", n],
                                 cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True)
             for n in NAMES}
    outs = {}
    try:
        for n, p in procs.items():
            outs[n] = p.communicate(timeout=420)[0]
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, 9)
    for n, p in procs.items():
        assert p.returncode == 0, f"sweep {n} exited {p.returncode}:\n{outs[n][-3000:]}"

    c = MlflowClient(cfg["tracking"]["uri"])
    exp = c.get_experiment_by_name("test")
    for n in NAMES:
        runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`qksweep.sweep` = '{n}'")
        trials = [r for r in runs if r.data.tags.get("qksweep.kind") == "trial"]
        parents = [r for r in runs if r.data.tags.get("qksweep.kind") == "sweep"]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED", (n, [r.info.status for r in parents])
        per_trial = Counter(r.data.tags["qksweep.trial_id"] for r in trials)
        assert len(per_trial) == 2 and set(per_trial.values()) == {1}, (n, per_trial)
        for r in trials:
            assert r.info.status == "FINISHED", (n, r.info.run_id, r.info.status)
            assert r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id, (n, r.data.tags)
            for key in ("epoch", "val/loss", "train/loss"):
                steps = sorted(m.step for m in c.get_metric_history(r.info.run_id, key))
                assert steps == [1, 2], (n, key, steps)
        # the console, as a user reads it off a pipe: every epoch line once, no Ray prefixes or colour codes
        lines = outs[n].splitlines()
        for r in trials:
            tid = r.data.tags["qksweep.trial_id"]
            shown = [ln for ln in lines if ln.startswith(f"[{tid}] epoch ")]
            assert [ln.split()[2] for ln in shown] == ["1/2", "2/2"], (n, tid, shown)
        assert "\x1b[" not in outs[n] and "pid=" not in outs[n], outs[n][-2000:]
        study = optuna.load_study(study_name=None, storage=f"sqlite:///{workdir / 'results' / n / 'optuna.db'}")
        assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"], (n, study.trials)
        assert {t.user_attrs["mlflow_run_id"] for t in study.trials} == {r.info.run_id for r in trials}
    top = sorted(p.name for p in (workdir / "results").iterdir())
    assert set(NAMES) <= set(top), top
