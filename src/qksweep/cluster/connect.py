"""Connecting to Ray: a local instance started on demand, or the cluster named by ``RAY_ADDRESS``."""

from __future__ import annotations

import os
from typing import Any

# Ray Train V2 polls each worker's one-slot result queue at the health-check interval, so every
# ray.train.report blocks about that long (~1.9 s at Ray's default of 2 s; ~0.18 s at 0.2 s).
# See DEVELOPERS.md. Jobs may still override it.
RAY_ENV: dict[str, str] = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2"),
    "RAY_TRAIN_V2_ENABLED": "1",
    # Importing torch, timm and SpikingJelly in a fresh worker takes 10-30 s on a loaded 2-CPU box;
    # Ray's 60 s start-up limit then fails trials that would have run fine.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300"),
    # Each Train run starts a PreemptionWatcher actor: one more Python process per trial, started just
    # as the worker imports torch, for a watcher that only logs node drains and feeds
    # ray.train.get_preemption_info (qksweep reads neither; a lost node is a worker failure that
    # FailureConfig retries from the last checkpoint either way). Off unless set in the environment.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0"),
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    # qksweep validates sweep metrics before Ray starts; a trial rejected by a static constraint
    # returns without a result, which Tune's own strict check would turn into an error.
    "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
    "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning,ignore::UserWarning",
}


def runtime_env() -> dict[str, Any]:
    env = dict(RAY_ENV)
    for k in ("QKSWEEP_TEST_KILL_AT", "QKSWEEP_TEST_KILL_MARKER"):  # tests' kill points (qksweep/kill_points.py)
        if os.environ.get(k):
            env[k] = os.environ[k]
    return {"env_vars": env, "worker_process_setup_hook": "qksweep.cluster.connect.export_ray_address"}


def export_ray_address() -> None:
    """Ray ``worker_process_setup_hook``: every worker process learns its own cluster's address.

    Ray Train's ``PlacementGroupCleaner`` (a detached actor that removes a Train run's placement group
    when its controller dies, as it does when ASHA stops a trial) finds its cluster through the state
    API with no address. With more than one Ray on the machine (a shared CI or dev box) it fails with
    "Found multiple active Ray instances", the stopped trial's placement group keeps its CPUs until
    the sweep ends, and later trials time out waiting for workers. ``RAY_ADDRESS`` names the cluster."""
    import ray

    try:
        os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    except Exception:  # noqa: BLE001 - best effort: the cleaner works without it on a one-Ray machine
        pass


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect once per process. Locally everything binds 127.0.0.1; the dashboard stays on because
    Ray Train's placement-group cleaner needs the state API it serves."""
    import ray

    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"runtime_env": runtime_env(), "log_to_driver": True, "logging_level": "ERROR"}
    if address:
        ray.init(address=address, **kwargs)
    else:
        # Ray starts its workers at nice 15 so that its own daemons win any contention. Here the workers
        # are the training: a 6-epoch tiny run took 39 s at nice 0 and did not finish in 400 s at nice 15
        # beside two busy loops on this 2-CPU box (an MLflow server, a browser or a second job is enough
        # to starve them). A local instance runs them at normal priority unless RAY_worker_niceness says
        # otherwise; the raylet reads it from the environment it inherits here.
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(num_cpus=num_cpus, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1", **kwargs)


def state_api_address() -> str:
    """The dashboard (state API) of the Ray this process is connected to. With more than one Ray on the
    machine, the state API's ``address=None`` refuses to pick one ("Found multiple active Ray instances")."""
    from ray._private.worker import get_dashboard_url

    url = get_dashboard_url()
    return url if not url or url.startswith("http") else f"http://{url}"


def cluster_resources() -> dict[str, float]:
    import ray

    return dict(ray.cluster_resources())
