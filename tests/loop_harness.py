"""Run the shared training loop in this process, without Ray actors: Ray Train V2's local-mode
``TrainFnUtils``, recording every report and copying each reported checkpoint (the loop reports a
temporary folder). ``resume`` hands the loop a checkpoint as ``ray.train.get_checkpoint()`` does for a
restarted worker."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ray.train import Checkpoint
from ray.train.v2._internal.execution.train_fn_utils import LocalTrainFnUtils, set_train_fn_utils

from qksweep.config import build_config
from qksweep.trainables.loop import train_loop


class Recorder(LocalTrainFnUtils):
    def __init__(self, store: Path, resume: Path | None = None):
        super().__init__(experiment_name="inprocess")
        self.store, self.resume = Path(store), resume
        self.reports: list[tuple[dict[str, Any], Path | None]] = []

    def report(self, metrics, checkpoint=None, **kw) -> None:
        saved = None
        if checkpoint is not None:
            saved = self.store / f"epoch{metrics['epoch']}"
            shutil.copytree(checkpoint.path, saved)
        self.reports.append((metrics, saved))

    def get_checkpoint(self):
        return Checkpoint(str(self.resume)) if self.resume else None


def run_loop(cfg: dict, store: Path, resume: Path | None = None,
             extra: dict[str, Any] | None = None) -> list[tuple[dict[str, Any], Path | None]]:
    """[(metrics, checkpoint dir)] per epoch of one in-process run of ``train_loop`` (``extra``: more of the
    loop config, e.g. ``repeats``)."""
    rec = Recorder(store, resume)
    set_train_fn_utils(rec)
    try:
        train_loop({"config": build_config(cfg).to_dict(), "tracking_uri": None, **(extra or {})})
    finally:
        set_train_fn_utils(None)
    return rec.reports
