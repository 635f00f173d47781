"""Core training under Ray Train with real MLflow: one run per train, determinism, worker faults,
restart by run name."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from qksweep import api
from qksweep.trainables.checkpoint import load_checkpoint

from .conftest import tiny_config

pytestmark = pytest.mark.slow


def _runs(uri: str):
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("test")
    return c, (c.search_runs([exp.experiment_id]) if exp else [])


def test_two_workers_log_one_run_with_epochs_and_checkpoint(ray_session, workdir):
    cfg = tiny_config(workdir, run={"workers": 2}, spectral={"enabled": True, "every": 10},
                      tracking={"system_metrics": True, "system_metrics_interval_s": 0.5})
    res = api.train(cfg)
    c, runs = _runs(cfg["tracking"]["uri"])
    assert len(runs) == 1 and runs[0].info.run_id == res.run_id
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["qksweep.kind"] == "train"
    assert run.data.params["model.embed_dim"] == "32" and run.data.params["run.workers"] == "2"
    for key in ["train/loss", "train/top1", "val/loss", "val/top1", "val/top5", "lr", "samples_per_s", "epoch_time_s"]:
        hist = c.get_metric_history(res.run_id, key)
        assert sorted(m.step for m in hist) == [1, 2], key
    # validation is averaged over both workers' shards: 359 digits → top-1 is k/359
    top1 = c.get_metric_history(res.run_id, "val/top1")[-1].value
    assert abs(top1 * 359 - round(top1 * 359)) < 1e-6
    assert c.get_metric_history(res.run_id, "spec/stage1.0.mlp.fc1/sigma_max"), "spectra logged"
    # tracking.system_metrics: MLflow's monitor sampled the process that trains (rank 0)
    assert c.get_metric_history(res.run_id, "system/cpu_utilization_percentage")
    assert c.get_metric_history(res.run_id, "system/system_memory_usage_megabytes")
    # lineage: the train and validation sets as dataset inputs, once each, with their sizes
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["digits-train", "digits-validation"]
    assert json.loads(inputs["digits-validation"].dataset.profile)["num_rows"] == 359
    assert {t.value for i in inputs.values() for t in i.tags} == {"training", "validation"}
    arts = {a.path for a in c.list_artifacts(res.run_id)}
    assert {"config.yaml", "checkpoints", "plots"} <= arts
    best = {a.path for a in c.list_artifacts(res.run_id, "checkpoints/best")}
    assert "checkpoints/best/checkpoint.pt" in best
    # rank 0 publishes its spectral plots inside the last checkpoint; the controller's logger uploads them
    assert "spectral" in arts and c.list_artifacts(res.run_id, "spectral")
    last = {a.path for a in c.list_artifacts(res.run_id, "checkpoints/last")}
    assert "checkpoints/last/checkpoint.pt" in last and not [p for p in best | last if "_publish" in p]
    state, conf = load_checkpoint(res.checkpoint_path)
    assert state["epoch"] == 2 and conf["model"]["embed_dim"] == 32


def test_same_seed_same_validation_metrics(ray_session, workdir):
    a = api.train(tiny_config(workdir / "a"))
    b = api.train(tiny_config(workdir / "b"))
    for k in ("val/loss", "val/top1", "train/loss"):
        assert a.metrics[k] == b.metrics[k], k
    digests = [{i.dataset.name: i.dataset.digest for i in MlflowClient(f"sqlite:///{workdir / d / 'mlflow.db'}")
                .get_run(r.run_id).inputs.dataset_inputs} for d, r in (("a", a), ("b", b))]
    assert digests[0] == digests[1] and len(digests[0]) == 2  # the same data: the same MLflow datasets


def test_train_from_python_leaves_no_controller_and_keeps_the_callers_ctrl_c(ray_session, workdir):
    """Train V2 leaves its SIGINT handler (holding the controller) installed after fit on the main thread:
    a notebook kept one TrainController process per session and its Ctrl-C went to a finished run."""
    from ray._private.state import state

    def mine():
        job = ray_session.get_runtime_context().get_job_id()
        return [a for a in state.actor_table(None).values()
                if a["State"] != "DEAD" and a["ActorClassName"] == "TrainController" and a["JobID"] == job]

    before = signal.getsignal(signal.SIGINT)
    api.train(tiny_config(workdir, optim={"epochs": 1}))
    assert signal.getsignal(signal.SIGINT) is before
    deadline = time.monotonic() + 30
    while mine() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not mine(), "the run's TrainController outlived it"


def _kill_worker_when(uri: str, epoch_reached: int, done: dict) -> None:
    """Fault injection: SIGKILL the Ray Train worker once the run has logged `epoch_reached`."""
    from ray.util.state import list_actors

    from qksweep.cluster.connect import state_api_address

    deadline = time.time() + 240
    c = MlflowClient(uri)
    while time.time() < deadline and not done.get("killed"):
        exp = c.get_experiment_by_name("test")
        runs = c.search_runs([exp.experiment_id]) if exp else []
        if runs and any(m.step >= epoch_reached for m in c.get_metric_history(runs[0].info.run_id, "epoch")):
            for a in list_actors(address=state_api_address(),
                                 filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]):
                os.kill(a.pid, signal.SIGKILL)
                done["killed"] = a.pid
            return
        time.sleep(0.2)


def test_killed_worker_is_replaced_and_resumes_from_checkpoint(ray_session, workdir):
    cfg = tiny_config(workdir, optim={"epochs": 5})
    uri = cfg["tracking"]["uri"]
    done: dict = {}
    killer = threading.Thread(target=_kill_worker_when, args=(uri, 2, done), daemon=True)
    killer.start()
    res = api.train(cfg)
    killer.join(timeout=5)
    assert done.get("killed"), "the fault was injected"
    c, runs = _runs(uri)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in c.get_metric_history(res.run_id, "epoch")]
    assert sorted(steps) == [1, 2, 3, 4, 5], f"each epoch once: {steps}"
    assert res.metrics["epoch"] == 5


def test_restart_with_same_run_name_continues_from_checkpoint(ray_session, workdir):
    cfg = tiny_config(workdir, optim={"epochs": 4}, run={"name": "again"})
    uri = cfg["tracking"]["uri"]
    # interrupt: stop after 2 of 4 epochs by killing the worker for good (no retries left)
    cfg_short = tiny_config(workdir, optim={"epochs": 4}, run={"name": "again", "max_failures": 0})
    done: dict = {}
    killer = threading.Thread(target=_kill_worker_when, args=(uri, 2, done), daemon=True)
    killer.start()
    with pytest.raises(Exception):
        api.train(cfg_short)
    killer.join(timeout=5)
    c, runs = _runs(uri)
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    logged_before = {m.step for m in c.get_metric_history(runs[0].info.run_id, "epoch")}
    assert 2 <= max(logged_before) < 4
    res = api.train(cfg)
    c, runs = _runs(uri)
    assert len(runs) == 1 and res.run_id == runs[0].info.run_id and runs[0].info.status == "FINISHED"
    steps = [m.step for m in c.get_metric_history(res.run_id, "epoch")]
    assert sorted(steps) == [1, 2, 3, 4], f"continued, no epoch repeated: {steps}"


def test_spectral_metrics_and_stop_rule_on_blow_up(ray_session, workdir):
    """A ViT run logs seed 001's metric families; an absurd lr makes sigma_max explode and the
    spectral rule stops the run, recording why."""
    cfg = tiny_config(workdir, optim={"epochs": 3, "lr": 5.0, "weight_decay": 0.0},
                      spectral={"enabled": True, "every": 2, "topk": 4, "interval": 1})
    cfg["model"] = {"name": "vit_tiny_patch16_224", "embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 4,
                    "mlp_ratio": 2}
    cfg["sweep"] = {"stop_on": {"spec_sigma_max_growth": 3}}
    res = api.train(cfg)
    c, runs = _runs(cfg["tracking"]["uri"])
    run = c.get_run(res.run_id)
    assert run.data.tags["qksweep.stopped_by"] == "spectral" and "grew" in run.data.tags["qksweep.stop_reason"]
    assert run.info.status == "KILLED"
    assert len(c.get_metric_history(res.run_id, "epoch")) < 3
    keys = set(run.data.metrics)
    m = "blocks.0.attn.qkv"
    for fam in ("sigma_max", "sv1", "sv_last1", "delta_sv_rel", "cos_u1", "cos_v1", "cos_u_last1", "cos_v_last1",
                "cos_u_max", "cos_u_mean", "cos_v_max", "cos_v_mean"):
        assert f"spec/{m}/{fam}" in keys, fam
    assert any(k.startswith("spec/blocks.1.mlp.fc2/") for k in keys)
