"""This process's console while Ray runs work for it: what reaches stdout and stderr (the workers' output as
Ray forwards it, Ray's, Tune's and the libraries' messages, qksweep's own prints) is caught line by line
and handed to a router that decides what the user sees and what goes to a log file.

:func:`captured_streams` does the catching for the sweep view (:mod:`qksweep.orchestrator.console`) and
for ``qksweep train`` (:func:`train_console`: the epoch lines and qksweep's lines on the console, a
progress bar within the epoch on a terminal, the rest in ``train.log`` in the run's folder)."""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][A-Za-z0-9]|\r")
TRAIN_LOG = "train.log"
# modules between a print (or a log call) and the stream: the line is told by the frame above them. Ray's
# driver replaces builtins.print with tqdm_ray's safe_print, so every print in it goes through that.
PASS_THROUGH = ("logging", "io", "_io", "ray.experimental.tqdm_ray")
# Ray's prefix on a worker's forwarded line (unless RAY_DISABLE_WORKER_LOG_PREFIX=1, which the CLI sets)
RAY_PREFIX = re.compile(r"^\((?:[\w.:-]+ )?pid=\d+(?:, ip=[\w.:-]+)?\) ")


def plain(text: str) -> str:
    """A captured line without ANSI codes and without Ray's ``(Actor pid=N)`` prefix."""
    return RAY_PREFIX.sub("", ANSI.sub("", text))


def emit(text: str, live_console, out, err, to_err: bool = False) -> None:
    """One line for the user: above a live ``rich`` view when one runs (``live_console``), else a plain
    line on stdout or, when it was written there, stderr."""
    if live_console is not None:
        live_console.print(text, markup=False, highlight=False, soft_wrap=True)
    else:
        stream = err if to_err else out
        stream.write(text + "\n")
        stream.flush()


_VERBOSE = False  # --verbose of this command (QKSWEEP_VERBOSE=1 also turns it on)


def verbose() -> bool:
    return _VERBOSE or os.environ.get("QKSWEEP_VERBOSE") == "1"


@contextmanager
def verbose_console(on: bool):
    """``--verbose`` for the command the block runs (not for later ones in the same process)."""
    global _VERBOSE

    before, _VERBOSE = _VERBOSE, bool(on) or _VERBOSE
    try:
        yield
    finally:
        _VERBOSE = before


class Capture(io.TextIOBase):
    """Stands for stdout or stderr: whole lines to ``on_line(line, origin=..., err=...)``, where ``origin``
    says who wrote it: ``trial`` (a worker's output as Ray forwards it), ``qksweep`` (this process's qksweep
    code) or ``library``; ``err``: it was written to stderr."""

    def __init__(self, on_line: Callable[..., None], original, *, err: bool = False):
        self.on_line, self.original, self.err = on_line, original, err
        self._bufs: dict[int, tuple[str, str]] = {}  # thread -> (partial line, its origin)
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:  # libraries that write to the descriptor bypass the capture, as before
        return self.original.fileno()

    @property
    def encoding(self):
        return getattr(self.original, "encoding", "utf-8")

    def write(self, s: str) -> int:
        if threading.current_thread().name == "ray_print_logs":
            origin = "trial"  # a worker's output as Ray forwards it
        else:  # who printed: qksweep's own code, or a library (Tune's banner, a logging handler, a progress bar)
            caller = sys._getframe(1)  # past logging's frames and Ray's print wrapper (tqdm_ray.safe_print)
            while caller is not None and caller.f_globals.get("__name__", "").startswith(PASS_THROUGH):
                caller = caller.f_back
            module = caller.f_globals.get("__name__", "") if caller is not None else ""
            origin = "qksweep" if module.startswith("qksweep") else "library"
        out: list[tuple[str, str]] = []
        key = threading.get_ident()
        with self._lock:  # one partial line per thread; a writer of another origin ends the one before it
            buf, buf_origin = self._bufs.get(key, ("", origin))
            if buf and buf_origin != origin:
                out.append((buf, buf_origin))
                buf = ""
            *lines, rest = (buf + s).split("\n")
            out += [(ln, origin) for ln in lines]
            self._bufs[key] = (rest, origin)
        for ln, o in out:
            self.on_line(ln, origin=o, err=self.err)
        return len(s)

    def flush(self) -> None:
        """Nothing to do: a line is handed on as soon as its newline is written."""

    def drain(self) -> None:
        with self._lock:
            rest, self._bufs = list(self._bufs.values()), {}
        for text, origin in rest:
            if text:
                self.on_line(text, origin=origin, err=self.err)


