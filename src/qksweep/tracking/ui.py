"""``qksweep ui``: the MLflow web UI over a tracking store.

For a database or file store it starts ``mlflow server`` on ``host:port`` (127.0.0.1 unless told
otherwise); for an ``http(s)://`` tracking URI the server already exists and nothing is started.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

from . import runs

log = logging.getLogger("qksweep.tracking")

REMOTE_SCHEMES = ("http://", "https://", "databricks")


class UIError(RuntimeError):
    """The UI server did not start or answer (one line)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ui_url(host: str, port: int) -> str:
    """The URL to open: a wildcard bind address is reached through 127.0.0.1."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


def is_remote(tracking_uri: str) -> bool:
    return tracking_uri.startswith(REMOTE_SCHEMES)


def server_command(tracking_uri: str, *, host: str = "127.0.0.1", port: int = 5000,
                   artifacts_destination: str | None = None, workers: int = 1) -> list[str]:
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri,
           "--host", host, "--port", str(port), "--workers", str(workers)]
    if artifacts_destination:
        cmd += ["--artifacts-destination", str(artifacts_destination)]
    return cmd


def server_env() -> dict[str, str]:
    """This environment, with MLflow's GenAI job executor off unless asked for: browsing runs needs none of
    it, and it would start about ten more processes (huey consumers) next to the server."""
    env = dict(os.environ)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return env


def start_ui(tracking_uri: str, *, host: str = "127.0.0.1", port: int = 5000, artifacts_destination: str | None = None,
             log_file: str | Path | IO | None = None, workers: int = 1) -> subprocess.Popen | None:
    """Start ``mlflow server`` over ``tracking_uri``; returns its process (None for an http(s) URI).

    The server runs in its own process group (see :func:`stop_ui`). Its output goes to ``log_file``
    (a path or an open file) or, without one, to this process's stdout/stderr.
    ``artifacts_destination``: where uploads of runs created through this server go
    (``--artifacts-destination``); runs logged straight to the store keep their own artifact paths.
    """
    if is_remote(tracking_uri):
        print(f"MLflow server already at {runs.mask_secrets(tracking_uri)}: open it in a browser")
        return None
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):].split("?", 1)[0])
        if str(db) not in ("", ":memory:") and not db.exists():
            log.warning("%s does not exist yet: the server starts on an empty store", db)
    if host in ("0.0.0.0", "::", ""):
        log.warning("MLflow UI bound to %s: reachable from other machines on this network", host or "all interfaces")
    cmd = server_command(tracking_uri, host=host, port=port, artifacts_destination=artifacts_destination, workers=workers)
    out = None
    if isinstance(log_file, (str, Path)):
        out = open(log_file, "ab")  # noqa: SIM115 - handed to the child, closed below
    elif log_file is not None:
        out = log_file
    try:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if out is not None else None,
                                stdin=subprocess.DEVNULL, start_new_session=True, env=server_env())
    finally:
        if isinstance(log_file, (str, Path)) and out is not None:
            out.close()
    proc.url = ui_url(host, port)  # type: ignore[attr-defined]
    log.info("MLflow UI at %s (pid %d)", proc.url, proc.pid)  # type: ignore[attr-defined]
    return proc


def wait_until_up(url: str, timeout: float = 60.0, *, proc: subprocess.Popen | None = None, interval: float = 0.25) -> None:
    """Poll ``<url>/health`` until it answers 200; raise :class:`UIError` on timeout or if ``proc`` exits."""
    health = url.rstrip("/") + "/health"
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        if proc is not None and proc.poll() is not None:
            raise UIError(f"mlflow server exited with code {proc.returncode} before answering at {url}")
        try:
            with urllib.request.urlopen(health, timeout=2) as r:  # noqa: S310 - our own local server
                if r.status == 200:
                    return
                last = f"HTTP {r.status}"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            last = str(getattr(e, "reason", e))
        if time.monotonic() >= deadline:
            raise UIError(f"MLflow server at {url} did not answer within {timeout:.0f}s ({last})")
        time.sleep(interval)


def stop_ui(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """Stop a server started by :func:`start_ui` (its whole process group: the server and its workers)."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        try:  # workers that outlived the server process
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return
