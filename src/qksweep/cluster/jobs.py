"""Ray Jobs: submitting a sweep to a cluster, following it, listing, stopping.

Everything goes through Ray's own ``JobSubmissionClient``; qksweep adds what a sweep needs:

* a reachability probe of the dashboard (3 s) before the client is built, so a wrong address is one
  line within seconds instead of a long hang;
* the Ray auth token, found the way Ray finds it (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``,
  ``~/.ray/auth_token``, through Ray's own loader) and sent only to a cluster that asks for one
  (``/api/authentication_mode``). The token is never printed;
* the config checks of :mod:`qksweep.cluster.checks`, and a ``working_dir`` holding only the resolved
  config (results, MLflow stores, data, virtualenvs and .git are never uploaded);
* secrets in tracking URIs masked in everything printed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

import yaml

from ..config import Config, ConfigError, load_config
from ..tracking.runs import mask_secrets
from ..trainables.train import JobFailed
from .checks import check_for_cluster, normalize_address, security_warnings
from .connect import RAY_ENV

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
CONFIG_NAME = "qksweep_job.yaml"
PROBE_TIMEOUT_S = 3.0
# qksweep's driver calls ray.init(runtime_env={"env_vars": RAY_ENV}) too; without this Ray refuses the
# overlap with the job's env_vars ("Failed to merge the Job's runtime env") instead of merging key by key.
JOB_ENV = {"RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}
_CHATTY_LOGGERS = ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                   "ray._private.runtime_env.packaging")
# gitignore-style patterns Ray applies to working_dir: nothing of these is ever uploaded
DEFAULT_EXCLUDES = [
    "qksweep_results/", "ray_results/", "mlruns/", "mlartifacts/", "mlflow.db", "*.db", "*.sqlite",
    "data/", "datasets/", ".venv/", "venv/", ".git/", "__pycache__/", "*.pyc", "checkpoints/",
    "*.ckpt", "*.pt", "*.pth", "*.safetensors", "dist/", "build/", "*.egg-info/", ".pytest_cache/",
]


class JobError(JobFailed):
    """The cluster answered, but the request failed for a reason that is not bad input (exit 1)."""


def warn(msg: str) -> None:
    print(f"qksweep: warning: {mask_secrets(msg)}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- connecting


def resolve_address(address: str | None) -> str:
    return normalize_address(address or os.environ.get("RAY_ADDRESS"))


def probe(address: str, timeout: float = PROBE_TIMEOUT_S) -> str:
    """GET ``/api/authentication_mode`` (public, no token needed) within ``timeout`` seconds.

    Returns the cluster's auth mode (``"token"`` or ``"disabled"``); raises ConfigError (one line)
    when nothing answers there.
    """
    import socket
    import urllib.error
    import urllib.request

    url = f"{address}/api/authentication_mode"
    where = f"the Ray dashboard at {mask_secrets(address)}"
    fix = ("start a head with `ray start --head` or pass the dashboard address (port 8265 by default) "
           "with --address or RAY_ADDRESS")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - http(s) only (normalize_address)
            body = r.read(4096)
    except urllib.error.HTTPError as e:
        if e.code == 404:  # Ray before token auth: no such endpoint, no token either
            return "disabled"
        raise ConfigError(f"{where} answered HTTP {e.code} to a probe; is this a Ray dashboard? {fix}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:  # ValueError: http.client.InvalidURL
        reason = getattr(e, "reason", e)
        if isinstance(reason, (socket.timeout, TimeoutError)) or "timed out" in str(reason):
            why = f"no answer within {timeout:g} s"
        elif isinstance(reason, ConnectionRefusedError):
            why = "connection refused"
        else:
            why = str(reason).splitlines()[0] if str(reason) else type(reason).__name__
        raise ConfigError(f"cannot reach {where} ({why}): {fix}") from None
    try:
        return str(json.loads(body).get("authentication_mode", "disabled"))
    except (ValueError, AttributeError):
        raise ConfigError(f"{where} did not answer like a Ray dashboard; {fix}") from None


def auth_headers() -> dict[str, str]:
    """The ``authorization`` header from the token Ray would use (env, token path, ~/.ray/auth_token)."""
    import ray  # noqa: F401 - loads ray._raylet
    from ray._raylet import AuthenticationTokenLoader

    try:
        return dict(AuthenticationTokenLoader.instance().get_token_for_http_header(ignore_auth_mode=True))
    except Exception as e:  # noqa: BLE001 - Ray's AuthenticationError: e.g. RAY_AUTH_TOKEN_PATH unreadable
        raise ConfigError(f"Ray auth token: {str(e).splitlines()[0].split('. Note:')[0]}") from None


NO_TOKEN = ("the cluster at {a} uses token authentication and no token was found: copy the head's token "
            "(`ray get-auth-token` on the head) into ~/.ray/auth_token, or set RAY_AUTH_TOKEN_PATH=FILE "
            "or RAY_AUTH_TOKEN")
BAD_TOKEN = ("the cluster at {a} refused this machine's Ray auth token (from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH "
             "or ~/.ray/auth_token): use the head's token (`ray get-auth-token` on the head)")


def connect(address: str | None, *, quiet: bool = False):
    """A ``JobSubmissionClient`` for ``address`` (or ``RAY_ADDRESS``), after the probe."""
    a = resolve_address(address)
    mode = probe(a)  # first: an address that does not answer is one line, with no warning before it
    if not quiet:
        for w in security_warnings(a):
            warn(w)
    headers: dict[str, str] = {}
    if mode == "token":
        headers = auth_headers()
        if not headers:
            raise ConfigError(NO_TOKEN.format(a=mask_secrets(a)))
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    for name in _CHATTY_LOGGERS:  # "uploading package ...", "WebSocket closed ...": qksweep says what matters
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        client = JobSubmissionClient(a, headers=headers)
    except AuthenticationError:
        raise ConfigError(BAD_TOKEN.format(a=mask_secrets(a))) from None
    except ConnectionError as e:
        raise ConfigError(f"cannot reach the Ray Jobs API at {mask_secrets(a)}: {str(e).splitlines()[0]}") from None
    client._qksweep_address = a  # for messages
    return client


def _call(client, what: str, fn: Callable[[], Any], job_id: str | None = None) -> Any:
    """One SDK call with Ray's errors turned into one-line qksweep errors."""
    from ray.exceptions import AuthenticationError

    a = mask_secrets(getattr(client, "_qksweep_address", "the cluster"))
    try:
        return fn()
    except AuthenticationError:
        raise ConfigError(BAD_TOKEN.format(a=a)) from None
    except RuntimeError as e:
        text = str(e)
        if job_id and ("404" in text or "does not exist" in text):
            raise ConfigError(f"no job '{job_id}' on the cluster at {a}: see `qksweep jobs list --address {a}`") from None
        first = mask_secrets(text.splitlines()[0] if text else type(e).__name__)
        raise JobError(f"{what} failed: {first}") from None
    except OSError as e:  # requests' ConnectionError is an OSError
        raise ConfigError(f"lost the connection to the Ray dashboard at {a} during {what}: "
                          f"{mask_secrets(str(e).splitlines()[0] if str(e) else type(e).__name__)}") from None


