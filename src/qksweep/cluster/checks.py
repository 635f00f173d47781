"""What a cluster needs from a config, checked before anything is submitted.

Pure functions: nothing here opens a connection, so the remote-cluster rules are testable offline.
A trial may run on any node, so everything a trial writes or reads must be reachable from every
node: ``run.storage`` (Tune state, checkpoints) must be shared, and ``tracking.uri`` must name an
MLflow server or database the nodes can reach. For a head on this machine (127.0.0.1/localhost),
local files are fine; their relative paths are made absolute here, because a Ray job runs in its
own working directory.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from ..config import Config, ConfigError
from ..storage import URI_SCHEMES, check_uri
from ..tracking.runs import mask_secrets

DASHBOARD_PORT = 8265
# pyarrow filesystems that Ray Train/Tune write trial state to and qksweep keeps its sweep files in
SHARED_STORAGE_SCHEMES = URI_SCHEMES
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")

STORAGE_FIX = ("use a path on a filesystem every node mounts at the same place (NFS, EFS, Filestore, Lustre), "
               "e.g. -s run.storage=/mnt/shared/qksweep_results, or a bucket: -s run.storage=s3://BUCKET/qksweep "
               "(or gs://BUCKET/qksweep)")
TRACKING_FIX = ("run an MLflow server the nodes can reach (`mlflow server --host 0.0.0.0 --port 5000 "
                "--backend-store-uri postgresql://... --artifacts-destination s3://BUCKET/mlflow`) and set "
                "tracking.uri: http://HOST:5000")


# ---------------------------------------------------------------- addresses


def normalize_address(address: str | None) -> str:
    """The Ray dashboard (Jobs API) address as ``http(s)://host:port``, without a trailing slash.

    ``host:port`` gets ``http://`` like Ray's own Jobs client does; Ray Client (``ray://``) and GCS
    (``auto``) addresses are refused with the address to use instead.
    """
    if address is None or not str(address).strip():
        raise ConfigError("no cluster address: pass --address http://HEAD:8265 (the Ray dashboard) or set RAY_ADDRESS")
    a = str(address).strip().rstrip("/")
    if a == "auto":
        raise ConfigError("address 'auto' is for ray.init; qksweep submit talks to the Ray dashboard: "
                          "pass --address http://HEAD:8265")
    if "://" not in a:
        a = f"http://{a}"
    scheme = a.split("://", 1)[0].lower()
    if scheme == "ray":
        raise ConfigError(f"{a} is a Ray Client address; qksweep submit uses Ray Jobs through the dashboard: "
                          f"pass --address http://HEAD:{DASHBOARD_PORT}")
    if scheme not in ("http", "https"):
        raise ConfigError(f"address {mask_secrets(a)}: use http://HEAD:{DASHBOARD_PORT} (or https:// behind TLS)")
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in a):
        raise ConfigError(f"address {mask_secrets(a)!r} contains white space or control characters: "
                          f"pass --address http://HEAD:{DASHBOARD_PORT}")
    try:
        parts = urlsplit(a)
    except ValueError as e:  # e.g. "Invalid IPv6 URL" for an unclosed [
        raise ConfigError(f"address {mask_secrets(a)} is not a valid URL ({e}): pass --address http://HEAD:{DASHBOARD_PORT}") from None
    if not parts.hostname:
        raise ConfigError(f"address {mask_secrets(a)} names no host: pass --address http://HEAD:{DASHBOARD_PORT}")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ConfigError(f"address {mask_secrets(a)} has a bad port: pass --address http://HEAD:{DASHBOARD_PORT}") from None
    return a


def host_is_loopback(host: str | None) -> bool:
    if not host:
        return False
    h = host.strip("[]").lower()
    if h in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def is_loopback(address: str) -> bool:
    """True when the cluster's head is this machine (127.0.0.0/8, ::1, localhost)."""
    return host_is_loopback(urlsplit(normalize_address(address)).hostname)


def security_warnings(address: str) -> list[str]:
    """A plain-HTTP dashboard on another host: the Ray auth token (and every job) travels in clear text."""
    a = normalize_address(address)
    if a.startswith("http://") and not is_loopback(a):
        host = urlsplit(a).hostname
        return [f"{mask_secrets(a)} is plain HTTP to another host: the Ray auth token and the job travel in clear "
                f"text; tunnel the dashboard instead (`ray dashboard cluster.yaml`, or `ssh -L 8265:localhost:8265 "
                f"{host}` and --address http://127.0.0.1:8265) or put TLS in front of it and use https://"]
    return []


