"""Argument-level checks of the ``qksweep`` command: everything a command is given on its command line is
checked here before Ray, MLflow or the storage is touched. Config-level checks stay in
:mod:`qksweep.checks` (and the probes of what a run joins, which both layers use, live there too).

Two kinds:

* **argparse types** (``type=`` of an option): the shape of one value — a port, a count, a number of
  seconds, a path of the right kind, a URL that parses. A bad value is argparse's one line naming the
  option (``qksweep ui: argument --port: ...``), exit 2.
* **pre-flight** (:func:`preflight`, run by ``cli.main`` after parsing, before the command): what needs
  the network or several options at once — the tracking server answers, a port is free where ``ui``
  binds it, the paths and sweep names of ``flush`` exist, a bucket answers.

Every message is one line that names what is wrong and how to fix it.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path

# ---------------------------------------------------------------- argparse types


def _typed(name: str):
    """Name a type function the way argparse shows it (``invalid port value``) and make its
    ArgumentTypeError the message."""

    def wrap(fn):
        fn.__name__ = name
        return fn

    return wrap


def _int(text: str, what: str) -> int:
    try:
        return int(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be a whole number, got {text!r}") from None


@_typed("port")
def port(text: str) -> int:
    """A TCP port, 1-65535."""
    n = _int(text, "a port")
    if not 1 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"port {n} is out of range: use 1-65535 (e.g. 5000)")
    return n


@_typed("positive int")
def positive_int(text: str) -> int:
    n = _int(text, "the value")
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


@_typed("non-negative int")
def nonneg_int(text: str) -> int:
    n = _int(text, "the value")
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {n}")
    return n


@_typed("seed")
def seed(text: str) -> int:
    n = _int(text, "a seed")
    if not 0 <= n < 2**32:
        raise argparse.ArgumentTypeError(f"seed {n} is out of range: use 0 to {2**32 - 1}")
    return n


def _float(text: str, what: str) -> float:
    try:
        x = float(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be a number, got {text!r}") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"{what} must be a finite number, got {text!r}")
    return x


@_typed("seconds")
def seconds(text: str) -> float:
    """A wait in seconds: finite, 0 or more."""
    x = _float(text, "seconds")
    if x < 0:
        raise argparse.ArgumentTypeError(f"seconds must be 0 or more, got {text}")
    return x


@_typed("fraction")
def fraction(text: str) -> float:
    """A share strictly between 0 and 1."""
    x = _float(text, "the fraction")
    if not 0 < x < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return x


def _path_text(text: str) -> Path:
    if not str(text).strip() or "\x00" in str(text):
        raise argparse.ArgumentTypeError("an empty path (or one with a NUL byte) names nothing")
    return Path(text).expanduser()


@_typed("existing file")
def existing_file(text: str) -> str:
    p = _path_text(text)
    if not p.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a file")
    return text


@_typed("existing folder")
def existing_dir(text: str) -> str:
    p = _path_text(text)
    if not p.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such folder")
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a folder")
    return text


def _creatable(p: Path, text: str) -> None:
    """The nearest existing ancestor of ``p`` is a folder this process can write in."""
    parent = p.parent if str(p.parent) else Path(".")
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {parent} is not a folder")
    if not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text}: cannot write in {parent}")


@_typed("output folder")
def output_dir(text: str) -> str:
    """A folder to write into: an existing folder, or one that can be created."""
    p = _path_text(text)
    if p.exists():
        if not p.is_dir():
            raise argparse.ArgumentTypeError(f"{text} exists and is not a folder")
        if not os.access(p, os.W_OK):
            raise argparse.ArgumentTypeError(f"{text}: cannot write in this folder")
        return text
    _creatable(p, text)
    return text


@_typed("output file")
def output_file(text: str) -> str:
    """A file to write: not an existing folder, in a folder that exists or can be created."""
    p = _path_text(text)
    if p.is_dir() or str(text).endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name")
    _creatable(p, text)
    return text


SWEEP_NAME_BAD = re.compile(r"[\s/\\?#%*:\x00-\x1f\x7f]")


@_typed("sweep name")
def sweep_name(text: str) -> str:
    """A sweep name: it becomes a folder, a bucket prefix and an MLflow tag, so no path separators, white
    space, URI characters (``?#%:*``) or leading dot or dash."""
    if not text or len(text) > 200 or text[0] in ".-" or SWEEP_NAME_BAD.search(text):
        raise argparse.ArgumentTypeError(
            f"sweep name {text!r}: use letters, digits and . _ - (not starting with . or -, at most 200 characters)")
    return text


DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@_typed("device")
def device(text: str) -> str:
    if not DEVICE_RE.match(text):
        raise argparse.ArgumentTypeError(f"device {text!r}: use auto, cpu, cuda or cuda:N")
    return text


@_typed("tracking URI")
def tracking_uri(text: str) -> str:
    """Parses as a tracking URI MLflow 3 takes (whether it answers is :func:`preflight`'s)."""
    from .checks import check_tracking_uri, _url_parts
    from .config import ConfigError

    try:
        check_tracking_uri(text)
        if text.lower().startswith(("http://", "https://")):
            _url_parts(text, "tracking URI", "http://HOST:PORT of an `mlflow server`")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).replace("tracking.uri", "tracking URI", 1)) from None
    return text


