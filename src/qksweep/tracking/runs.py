"""MLflow run lifecycle: one run per ``qksweep train``, a parent per sweep, exactly one child per trial.

Runs are found again by tags (``qksweep.kind``, ``qksweep.sweep``, ``qksweep.trial_id``,
``qksweep.run_name``) rather than by an in-memory map, so worker restarts, trial retries and a
restored sweep all land in the run that already exists. Every call goes through :func:`retrying`
(SQLite locks under concurrent trials, a tracking server that is briefly away).
"""

from __future__ import annotations

import logging
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from ..names import PUBLISH_DIR

log = logging.getLogger("qksweep.tracking")
T = TypeVar("T")

KIND, SWEEP, TRIAL, RUN_NAME = "qksweep.kind", "qksweep.sweep", "qksweep.trial_id", "qksweep.run_name"
SEED_KIND, SEED_INDEX = "seed", "qksweep.seed_index"  # sweep.repeats: a trial's nested run of one seed
PARENT = "mlflow.parentRunId"
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_LEN = 6000

_SECRET_URI = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^:/@\s]+):(?P<pw>[^@/\s]+)@")
_SECRET_QUERY = re.compile(r"(?i)((?:token|password|passwd|secret|api[_-]?key|access[_-]?key)=)[^&\s]+")


def mask_secrets(text: str) -> str:
    """``postgresql://u:pw@h/db`` → ``postgresql://u:***@h/db``; ``?token=abc`` → ``?token=***``."""
    if not isinstance(text, str):
        return text
    text = _SECRET_URI.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    return _SECRET_QUERY.sub(r"\1***", text)


def first_line(e: BaseException) -> str:
    """The innermost error's first line (Ray wraps worker exceptions several times)."""
    seen = e
    while seen.__cause__ is not None:
        seen = seen.__cause__
    text = str(seen).strip() or type(seen).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):  # the last line of a remote traceback holds "ErrType: message"
        if ":" in ln and not ln.startswith(("File ", "Traceback")):
            return mask_secrets(ln)[:500]
    return mask_secrets(lines[0] if lines else type(seen).__name__)[:500]


def retrying(fn: Callable[[], T], *, what: str, attempts: int | None = None, base_delay: float = 0.2,
             max_delay: float = 5.0, deadline_s: float | None = None) -> T:
    """Call ``fn`` with bounded exponential back-off; re-raise the last error.

    ``deadline_s`` bounds the whole call, back-off and HTTP timeouts included (the epoch logger uses a
    few seconds so that a tracking server that went away never holds training up for long). MLflow's
    own HTTP retries (7 by default, minutes in all) are turned off inside: this is the one retry layer.
    """
    attempts = attempts or int(os.environ.get("QKSWEEP_MLFLOW_RETRIES", "6"))
    end = time.monotonic() + deadline_s if deadline_s is not None else None
    delay = base_delay
    for i in range(attempts):
        try:
            with http_limits(None if end is None else end - time.monotonic()):
                return fn()
        except Exception as e:  # noqa: BLE001 - MLflow raises REST, SQLAlchemy and connection errors
            late = end is not None and time.monotonic() + delay >= end
            if i == attempts - 1 or late or not _transient(e):
                raise
            # under a deadline the caller reports the outcome itself (once, not at every try)
            log.log(logging.INFO if end is not None else logging.WARNING, "MLflow %s failed (%s); retrying in %.1fs",
                    what, mask_secrets(str(e).splitlines()[0][:200]), delay)
            time.sleep(delay)
            delay = min(delay * 2, max_delay)
    raise AssertionError("unreachable")


HTTP_TIMEOUT_S = 15
_HTTP_ENV = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
_USER_HTTP_ENV = {k for k in _HTTP_ENV if k in os.environ}  # what the user set wins


