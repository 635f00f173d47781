"""``run.storage``: a local path, a path every node mounts, or a bucket URI (``s3://``, ``gs://``).

Ray Tune and Ray Train write to a URI themselves (pyarrow filesystems: the experiment state, every
trial's checkpoints). qksweep's own sweep files (the state file and the Optuna study, a SQLite
database) need a local file, so for a URI they are *working copies* in a local cache folder,
uploaded to ``<storage>/<sweep>/`` as the sweep runs and downloaded again by ``qksweep resume``,
possibly on another machine.

Custom S3 endpoints (MinIO, Ceph, a test server) go in the URI's query, as pyarrow reads it:
``s3://bucket/prefix?endpoint_override=HOST:PORT&scheme=http&region=us-east-1``. Credentials come
from the usual places (environment, ``~/.aws``, an instance role, ``GOOGLE_APPLICATION_CREDENTIALS``);
``s3://KEY:SECRET@bucket/...`` also works and is masked in everything qksweep prints or logs.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
import time
from contextlib import closing
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from .config import ConfigError

# the schemes whose pyarrow filesystem qksweep opens (gs and gcs are the same GcsFileSystem)
URI_SCHEMES = ("s3", "gs", "gcs")
STATE_FILE = "qksweep_sweep.json"
OPTUNA_DB = "optuna.db"
SWEEP_FILES = (STATE_FILE, OPTUNA_DB)
EXAMPLE = "s3://BUCKET/qksweep (or gs://BUCKET/qksweep), or a path every node mounts"


def _mask(text: str) -> str:
    from .tracking.runs import mask_secrets

    return mask_secrets(text)


def is_uri(storage: str) -> bool:
    """A bucket URI (not a local path, not ``file://``)."""
    return "://" in storage and not storage.lower().startswith("file://")


def local_path(storage: str) -> str:
    """The absolute local path of a path or ``file://`` value."""
    s = storage[len("file://"):] if storage.lower().startswith("file://") else storage
    return str(Path(s).expanduser().resolve())


def check_uri(storage: str) -> None:
    """Static checks of a ``run.storage`` URI (opens no connection): scheme, bucket, query."""
    if not is_uri(storage):
        return
    shown = _mask(storage)
    scheme = storage.split("://", 1)[0].lower()
    if scheme not in URI_SCHEMES:
        raise ConfigError(f"run.storage '{shown}': scheme {scheme}:// is not supported; use {EXAMPLE}")
    if any(ch.isspace() for ch in storage):
        raise ConfigError(f"run.storage '{shown}' contains white space: not a valid URI")
    try:
        parts = urlsplit(storage)
        parts.port  # noqa: B018 - raises on a malformed host:port
    except ValueError as e:
        raise ConfigError(f"run.storage '{shown}' is not a valid URI ({e})") from None
    if not parts.hostname:
        raise ConfigError(f"run.storage '{shown}' names no bucket; use {EXAMPLE}")
    if parts.fragment:
        raise ConfigError(f"run.storage '{shown}': a URI fragment (#...) has no meaning here")
    try:
        parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise ConfigError(f"run.storage '{shown}': malformed query string '{parts.query}'") from None


def join(storage: str, *parts: str) -> str:
    """``storage``/parts: a path, or a URI with the parts inserted before its query."""
    if not is_uri(storage):
        return str(Path(storage, *parts))
    base, sep, query = storage.partition("?")
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)]) + (sep + query if sep else "")


