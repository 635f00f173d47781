"""Reused trial processes (``sweep.reuse_actors``, on by default for one-worker trials): a trial process
that finished, or that ASHA stopped, trains the next trial instead of a fresh process importing Ray,
torch and MLflow again. What a trial learns must not depend on it: the same sweep with reuse on and
off gives every configuration the same epochs and the same metrics, each in its own MLflow run."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from qksweep import api
from qksweep.checks import check_config
from qksweep.config import ConfigError, load_config

from .conftest import tiny_config


def _sweep(workdir, reuse: bool):
    cfg = tiny_config(workdir / ("on" if reuse else "off"), optim={"epochs": 2, "warmup_epochs": 0})
    cfg["sweep"] = {"metric": "val/loss", "mode": "min", "num_samples": 3, "max_concurrent": 1, "reuse_actors": reuse,
                    "searcher": {"sampler": "random", "seed": 3},
                    "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
                    "space": {"optim.lr": {"loguniform": [1e-4, 3e-2]}}}
    res = api.sweep(cfg, name="reuse")
    c = MlflowClient(cfg["tracking"]["uri"])
    exp = c.get_experiment_by_name("test")
    trials = [r for r in c.search_runs([exp.experiment_id], filter_string="tags.`qksweep.kind` = 'trial'")]
    by_lr = {r.data.params["optim.lr"]: [round(m.value, 6) for m in sorted(c.get_metric_history(r.info.run_id, "val/loss"),
                                                                        key=lambda m: m.step)]
             for r in trials}
    return res, trials, by_lr


@pytest.mark.slow
def test_reused_trial_processes_train_each_trial_as_a_fresh_one_would(ray_session, workdir):
    on, on_runs, on_hist = _sweep(workdir, reuse=True)
    off, off_runs, off_hist = _sweep(workdir, reuse=False)
    assert on.num_errors == off.num_errors == 0
    assert on.trials["pid"].nunique() < len(on.trials) == 3  # processes were handed on
    assert off.trials["pid"].nunique() == len(off.trials) == 3
    assert len(on_runs) == len(off_runs) == 3 and all(r.info.status in ("FINISHED", "KILLED") for r in on_runs)
    assert on_hist == off_hist  # same configs, same epochs, same values
    assert sorted(len(h) for h in on_hist.values()) != [2, 2, 2]  # ASHA stopped at least one trial


def test_reuse_with_trials_on_ray_train_is_refused(tmp_path):
    cfg = tiny_config(tmp_path, run={"launcher": "train"}, sweep={"reuse_actors": True})
    with pytest.raises(ConfigError, match="sweep.reuse_actors: true .* Ray Train"):
        check_config(load_config(cfg))
