"""Sweeps with real Ray Tune, Optuna and MLflow: one parent + one child per trial, ASHA early stops,
a SIGKILLed driver resumed, `continue`, and the API agreeing with the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from qksweep import api

from .conftest import run_cli, tiny_config

pytestmark = pytest.mark.slow


def sweep_config(tmp, **over):
    cfg = tiny_config(tmp, optim={"epochs": 4, "warmup_epochs": 0})
    cfg["sweep"] = {
        # val/loss is continuous: tiny trials all sit at chance top-1 after one epoch and ties never stop.
        # One trial at a time and a seeded sampler make the sweep deterministic.
        "metric": "val/loss", "mode": "min", "num_samples": 4, "max_concurrent": 1,
        "searcher": {"sampler": "tpe", "seed": 0},
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        "space": {"model.num_heads": {"choice": [1, 2]}, "model.head_dim": {"choice": [4, 8]},
                  "optim.lr": {"loguniform": [1e-5, 1e-2]}},
    }
    for k, v in over.items():
        cfg["sweep"][k] = v
    return cfg


def trial_runs(uri, sweep):
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("test")
    if exp is None:
        return c, [], []
    rs = c.search_runs([exp.experiment_id], filter_string=f"tags.`qksweep.sweep` = '{sweep}'")
    return c, [r for r in rs if r.data.tags.get("qksweep.kind") == "trial"], [r for r in rs if r.data.tags.get("qksweep.kind") == "sweep"]


def test_four_trial_sweep_parent_children_asha_and_continue(ray_session, workdir):
    cfg = sweep_config(workdir)
    cfg["run"]["keep_checkpoints"] = 3  # Ray keeps 3 while a trial trains; the sweep's end keeps best and last
    cfg["tracking"]["log_model"] = True  # each trial that trains to its end logs its best checkpoint as a model
    uri = cfg["tracking"]["uri"]
    res = api.sweep(cfg, name="four")
    c, trials, parents = trial_runs(uri, "four")
    assert len(parents) == 1 and len(trials) == 4
    parent_id = parents[0].info.run_id
    assert parents[0].info.status == "FINISHED" and res.parent_run_id == parent_id
    stopped = []
    for r in trials:
        assert r.data.tags["mlflow.parentRunId"] == parent_id
        assert {"model.embed_dim", "model.num_heads", "model.head_dim", "optim.lr", "data.img_size"} <= set(r.data.params)
        steps = [m.step for m in c.get_metric_history(r.info.run_id, "val/loss")]
        assert sorted(steps) == list(range(1, len(steps) + 1)), "one value per epoch, step=epoch"
        assert all(c.get_metric_history(r.info.run_id, k) for k in ("train/loss", "val/top5", "lr"))
        # lineage on the trial path too: the trial's train and validation sets, once each
        assert sorted(i.dataset.name for i in r.inputs.dataset_inputs) == ["digits-train", "digits-validation"]
        if r.info.status == "KILLED":
            # the decision is taken at a rung (1 or 2); the worker may finish one more epoch meanwhile
            assert r.data.tags["qksweep.stopped_by"] == "asha" and int(r.data.tags["qksweep.stopped_at_epoch"]) <= 2
            assert len(steps) < 4
            stopped.append(r)
        else:
            assert r.info.status == "FINISHED" and len(steps) == 4
            # ASHA stops a trial at max_t too: the sweep callback closes it with its last checkpoint
            assert "checkpoints/last/checkpoint.pt" in {a.path for a in c.list_artifacts(r.info.run_id, "checkpoints/last")}
    assert stopped, "ASHA stopped at least one trial early"
    arts = {a.path for a in c.list_artifacts(parent_id)}
    assert {"config.yaml", "search_space.yaml", "results.csv"} <= arts

    # Optuna hears the truth: stopped trials are PRUNED, not COMPLETE with a truncated score
    # the study is named after the sweep, and each of its trials names its Tune trial and MLflow run
    study = optuna.load_study(study_name="four", storage=f"sqlite:///{workdir / 'results' / 'four' / 'optuna.db'}")
    states = sorted(t.state.name for t in study.trials)
    assert states.count("PRUNED") == len(stopped) and len(study.trials) == 4
    by_trial = {r.data.tags["qksweep.trial_id"]: r.info.run_id for r in trials}
    assert {t.user_attrs["tune_trial_id"]: t.user_attrs["mlflow_run_id"] for t in study.trials} == by_trial

    # the API's best trial is the one the CLI prints
    out = run_cli("best", "four", "--tracking-uri", uri, "--format", "json", cwd=workdir, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["trial_id"] == res.best_trial_id
    assert res.best_run_id and res.best_config["model"]["embed_dim"] in (4, 8, 16, 32)
    # the trials table (one row per trial, last result) and the best epoch's metrics
    assert len(res.trials) == 4 and {"trial_id", "val/top1", "epoch"} <= set(res.trials.columns)
    # the sweep's metric is val/loss (min): best_metrics is the epoch with the lowest val/loss, whatever its top-1
    loss_hist = c.get_metric_history(res.best_run_id, "val/loss")
    best_step = min(loss_hist, key=lambda m: (m.value, m.step)).step
    top1_at = {m.step: m.value for m in c.get_metric_history(res.best_run_id, "val/top1")}
    assert res.best_metrics["val/loss"] == pytest.approx(min(m.value for m in loss_hist))
    assert res.best_metrics["epoch"] == best_step
    assert res.best_metrics["val/top1"] == pytest.approx(top1_at[best_step])

    # browsing reads MLflow: one row per trial with the searched params; best --export is re-runnable
    out = run_cli("runs", "--sweep", "four", "--tracking-uri", uri, "--format", "json", cwd=workdir, timeout=120)
    rows = json.loads(out.stdout)
    assert len(rows) == 4 and all("optim.lr" in r and "model.head_dim" in r for r in rows)
    out = run_cli("best", "four", "--tracking-uri", uri, "--export", str(workdir / "exported"), cwd=workdir, timeout=120)
    assert out.returncode == 0, out.stderr
    from qksweep.checks import check_config
    from qksweep.config import load_config
    from qksweep.trainables.checkpoint import load_checkpoint

    check_config(load_config(workdir / "exported" / "config.yaml"))  # `qksweep train` accepts it
    state, _ = load_checkpoint(workdir / "exported" / "checkpoint")  # torch.load(weights_only=True)
    assert "model" in state and json.loads((workdir / "exported" / "metrics.json").read_text())

    # the best trial as an MLflow model: registered as four-best@champion from its best checkpoint, with a
    # signature; pyfunc serves it (the same logits on every call: the neurons are reset) as qksweep loads it
    from qksweep.tools.mlflow_model import logged_model

    for r in trials:  # each trial's best checkpoint is a model: logged at its last epoch, or at the sweep's end
        assert logged_model(uri, r.info.run_id) is not None, r.info.status
    status = c.get_run(res.best_run_id).info.status
    had = logged_model(uri, res.best_run_id)
    out = run_cli("best", "four", "--tracking-uri", uri, "--register", "four-best", cwd=workdir, timeout=300)
    assert out.returncode == 0 and "registered models:/four-best@champion (version 1)" in out.stdout, out.stderr
    mv = c.get_model_version_by_alias("four-best", "champion")
    assert mv.run_id == res.best_run_id and mv.tags["qksweep.checkpoint"] == "checkpoints/best"
    assert c.get_run(res.best_run_id).info.status == status, "registering leaves the trial's status alone"
    if had is not None:  # the model the trial logged is the one registered, not a second copy
        assert mv.source == had.model_uri and logged_model(uri, res.best_run_id).model_id == had.model_id
    import mlflow
    import numpy as np
    import torch

    from qksweep.tools.source import load_source

    before_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        served = mlflow.pyfunc.load_model("models:/four-best@champion")
    finally:
        mlflow.set_tracking_uri(before_uri)
    loaded = load_source("models:/four-best@champion", tracking_uri=uri)
    size = loaded.cfg.data.img_size  # searched
    assert loaded.run_id == res.best_run_id
    assert [s.shape for s in served.metadata.signature.inputs.inputs] == [(-1, 3, size, size)]
    x = np.random.default_rng(0).normal(size=(3, 3, size, size)).astype(np.float32)
    first, again = served.predict(x), served.predict(x)
    with torch.no_grad():
        ours = loaded.model(torch.from_numpy(x)).numpy()
    assert np.array_equal(first, again) and np.allclose(first, ours, atol=1e-6)

    # checkpoint clean-up: at the sweep's end each trial keeps its best and last checkpoint (as its
    # result.json says), and the parent run records the storage used before and after
    sweep_dir = workdir / "results" / "four"
    for tdir in sweep_dir.glob("trial_driver_*"):
        rows = [json.loads(line) for line in (tdir / "result.json").read_text().splitlines()]
        at = {Path(r["checkpoint_path"]).name: r for r in rows if r.get("checkpoint_path")}
        last = max(at, key=lambda k: at[k]["epoch"])
        best = min(at, key=lambda k: (at[k]["val/loss"], -at[k]["epoch"]))
        assert {p.name for p in tdir.glob("checkpoint_*")} == {best, last}, tdir.name
    before, after = (c.get_metric_history(parent_id, f"storage/bytes_{k}") for k in ("before", "after"))
    assert len(before) == len(after) == 1 and 0 < after[0].value <= before[0].value
    if any(len(c.get_metric_history(r.info.run_id, "epoch")) >= 3 for r in trials):  # Ray had kept 3 of it
        assert after[0].value < before[0].value
    # `qksweep gc --keep-best 1`: a dry run removes nothing; then only the best trial keeps checkpoints
    ckpts = sorted(sweep_dir.glob("*/checkpoint_*"))
    out = run_cli("gc", "four", "--storage", str(workdir / "results"), "--keep-best", "1", "--dry-run", cwd=workdir, timeout=120)
    assert out.returncode == 0 and "dry run: nothing removed" in out.stdout, out.stdout + out.stderr
    assert sorted(sweep_dir.glob("*/checkpoint_*")) == ckpts
    out = run_cli("gc", "four", "--storage", str(workdir / "results"), "--keep-best", "1", cwd=workdir, timeout=120)
    assert out.returncode == 0 and "removed" in out.stdout, out.stdout + out.stderr
    assert {p.parent.name.split("_")[2] for p in sweep_dir.glob("*/checkpoint_*")} == {res.best_trial_id}
    assert len(c.get_metric_history(parent_id, "storage/bytes_after")) == 2

    # continue the stopped trial to the full budget as a new run linked to the old one (from its MLflow
    # checkpoint: gc removed it from the storage unless it was the best)
    old = stopped[0]
    done = len(c.get_metric_history(old.info.run_id, "epoch"))
    cont = api.continue_trial(old.info.run_id, epochs=5, tracking_uri=uri)
    new = c.get_run(cont.run_id)
    assert new.data.tags["qksweep.continued_from"] == old.info.run_id and new.info.status == "FINISHED"
    assert sorted(m.step for m in c.get_metric_history(cont.run_id, "epoch")) == list(range(done + 1, 6))


def checkpointed_trials(results: Path, sweep: str) -> set[str]:
    """The trials of ``sweep`` with a checkpoint on disk: in their Tune trial folder (``run.launcher: tune``)
    or in their Train run's folder in the sweep's ``trials/`` (``train``)."""
    found = list(results.glob(f"{sweep}/*/checkpoint_*")) + list(results.glob(f"{sweep}/trials/*/checkpoint_*"))
    return {p.parent.name for p in found}


@pytest.mark.parametrize("launcher", ["tune", "train"])
def test_killed_driver_then_resume_finishes_each_trial_once(ray_session, workdir, launcher):
    cfg = sweep_config(workdir, scheduler={"name": "none"}, num_samples=3)
    cfg["run"]["launcher"] = launcher
    (workdir / "sweep.yaml").write_text(yaml.safe_dump(cfg))
    uri = cfg["tracking"]["uri"]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "qksweep.cli", "sweep", "sweep.yaml", "--name", "killme"],
                            cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:  # kill once the second trial has checkpointed an epoch
            # (watch the files: opening the store while the sweep creates it would race its migrations)
            if len(checkpointed_trials(workdir / "results", "killme")) >= 2:
                break
            assert proc.poll() is None, "the sweep ended before the fault was injected"
            time.sleep(0.5)
        else:
            pytest.fail("the sweep never reached its second trial")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    time.sleep(3)  # let Ray reap the dead driver's trial actors
    results = workdir / "results"
    assert [p.name for p in results.iterdir()] == ["killme"], "everything the sweep writes is in its folder"
    legacy = []
    if launcher == "train":  # as a sweep begun before that layout left them: its trials' folders beside its own
        for d in sorted((results / "killme" / "trials").iterdir()):
            d.rename(results / d.name)
            legacy.append(d.name)
    res = api.resume("killme", storage=str(workdir / "results"))
    for name in legacy:  # a resumed trial of such a sweep goes on where its checkpoints are
        assert not (results / "killme" / "trials" / name).exists()
        assert list((results / name).glob("checkpoint_*")), name
    c, trials, parents = trial_runs(uri, "killme")
    assert len(trials) == 3, [t.data.tags["qksweep.trial_id"] for t in trials]
    for t in trials:
        steps = [m.step for m in c.get_metric_history(t.info.run_id, "epoch")]
        assert sorted(steps) == [1, 2, 3, 4], f"no repeated or missing epoch: {steps}"
        assert t.info.status == "FINISHED"
    assert parents[0].info.status == "FINISHED" and res.best_trial_id
    study = optuna.load_study(study_name="killme", storage=f"sqlite:///{workdir / 'results' / 'killme' / 'optuna.db'}")
    finished = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(finished) == 3


def test_killed_trial_process_restarts_from_its_checkpoint(ray_session, workdir):
    """``run.launcher: tune``: the trial trains in its own process; SIGKILLed after its second epoch, Tune
    starts it again (``run.max_failures``) from its last checkpoint, and MLflow has each epoch once."""
    from ray.util.state import list_actors

    from qksweep.cluster.connect import state_api_address

    cfg = sweep_config(workdir, scheduler={"name": "none"}, num_samples=1)
    cfg["optim"]["epochs"] = 6  # time for the killer to see epoch 2 and find the process on a busy machine
    uri = cfg["tracking"]["uri"]
    done: dict = {}

    def kill_trial_after_epoch_2() -> None:
        deadline = time.time() + 240
        while time.time() < deadline:
            try:
                c = MlflowClient(uri)
                exp = c.get_experiment_by_name("test")
                trial = [r for r in (c.search_runs([exp.experiment_id]) if exp else [])
                         if r.data.tags.get("qksweep.kind") == "trial"]
                if trial and any(m.step >= 2 for m in c.get_metric_history(trial[0].info.run_id, "epoch")):
                    for a in list_actors(address=state_api_address(),
                                         filters=[("class_name", "=", "ImplicitFunc"), ("state", "=", "ALIVE")]):
                        os.kill(a.pid, signal.SIGKILL)
                        done["killed"] = a.pid
                    return
            except Exception:  # noqa: BLE001 - the store may be mid-creation: look again
                pass
            time.sleep(0.2)

    killer = threading.Thread(target=kill_trial_after_epoch_2, daemon=True)
    killer.start()
    res = api.sweep(cfg, name="trialkill")
    killer.join(timeout=5)
    assert done.get("killed"), "the fault was injected"
    c, trials, parents = trial_runs(uri, "trialkill")
    assert len(trials) == 1 and trials[0].info.status == "FINISHED" and res.best_trial_id
    steps = [m.step for m in c.get_metric_history(trials[0].info.run_id, "epoch")]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6], f"each epoch once: {steps}"
    history = [json.loads(line) for line in next((workdir / "results" / "trialkill").glob("*/result.json")).read_text().splitlines()]
    epochs = [h["epoch"] for h in history]
    assert epochs.count(1) == 1 and epochs[-1] == 6, f"resumed from its checkpoint, not started again: {epochs}"


def test_ctrl_c_saves_state_exits_130_and_resume_finishes(ray_session, workdir):
    cfg = sweep_config(workdir, scheduler={"name": "none"}, num_samples=2)
    (workdir / "sweep.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "qksweep.cli", "sweep", "sweep.yaml", "--name", "ctrlc"],
                            cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not checkpointed_trials(workdir / "results", "ctrlc"):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err[-2000:]
    assert "qksweep resume ctrlc" in err
    c, trials, parents = trial_runs(cfg["tracking"]["uri"], "ctrlc")
    assert parents[0].info.status == "KILLED"
    res = api.resume("ctrlc", storage=str(workdir / "results"))
    c, trials, parents = trial_runs(cfg["tracking"]["uri"], "ctrlc")
    assert len(trials) == 2 and all(t.info.status == "FINISHED" for t in trials) and res.best_trial_id
    assert parents[0].info.status == "FINISHED"


def test_release_placement_groups_frees_only_what_the_sweep_left(ray_session):
    """A Train controller that dies while it reserves a new worker group leaves a placement group that
    outlives it (see cluster/placement.py). The sweep driver removes the ones its job made during the
    sweep, and only those."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from qksweep.cluster.placement import job_placement_groups, release_placement_groups

    mine = placement_group([{"CPU": 0.5}])  # the caller's own, made before the sweep
    ray.get(mine.ready(), timeout=60)
    before = job_placement_groups()

    @ray.remote(num_cpus=0)
    class Reserver:  # stands for a controller reserving a worker group as it dies
        def reserve(self):
            pg = placement_group([{"CPU": 1}])
            ray.get(pg.ready(), timeout=60)
            return pg.id.hex()

    r = Reserver.remote()
    left = ray.get(r.reserve.remote(), timeout=120)
    ray.kill(r)
    time.sleep(1)
    assert left in job_placement_groups() and ray.available_resources().get("CPU", 0) == 0.5
    assert release_placement_groups(before, settle_s=5) == [left]
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < 1.5 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 1.5
    assert mine.id.hex() in job_placement_groups()
    remove_placement_group(mine)