# ---------------------------------------------------------------- submitting


@dataclass
class Submission:
    """What ``submit`` sends: built (and checked) without touching the cluster."""

    address: str
    name: str
    entrypoint: str
    runtime_env: dict[str, Any]
    submission_id: str
    metadata: dict[str, str]
    config: Config
    warnings: list[str] = field(default_factory=list)
    workdir: Path | None = None

    def cleanup(self) -> None:
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


def _check_sweep_offline(cfg: Config, remote: bool, address: str) -> None:
    """The sweep's own checks (space, metric, sampler, every sampled model shape) before submitting.

    GPUs are the cluster's business, not this machine's (``RAY_ADDRESS`` tells the config check so);
    for a remote cluster the data lives there too, so the shape checks run against synthetic data of
    the same image size and class count, and the cluster checks the real data when the job starts.
    """
    from ..config import known_num_classes
    from ..checks import check_sweep

    probe_cfg = cfg.model_copy(deep=True)
    if remote and probe_cfg.data.name not in ("digits", "synthetic"):
        d = probe_cfg.data
        probe_cfg.data = type(d)(name="synthetic", img_size=d.img_size, batch_size=d.batch_size,
                                 num_classes=known_num_classes(d) or d.num_classes or 10)
    old = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = address
    try:
        check_sweep(probe_cfg)
    finally:
        if old is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = old


