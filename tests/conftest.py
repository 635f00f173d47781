"""Shared fixtures: one local Ray for the in-process tests, and tiny configs that train in seconds."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def tiny_config(tmp: Path, **sections) -> dict:
    """A QKFormer small enough that an epoch on digits takes about a second."""
    cfg = {
        "experiment": "test",
        "model": {"name": "qkformer_cifar", "embed_dim": 32, "num_heads": 2, "depth": 2, "mlp_ratio": 2, "time_steps": 1},
        "data": {"name": "digits", "img_size": 8, "batch_size": 64},
        "optim": {"epochs": 2, "warmup_epochs": 0, "lr": 3e-3},
        "run": {"workers": 1, "seed": 1, "storage": str(tmp / "results"), "max_failures": 2},
        # no MLflow model per finished run (a few seconds each); the tests of that turn it on
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "log_model": False},
        "spectral": {"enabled": False},
    }
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return cfg


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from qksweep.cluster.connect import ensure_ray

    ensure_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_cli(*args: str, cwd: Path, timeout: float = 600, env: dict | None = None):
    import subprocess

    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "qksweep.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=e)


def _cpus_held() -> float:
    import ray

    return ray.cluster_resources().get("CPU", 0.0) - ray.available_resources().get("CPU", 0.0)


def _alive_actors() -> list[str]:
    """The actors still alive in the session's Ray, named by class, state and pid."""
    from ray.util.state import list_actors, list_jobs

    from qksweep.cluster.connect import state_api_address

    try:
        actors = list_actors(address=state_api_address(),
                             filters=[("state", "!=", "DEAD")], raise_on_missing_output=False)
        dead_jobs = {j.job_id for j in list_jobs(address=state_api_address(), raise_on_missing_output=False)
                     if j.status != "RUNNING"}
        return [f"{a.class_name} ({a.state}, pid {a.pid}, job {a.job_id}{' (ended)' if a.job_id in dead_jobs else ''})"
                for a in actors]
    except Exception as e:  # noqa: BLE001 - the state API is only used to name what is left
        return [f"(state API: {type(e).__name__})"]


@pytest.fixture(autouse=True)
def _ray_left_clean(request):
    """A test that uses the session's Ray must hand its CPUs back: a Train run or trial left alive holds
    them, and every later test then waits for workers until its own timeout (one leak used to cost the
    rest of the suite). The leaking test fails here, by name, and what it left is killed so the suite goes
    on. The wait is bounded: Ray frees a finished run's placement group within a few seconds."""
    yield
    if "ray_session" not in request.fixturenames:
        return
    import time

    import ray

    if not ray.is_initialized():
        return
    deadline = time.monotonic() + 60
    while _cpus_held() > 1e-6 and time.monotonic() < deadline:
        time.sleep(0.5)
    held = _cpus_held()
    if held <= 1e-6:
        return
    names = _alive_actors()
    from ray.util import placement_group_table

    from qksweep.cluster.placement import remove

    remove(pg_id for pg_id, pg in placement_group_table().items() if pg.get("state") == "CREATED")
    pytest.fail(f"{held:g} CPU still held 60 s after the test; alive actors: {', '.join(names) or 'none'}",
                pytrace=False)