def stream_handlers():
    """The logging handlers that write to this process's stdout or stderr (Ray's, Tune's, Optuna's...)."""
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    std = {id(sys.stdout), id(sys.stderr), id(sys.__stdout__), id(sys.__stderr__)}
    for lg in loggers:
        for h in lg.handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) and id(h.stream) in std:
                yield h


@contextmanager
def captured_streams(on_line: Callable[..., None]):
    """stdout, stderr and the logging handlers on them go to ``on_line`` while the block runs."""
    out, err = sys.stdout, sys.stderr
    cap_out, cap_err = Capture(on_line, out), Capture(on_line, err, err=True)
    handlers = [(h, h.stream) for h in stream_handlers()]
    sys.stdout, sys.stderr = cap_out, cap_err
    for h, stream in handlers:
        h.setStream(cap_err if stream in (err, sys.__stderr__) else cap_out)
    try:
        yield out
    finally:
        for h, stream in handlers:
            h.setStream(stream)
        sys.stdout, sys.stderr = out, err
        cap_out.drain()
        cap_err.drain()


EPOCH_LINE = re.compile(r"^(\[[^\]]+\] )?epoch \d+/\d+")


class TrainConsole:
    """``qksweep train``'s console: epoch lines (and qksweep's own lines) as they come, a progress bar
    within the epoch on a terminal (samples/s), everything else in ``train.log``; ``--verbose``
    (``QKSWEEP_VERBOSE=1``) shows everything."""

    def __init__(self, log_path: Path | None, out, *, err=None, tty: bool | None = None, show_all: bool | None = None):
        self.out, self.err = out, err or out
        self.tty = out.isatty() if tty is None else tty
        self.show_all = verbose() if show_all is None else show_all
        self.log = None
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log = open(log_path, "a", encoding="utf-8", buffering=1)
        self.lock = threading.RLock()
        self.progress = self.task = None
        self._epoch = None

    def start(self) -> None:
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                                     console=Console(file=self.out, force_terminal=True), transient=True,
                                     redirect_stdout=False, redirect_stderr=False)
            self.progress.start()

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if self.log is not None:
            self.log.close()

    def show(self, text: str, err: bool = False) -> None:
        emit(text, self.progress.console if self.progress is not None else None, self.out, self.err, err)

    def on_line(self, text: str, *, origin: str, err: bool = False) -> None:
        from .trainables.extras.progress import parse

        logged = ANSI.sub("", text)
        clean = plain(text)
        if not clean.strip():
            return
        rec = parse(clean)
        with self.lock:
            if rec is not None:
                if self.progress is not None:
                    self._advance(rec)
                return  # off a terminal the epoch line says it all
            if self.log is not None:
                self.log.write(logged + "\n")
            if self.show_all or origin == "qksweep" or EPOCH_LINE.match(clean) or clean.startswith("qksweep"):
                self.show(clean, err)

    def _advance(self, rec: dict) -> None:
        desc = f"epoch {rec['epoch']}/{rec['epochs']}"
        rate = f"{rec.get('samples_per_s', 0):.0f} samples/s"
        if self._epoch != rec["epoch"] or self.task is None:
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.task = self.progress.add_task(desc, total=rec["total"], rate=rate)
            self._epoch = rec["epoch"]
        self.progress.update(self.task, completed=rec["done"], description=desc, rate=rate)


@contextmanager
def train_console(log_path: Path | None):
    """``qksweep train``'s console while the block runs (see :class:`TrainConsole`)."""
    c = TrainConsole(log_path, sys.stdout, err=sys.stderr)
    c.start()
    try:
        with captured_streams(c.on_line):
            yield c
    finally:
        c.stop()