def filesystem(uri: str):
    """(pyarrow filesystem, path on it) of a URI; ConfigError when pyarrow refuses it. For ``s3://``
    without ``region=`` pyarrow asks the endpoint for the bucket's region, so this may connect."""
    import pyarrow.fs as pafs

    check_uri(uri)
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError, TypeError) as e:  # ArrowInvalid is a ValueError
        raise ConfigError(f"run.storage '{_mask(uri)}': {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return _mask(lines[0] if lines else type(e).__name__)[:300]


def _quick(fs):
    """The same filesystem with short timeouts and no retries, so a probe fails in seconds."""
    import datetime

    import pyarrow.fs as pafs

    try:
        if isinstance(fs, pafs.S3FileSystem):
            _, (opts,) = fs.__reduce__()
            opts = {**opts, "connect_timeout": 3.0, "request_timeout": 10.0,
                    "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=1)}
            return pafs.S3FileSystem(**opts)
        if isinstance(fs, pafs.GcsFileSystem):
            _, (opts,) = fs.__reduce__()
            return pafs.GcsFileSystem(**{**opts, "retry_time_limit": datetime.timedelta(seconds=10)})
    except (TypeError, ValueError):  # a pyarrow whose options differ: probe with the filesystem as is
        pass
    return fs


def probe(storage: str) -> None:
    """Refuse a URI whose bucket does not exist or cannot be reached (one line, before any write).
    A local path is never probed: it is created when the sweep starts."""
    if not is_uri(storage):
        return
    import pyarrow.fs as pafs

    fs, path = filesystem(storage)
    bucket = path.split("/", 1)[0]
    try:
        info = _quick(fs).get_file_info(bucket)
    except OSError as e:
        raise ConfigError(f"run.storage '{_mask(storage)}' cannot be reached: {_first_line(e)}") from None
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"run.storage '{_mask(storage)}': bucket '{bucket}' does not exist (create it first)")


def checkpoint_location(checkpoint) -> str:
    """A Ray checkpoint's location as the user would write it (``s3://bucket/...`` or a path)."""
    fs = getattr(checkpoint, "filesystem", None)
    kind = getattr(fs, "type_name", "local")
    if kind in ("local", "mock"):
        return checkpoint.path
    return f"{'gs' if kind == 'gcs' else kind}://{checkpoint.path}"


def checkpoint_uri(storage: str, checkpoint) -> str | None:
    """A Ray checkpoint as a string ``ray.train.Checkpoint(...)`` opens again anywhere: its local path,
    or for a bucket the ``run.storage`` URI extended to it (credentials and ``?endpoint`` options kept)."""
    if checkpoint is None:
        return None
    if not is_uri(storage) or getattr(checkpoint.filesystem, "type_name", "local") == "local":
        return checkpoint.path
    parts = urlsplit(storage.partition("?")[0])
    root = (parts.netloc.rpartition("@")[2] + parts.path).rstrip("/")
    path = checkpoint.path
    if path == root or path.startswith(root + "/"):
        return join(storage, path[len(root):].lstrip("/"))
    return checkpoint_location(checkpoint)


def cache_root() -> Path:
    return Path(os.environ.get("QKSWEEP_CACHE_DIR") or Path.home() / ".cache" / "qksweep").expanduser()


class SweepFiles:
    """Where a sweep's own files live: ``local`` is the folder the driver reads and writes; for a
    URI ``remote`` is ``<storage>/<name>`` and ``local`` a cache folder kept in step with it."""

    def __init__(self, storage: str, name: str):
        self.name = name
        self.storage = storage
        if is_uri(storage):
            self.remote: str | None = join(storage, name)
            self._fs, self._fs_path = filesystem(self.remote)
            self._scheme = storage.split("://", 1)[0].lower()
        else:
            self.remote = None
            self._fs = self._fs_path = None
            self._local = Path(local_path(storage)) / name
        self._last_upload = 0.0

    @property
    def local(self) -> Path:
        """The folder the driver reads and writes. For a URI it is computed on the machine that uses
        it (this object travels pickled in Tune's state when a sweep resumes elsewhere)."""
        if self.remote is None:
            return self._local
        return cache_root() / "sweeps" / self._scheme / self._fs_path

    @property
    def tune_path(self) -> str:
        """The Tune experiment folder (``Tuner.restore`` argument)."""
        return self.remote or str(self.local)

    @property
    def location(self) -> str:
        """For messages: the URI (secrets masked) or the local folder."""
        return _mask(self.remote) if self.remote else str(self.local)

    @property
    def optuna_url(self) -> str:
        return f"sqlite:///{self.local / OPTUNA_DB}"

    def exists(self) -> bool:
        """Anything is stored under the sweep's name (its folder, or objects under its prefix)."""
        if self.remote is None:
            return self.local.exists()
        import pyarrow.fs as pafs

        return self._info("").type != pafs.FileType.NotFound

    def has_state(self) -> bool:
        """The sweep's state file is there (in the bucket for a URI)."""
        if self.remote is None:
            return (self.local / STATE_FILE).exists()
        return self._info(STATE_FILE).is_file

    def _info(self, rel: str):
        try:
            return self._fs.get_file_info(f"{self._fs_path}/{rel}".rstrip("/"))
        except OSError as e:
            raise ConfigError(f"run.storage '{self.location}' cannot be read: {_first_line(e)}") from None

    def prepare_new(self) -> None:
        """A fresh local folder for a new sweep (an old cache of the same name is dropped)."""
        if self.remote is not None and self.local.exists():
            shutil.rmtree(self.local)
        self.local.mkdir(parents=True)

    def download(self) -> None:
        """Fetch the bucket's copies into the cache (the bucket's copy is the one in step with
        Tune's experiment state there). No-op for a local path."""
        if self.remote is None:
            return
        self.local.mkdir(parents=True, exist_ok=True)
        for rel in SWEEP_FILES:
            if not self._info(rel).is_file:
                (self.local / rel).unlink(missing_ok=True)
                continue
            tmp = self.local / f".{rel}.part"
            with self._fs.open_input_stream(f"{self._fs_path}/{rel}") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            tmp.replace(self.local / rel)

    def upload(self, *, min_interval_s: float = 0.0) -> bool:
        """Copy the working files to the bucket (the Optuna database as a consistent SQLite snapshot).
        Skipped (False) within ``min_interval_s`` of the previous upload; no-op for a local path."""
        if self.remote is None:
            return False
        now = time.monotonic()
        if min_interval_s and now - self._last_upload < min_interval_s:
            return False
        self._last_upload = now
        with tempfile.TemporaryDirectory(prefix="qksweep-up-") as tmp:
            for rel in SWEEP_FILES:
                src = self.local / rel
                if not src.exists():
                    continue
                if rel == OPTUNA_DB:
                    snap = Path(tmp) / rel
                    with closing(sqlite3.connect(src)) as a, closing(sqlite3.connect(snap)) as b:
                        a.backup(b)
                    src = snap
                # one PUT on close: a reader never sees a half-written object
                with open(src, "rb") as f, self._fs.open_output_stream(f"{self._fs_path}/{rel}") as out:
                    shutil.copyfileobj(f, out, 1 << 20)
        return True

    def known_sweeps(self) -> list[str]:
        """Names of the sweeps stored beside this one."""
        import pyarrow.fs as pafs

        if self.remote is None:
            root = self.local.parent
            return sorted(d.name for d in root.glob("*") if (d / STATE_FILE).exists()) if root.exists() else []
        parent = self._fs_path.rsplit("/", 1)[0]
        try:
            infos = self._fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
            return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory
                          and self._fs.get_file_info(f"{i.path}/{STATE_FILE}").is_file)
        except OSError:
            return []


