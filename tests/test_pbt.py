"""Population-based training (issue 16.4): ``sweep.scheduler.name: pbt | pb2`` (orchestrator/pbt.py,
trainables/extras/pbt.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from qksweep.checks import check_sweep
from qksweep.config import ConfigError, load_config
from qksweep.orchestrator.pbt import KeepInSpace, make_pbt
from qksweep.search_spaces import parse_space

from .conftest import tiny_config
from .loop_harness import run_loop

SPACE = {"optim.lr": {"loguniform": [1e-4, 3e-2]}, "model.num_heads": {"choice": [1, 2]}}


def pbt_config(tmp, **scheduler):
    cfg = tiny_config(tmp, optim={"epochs": 4, "warmup_epochs": 0})
    cfg["sweep"] = {"metric": "val/loss", "mode": "min", "num_samples": 4, "max_concurrent": 2,
                    "scheduler": {"name": "pbt", "perturbation_interval": 1, "quantile_fraction": 0.5, **scheduler},
                    "space": dict(SPACE)}
    return cfg


@pytest.mark.parametrize("change, message", [
    ({"metric": ["val/top1", "val/loss"], "mode": ["max", "min"]}, "ranks trials on one metric"),
    ({"space": {"model.num_heads": {"choice": [1, 2]}}}, "sweep.space has none it can change: add one of optim.lr"),
    ({"repeats": 2}, "copies one checkpoint, not one per seed"),
    ({"warm_start": "earlier"}, "sweep.warm_start seeds an Optuna study"),
    ({"searcher": {"options": {"multivariate": False}}}, "sweep.searcher options are for an Optuna sampler"),
    ({"scheduler": {"name": "pbt", "perturbation_interval": 4}}, "perturbation_interval=4 leaves no perturbation"),
    ({"scheduler": {"name": "pb2"}, "space": {"optim.lr": {"choice": [1e-3, 1e-2]}}}, "'pb2' models continuous values"),
    ({"scheduler": {"name": "asha", "perturbation_interval": 3}}, "perturbation_interval is a key of population-based"),
])
def test_what_pbt_cannot_do_is_one_line_before_ray(tmp_path, change, message):
    cfg = pbt_config(tmp_path)
    cfg["sweep"].update(change)
    with pytest.raises(ConfigError, match=message):
        check_sweep(load_config(cfg))


def test_explored_values_stay_in_the_space_and_only_mutable_keys_are_perturbed(tmp_path):
    specs = parse_space({"optim.lr": {"loguniform": [1e-3, 1e-2]}, "optim.smoothing": {"quniform": [0.0, 0.2, 0.05]},
                         "model.num_heads": {"choice": [1, 2]}})
    keep = KeepInSpace(specs)
    assert keep({"optim.lr": 0.012, "optim.smoothing": 0.137, "model.num_heads": 2}) == \
        {"optim.lr": 0.01, "optim.smoothing": pytest.approx(0.15), "model.num_heads": 2}
    cfg = load_config(pbt_config(tmp_path, name="pb2") | {"sweep": {**pbt_config(tmp_path)["sweep"],
                                                                   "scheduler": {"name": "pb2"}}})
    sched = make_pbt(cfg, specs, "val/loss", "min")
    assert set(sched._hyperparam_bounds) == {"optim.lr", "optim.smoothing"} and sched.last_epoch == 4


def test_a_run_restored_from_another_trials_checkpoint_trains_with_its_own_values_and_says_so(tmp_path):
    donor = run_loop(tiny_config(tmp_path, optim={"epochs": 3, "lr": 3e-3}), tmp_path / "donor",
                     extra={"trial_id": "donor", "pbt_values": {"optim.lr": 3e-3}})
    fresh = run_loop(tiny_config(tmp_path, optim={"epochs": 3, "lr": 1e-2}), tmp_path / "fresh")
    copied = run_loop(tiny_config(tmp_path, optim={"epochs": 3, "lr": 1e-2}), tmp_path / "copied",
                      resume=donor[0][1], extra={"trial_id": "me", "pbt_values": {"optim.lr": 1e-2}})
    assert [m["epoch"] for m, _ in copied] == [2, 3]
    # the lr schedule is the new config's at the restored step, not the donor's
    assert [m["lr"] for m, _ in copied] == [m["lr"] for m, _ in fresh[1:]] != [m["lr"] for m, _ in donor[1:]]
    assert [m["pbt/optim.lr"] for m, _ in copied] == [1e-2, 1e-2]
    note = json.loads(copied[0][0]["_tags"]["qksweep.pbt.exploit.2"])
    assert note == {"from_trial": "donor", "at_epoch": 1, "optim.lr": 1e-2}
    assert "_tags" not in copied[1][0] or not any(k.startswith("qksweep.pbt") for k in copied[1][0]["_tags"])
    # a run restored from its own checkpoint notes nothing
    again = run_loop(tiny_config(tmp_path, optim={"epochs": 3, "lr": 1e-2}), tmp_path / "again",
                     resume=copied[0][1], extra={"trial_id": "me", "pbt_values": {"optim.lr": 1e-2}})
    assert not any(k.startswith("qksweep.pbt") for k in (again[0][0].get("_tags") or {}))


def _checkpoints(results):
    return list(results.glob("pbt/*/checkpoint_*"))


@pytest.mark.slow
def test_a_pbt_sweep_copies_checkpoints_logs_the_new_values_and_survives_a_killed_driver(workdir):
    """Sweep and resume each start their own local Ray, not the session's: Ray 2.60 now and then keeps one
    CPU of a PBT sweep's many pause-and-restart placement groups after the sweep (no actor, no group left:
    see DEVELOPERS.md), and in the session's Ray that CPU would starve every later test."""
    from mlflow.tracking import MlflowClient

    cfg = pbt_config(workdir)  # synch (the default): every trial meets the others at each epoch, copies happen
    cfg["sweep"]["space"] = {"optim.lr": {"loguniform": [1e-4, 3e-2]}}
    (workdir / "pbt.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "qksweep.cli", "sweep", "pbt.yaml", "--name", "pbt"], cwd=workdir,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    try:
        while len(_checkpoints(workdir / "results")) < 6:  # past the first perturbation, before the end
            assert proc.poll() is None, "the sweep ended before the driver was killed"
            assert time.time() < deadline, "the sweep never got past its first epochs"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    time.sleep(3)
    done = subprocess.run([sys.executable, "-m", "qksweep.cli", "resume", "pbt", "--storage", str(workdir / "results")],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    c = MlflowClient(cfg["tracking"]["uri"])
    exp = c.get_experiment_by_name("test").experiment_id
    trials = c.search_runs([exp], "tags.`qksweep.kind` = 'trial' and tags.`qksweep.sweep` = 'pbt'")
    assert len(trials) == 4, "one run per trial"
    copies = 0
    for t in trials:
        assert t.info.status == "FINISHED"
        assert sorted(m.step for m in c.get_metric_history(t.info.run_id, "epoch")) == [1, 2, 3, 4]
        lr = {m.step: m.value for m in c.get_metric_history(t.info.run_id, "pbt/optim.lr")}
        assert sorted(lr) == [1, 2, 3, 4]
        assert lr[1] == pytest.approx(float(t.data.params["optim.lr"]))  # params keep the starting value
        for key, text in t.data.tags.items():
            if key.startswith("qksweep.pbt.exploit."):
                epoch, note = int(key.rsplit(".", 1)[1]), json.loads(text)
                assert note["at_epoch"] == epoch - 1 and note["from_trial"] != t.data.tags["qksweep.trial_id"]
                assert lr[epoch] == pytest.approx(note["optim.lr"])  # the new value from that epoch on
                copies += 1
    assert copies >= 1
