"""Placement groups that outlive their Train run while a sweep runs (issue 22): the deterministic
reproduction of the main job's hang, and the line a waiting sweep prints.

A Train V2 controller hands its worker group's placement group to Ray Train's cleaner only after the
workers started. A controller that dies before that (here: its trial's driver is SIGKILLed while the
group waits for a CPU the test holds, or just after the group was placed, while the workers start) leaves
a group that Ray keeps until the sweep's job ends. With one CPU held by the test and that group holding
the other, the sweep's next worker group can never be placed: without the sweep's placement-group watch
the sweep waits forever."""

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

    return [g for g in groups() if g.job == job and g.state != "REMOVED" and g.creator]


def _alive(job: str | None = None):
    from ray.util.state import list_actors

    from qksweep.cluster.connect import state_api_address

    return [a for a in list_actors(address=state_api_address(), filters=[("state", "!=", "DEAD")],
                                   raise_on_missing_output=False) if job is None or a.job_id == job]


def _sweep_job(my_job: str, deadline: float) -> str:
    """The job id of the sweep subprocess (the job of the first Train controller not of this process)."""
    while time.time() < deadline:
        for a in _alive():
            if a.class_name == "TrainController" and a.job_id != my_job:
                return a.job_id
        time.sleep(0.1)
    pytest.fail("the sweep started no Train run")


@pytest.mark.parametrize("when", ["pending", "placed"])
def test_train_run_dying_while_it_reserves_workers_does_not_hang_the_sweep(ray_session, workdir, when):
    import ray
    from ray.util.placement_group import placement_group

    from qksweep.cluster.placement import actor_dead, orphans, remove

    held = placement_group([{"CPU": 1}])  # stays for the whole sweep
    gate = placement_group([{"CPU": 1}]) if when == "pending" else None  # lifted once the controller is dead
    ray.get([held.ready()] + ([gate.ready()] if gate else []), timeout=60)
    # trials on Ray Train: the leak is a Train controller's worker group (one-worker trials default to tune)
    cfg = tiny_config(workdir, optim={"epochs": 1, "warmup_epochs": 0}, run={"launcher": "train"})
    cfg["sweep"] = {"metric": "val/loss", "mode": "min", "num_samples": 2, "max_concurrent": 1,
                    "searcher": {"sampler": "random", "seed": 0}, "scheduler": {"name": "none"},
                    "space": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}}
    (workdir / "sweep.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "QKSWEEP_STALL_S": "10"}
    log = open(workdir / "sweep.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "qksweep.cli", "sweep", "sweep.yaml", "--name", f"pg{when}"],
                            cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    my_job = ray.get_runtime_context().get_job_id()
    job = None
    try:
        deadline = time.time() + 180
        job = _sweep_job(my_job, deadline)
        # the first trial's controller has reserved its worker group: still waiting for a CPU (pending), or
        # placed with its worker not started yet (placed)
        want = "PENDING" if when == "pending" else "CREATED"
        while time.time() < deadline:
            reserved = [g for g in _sweep_groups(job) if g.state == want]
            if reserved:
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"the first trial's worker group was never {want}")
        if when == "pending":  # the cluster is really busy: the sweep waits and says so, naming the holder
            while time.time() < deadline and "sweep waiting:" not in (workdir / "sweep.log").read_text():
                time.sleep(0.5)
            text = (workdir / "sweep.log").read_text()
            assert "sweep waiting:" in text and held.id.hex()[:8] in text and "wait for CPU 1" in text, text[-3000:]
        # the trial ends while its controller reserves workers: its driver dies, the controller with it
        drivers = [a for a in _alive(job) if a.class_name == "ImplicitFunc"]
        assert len(drivers) == 1, [a.class_name for a in _alive()]
        os.kill(drivers[0].pid, signal.SIGKILL)
        orphan = reserved[0]
        while time.time() < deadline and not actor_dead(orphan.creator):
            time.sleep(0.1)
        if gate:
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
        remove([held.id.hex()] + ([gate.id.hex()] if gate else []))
        if job:
            remove(g.id for g in orphans(job))
    text = (workdir / "sweep.log").read_text()
    assert proc.returncode == 0, text[-3000:]
    c, trials, parents = trial_runs(cfg["tracking"]["uri"], f"pg{when}")
    assert len(trials) == 2 and all(t.info.status == "FINISHED" for t in trials), [t.info.status for t in trials]
    if when == "pending":  # a placed group may already be the cleaner's (the worker registered it first)
        assert f"released placement group {orphan.id[:8]}" in text, text[-3000:]


def _cpu_free(ray, want: float, timeout: float = 30) -> float:
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0) < want and time.monotonic() < deadline:
        time.sleep(0.2)
    return ray.available_resources().get("CPU", 0)