@contextmanager
def http_limits(remaining_s: float | None):
    """No MLflow-internal HTTP retries and a request timeout within ``remaining_s`` while inside
    (MLflow reads these variables on every request)."""
    wanted = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
              "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, int(min(HTTP_TIMEOUT_S, remaining_s or HTTP_TIMEOUT_S))))}
    saved = {k: os.environ.get(k) for k in wanted if k not in _USER_HTTP_ENV}
    for k in saved:
        os.environ[k] = wanted[k]
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _transient(e: Exception) -> bool:
    from mlflow.exceptions import MlflowException

    if isinstance(e, MlflowException):
        code = getattr(e, "error_code", "")
        msg = str(e).lower()
        return ("locked" in msg or "connection" in msg or "timed out" in msg or "temporarily" in msg
                or code in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"))
    return True  # connection errors, OperationalError (database is locked), timeouts


_OPENED: set[str] = set()


def client(uri: str) -> MlflowClient:
    """A client for ``uri``; the first one in a process on a SQLite store opens it under a file lock.

    MLflow creates and migrates a new SQLite database on first use; two processes doing that at
    once (two sweeps started together on a fresh ``mlflow.db``) race in alembic and one fails with
    "Online migration expected to match one row". The lock makes the second wait for the first.
    """
    if not uri.startswith("sqlite:///") or uri in _OPENED:
        return MlflowClient(tracking_uri=uri)
    with _sqlite_open_lock(uri):  # MlflowClient() creates and migrates the database
        c = MlflowClient(tracking_uri=uri)
    _OPENED.add(uri)
    return c


@contextmanager
def _sqlite_open_lock(uri: str):
    import fcntl
    import hashlib
    import tempfile

    path = uri[len("sqlite:///"):].split("?", 1)[0]
    key = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"qksweep-mlflow-{key}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def experiment_id(c: MlflowClient, name: str) -> str:
    def get_or_create() -> str:
        exp = c.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                c.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        try:
            return c.create_experiment(name)
        except Exception:  # created meanwhile by a concurrent trial
            exp = c.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    return retrying(get_or_create, what="experiment lookup")


def find_run(c: MlflowClient, exp_id: str, tags: dict[str, str]):
    filt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = retrying(lambda: c.search_runs([exp_id], filter_string=filt, max_results=2, order_by=["attributes.start_time ASC"]),
                    what="run lookup")
    return runs[0] if runs else None


def get_or_create_run(c: MlflowClient, exp_id: str, tags: dict[str, str], *, run_name: str | None,
                      params: dict[str, Any] | None = None) -> tuple[str, bool]:
    """(run_id, created). Looks the run up by ``tags`` first; creates it with params otherwise."""
    existing = find_run(c, exp_id, tags)
    if existing is not None:
        if existing.info.status != "RUNNING":
            retrying(lambda: c.update_run(existing.info.run_id, status="RUNNING"), what="run reopen")
        return existing.info.run_id, False
    run = retrying(lambda: c.create_run(exp_id, run_name=run_name, tags=tags), what="run creation")
    if params:
        log_params(c, run.info.run_id, params)
    return run.info.run_id, True


def log_params(c: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(k, mask_secrets(_param_str(v))[:MAX_PARAM_LEN]) for k, v in sorted(params.items())]
    for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
        chunk = items[i : i + MAX_PARAMS_PER_BATCH]
        retrying(lambda: c.log_batch(run_id, params=chunk), what="param logging")


def _param_str(v: Any) -> str:
    if v is None:
        return "None"
    if isinstance(v, (list, dict)):
        import json

        return json.dumps(v, sort_keys=True)
    return str(v)


def log_metrics(c: MlflowClient, run_id: str, metrics: dict[str, float], step: int, timestamp: int | None = None) -> None:
    ts = timestamp or int(time.time() * 1000)
    items = [Metric(k, float(v), ts, step) for k, v in metrics.items() if _is_number(v)]
    log_metric_list(c, run_id, items)


def log_metric_list(c: MlflowClient, run_id: str, items: list[Metric]) -> None:
    for i in range(0, len(items), MAX_METRICS_PER_BATCH):
        chunk = items[i : i + MAX_METRICS_PER_BATCH]
        retrying(lambda: c.log_batch(run_id, metrics=chunk), what="metric logging")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def set_tags(c: MlflowClient, run_id: str, tags: dict[str, str]) -> None:
    items = [RunTag(k, mask_secrets(str(v))[:MAX_PARAM_LEN]) for k, v in tags.items()]
    retrying(lambda: c.log_batch(run_id, tags=items), what="tag logging")


def finish_run(c: MlflowClient, run_id: str, status: str, tags: dict[str, str] | None = None) -> None:
    """Close a run, and with it the runs of its seeds (``sweep.repeats``) that are still running: every way a
    trial's run ends (its own end, a scheduler's stop, a budget, an orphan's close) comes through here."""
    if tags:
        set_tags(c, run_id, tags)
    retrying(lambda: c.set_terminated(run_id, status=status), what="run termination")
    run = retrying(lambda: c.get_run(run_id), what="run status")
    if run.data.tags.get("qksweep.repeats"):
        seeds = retrying(lambda: c.search_runs(
            [run.info.experiment_id], f"tags.`{PARENT}` = '{run_id}' and tags.`{KIND}` = '{SEED_KIND}' "
            "and attributes.status = 'RUNNING'"), what="run lookup")
        for r in seeds:
            retrying(lambda r=r: c.set_terminated(r.info.run_id, status=status), what="run termination")


def close_if_running(c: MlflowClient, run_id: str, status: str, tags: dict[str, str] | None = None) -> bool:
    """Close a run unless something else (the sweep's callback after an early stop) already did."""
    run = retrying(lambda: c.get_run(run_id), what="run status")
    if run.info.status != "RUNNING":
        return False
    finish_run(c, run_id, status, tags)
    return True


def log_artifact_dir(uri: str, run_id: str, local_dir: str | Path, artifact_path: str) -> None:
    c = client(uri)
    retrying(lambda: c.log_artifacts(run_id, str(local_dir), artifact_path), what="artifact upload")


def log_artifact_file(uri: str, run_id: str, local_file: str | Path, artifact_path: str | None = None) -> None:
    c = client(uri)
    retrying(lambda: c.log_artifact(run_id, str(local_file), artifact_path), what="artifact upload")


def logged_steps(c: MlflowClient, run_id: str, key: str = "epoch") -> set[int]:
    """Steps already logged for ``key`` (so a restarted run never logs an epoch twice)."""
    hist = retrying(lambda: c.get_metric_history(run_id, key), what="metric history")
    return {m.step for m in hist}


def iter_metrics(metrics: dict[str, Any]) -> Iterable[tuple[str, float]]:
    for k, v in metrics.items():
        if not k.startswith("_") and _is_number(v):
            yield k, float(v)


def log_checkpoint_dir(c: MlflowClient, run_id: str, local_dir: str | Path, artifact_path: str) -> None:
    """A checkpoint folder as artifacts, without the files it carries for publishing (``_publish/``)."""
    d = Path(local_dir)
    if not (d / PUBLISH_DIR).exists():
        retrying(lambda: c.log_artifacts(run_id, str(d), artifact_path), what="artifact upload")
        return
    for f in sorted(d.iterdir()):
        if f.name == PUBLISH_DIR:
            continue
        if f.is_dir():
            retrying(lambda f=f: c.log_artifacts(run_id, str(f), f"{artifact_path}/{f.name}"), what="artifact upload")
        else:
            retrying(lambda f=f: c.log_artifact(run_id, str(f), artifact_path), what="artifact upload")

