"""Faults injected for real: non-finite loss in one trial of a sweep, a corrupt checkpoint on resume,
and secrets that must never reach MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from qksweep import api
from qksweep.config import load_config
from qksweep.tracking import runs
from qksweep.tracking.lifecycle import run_params

from .conftest import tiny_config


@pytest.mark.slow
def test_non_finite_loss_fails_one_trial_and_the_sweep_goes_on(ray_session, workdir):
    cfg = tiny_config(workdir, run={"max_failures": 0}, optim={"epochs": 2})
    cfg["sweep"] = {"num_samples": 2, "searcher": {"sampler": "random", "seed": 0}, "scheduler": {"name": "none"},
                    # seed 0 draws 1e12 (diverges at once) then 0.003
                    "space": {"optim.lr": {"choice": [0.003, 1.0e12]}}}
    res = api.sweep(cfg, name="nan")
    assert res.num_errors == 1 and res.best_trial_id
    c = MlflowClient(cfg["tracking"]["uri"])
    exp = c.get_experiment_by_name("test")
    trials = [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("qksweep.kind") == "trial"]
    status = sorted(r.info.status for r in trials)
    assert status == ["FAILED", "FINISHED"]
    failed = next(r for r in trials if r.info.status == "FAILED")
    assert "non-finite loss at epoch 1, step" in failed.data.tags["qksweep.error"]


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_to_previous(ray_session, workdir):
    cfg = tiny_config(workdir, optim={"epochs": 2}, run={"name": "corrupt", "keep_checkpoints": 3})
    api.train(cfg)
    ckpts = sorted(p for p in (workdir / "results" / "corrupt").glob("checkpoint_*") if p.is_dir())
    assert len(ckpts) == 2
    (ckpts[-1] / "checkpoint.pt").write_bytes(b"this is not a checkpoint")
    res = api.train(tiny_config(workdir, optim={"epochs": 3}, run={"name": "corrupt", "keep_checkpoints": 3}))
    assert res.metrics["epoch"] == 3
    c = MlflowClient(cfg["tracking"]["uri"])
    steps = sorted(m.step for m in c.get_metric_history(res.run_id, "epoch"))
    assert steps == [1, 2, 3], steps


def test_secrets_never_reach_mlflow_params_or_tags(tmp_path):
    uri = "postgresql://alice:s3cr3t-pw@db.example/mlflow?token=tok123"
    assert "s3cr3t" not in runs.mask_secrets(uri) and "tok123" not in runs.mask_secrets(uri)
    cfg = load_config({"tracking": {"uri": uri}})
    store = f"sqlite:///{tmp_path / 'm.db'}"
    c = runs.client(store)
    exp = runs.experiment_id(c, "secrets")
    run_id, _ = runs.get_or_create_run(c, exp, {runs.KIND: "train", runs.RUN_NAME: "x"}, run_name="x",
                                       params=run_params(cfg))
    runs.set_tags(c, run_id, {"qksweep.error": f"could not connect to {uri}"})
    data = c.get_run(run_id).data
    text = repr(data.params) + repr(data.tags)
    assert "s3cr3t" not in text and "tok123" not in text and "alice:***@" in data.params["tracking.uri"]


def test_interrupt_probe_sees_tunes_handler_fire():
    """Tune replaces the SIGINT handler during fit and restores the previous one only when a signal
    arrives; the probe reads that to tell an interrupted sweep from a finished one."""
    import os
    import signal

    from qksweep.orchestrator.sweep import tune_interrupt_probe

    def fake_fit(send: bool) -> None:
        previous = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, lambda *_: signal.signal(signal.SIGINT, previous))  # Tune's behaviour
        if send:
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)  # an earlier in-process TorchTrainer may have left its own
    with tune_interrupt_probe() as quiet:
        fake_fit(send=False)
    with tune_interrupt_probe() as hit:
        fake_fit(send=True)
    assert not quiet.fired and hit.fired
    assert signal.getsignal(signal.SIGINT) is before