def _job_id(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")[:80] or "sweep"
    return f"qksweep-{safe}-{uuid.uuid4().hex[:6]}"


def build_submission(config: str | Path, overrides: list[str] | None, address: str | None, *,
                     name: str | None = None, resume: str | None = None,
                     num_samples: int | None = None, working_dir: str | Path | None = None) -> Submission:
    """Load and check the config for the cluster at ``address`` and prepare the job (no connection).

    The job's ``working_dir`` is a fresh temporary folder holding the resolved config; with
    ``working_dir`` given, that project folder is copied in too, minus :data:`DEFAULT_EXCLUDES`.
    """
    from ..checks import check_tracking_uri
    from ..orchestrator.sweep import default_sweep_name

    a = resolve_address(address)
    extra = list(overrides or [])
    if num_samples is not None:
        extra.append(f"sweep.num_samples={num_samples}")
    cfg = load_config(config, extra)
    check_tracking_uri(cfg.tracking.uri)
    checked = check_for_cluster(cfg, a)
    cfg = checked.config
    if not resume:
        _check_sweep_offline(cfg, checked.remote, a)
    name = resume or name or default_sweep_name(cfg)
    if resume:
        entry = ["qksweep", "resume", resume, "--storage", cfg.run.storage]
    else:
        entry = ["qksweep", "sweep", CONFIG_NAME, "--name", name]
    env_vars = {**RAY_ENV, **JOB_ENV}
    if cfg.tracking.enabled and mask_secrets(cfg.tracking.uri) == cfg.tracking.uri:
        env_vars["MLFLOW_TRACKING_URI"] = cfg.tracking.uri  # secrets stay in the uploaded config only
    workdir = Path(tempfile.mkdtemp(prefix="qksweep-job-"))
    try:
        if working_dir is not None:
            src = Path(working_dir)
            if not src.is_dir():
                raise ConfigError(f"--working-dir '{working_dir}' is not a directory")
            ignore = shutil.ignore_patterns(*[p.rstrip("/") for p in DEFAULT_EXCLUDES])
            shutil.copytree(src, workdir, ignore=ignore, dirs_exist_ok=True, symlinks=True)
        (workdir / CONFIG_NAME).write_text(
            f"# written by qksweep submit from {Path(config).name}"
            f"{' with ' + ' '.join(mask_secrets(o) for o in extra) if extra else ''}\n"
            + yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    runtime_env = {"working_dir": str(workdir), "excludes": list(DEFAULT_EXCLUDES), "env_vars": env_vars}
    metadata = {"qksweep.sweep": name, "qksweep.config": Path(config).name, "qksweep.kind": "resume" if resume else "sweep"}
    return Submission(address=a, name=name, entrypoint=shlex.join(entry), runtime_env=runtime_env,
                      submission_id=_job_id(name), metadata=metadata, config=cfg,
                      warnings=checked.warnings + security_warnings(a), workdir=workdir)


# ---------------------------------------------------------------- the head's Python

HEAD_MARK = "QKSWEEP-HEAD "
HEAD_PROBE_TIMEOUT_S = 90.0
# Ray Jobs runs an entrypoint through /bin/sh -c, a child of the job's supervisor: a worker process of the
# head's Ray, whatever the PATH says. Its Python is found from where it loaded Ray from
# (<prefix>/lib/pythonX.Y/site-packages/ray/_raylet.so -> <prefix>/bin/python3: a venv's own Python, which
# /proc/$PPID/exe, the resolved base interpreter, is not); then that binary; then python3 on the PATH.
_HEAD_PYTHON = (
    'py=""; so="$(grep -m1 -o "/[^ ]*/site-packages/ray/_raylet.so" /proc/$PPID/maps 2>/dev/null)"; '
    'if [ -n "$so" ]; then prefix="${so%/lib/python*/site-packages/ray/_raylet.so}"; '
    'for c in "$prefix/bin/python3" "$prefix/bin/python"; do [ -x "$c" ] && { py="$c"; break; }; done; fi; '
    '[ -n "$py" ] || py="$(readlink -f /proc/$PPID/exe 2>/dev/null)"; [ -x "$py" ] || py="$(command -v python3)"; '
)
_PROBE = ("import json, sys\n"
          "try:\n    import qksweep\n    info = {'version': qksweep.__version__}\n"
          "except Exception as e:\n    info = {'version': None, 'error': f'{type(e).__name__}: {e}'}\n"
          f"print({HEAD_MARK!r} + json.dumps(dict(info, python=sys.executable)), flush=True)")


@dataclass(frozen=True)
class HeadPython:
    python: str
    version: str


def local_version() -> str:
    import qksweep

    return qksweep.__version__


def head_python(client, address: str, env: dict[str, str] | None = None,
                timeout: float = HEAD_PROBE_TIMEOUT_S) -> HeadPython:
    """Ask the cluster, with a small job in the job's environment (``env``: its env_vars), which Python runs
    it and which qksweep that Python imports; a missing or different qksweep is one line naming both
    versions and the fix."""
    job = f"qksweep-probe-{uuid.uuid4().hex[:8]}"
    _call(client, "head probe", lambda: client.submit_job(
        entrypoint=_HEAD_PYTHON + 'exec "$py" -c ' + shlex.quote(_PROBE), submission_id=job,
        metadata={"qksweep.kind": "probe"}, runtime_env={"env_vars": {**RAY_ENV, **(env or {})}}))
    st = wait_until_terminal(client, job, timeout, poll=0.5)
    logs = _call(client, "logs", lambda: client.get_job_logs(job), job) or ""
    line = next((x[len(HEAD_MARK):] for x in logs.splitlines() if x.startswith(HEAD_MARK)), None)
    if line is None:
        tail = " ".join(logs.split())[-200:] or f"job {job} {st}"
        raise ConfigError(f"the head at {address} did not say which Python runs it ({tail}); check that its "
                          "Ray can start jobs (`ray job submit -- python3 -V`)")
    info = json.loads(line)
    mine = local_version()
    if info.get("version") is None:
        raise ConfigError(f"the head's Python {info['python']} cannot import qksweep ({info.get('error')}); install "
                          f"it there (`{info['python']} -m pip install qksweep=={mine}`) or start the head's Ray "
                          "from the environment that has it")
    if info["version"] != mine:
        raise ConfigError(f"the head runs qksweep {info['version']} ({info['python']}) and this machine {mine}: "
                          f"install the same version on both (`{info['python']} -m pip install qksweep=={mine}`)")
    return HeadPython(info["python"], info["version"])


def with_python(sub: Submission, head: HeadPython) -> Submission:
    """``sub`` with its entrypoint run by the head's own Python (``python -m qksweep ...``), not a
    ``qksweep`` found through the head's PATH."""
    args = shlex.split(sub.entrypoint)
    if args[:1] == ["qksweep"]:
        args = [head.python, "-m", "qksweep", *args[1:]]
    sub.entrypoint = shlex.join(args)
    return sub


def submit(sub: Submission, client=None) -> str:
    """Send ``sub`` (uploading its working_dir) and return the submission id."""
    client = client or connect(sub.address, quiet=True)
    try:
        return _call(client, "job submission", lambda: client.submit_job(
            entrypoint=sub.entrypoint, runtime_env=sub.runtime_env, submission_id=sub.submission_id,
            metadata=sub.metadata))
    finally:
        sub.cleanup()


# ---------------------------------------------------------------- following, status, stopping


def _status(client, job_id: str) -> str:
    st = _call(client, "status", lambda: client.get_job_status(job_id), job_id)
    return str(getattr(st, "value", st))


def wait_until_terminal(client, job_id: str, timeout: float, poll: float = 1.0) -> str:
    deadline = time.monotonic() + timeout
    st = _status(client, job_id)
    while st not in TERMINAL and time.monotonic() < deadline:
        time.sleep(min(poll, max(0.0, deadline - time.monotonic())))
        st = _status(client, job_id)
    return st


def follow(client, job_id: str, out: TextIO | None = None, *, poll: float = 2.0) -> str:
    """Stream the job's logs until it ends; return its final status.

    Ray's ``tail_job_logs`` websocket is used; if it breaks, the logs are polled with
    ``get_job_logs`` (bounded sleeps) and only the new part is written.
    """
    out = out or sys.stdout
    written = 0
    pending = ""  # masked line by line, so a URI split across two chunks is still masked

    def emit(text: str, final: bool = False) -> None:
        nonlocal written, pending
        written += len(text)
        pending += text
        cut = len(pending) if final else pending.rfind("\n") + 1
        if cut:
            out.write(mask_secrets(pending[:cut]))
            out.flush()
            pending = pending[cut:]

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            emit(chunk)

    _status(client, job_id)  # unknown id: one line, exit 2
    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        raise
    except Exception:  # noqa: BLE001 - websocket trouble: fall back to polling
        pass
    st = _status(client, job_id)
    while True:
        logs = _call(client, "logs", lambda: client.get_job_logs(job_id), job_id) or ""
        if len(logs) > written:
            emit(logs[written:])
        if st in TERMINAL:
            emit("", final=True)
            return st
        time.sleep(poll)
        st = _status(client, job_id)


def _fmt_time(ms: int | None) -> str:
    if not ms:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


def _short(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def as_typed(entrypoint: str) -> str:
    """The entrypoint as the user typed it: ``<head python> -m qksweep sweep ...`` reads ``qksweep sweep ...``
    (the table has a column's width, and which Python ran it is in ``qksweep jobs status``)."""
    try:
        args = shlex.split(entrypoint)
    except ValueError:
        return entrypoint
    if len(args) >= 3 and args[1:3] == ["-m", "qksweep"]:
        return shlex.join(["qksweep", *args[3:]])
    return entrypoint


def job_rows(client) -> list[dict[str, Any]]:
    jobs = _call(client, "listing jobs", client.list_jobs)
    rows = []
    for j in jobs:
        if (j.metadata or {}).get("qksweep.kind") == "probe":  # qksweep submit's question to the head
            continue
        rows.append({
            "id": j.submission_id or j.job_id or "-",
            "status": str(getattr(j.status, "value", j.status)),
            "sweep": (j.metadata or {}).get("qksweep.sweep", "-"),
            "start": _fmt_time(j.start_time),
            "end": _fmt_time(j.end_time),
            "entrypoint": mask_secrets(as_typed(j.entrypoint or "")),
            "start_time": j.start_time or 0,
        })
    rows.sort(key=lambda r: r["start_time"])
    return rows


def format_jobs(rows: list[dict[str, Any]], width: int = 48) -> str:
    if not rows:
        return "no jobs on this cluster"
    cols = ["id", "status", "sweep", "start", "end", "entrypoint"]
    table = [[r[c] if c != "entrypoint" else _short(r[c], width) for c in cols] for r in rows]
    widths = [max(len(c), *(len(str(t[i])) for t in table)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(cols, widths)).rstrip()]
    lines += ["  ".join(str(v).ljust(w) for v, w in zip(t, widths)).rstrip() for t in table]
    return "\n".join(lines)


def job_info(client, job_id: str) -> dict[str, Any]:
    info = _call(client, "status", lambda: client.get_job_info(job_id), job_id)
    return {
        "id": info.submission_id or info.job_id,
        "status": str(getattr(info.status, "value", info.status)),
        "message": mask_secrets(info.message or ""),
        "entrypoint": mask_secrets(info.entrypoint or ""),
        "sweep": (info.metadata or {}).get("qksweep.sweep"),
        "start": _fmt_time(info.start_time),
        "end": _fmt_time(info.end_time),
        "driver_exit_code": getattr(info, "driver_exit_code", None),
    }


def logs(client, job_id: str) -> str:
    return mask_secrets(_call(client, "logs", lambda: client.get_job_logs(job_id), job_id) or "")


def stop(client, job_id: str, *, wait: float = 60.0) -> tuple[bool, str]:
    """Ask Ray to stop the job (SIGTERM, then SIGKILL after Ray's grace period); wait up to ``wait``
    seconds for it to end. Returns (whether a stop was sent, the status then)."""
    sent = bool(_call(client, "stop", lambda: client.stop_job(job_id), job_id))
    st = wait_until_terminal(client, job_id, wait) if wait > 0 else _status(client, job_id)
    return sent, st
