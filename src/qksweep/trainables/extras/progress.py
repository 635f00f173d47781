"""Progress within an epoch, for ``qksweep train``'s console: rank 0 prints one marked line
(``qksweep-progress {json}``) at most every ``INTERVAL_S`` seconds and after the epoch's last update;
the ``train`` command's console (:mod:`qksweep.console`) turns them into a progress bar on a terminal and
drops them elsewhere (the epoch line says it all). Off unless the launch asks for it
(``loop_config["progress"]``): sweep trials have the sweep's own view."""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any

from ..core import Core
from .base import Extra

MARK = "qksweep-progress "
INTERVAL_S = 0.5


class Progress(Extra):
    def __init__(self, core: Core, label: str):
        self.epochs = core.cfg.optim.epochs
        self.total = max(1, math.ceil(len(core.train_batches) / core.cfg.optim.grad_accum))
        self.samples_per_update = core.cfg.data.batch_size * core.cfg.optim.grad_accum * core.world
        self.label = label
        self.epoch, self.first, self.t0, self.last = 0, 0, 0.0, 0.0

    @classmethod
    def build(cls, core: Core, loop_config: dict[str, Any]) -> Progress | None:
        if core.rank != 0 or not loop_config.get("progress"):
            return None
        return cls(core, str(loop_config.get("progress_label", "")))

    def before_epoch(self, epoch: int) -> None:
        self.epoch, self.first, self.t0, self.last = epoch + 1, -1, time.perf_counter(), 0.0

    def after_update(self, step: int) -> None:
        if self.first < 0:
            self.first = step - 1
        done = step - self.first
        now = time.perf_counter()
        if done < self.total and now - self.last < INTERVAL_S:
            return
        self.last = now
        rate = done * self.samples_per_update / max(now - self.t0, 1e-9)
        print(MARK + json.dumps({"run": self.label, "epoch": self.epoch, "epochs": self.epochs, "done": min(done, self.total),
                                 "total": self.total, "samples_per_s": round(rate, 1)}), file=sys.stdout, flush=True)


def parse(line: str) -> dict[str, Any] | None:
    """The progress record of a marked line (None for any other line)."""
    i = line.find(MARK)
    if i < 0:
        return None
    try:
        rec = json.loads(line[i + len(MARK):])
    except json.JSONDecodeError:
        return None
    return rec if isinstance(rec, dict) and {"epoch", "epochs", "done", "total"} <= set(rec) else None