# ---------------------------------------------------------------- storage, tracking, data


@dataclass
class ClusterChecks:
    """The config as it will be sent (paths fixed up for a local head) and the warnings to print."""

    config: Config
    remote: bool
    warnings: list[str] = field(default_factory=list)


def check_storage(storage: str, *, remote: bool) -> tuple[str, list[str]]:
    """``run.storage`` for a cluster: returns the value to send and warnings; raises ConfigError."""
    s = storage.strip()
    if s.lower().startswith("file://"):
        s = s[len("file://"):]
    if "://" in s:
        scheme = s.split("://", 1)[0].lower()
        if scheme not in SHARED_STORAGE_SCHEMES:
            raise ConfigError(f"run.storage '{mask_secrets(storage)}': scheme {scheme}:// is not a filesystem Ray can "
                              f"write trial state to; {STORAGE_FIX}")
        check_uri(s)  # malformed: one line here (the bucket itself is probed when the sweep starts)
        return s, []
    if remote:
        if s.startswith("~") or not Path(s).is_absolute():
            raise ConfigError(f"run.storage '{storage}' is a path on this machine and the cluster's nodes cannot "
                              f"write there; {STORAGE_FIX}")
        return s, [f"run.storage {s} must be on a filesystem mounted at the same path on every node of the "
                   "cluster (the head and all workers), or trials cannot restore their checkpoints"]
    return str(Path(s).expanduser().resolve()), []


def _uri_host(uri: str) -> str | None:
    try:
        return urlsplit(uri).hostname
    except ValueError:
        return None


def check_tracking(uri: str, *, remote: bool) -> tuple[str, list[str]]:
    """``tracking.uri`` for a cluster: returns the value to send and warnings; raises ConfigError."""
    shown = mask_secrets(uri)
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""
    if scheme == "sqlite":
        if uri in ("sqlite://", "sqlite:///:memory:"):
            raise ConfigError(f"tracking.uri {shown} is an in-memory database that dies with the job; "
                              "use sqlite:////ABSOLUTE/PATH/mlflow.db (local head) or an MLflow server")
        if remote:
            raise ConfigError(f"tracking.uri {shown} lives on this machine; the cluster's nodes cannot reach it: "
                              f"{TRACKING_FIX}")
        path = uri[len("sqlite:///"):]
        if not path.startswith("/"):
            uri = "sqlite:///" + str(Path(path).expanduser().resolve())
        return uri, []
    if scheme in ("", "file"):
        raise ConfigError(f"tracking.uri {shown} is a local path; {TRACKING_FIX}")
    if remote and host_is_loopback(_uri_host(uri)):
        raise ConfigError(f"tracking.uri {shown} points at this machine, but on a cluster node localhost is the node "
                          f"itself: {TRACKING_FIX} (with HOST an address the nodes can reach)")
    return uri, []


def check_data_root(root: str | None, *, remote: bool) -> tuple[str | None, list[str]]:
    if not root or "://" in root:
        return root, []
    if remote:
        if root.startswith("~") or not Path(root).is_absolute():
            return root, [f"data.root '{root}' is relative: on the cluster it resolves inside the job's working "
                          "directory, where no data is shipped; use an absolute path that exists on every node"]
        return root, []
    return str(Path(root).expanduser().resolve()), []


def check_for_cluster(cfg: Config, address: str) -> ClusterChecks:
    """Everything a cluster needs from ``cfg``, for the head at ``address`` (opens no connection)."""
    remote = not is_loopback(address)
    out = cfg.model_copy(deep=True)
    warnings: list[str] = []
    out.run.storage, w = check_storage(cfg.run.storage, remote=remote)
    warnings += w
    if cfg.tracking.enabled:
        out.tracking.uri, w = check_tracking(cfg.tracking.uri, remote=remote)
        warnings += w
    out.data.root, w = check_data_root(cfg.data.root, remote=remote)
    warnings += w
    return ClusterChecks(out, remote, warnings)
