"""Checkpoint clean-up: what a sweep keeps in ``run.storage`` once its trials are over.

A trial keeps ``run.keep_checkpoints`` checkpoints while it trains (the best by the sweep's first metric,
and Ray always keeps the latest): enough to resume it after a failure. Once a trial is over, MLflow holds
its best and last checkpoints as artifacts (what ``continue``, ``validate``, ``predict`` and ``best
--export`` read), and the storage needs no more than those two either. At a sweep's end every finished
trial is cut down to its best and last checkpoint; ``qksweep gc SWEEP --keep-best K`` also removes every
checkpoint of the trials outside the K best (their MLflow artifacts stay). Trials that are not over
(an interrupted sweep) are left alone, so ``qksweep resume`` still finds their checkpoints.

Which checkpoint holds which epoch and metric is read from the trial's ``result.json`` (one line per
reported epoch, with the checkpoint folder it wrote), never by loading the checkpoints. A checkpoint
folder the trial never reported (a copy cut short) counts as neither best nor last.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from ..storage import is_uri, join, legacy_trial_dirs, local_path, trial_storage

FINISHED = ("TERMINATED", "ERROR")


@dataclass
class Ckpt:
    trial_id: str
    path: str  # a local path, or a URI for a bucket
    epoch: int | None
    value: float | None  # the sweep's first metric at that epoch
    bytes: int


@dataclass
class TrialCkpts:
    trial_id: str
    status: str
    checkpoints: list[Ckpt]

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def best_value(self, mode: str) -> float | None:
        vals = [c.value for c in self.checkpoints if c.value is not None]
        if not vals:
            return None
        return max(vals) if mode == "max" else min(vals)


@dataclass
class Plan:
    remove: list[Ckpt] = field(default_factory=list)
    keep: list[Ckpt] = field(default_factory=list)
    running: list[str] = field(default_factory=list)  # trials not over: untouched

    @property
    def freed(self) -> int:
        return sum(c.bytes for c in self.remove)

    @property
    def kept(self) -> int:
        return sum(c.bytes for c in self.keep)


def _fs(path: str):
    """(pyarrow filesystem, path on it) for a local path or a bucket URI."""
    import pyarrow.fs as pafs

    from ..storage import filesystem

    if is_uri(path):
        return filesystem(path)
    return pafs.LocalFileSystem(), local_path(path)


def _children(path: str) -> list[tuple[str, Any]]:
    """(name, info) of what is directly in ``path``; empty when it does not exist."""
    import pyarrow.fs as pafs

    fs, p = _fs(path)
    try:
        infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
    except OSError:
        return []
    return [(i.base_name, i) for i in infos]


def tree_bytes(path: str) -> int:
    """The bytes of every file under ``path`` (0 when it does not exist)."""
    import pyarrow.fs as pafs

    fs, p = _fs(path)
    try:
        infos = fs.get_file_info(pafs.FileSelector(p, recursive=True, allow_not_found=True))
    except OSError:
        return 0
    return sum(i.size or 0 for i in infos if i.type == pafs.FileType.File)


def _read_text(path: str) -> str | None:
    fs, p = _fs(path)
    try:
        with fs.open_input_stream(p) as f:
            return f.read().decode("utf-8", "replace")
    except (OSError, FileNotFoundError):
        return None


def _reported(trial_dir: str, metric: str) -> dict[str, tuple[int | None, float | None]]:
    """checkpoint folder name -> (epoch, metric) from the trial's result.json (the last line that names it
    wins: a restarted trial reports its restored epoch again)."""
    out: dict[str, tuple[int | None, float | None]] = {}
    text = _read_text(join(trial_dir, "result.json")) or ""
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        where = row.get("checkpoint_path") or row.get("checkpoint_dir_name")
        if not where:
            continue
        v = row.get(metric)
        value = float(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else None
        out[str(where).rstrip("/").rsplit("/", 1)[-1]] = (row.get("epoch"), value)
    return out


def sweep_checkpoints(tune_path: str, storage: str, sweep: str, metric: str) -> list[TrialCkpts]:
    """Every trial of the sweep with the checkpoint folders it has on the storage: in its Tune trial folder
    (one-worker trials) and in its Train run's folder (trials on Ray Train: ``<sweep>/trials/<sweep>-<trial>``,
    or beside the sweep's folder for an older sweep)."""
    from ray.tune import ExperimentAnalysis

    from ..trainables.trial import trial_run_name

    found = []
    listed: dict[str, list[str]] = {}  # the folder of trials' Train runs -> what it holds (listed once)
    for t in ExperimentAnalysis(tune_path).trials:
        trial_dir = join(tune_path, t.storage.trial_dir_name)
        reported = _reported(trial_dir, metric)
        ckpts = []
        name = trial_run_name(sweep, t.trial_id)
        under = trial_storage(storage, sweep, t.trial_id)
        if under not in listed:
            listed[under] = [e for e, info in _children(under) if info.type.name == "Directory"]
        # a trial that copied another's checkpoint under PBT went on as a new Train run, name-pbt<time>
        train_runs = [name] + sorted(e for e in listed[under] if e.startswith(f"{name}-pbt"))
        for folder in (trial_dir, *(join(under, r) for r in train_runs)):
            for entry, info in _children(folder):
                if not entry.startswith("checkpoint_") or info.type.name != "Directory":
                    continue
                path = join(folder, entry)
                epoch, value = reported.get(entry, (None, None))
                ckpts.append(Ckpt(t.trial_id, path, epoch, value, tree_bytes(path)))
        found.append(TrialCkpts(t.trial_id, str(t.status), ckpts))
    return found


