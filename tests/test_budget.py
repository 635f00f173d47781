"""Sweep budgets (issue 16.3): ``sweep.time_budget_s``, ``sweep.stop_at`` and ``sweep.patience`` end a
sweep cleanly before ``num_samples``: running trials closed KILLED with the reason, the parent tagged
``qksweep.ended_by``, and ``qksweep resume`` says the sweep is complete."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import optuna
import pytest
from mlflow.tracking import MlflowClient

from qksweep import api
from qksweep.checks import check_sweep
from qksweep.config import ConfigError, load_config
from qksweep.orchestrator.budget import SweepBudget
from qksweep.orchestrator.sweep import SweepComplete
from qksweep.storage import STATE_FILE

from .conftest import tiny_config


def _budget(tmp_path, **kw):
    (tmp_path / STATE_FILE).write_text(json.dumps({"name": "s"}))
    files = SimpleNamespace(local=tmp_path)
    return SweepBudget(files, metric="val/top1", mode="max", modes={"val/top1": "max", "val/loss": "min"}, **kw)


def _trial(tid):
    return SimpleNamespace(trial_id=tid)


def test_stop_at_ends_when_a_trial_reaches_the_value_in_the_metrics_direction(tmp_path):
    b = _budget(tmp_path, stop_at={"val/loss": 0.5})
    assert b("a", {"val/loss": 0.7, "epoch": 1}) is False and not b.stop_all()
    b("b", {"val/loss": 0.5, "epoch": 3})
    assert b.stop_all() and b.ended_by == "stop_at: val/loss <= 0.5 (trial b: 0.5 at epoch 3)"
    assert json.loads((tmp_path / STATE_FILE).read_text())["ended_by"] == b.ended_by


def test_patience_counts_finished_trials_without_a_better_best(tmp_path):
    b = _budget(tmp_path, patience=2)
    for tid, v in (("a", 0.5), ("b", 0.7), ("c", 0.7), ("d", 0.6)):
        b(tid, {"val/top1": v - 0.1})
        b(tid, {"val/top1": v})
        b.on_trial_complete(0, [], _trial(tid))
        assert b.stop_all() == (tid == "d"), tid
    assert b.ended_by == "patience: 2 finished trials in a row without a better val/top1 than 0.7"


def test_time_budget_counts_from_the_first_step_and_survives_pickling(tmp_path):
    import pickle

    b = _budget(tmp_path, time_budget_s=0.2)
    assert not b.stop_all()
    again = pickle.loads(pickle.dumps(b))  # a resumed driver: its clock starts at its own first step
    time.sleep(0.25)
    assert b.stop_all() and b.ended_by == "time_budget_s: 0.2 s spent"
    assert not again.stop_all()


def test_stop_at_on_a_metric_that_is_not_searched_is_refused(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg["sweep"] = {"metric": "val/top1", "space": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}, "stop_at": {"val/loss": 0.1}}
    with pytest.raises(ConfigError, match=r"sweep.stop_at.val/loss: not one of sweep.metric \(val/top1\)"):
        check_sweep(load_config(cfg))


def _sweep_cfg(workdir, **sweep):
    cfg = tiny_config(workdir, optim={"epochs": 2, "warmup_epochs": 0})
    cfg["sweep"] = {"metric": "val/loss", "mode": "min", "num_samples": 6, "max_concurrent": 2,
                    "searcher": {"sampler": "random", "seed": 0}, "scheduler": {"name": "none"},
                    "space": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}, **sweep}
    return cfg


def _runs(cfg, sweep):
    c = MlflowClient(cfg["tracking"]["uri"])
    exp = c.get_experiment_by_name("test")
    found = c.search_runs([exp.experiment_id], filter_string=f"tags.`qksweep.sweep` = '{sweep}'")
    parent, = [r for r in found if r.data.tags["qksweep.kind"] == "sweep"]
    return parent, [r for r in found if r.data.tags["qksweep.kind"] == "trial"]


@pytest.mark.slow
def test_a_sweep_ends_on_stop_at_patience_or_time_closes_its_trials_and_resume_says_complete(ray_session, workdir):
    # stop_at: the first epoch of any trial reaches it
    cfg = _sweep_cfg(workdir, stop_at={"val/loss": 100.0})
    api.sweep(cfg, name="reached")
    parent, trials = _runs(cfg, "reached")
    assert parent.info.status == "FINISHED" and parent.data.tags["qksweep.ended_by"].startswith("stop_at: val/loss <= 100")
    assert 1 <= len(trials) < 6 and not [r for r in trials if r.info.status == "RUNNING"]
    stopped = [r for r in trials if r.data.tags.get("qksweep.stopped_by") == "budget"]
    assert stopped and all(r.info.status == "KILLED" and r.data.tags["qksweep.ended_by"].startswith("stop_at")
                           for r in stopped)
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{workdir / 'results' / 'reached' / 'optuna.db'}")
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    with pytest.raises(SweepComplete, match="sweep reached is complete: it ended by stop_at"):
        api.resume("reached", storage=str(workdir / "results"))

    # patience 1: a learning rate too small to move the weights never betters the first trial
    cfg = _sweep_cfg(workdir, patience=1, max_concurrent=1, space={"optim.lr": {"loguniform": [1e-12, 2e-12]}})
    api.sweep(cfg, name="flat")
    parent, trials = _runs(cfg, "flat")
    assert parent.data.tags["qksweep.ended_by"].startswith("patience: 1 finished trials in a row")
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials)
    # resume --num-samples extends it: the budget counts afresh and ends it again one trial later
    with pytest.raises(ConfigError, match="already has 6 trials planned"):
        api.resume("flat", storage=str(workdir / "results"), num_samples=6)
    api.resume("flat", storage=str(workdir / "results"), num_samples=7)
    parent, trials = _runs(cfg, "flat")
    assert len(trials) == 3 and len({r.data.tags["qksweep.trial_id"] for r in trials}) == 3
    assert all(r.info.status == "FINISHED" for r in trials) and parent.info.status == "FINISHED"
    assert parent.data.tags["qksweep.ended_by"].startswith("patience: 1 finished trials in a row")
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{workdir / 'results' / 'flat' / 'optuna.db'}")
    assert len(study.trials) == 3 and all(t.state.name == "COMPLETE" for t in study.trials)

    # time budget: far fewer trials than asked fit in it; the ones it cut short are closed KILLED
    cfg = _sweep_cfg(workdir, num_samples=40, time_budget_s=12)
    t0 = time.monotonic()
    api.sweep(cfg, name="timed")
    assert time.monotonic() - t0 < 90
    parent, trials = _runs(cfg, "timed")
    assert parent.data.tags["qksweep.ended_by"] == "time_budget_s: 12 s spent"
    assert len(trials) < 40 and not [r for r in trials if r.info.status == "RUNNING"]
