"""Argument-level checks of the ``qksweep`` command: everything a command is given on its command line is
checked here before Ray, MLflow or the storage is touched. Config-level checks stay in
:mod:`qksweep.checks` (and the probes of what a run joins, which both layers use, live there too).

Two kinds:

* **argparse types** (``type=`` of an option): the shape of one value — a port, a count, a number of
  seconds, a URL that parses. A bad value is argparse's one line naming the option
  (``qksweep ui: argument --port: ...``), exit 2. Parsing opens nothing and reads no file: a Ray job's
  or a KubeRay manifest's entrypoint, parsed here, names paths on another machine.
* **pre-flight** (:func:`preflight`, run by ``cli.main`` after parsing, before the command): what needs
  the filesystem, the network or several options at once — each path is of its option's kind
  (:class:`PathArg`, same one-line form as argparse's), the tracking server answers, a port is free
  where ``ui`` binds it, ``flush``'s targets exist, a bucket answers.

Every message is one line that names what is wrong and how to fix it.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path
from typing import Callable

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


class PathArg(str):
    """A path option's value. argparse checks only its shape; whether it exists and is of the right kind
    is :func:`preflight`'s (``check``), so that parsing stays pure: an entrypoint parsed here (a Ray
    job's, a KubeRay manifest's) names paths on another machine."""

    check: "Callable[[str], None]"


def _path_type(name: str, check):
    @_typed(name)
    def parse(text: str) -> str:
        _path_text(text)
        value = PathArg(text)
        value.check = check
        return value

    parse.__doc__ = check.__doc__
    return parse


def _existing_file(text: str) -> None:
    """An existing file."""
    p = _path_text(text)
    if not p.exists():
        raise argparse.ArgumentTypeError(f"{text} does not exist: give an existing file")
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a file")


def _existing_dir(text: str) -> None:
    """An existing folder."""
    p = _path_text(text)
    if not p.exists():
        raise argparse.ArgumentTypeError(f"{text} does not exist: give an existing folder")
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a folder")


def _creatable(p: Path, text: str) -> None:
    """The nearest existing ancestor of ``p`` is a folder this process can write in."""
    parent = p.parent if str(p.parent) else Path(".")
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {parent} is not a folder")
    if not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text}: cannot write in {parent}")


def _output_dir(text: str) -> None:
    """A folder to write into: an existing folder, or one that can be created."""
    p = _path_text(text)
    if p.exists():
        if not p.is_dir():
            raise argparse.ArgumentTypeError(f"{text} exists and is not a folder")
        if not os.access(p, os.W_OK):
            raise argparse.ArgumentTypeError(f"{text}: cannot write in this folder")
        return
    _creatable(p, text)


def _output_file(text: str) -> None:
    """A file to write: not an existing folder, in a folder that exists or can be created."""
    p = _path_text(text)
    if p.is_dir() or str(text).endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name")
    _creatable(p, text)


existing_file = _path_type("existing file", _existing_file)
existing_dir = _path_type("existing folder", _existing_dir)
output_dir = _path_type("output folder", _output_dir)
output_file = _path_type("output file", _output_file)


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
    if not eq:
        raise argparse.ArgumentTypeError(f"{text!r} has no '=': use KEY=VALUE, e.g. -s optim.lr=3e-4")
    if not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} names no key: use KEY=VALUE, e.g. -s optim.lr=3e-4")
    return text


@_typed("non-empty text")
@_typed("model name")
def model_name(text: str) -> str:
    """A registered model name that a ``models:/NAME@ALIAS`` URI can carry."""
    nonempty(text)
    if any(ch in text for ch in "/@:") or text != text.strip():
        raise argparse.ArgumentTypeError(f"'{text}' cannot name a registered model: leave out '/', '@', ':' and outer "
                                         "spaces (models:/NAME@ALIAS must be able to carry it)")
    return text


@_typed("model alias")
def model_alias(text: str) -> str:
    """An MLflow model alias: letters, digits, ``_`` and ``-``, not ``latest`` and not ``v<digits>``
    (MLflow's own rules, checked here so that a bad one is refused before the model is logged)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,255}", text or "") or text.lower() == "latest" or re.fullmatch(r"[vV]\d+", text):
        raise argparse.ArgumentTypeError(f"'{text}' is not a model alias: use letters, digits, _ and - "
                                         "(not 'latest' or v<number>), e.g. champion")
    return text


def nonempty(text: str) -> str:
    if not str(text).strip() or any(ord(ch) < 32 for ch in str(text)):
        raise argparse.ArgumentTypeError(f"{text!r}: give a non-empty value without control characters")
    return text


# ---------------------------------------------------------------- pre-flight

# commands that always read MLflow: their tracking URI (option, $MLFLOW_TRACKING_URI or the default) must answer
READS_MLFLOW = ("runs", "best", "continue")


RUN_ID_RE = re.compile(r"^[0-9a-f]{32}$")  # an MLflow run id (tools.source.RUN_ID_RE, without importing torch)


def _reads_mlflow(args) -> bool:
    """The command will ask MLflow: always (runs, best, continue), or for a SOURCE that is a run id."""
    if getattr(args, "command", None) in READS_MLFLOW:
        return True
    source = getattr(args, "source", None)
    if source and source.startswith("models:/"):  # a registered model (tools/mlflow_model.py)
        return True
    return bool(source and RUN_ID_RE.match(source) and not Path(source).exists())


def _given_tracking_uri(args) -> tuple[str | None, str]:
    uri = getattr(args, "tracking_uri", None)
    if uri:
        return uri, "--tracking-uri"
    if _reads_mlflow(args) and os.environ.get("MLFLOW_TRACKING_URI"):
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


def _command_parser(parser: argparse.ArgumentParser, args) -> argparse.ArgumentParser:
    """The leaf subparser ``args`` was parsed by (``jobs list``, ``cluster template``, ``ui``...)."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            return parser
        parser = subs[0].choices[getattr(args, subs[0].dest)]


def check_paths(args, parser: argparse.ArgumentParser | None) -> None:
    """Each path the command line names is of the kind its option asks for (``PathArg.check``); the
    values become plain strings again. The line reads like argparse's: ``qksweep PROG: argument OPT: ...``."""
    from .config import ConfigError

    leaf = _command_parser(parser, args) if parser is not None else None
    labels = {a.dest: "/".join(a.option_strings) or (a.metavar or a.dest) for a in (leaf._actions if leaf else [])}
    prog = leaf.prog if leaf else "qksweep"
    for dest, value in vars(args).items():
        many = isinstance(value, list)
        for v in value if many else [value]:
            if isinstance(v, PathArg):
                try:
                    v.check(str(v))
                except argparse.ArgumentTypeError as e:
                    raise ConfigError(f"{prog}: argument {labels.get(dest, dest)}: {e}") from None
        if many and any(isinstance(v, PathArg) for v in value):
            setattr(args, dest, [str(v) for v in value])
        elif isinstance(value, PathArg):
            setattr(args, dest, str(value))


def preflight(args, parser: argparse.ArgumentParser | None = None) -> None:
    """Everything a parsed command line can be refused for before the command runs (raises a one-line
    ConfigError or UsageError, exit 2). ``parser``: the one that parsed ``args``, to name options."""
    from .checks import check_tracking_server
    from .storage import is_uri, probe

    check_paths(args, parser)

    uri, source = _given_tracking_uri(args)
    if uri:
        from .checks import check_tracking_uri

        check_tracking_uri(uri)
        check_tracking_server(uri, what=source)
    command = getattr(args, "command", None)
    if command == "ui":
        from .config import DEFAULT_TRACKING_URI
        from .tracking.ui import is_remote

        if not is_remote(args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI):  # an http(s) URI is a server already: ui starts nothing
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