def _best_and_last(t: TrialCkpts, mode: str) -> set[str]:
    known = [c for c in t.checkpoints if c.epoch is not None]
    if not known:
        return set()
    last = max(known, key=lambda c: (c.epoch, c.path))
    scored = [c for c in known if c.value is not None]
    keep = {last.path}
    if scored:
        sign = 1 if mode == "max" else -1
        keep.add(max(scored, key=lambda c: (sign * c.value, c.epoch)).path)
    return keep


def plan(trials: list[TrialCkpts], mode: str, keep_best: int | None = None) -> Plan:
    """What to remove: of every finished trial all but its best and last checkpoint, and with
    ``keep_best`` every checkpoint of the finished trials outside the ``keep_best`` best (by the best
    value each reached; a trial that reported none ranks last)."""
    out = Plan()
    finished = [t for t in trials if t.finished]
    out.running = [t.trial_id for t in trials if not t.finished]
    for t in trials:
        if not t.finished:
            out.keep += t.checkpoints
    ranked = sorted(finished, key=lambda t: _rank_key(t, mode))
    for i, t in enumerate(ranked):
        keep = _best_and_last(t, mode) if keep_best is None or i < keep_best else set()
        for c in t.checkpoints:
            (out.keep if c.path in keep else out.remove).append(c)
    return out


def _rank_key(t: TrialCkpts, mode: str):
    v = t.best_value(mode)
    if v is None:
        return (1, 0.0, t.trial_id)
    return (0, -v if mode == "max" else v, t.trial_id)


def apply(p: Plan) -> list[str]:
    """Remove the plan's checkpoint folders; returns the ones that could not be removed (with why)."""
    failed = []
    for c in p.remove:
        fs, path = _fs(c.path)
        try:
            fs.delete_dir(path)
        except FileNotFoundError:
            continue
        except OSError as e:
            failed.append(f"{c.path} ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})")
    return failed


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def sweep_bytes(tune_path: str, storage: str, sweep: str, trial_ids: list[str]) -> int:
    """What the sweep occupies on the storage: its folder (its trials' folders in it), and the trial folders
    an older sweep kept beside it."""
    return tree_bytes(tune_path) + sum(tree_bytes(d) for d in legacy_trial_dirs(storage, sweep, trial_ids))


@dataclass
class GcResult:
    sweep: str
    plan: Plan
    before: int
    after: int
    failed: list[str]
    dry_run: bool

    def summary(self) -> str:
        p = self.plan
        trials = len({c.trial_id for c in p.remove})
        what = (f"{'would remove' if self.dry_run else 'removed'} {len(p.remove)} checkpoint(s) of {trials} trial(s), "
                f"{'freeing' if self.dry_run else 'freed'} {human(p.freed)} (the sweep's storage: {human(self.before)} -> "
                f"{human(self.after)}); kept {len(p.keep)} checkpoint(s), {human(p.kept)}")
        if p.running:
            what += f"; {len(p.running)} trial(s) not over left as they are"
        if self.failed:
            what += f"; {len(self.failed)} could not be removed: {self.failed[0]}"
        return f"{self.sweep}: {what}" + ("  (dry run: nothing removed)" if self.dry_run else "")


def collect(files, cfg, *, keep_best: int | None = None, dry_run: bool = False,
            parent_run_id: str | None = None) -> GcResult:
    """Clean the checkpoints of the sweep whose files are ``files`` (see the module's docstring); the
    parent run records the storage used before and after (metrics ``storage/bytes_before`` and
    ``storage/bytes_after``, one step per clean-up)."""
    metric, mode = cfg.sweep.metrics[0], cfg.sweep.modes[0]
    trials = sweep_checkpoints(files.tune_path, files.storage, files.name, metric)
    ids = [t.trial_id for t in trials]
    before = sweep_bytes(files.tune_path, files.storage, files.name, ids)
    p = plan(trials, mode, keep_best)
    failed = [] if dry_run else apply(p)
    after = before - p.freed if dry_run else sweep_bytes(files.tune_path, files.storage, files.name, ids)
    if parent_run_id and cfg.tracking.enabled and not dry_run:
        try:
            record(cfg.tracking.uri, parent_run_id, before, after)
        except Exception as e:  # noqa: BLE001 - the checkpoints are gone either way; only the figures are missing
            import logging

            from ..tracking.runs import first_line, mask_secrets

            logging.getLogger("qksweep").warning("the sweep's storage figures could not be logged to MLflow at %s (%s)",
                                                 mask_secrets(cfg.tracking.uri), first_line(e))
    return GcResult(files.name, p, before, after, failed, dry_run)


def record(uri: str, run_id: str, before: int, after: int) -> None:
    import time

    from mlflow.entities import Metric

    from ..tracking import runs

    c = runs.client(uri)
    step = len(runs.retrying(lambda: c.get_metric_history(run_id, "storage/bytes_after"), what="metric history"))
    now = int(time.time() * 1000)
    figures = [Metric(k, float(v), now, step) for k, v in (("storage/bytes_before", before), ("storage/bytes_after", after))]
    runs.retrying(lambda: c.log_batch(run_id, metrics=figures), what="storage figures")