@_typed("Ray dashboard address")
def ray_dashboard(text: str) -> str:
    from .cluster.checks import normalize_address
    from .config import ConfigError

    try:
        normalize_address(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


@_typed("storage")
def storage(text: str) -> str:
    """``run.storage``: a path or an ``s3://`` / ``gs://`` URI that parses."""
    from .config import ConfigError
    from .storage import check_uri

    if not str(text).strip() or "\x00" in text:
        raise argparse.ArgumentTypeError("an empty storage names nothing: give a path or s3://BUCKET/PREFIX")
    try:
        check_uri(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


@_typed("KEY=VALUE")
def override(text: str) -> str:
    key, eq, _ = str(text).partition("=")
    if not eq or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE: e.g. -s optim.lr=3e-4")
    return text


@_typed("non-empty text")
def nonempty(text: str) -> str:
    if not str(text).strip() or any(ord(ch) < 32 for ch in str(text)):
        raise argparse.ArgumentTypeError(f"{text!r}: give a non-empty value without control characters")
    return text


# ---------------------------------------------------------------- pre-flight

# commands that always read MLflow: their tracking URI (option, $MLFLOW_TRACKING_URI or the default) must answer
READS_MLFLOW = ("runs", "best", "continue")


def _given_tracking_uri(args) -> tuple[str | None, str]:
    uri = getattr(args, "tracking_uri", None)
    if uri:
        return uri, "--tracking-uri"
    if getattr(args, "command", None) in READS_MLFLOW and os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], "MLFLOW_TRACKING_URI"
    return None, ""


def check_bind(host: str, port_: int) -> None:
    """``host:port`` can be bound here now (``qksweep ui`` starts a server there)."""
    import socket

    from .config import ConfigError

    try:
        infos = socket.getaddrinfo(host or None, port_, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError, ValueError) as e:
        raise ConfigError(f"--host {host!r} is not an address of this machine ({e}): use 127.0.0.1 "
                          "(or 0.0.0.0 to expose the UI)") from None
    family, kind, proto, _, addr = infos[0]
    try:
        with socket.socket(family, kind, proto) as s:
            s.bind(addr)
    except OSError as e:
        why = "already in use" if e.errno in (98, 48) else (e.strerror or str(e))
        raise ConfigError(f"cannot listen on {host}:{port_} ({why}): pick another --port (or --host)") from None


def check_flush_targets(targets: list[str], storage_: str | None) -> None:
    """Each target of ``flush`` is a pending file, a run or sweep folder, or a sweep name under the
    storage; an explicit local ``--storage`` is a folder."""
    from .config import DEFAULT_STORAGE, ConfigError
    from .storage import is_uri

    if storage_ and not is_uri(storage_):
        root = Path(storage_[len("file://"):] if storage_.lower().startswith("file://") else storage_).expanduser()
        if not root.is_dir():
            raise ConfigError(f"--storage {storage_}: no such folder; pass the run.storage your runs used")
    root = Path(storage_ or DEFAULT_STORAGE).expanduser()
    for t in targets:
        if is_uri(t) or (storage_ and is_uri(storage_)):
            continue  # looked up in the bucket (probed below)
        if Path(t).expanduser().exists() or ("/" not in t and (root / t).is_dir()):
            continue
        raise ConfigError(f"flush: '{t}' is neither a pending file, a run or sweep folder, nor a sweep under {root}; "
                          "give one of those (or --storage where the runs live)")


def preflight(args) -> None:
    """Everything a parsed command line can be refused for before the command runs (raises a one-line
    ConfigError or UsageError, exit 2)."""
    from .checks import check_tracking_server
    from .storage import is_uri, probe

    uri, source = _given_tracking_uri(args)
    if uri:
        from .checks import check_tracking_uri

        check_tracking_uri(uri)
        check_tracking_server(uri, what=source)
    command = getattr(args, "command", None)
    if command == "ui":
        from .cli_browse import _uri
        from .tracking.ui import is_remote

        if not is_remote(_uri(args)):  # an http(s) URI is a server already: ui starts nothing
            check_bind(args.host, args.port)
    if command == "flush":
        check_flush_targets(list(args.targets), args.storage)
    st = getattr(args, "storage", None)
    if st and is_uri(st):
        probe(st)  # a bucket that does not exist or does not answer (short timeouts, no retries)
    for t in getattr(args, "targets", None) or []:
        if is_uri(t):
            probe(t)
    dev = getattr(args, "device", None)
    if dev and dev.startswith("cuda"):
        from .tools.source import pick_device

        pick_device(dev)
