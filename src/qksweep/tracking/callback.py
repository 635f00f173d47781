"""A Ray Train ``UserCallback`` that logs each reported epoch to the run's MLflow run.

It runs in the Train controller, after the epoch's checkpoint is persisted, so one report becomes
one batch of MLflow metrics exactly once: a restarted worker resumes from that checkpoint and never
re-reports the epoch. On a controller restart (trial retry, resumed sweep) it first reads which
epochs the run already holds and skips them.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from mlflow.entities import Metric
from ray.train.v2.api.callback import UserCallback

from . import runs


class MLflowEpochLogger(UserCallback):
    def __init__(self, tracking_uri: str, run_id: str, *, metric: str, mode: str, epochs: int,
                 label: str = "", echo: bool = True):
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.metric, self.mode, self.epochs = metric, mode, epochs
        self.label, self.echo = label, echo
        self._client = None
        self._seen: set[int] | None = None
        self._best: float | None = None

    # the callback is pickled to the controller actor: open the client there, lazily
    def _c(self):
        if self._client is None:
            self._client = runs.client(self.tracking_uri)
        return self._client

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        m = metrics[0]
        epoch = int(m.get("epoch", 0))
        if self._seen is None:
            self._seen = runs.logged_steps(self._c(), self.run_id, "epoch")
            self._best = self._best_so_far()
        if epoch in self._seen or not self._still_running():
            return
        replay = m.get("_replay")
        if replay and int(replay.get("epoch", 0)) not in self._seen:
            self._log_epoch(replay)
        self._log_epoch(m)
        if m.get("_tags"):
            runs.set_tags(self._c(), self.run_id, m["_tags"])
        if m.get("_stopped_by"):
            runs.set_tags(self._c(), self.run_id, {"qksweep.stopped_by": m["_stopped_by"],
                                                   "qksweep.stop_reason": str(m.get("_stop_reason") or ""),
                                                   "qksweep.stopped_at_epoch": str(epoch)})
        value = m.get(self.metric)
        if checkpoint is not None and self._improved(value):
            self._best = float(value)
            with checkpoint.as_directory() as d:
                runs.log_artifact_dir(self.tracking_uri, self.run_id, d, "checkpoints/best")
        if self.echo:
            print(format_epoch(m, self.epochs, self.label), file=sys.stdout, flush=True)

    def _log_epoch(self, m: dict[str, Any]) -> None:
        epoch = int(m.get("epoch", 0))
        ts = int(time.time() * 1000)
        items = [Metric(k, v, ts, epoch) for k, v in runs.iter_metrics(m)]
        for step, spec in m.get("_spec", []) or []:
            items += [Metric(k, float(v), ts, int(step)) for k, v in spec.items()]
        runs.log_metric_list(self._c(), self.run_id, items)
        self._seen.add(epoch)

    def _still_running(self) -> bool:
        """A run that Tune has already closed (an ASHA stop races the Train controller, which dies a
        moment after its trial) takes no more epochs."""
        run = runs.retrying(lambda: self._c().get_run(self.run_id), what="run status")
        return run.info.status == "RUNNING"

    def _improved(self, value: Any) -> bool:
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self._best is None:
            return True
        return value > self._best if self.mode == "max" else value < self._best

    def _best_so_far(self) -> float | None:
        hist = runs.retrying(lambda: self._c().get_metric_history(self.run_id, self.metric), what="metric history")
        vals = [h.value for h in hist if math.isfinite(h.value)]
        if not vals:
            return None
        return max(vals) if self.mode == "max" else min(vals)


def format_epoch(m: dict[str, Any], epochs: int, label: str = "") -> str:
    keys = ["train/loss", "train/top1", "val/loss", "val/top1", "val/top5", "lr", "samples_per_s"]
    parts = [f"{label}epoch {int(m.get('epoch', 0))}/{epochs}"]
    for k in keys:
        if k in m:
            v = m[k]
            parts.append(f"{k} {v:.3g}" if k in ("lr",) else f"{k} {v:.4f}" if abs(v) < 100 else f"{k} {v:.0f}")
    return "  ".join(parts)
