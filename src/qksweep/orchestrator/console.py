"""What ``qksweep sweep`` and ``resume`` show while the sweep runs.

On a terminal: one refreshing view (``rich``): a table of the trials (id, status, the searched values,
epoch/total, the metric, the trial's best), counts by status, the best so far, elapsed time and an upper
bound of what is left; events worth a line of their own (a trial failed, was stopped, finished, a qksweep
warning) are printed above it. Not on a terminal (CI, a log file, ``submit --follow``): one plain line per
event, without ANSI codes: trial started, each epoch, stopped (by what and why), failed (its first error
line), finished.

Every epoch line comes from the sweep driver's own Tune callback (:class:`ConsoleEvents`), not from the
trials' output as Ray forwards it, so none is ever lost to Ray's log deduplication. Everything else that
reaches this process's stdout and stderr while the sweep runs (the trials' output as Ray forwards it,
Ray's, Tune's, Optuna's and MLflow's messages) goes to ``sweep.log`` in the sweep's folder, without ANSI
codes; ``--verbose`` (``QKSWEEP_VERBOSE=1``) shows it on the console too. qksweep's own warnings, in this
process or a trial's, still reach the console.

The callback is pickled into Tune's experiment state (a resumed sweep brings it back), so it holds no
state: it hands each event to the :class:`Session` that :func:`session` opened in this process.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.tune import Callback

from ..console import ANSI, captured_streams, emit, plain, verbose
from ..tracking.sweep_callback import error_line

LOG_FILE = "sweep.log"
EPOCH_LINE = re.compile(r"^\[[0-9a-f_]+\] epoch \d+/\d+")
TRIAL_LINE = re.compile(r"^\[[0-9a-f_]+\] ")  # a trial's own qksweep line: "[TRIAL] MLflow at ... is not answering"
ACTIVE: "Session | None" = None


def _dur(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _num(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


@dataclass
class Row:
    trial_id: str
    status: str = "PENDING"
    values: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    metric: float | None = None
    best: float | None = None
    note: str = ""
    announced: bool = False  # its "started" line is out (a row can exist earlier: Tune lists pending trials)


class Session:
    """The console of one sweep in this process (see the module's docstring)."""

    def __init__(self, name: str, *, num_samples: int, epochs: int, metric: str, mode: str, searched: list[str],
                 scheduler: str, reduction_factor: float | None, log_path: Path, out=None, tty: bool | None = None,
                 show_all: bool | None = None, rung_metric: str | None = None):
        self.name, self.num_samples, self.epochs = name, num_samples, epochs
        self.metric, self.mode, self.searched = metric, mode, searched
        self.rung_metric = rung_metric or metric  # what the scheduler ranks on at a rung (sweep.scheduler.metric)
        self.scheduler, self.reduction_factor = scheduler, reduction_factor
        self.out = out or sys.stdout
        self.err = sys.stderr if out is None else out
        self.tty = self.out.isatty() if tty is None else tty
        self.show_all = verbose() if show_all is None else show_all
        self.rows: dict[str, Row] = {}
        self.started = time.monotonic()
        self.lock = threading.RLock()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(log_path, "a", encoding="utf-8", buffering=1)
        self.log_path = log_path
        self.live = None
        self._last_refresh = 0.0

    # ------------------------------------------------------------------ output

    def line(self, text: str, err: bool = False) -> None:
        """An event line: above the view on a terminal, a plain line otherwise (on stderr when it was
        written there); always in the log."""
        text = ANSI.sub("", text)
        with self.lock:
            self.log.write(text + "\n")
            emit(text, self.live.console if self.live is not None else None, self.out, self.err, err)

    def captured(self, text: str, *, origin: str, err: bool = False) -> None:
        """A line that reached stdout/stderr while the sweep runs (``origin``: ``qksweep`` printed it in
        this process, a ``trial`` printed it, or a ``library``): the log always; the console when it is
        qksweep's (a print here, a trial's warning) or with --verbose. A trial's own epoch line goes to the
        log only: the console has the driver's."""
        logged, clean = ANSI.sub("", text), plain(text)
        if not clean.strip():
            return
        if origin == "trial" and EPOCH_LINE.match(clean):
            keep = False
        elif origin == "trial":
            keep = self.show_all or clean.startswith("qksweep") or TRIAL_LINE.match(clean) is not None
        else:
            keep = self.show_all or origin == "qksweep"
        if keep:
            self.line(clean, err)
        else:
            with self.lock:
                self.log.write(logged + "\n")

    # ------------------------------------------------------------------ events

    def row(self, trial) -> Row:
        r = self.rows.get(trial.trial_id)
        if r is None:
            config = getattr(trial, "config", None) or {}
            r = self.rows[trial.trial_id] = Row(trial.trial_id, values={k: config[k] for k in self.searched if k in config})
        return r

    def _better(self, a: float, b: float | None) -> bool:
        return b is None or (a > b if self.mode == "max" else a < b)

    def trial_started(self, trial) -> None:
        """A line when a trial starts, and when it starts again with other values (PBT copied another trial
        and changed them); a trial that only goes on (a retry, PBT's turn-taking) gets its row back."""
        r = self.row(trial)
        known, r.announced = r.announced, True
        r.status = "RUNNING"
        config = getattr(trial, "config", None) or {}
        values = {k: config[k] for k in self.searched if k in config}
        changed, r.values = known and values != r.values, values
        shown = "  ".join(f"{k}={_num(v)}" for k, v in values.items())
        if not known:
            self.line(f"trial {trial.trial_id} started" + (f": {shown}" if shown else ""))
        elif changed:
            self.line(f"trial {trial.trial_id} goes on from epoch {r.epoch} with {shown}")
        self.refresh(force=True)

    def trial_result(self, trial, result: dict[str, Any]) -> None:
        from ..tracking.callback import format_epoch

        if "epoch" not in result:
            return
        r = self.row(trial)
        r.status = "RUNNING"
        r.epoch = int(result["epoch"])
        v = result.get(self.metric)
        if isinstance(v, (int, float)):
            r.metric = float(v)
            if self._better(r.metric, r.best):
                r.best = r.metric
        if not self.tty:
            self.line(format_epoch(result, self.epochs, f"[{trial.trial_id}] "))
        self.refresh()

    def trial_complete(self, trial) -> None:
        r = self.row(trial)
        last = getattr(trial, "last_result", None) or {}
        epoch = int(last.get("epoch", r.epoch) or 0)
        value = f"{self.metric} {r.metric:.4f}" if r.metric is not None else f"no {self.metric}"
        rule = last.get("stopped_by")
        if rule:
            r.status, r.note = "STOPPED", str(rule)
            self.line(f"trial {trial.trial_id} stopped by {rule} at epoch {epoch}/{self.epochs} ({value})")
        elif epoch < self.epochs:
            r.status, r.note = "STOPPED", self.scheduler
            why = (f"not in the best 1/{self.reduction_factor:g} of its rung by {self.rung_metric}"
                   if self.reduction_factor else f"the {self.scheduler} scheduler ended it")
            ranked = last.get(self.rung_metric)
            if self.rung_metric != self.metric and isinstance(ranked, (int, float)):
                value = f"{self.rung_metric} {ranked:.4f}, {value}"
            self.line(f"trial {trial.trial_id} stopped by {self.scheduler} at epoch {epoch}/{self.epochs}: {why} ({value})")
        else:
            r.status = "FINISHED"
            best = f", best {r.best:.4f}" if r.best is not None else ""
            self.line(f"trial {trial.trial_id} finished: {epoch} epochs, {value}{best}")
        self.refresh(force=True)

    def trial_error(self, trial) -> None:
        r = self.row(trial)
        r.status = "FAILED"
        first = error_line(trial)
        r.note = first[:200]
        self.line(f"trial {trial.trial_id} failed: {first[:300]}")
        self.refresh(force=True)

    def sync(self, trials) -> None:
        """Statuses as Tune holds them (a resumed sweep's finished trials, pending ones)."""
        for t in trials:
            r = self.row(t)
            if t.status in ("PENDING", "PAUSED") and r.status == "PENDING":
                continue
            if t.status == "TERMINATED" and r.status in ("PENDING", "RUNNING"):
                last = t.last_result or {}
                r.epoch = int(last.get("epoch", r.epoch) or 0)
                r.status = "FINISHED" if r.epoch >= self.epochs and not last.get("stopped_by") else "STOPPED"
                v = last.get(self.metric)
                if isinstance(v, (int, float)):
                    r.metric = float(v)
                    r.best = r.metric if r.best is None else r.best
            elif t.status == "ERROR":
                r.status = "FAILED"
            elif t.status == "RUNNING" and r.status == "PENDING":
                r.status = "RUNNING"
        self.refresh()

    # ------------------------------------------------------------------ the view

    def counts(self) -> dict[str, int]:
        out = {"RUNNING": 0, "FINISHED": 0, "STOPPED": 0, "FAILED": 0}
        for r in self.rows.values():
            if r.status in out:
                out[r.status] += 1
        return out

    def left_s(self) -> float | None:
        """An upper bound of the time left: epochs still to train (every trial to the full budget; ASHA
        stops some early) at the rate the sweep has trained them so far."""
        done = sum(r.epoch for r in self.rows.values())
        elapsed = time.monotonic() - self.started
        if not done or elapsed <= 0:
            return None
        running = sum(self.epochs - r.epoch for r in self.rows.values() if r.status in ("RUNNING", "PENDING"))
        unstarted = max(0, self.num_samples - len(self.rows)) * self.epochs
        return (running + unstarted) * elapsed / done

    def best(self) -> tuple[str, float] | None:
        found = [(r.trial_id, r.best) for r in self.rows.values() if r.best is not None]
        if not found:
            return None
        return (max if self.mode == "max" else min)(found, key=lambda x: x[1])

    def header(self) -> str:
        c = self.counts()
        best = self.best()
        left = self.left_s()
        counts = (f"sweep {self.name}: {len(self.rows)}/{self.num_samples} trials  |  {c['RUNNING']} running, "
                  f"{c['FINISHED']} finished, {c['STOPPED']} stopped, {c['FAILED']} failed")
        parts = [f"best {self.metric} {best[1]:.4f} (trial {best[0]})" if best else f"best {self.metric} -",
                 f"elapsed {_dur(time.monotonic() - self.started)}"]
        if left is not None and c["RUNNING"] + (self.num_samples - len(self.rows)) > 0:
            parts.append(f"left at most ~{_dur(left)}")
        return counts + "\n" + "  |  ".join(parts)

    def renderable(self):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        table = Table(expand=False, show_edge=False, pad_edge=False, header_style="bold")
        table.add_column("trial")
        table.add_column("status")
        for k in self.searched:
            table.add_column(k, justify="right")
        table.add_column("epoch", justify="right")
        table.add_column(self.metric, justify="right")
        table.add_column("best", justify="right")
        style = {"RUNNING": "cyan", "FINISHED": "green", "STOPPED": "yellow", "FAILED": "red"}
        for r in self.rows.values():
            table.add_row(r.trial_id, Text(r.status.lower() + (f" ({r.note})" if r.note and r.status == "STOPPED" else ""),
                                           style=style.get(r.status, "")),
                          *(_num(r.values.get(k, "")) for k in self.searched), f"{r.epoch}/{self.epochs}",
                          "" if r.metric is None else f"{r.metric:.4f}", "" if r.best is None else f"{r.best:.4f}")
        return Group(Text(self.header(), style="bold"), table,
                     Text(f"Ray's and the libraries' messages: {self.log_path}", style="dim"))

    def refresh(self, force: bool = False) -> None:
        if self.live is None:
            return
        now = time.monotonic()
        if force or now - self._last_refresh >= 0.5:
            self._last_refresh = now
            with self.lock:
                self.live.update(self.renderable(), refresh=True)

    def start(self) -> None:
        if self.tty:
            from rich.console import Console
            from rich.live import Live

            console = Console(file=self.out, force_terminal=True)
            self.live = Live(self.renderable(), console=console, refresh_per_second=2, transient=False,
                             redirect_stdout=False, redirect_stderr=False, get_renderable=self.renderable)
            self.live.start()

    def stop(self) -> None:
        if self.live is not None:
            with self.lock:
                self.live.update(self.renderable(), refresh=True)
                self.live.stop()
            self.live = None
        self.log.close()


class _ConsoleHandler(logging.Handler):
    """qksweep's own log records in this process: on the console as one line each."""

    def __init__(self, session: Session):
        super().__init__(logging.INFO)
        self.session = session

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
            self.session.line(f"qksweep: {level}{record.getMessage()}")
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


@contextmanager
def session(cfg, name: str, folder: Path, searched: list[str]):
    """The console of sweep ``name`` while the block runs (see the module's docstring)."""
    global ACTIVE

    from .searcher import scheduler_settings

    sch = scheduler_settings(cfg)
    rf = sch["reduction_factor"] if sch["name"] in ("asha", "moasha") else None
    s = Session(name, num_samples=cfg.sweep.num_samples, epochs=cfg.optim.epochs, metric=cfg.sweep.metrics[0],
                mode=cfg.sweep.modes[0], searched=searched, scheduler=sch["name"], reduction_factor=rf,
                log_path=Path(folder) / LOG_FILE, rung_metric=sch["metric"] if sch["name"] != "moasha" else None)
    qk = logging.getLogger("qksweep")
    mine = _ConsoleHandler(s)
    propagate = qk.propagate
    s.start()
    try:
        with captured_streams(s.captured):
            qk.addHandler(mine)
            qk.propagate = False
            ACTIVE = s
            try:
                yield s
            finally:
                ACTIVE = None
                qk.removeHandler(mine)
                qk.propagate = propagate
    finally:
        s.stop()


class ConsoleEvents(Callback):
    """Tune's trial events, handed to the console this process opened (none: nothing is shown)."""

    def on_trial_start(self, iteration, trials, trial, **info):
        if ACTIVE is not None:
            ACTIVE.trial_started(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if ACTIVE is not None:
            ACTIVE.trial_result(trial, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if ACTIVE is not None:
            ACTIVE.trial_complete(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        if ACTIVE is not None:
            ACTIVE.trial_error(trial)

    def on_step_end(self, iteration, trials, **info):
        if ACTIVE is not None:
            ACTIVE.sync(trials)
