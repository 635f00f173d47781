"""Placement groups that outlive their Train run while a sweep runs (issue 22): the deterministic
reproduction of the main job's hang, and the line a waiting sweep prints.

A Train V2 controller hands its worker group's placement group to Ray Train's cleaner only after the
workers started. A controller that dies before that (here: its trial's driver is SIGKILLed while the
group waits for a CPU the test holds) leaves a group that Ray keeps until the sweep's job ends. With one
CPU held by the test and that group holding the other, the sweep's next worker group can never be
placed: without the sweep's placement-group watch the sweep waits forever."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from .conftest import tiny_config
from .test_sweep import trial_runs

pytestmark = pytest.mark.slow


def _sweep_groups(job: str):
    from qksweep.cluster.placement import groups

    return [g for g in groups() if g.job == job and g.state != "REMOVED"]


def _sweep_job(my_job: str, deadline: float) -> str:
    """The job id of the sweep subprocess (its trial driver is the first actor of another job)."""
    from ray.util.state import list_actors

    from qksweep.cluster.connect import state_api_address

    while time.time() < deadline:
        for a in list_actors(address=state_api_address(), filters=[("state", "=", "ALIVE")],
                             raise_on_missing_output=False):
            if a.class_name == "TrainController" and a.job_id != my_job:
                return a.job_id
        time.sleep(0.2)
    pytest.fail("the sweep started no Train run")


def test_train_run_dying_while_it_reserves_workers_does_not_hang_the_sweep(ray_session, workdir):
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.state import list_actors

    from qksweep.cluster.connect import state_api_address
    from qksweep.cluster.placement import remove

    held = placement_group([{"CPU": 1}])  # stays for the whole sweep
    gate = placement_group([{"CPU": 1}])  # lifted once the first trial's controller is dead
    ray.get([held.ready(), gate.ready()], timeout=60)
    cfg = tiny_config(workdir, optim={"epochs": 1, "warmup_epochs": 0})
    cfg["sweep"] = {"metric": "val/loss", "mode": "min", "num_samples": 2, "max_concurrent": 1,
                    "searcher": {"sampler": "random", "seed": 0}, "scheduler": {"name": "none"},
                    "space": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}}
    (workdir / "sweep.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "QKSWEEP_STALL_S": "10"}
    log = open(workdir / "sweep.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "qksweep.cli", "sweep", "sweep.yaml", "--name", "pgleak"],
                            cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    my_job = ray.get_runtime_context().get_job_id()
    try:
        deadline = time.time() + 180
        job = _sweep_job(my_job, deadline)
        while time.time() < deadline:  # the first trial's controller reserves its worker group and waits
            waiting = [g for g in _sweep_groups(job) if g.creator and g.state == "PENDING"]
            if waiting:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the first trial never asked for its worker group")
        # the cluster is really busy: the sweep waits and says so, naming the group that holds it
        while time.time() < deadline and "sweep waiting:" not in (workdir / "sweep.log").read_text():
            time.sleep(0.5)
        text = (workdir / "sweep.log").read_text()
        assert "sweep waiting:" in text and held.id.hex()[:8] in text and "wait for CPU 1" in text, text[-3000:]
        # the trial ends while its controller reserves workers: its driver dies, the controller with it
        drivers = [a for a in list_actors(address=state_api_address(), filters=[("state", "=", "ALIVE")],
                                          raise_on_missing_output=False)
                   if a.job_id == job and a.class_name not in ("TrainController", "_QueueActor")
                   and a.class_name.startswith(("ImplicitFunc", "trial_driver", "with_parameters"))]
        assert len(drivers) == 1, [a.class_name for a in list_actors(address=state_api_address())]
        os.kill(drivers[0].pid, signal.SIGKILL)
        orphan = waiting[0].id
        while time.time() < deadline and not any(g.id == orphan and g.creator_dead for g in _sweep_groups(job)):
            time.sleep(0.2)
        remove([gate.id.hex()])  # one CPU free: the orphan takes it (or the retried trial does, then the next)
        proc.wait(timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("the sweep hung behind a placement group its dead Train run left:\n"
                    + (workdir / "sweep.log").read_text()[-3000:])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
        remove([held.id.hex(), gate.id.hex()])
        remove(g.id for g in _sweep_groups(job) if g.orphaned) if "job" in locals() else None
    text = (workdir / "sweep.log").read_text()
    assert proc.returncode == 0, text[-3000:]
    assert f"released placement group {orphan[:8]}" in text, text[-3000:]
    c, trials, parents = trial_runs(cfg["tracking"]["uri"], "pgleak")
    assert len(trials) == 2 and all(t.info.status == "FINISHED" for t in trials), [t.info.status for t in trials]