def storage_root(cfg) -> str:
    """``run.storage`` as Ray wants it: an absolute path, or a URI (``s3://``, ``gs://``) as it is."""
    s = cfg.run.storage
    return s if is_uri(s) else local_path(s)


TRIALS_DIR = "trials"


def exists(path: str) -> bool:
    """Whether a local path or a bucket URI exists (False when the bucket cannot say)."""
    if not is_uri(path):
        return Path(local_path(path)).exists()
    import pyarrow.fs as pafs

    try:
        fs, p = filesystem(path)
        return fs.get_file_info(p).type != pafs.FileType.NotFound
    except (OSError, ConfigError):
        return False


def trial_storage(storage: str, sweep: str, trial_id: str) -> str:
    """The folder that holds a sweep trial's own folder ``<sweep>-<trial>`` (its Train run's checkpoints,
    its MLflow pending file): ``<storage>/<sweep>/trials``, so that everything a sweep writes is under
    ``<storage>/<sweep>/``. A trial of a sweep begun before that layout has its folder beside the sweep's
    (``<storage>/<sweep>-<trial>``) and keeps it, so that a resumed trial finds its checkpoints."""
    if exists(join(storage, f"{sweep}-{trial_id}")):
        return storage
    return join(storage, sweep, TRIALS_DIR)


def legacy_trial_dirs(storage: str, sweep: str, trial_ids) -> list[str]:
    """The trial folders an older sweep kept beside its own (``<storage>/<sweep>-<trial>``) that exist."""
    return [d for d in (join(storage, f"{sweep}-{t}") for t in trial_ids) if exists(d)]


def run_dir(cfg, run_name: str) -> str:
    """A Train run's folder (its checkpoints, and MLflow's pending file when the server is away)."""
    return join(storage_root(cfg), run_name)  # a URI keeps its ?endpoint_override=... after the path