def test_train_actor_left_by_a_driver_that_is_gone_is_killed_and_its_group_removed(ray_session, workdir):
    """A sweep driver SIGKILLed on a cluster that outlives it: one CI run found its TrainController alive
    minutes later, holding a worker group's CPU (Ray ties the actor to its owner, and missed it). Ray
    cannot be made to miss it on demand, so a driver that exits leaves a TrainController made detached
    (the one way an actor outlives its job) holding a 1-CPU group; the next sweep's reclaim frees both,
    and leaves the session's own actors and groups alone."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from qksweep.cluster.placement import finished_jobs, reclaim_finished_jobs

    mine = placement_group([{"CPU": 0.5}])  # this job's own: not touched
    ray.get(mine.ready(), timeout=60)
    script = (
        "import ray, time\n"
        "from ray.util.placement_group import placement_group\n"
        "ray.init(address='auto')\n"
        "@ray.remote(num_cpus=0)\n"
        "class TrainController:\n"
        "    def reserve(self):\n"
        "        self.pg = placement_group([{'CPU': 1}])\n"
        "        ray.get(self.pg.ready(), timeout=60)\n"
        "        return self.pg.id.hex()\n"
        "a = TrainController.options(lifetime='detached').remote()\n"
        "print(ray.get(a.reserve.remote(), timeout=120))\n"
    )
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    left = out.stdout.split()[-1]
    time.sleep(2)
    assert ray.available_resources().get("CPU", 0) == 0.5, "the gone driver's group should still hold its CPU"
    killed, removed = reclaim_finished_jobs()
    assert len(killed) == 1 and mine.id.hex() not in removed  # Ray may remove the group itself once its creator is dead
    assert _cpu_free(ray, 1.5) == 1.5
    from qksweep.cluster.placement import groups

    assert [g.state for g in groups() if g.id == left] == ["REMOVED"]
    assert not [a for a in _alive() if a.actor_id in killed]
    assert reclaim_finished_jobs() == ([], []) and ray.get_runtime_context().get_job_id() not in finished_jobs()
    remove_placement_group(mine)


class TrainController:
    """Stands for a Ray Train controller that outlived its trial (the GCS names an actor by its class)."""

    def reserve(self):
        import ray
        from ray.util.placement_group import placement_group

        self.pg = placement_group([{"CPU": 1}])
        ray.get(self.pg.ready(), timeout=60)
        return self.pg.id.hex()


def test_sweep_end_kills_its_train_actors_still_alive_then_frees_their_groups(ray_session):
    """At the end of a sweep every trial is over, so a Train controller of the sweep still alive after the
    settle wait can only reserve a group nobody uses: it is killed before the groups go. Actors that
    were alive before the sweep are left alone."""
    import ray

    from qksweep.cluster.placement import current_job, job_placement_groups, release_placement_groups, train_actors

    Controller = ray.remote(num_cpus=0)(TrainController)
    older = Controller.remote()
    ray.get(older.__ray_ready__.remote(), timeout=60)
    before, actors_before = job_placement_groups(), frozenset(train_actors(current_job()))
    leftover = Controller.remote()
    left = ray.get(leftover.reserve.remote(), timeout=120)
    assert release_placement_groups(before, settle_s=2, actors_before=actors_before) == [left]
    assert _cpu_free(ray, 2) == 2
    alive = train_actors(current_job())
    assert older._actor_id.hex() in alive and leftover._actor_id.hex() not in alive
    ray.kill(older)
