"""A Ray Train ``UserCallback`` that logs each reported epoch to the run's MLflow run.

It runs in the Train controller, after the epoch's checkpoint is persisted, so one report becomes
one batch of MLflow metrics exactly once: a restarted worker resumes from that checkpoint and never
re-reports the epoch. On a controller restart (trial retry, resumed sweep) it first reads which
epochs the run already holds and skips them.

The module imports MLflow only when the first epoch is logged: Ray pickles the callback into the
Train run's context, so the controller and every worker unpickle it at start-up, and importing
MLflow's client (with its SQLAlchemy store) there cost each worker ~0.8 s before its first step.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from ray.train.v2.api.callback import UserCallback


class MLflowEpochLogger(UserCallback):
    """Logs each epoch once. MLflow trouble never fails or stalls the run: an epoch that cannot be sent
    within ``QKSWEEP_MLFLOW_EPOCH_WAIT_S`` (3 s) goes to the run's pending file (see
    :mod:`qksweep.tracking.pending`), which is sent first at the next epoch and by the trial's end."""

    def __init__(self, tracking_uri: str, run_id: str, *, metric: str, mode: str, epochs: int,
                 label: str = "", echo: bool = True, run_dir: str | None = None, on_last_epoch=None,
                 seed_runs: list[str] | None = None):
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.seed_runs = list(seed_runs or [])  # sweep.repeats: each seed's nested run, for the report's `_seeds`
        self.on_last_epoch = on_last_epoch  # called once the last epoch is in MLflow (tracking.log_model)
        self.metric, self.mode, self.epochs = metric, mode, epochs
        self.label, self.echo = label, echo
        self.run_dir = run_dir
        self._sender = None  # a pending.Sender, made in the controller
        self._pending: bool | None = None  # whether the pending file holds records (read once)
        self._best: float | None = None
        self._outage_since: float | None = None
        self._mem: list[dict[str, Any]] = []  # pending records when the run has no storage folder

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        from . import pending

        m = metrics[0]
        epoch = int(m.get("epoch", 0))
        if self._sender is None:  # the callback is pickled to the controller actor: state starts there
            self._sender = pending.Sender(live=True)
        records = self._records(m, epoch, checkpoint)
        path = pending.pending_path(self.run_dir) if self.run_dir else None
        if path and self._pending is None:
            self._pending = bool(pending.read_records(path))
        queued = (pending.read_records(path) if path and self._pending else []) if path else self._mem
        left, err = self._sender.send(queued + records, pending.epoch_wait_s())
        if path:
            if left or queued:
                pending.write_records(path, left)
            self._pending = bool(left)
        else:
            self._mem = left
        self._report(left, err, path, epoch)
        if self.on_last_epoch is not None and epoch >= self.epochs and not left:  # before Tune can stop the trial
            self.on_last_epoch()
        if self.echo:
            note = f"  (MLflow away: {len({r.get('epoch') for r in left if r['type'] == 'epoch'})} epochs pending)" if left else ""
            print(format_epoch(m, self.epochs, self.label) + note, file=sys.stdout, flush=True)

    def _records(self, m: dict[str, Any], epoch: int, checkpoint) -> list[dict[str, Any]]:
        """This report as pending-file records; epochs the run already holds are skipped when sent."""
        from . import pending

        known = self._sender.known(self.run_id)
        seen = self._sender.seen_cached(self.run_id)
        out = []
        replay = m.get("_replay")
        if replay and not (known and int(replay.get("epoch", 0)) in seen):
            out.append(pending.epoch_record(self.tracking_uri, self.run_id, replay))
            out += self._seed_records(replay)
        if known and epoch in seen:
            return out
        tags = dict(m.get("_tags") or {})
        if m.get("_stopped_by"):
            tags.update({"qksweep.stopped_by": m["_stopped_by"], "qksweep.stop_reason": str(m.get("_stop_reason") or ""),
                         "qksweep.stopped_at_epoch": str(epoch)})
        out.append(pending.epoch_record(self.tracking_uri, self.run_id, m, tags=tags))
        out += self._seed_records(m)
        value = m.get(self.metric)
        if checkpoint is not None and isinstance(value, (int, float)) and math.isfinite(value) and self._improved(value):
            self._best = float(value)
            out.append({"type": "best", "uri": self.tracking_uri, "run_id": self.run_id, "metric": self.metric,
                        "mode": self.mode, "value": float(value), "checkpoint": _checkpoint_uri(checkpoint, self.run_dir)})
        if m.get("_dataset"):  # what the run trains on (the first epoch of each training process)
            out.append({"type": "inputs", "uri": self.tracking_uri, "run_id": self.run_id, "datasets": m["_dataset"]})
        if checkpoint is not None:  # what rank 0 published with its last epoch (after the best: it may replace it)
            for artifact_path, folder in (m.get("_publish") or {}).items():
                out.append({"type": "artifacts", "uri": self.tracking_uri, "run_id": self.run_id, "folder": folder,
                            "artifact_path": artifact_path, "checkpoint": _checkpoint_uri(checkpoint, self.run_dir)})
        return out

    def _seed_records(self, m: dict[str, Any]) -> list[dict[str, Any]]:
        """Each seed's own metrics of the epoch to its nested run (the sender skips epochs a run holds)."""
        from . import pending

        return [pending.epoch_record(self.tracking_uri, run_id, seed)
                for run_id, seed in zip(self.seed_runs, m.get("_seeds") or [])]

    def _improved(self, value: float) -> bool:
        """Against the best checkpoint this logger chose (the run's own history is checked again when the
        record is sent, so a restarted controller never replaces a better checkpoint)."""
        if self._best is None:
            return True
        return value > self._best if self.mode == "max" else value < self._best

    def _report(self, left: list, err: Exception | None, path: str | None, epoch: int) -> None:
        from . import runs

        if left and self._outage_since is None:
            self._outage_since = time.monotonic()
            where = f"kept in {runs.mask_secrets(path)}" if path else "kept in memory"
            print(f"{self.label or 'qksweep: '}MLflow at {runs.mask_secrets(self.tracking_uri)} is not answering "
                  f"({runs.mask_secrets(str(err).splitlines()[0][:160]) if err else 'no answer'}); epoch {epoch} "
                  f"{where}; training goes on and the metrics are sent when the server is back",
                  file=sys.stderr, flush=True)
        elif not left and self._outage_since is not None:
            print(f"{self.label or 'qksweep: '}MLflow is back after {time.monotonic() - self._outage_since:.0f} s; "
                  f"pending epochs sent (up to epoch {epoch})", file=sys.stderr, flush=True)
            self._outage_since = None


def _checkpoint_uri(checkpoint, run_dir: str | None = None) -> str:
    """A checkpoint's path with its filesystem's scheme (``s3://...``) unless it is local; under a bucket
    ``run_dir`` its URI keeps the storage's credentials and ``?endpoint_override=...`` options."""
    from ..storage import checkpoint_uri, is_uri

    if run_dir and is_uri(run_dir):
        return checkpoint_uri(run_dir, checkpoint)
    fs = getattr(checkpoint, "filesystem", None)
    kind = getattr(fs, "type_name", "local") if fs is not None else "local"
    return checkpoint.path if kind == "local" or "://" in checkpoint.path else f"{kind}://{checkpoint.path}"


def format_epoch(m: dict[str, Any], epochs: int, label: str = "") -> str:
    from ..names import CONSOLE_METRICS, LR

    parts = [f"{label}epoch {int(m.get('epoch', 0))}/{epochs}"]
    for k in CONSOLE_METRICS:
        if k in m:
            v = m[k]
            parts.append(f"{k} {v:.3g}" if k == LR else f"{k} {v:.4f}" if abs(v) < 100 else f"{k} {v:.0f}")
    return "  ".join(parts)
