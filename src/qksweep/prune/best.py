"""``checkpoints/best`` of a pruned run holds a pruned model.

The MLflow epoch logger keeps the checkpoint of the best epoch as ``checkpoints/best``; in a pruned
run that is often a dense epoch from before the pruning. Rank 0 therefore keeps a copy of the best
*pruned* epoch's checkpoint (permanent weights, see :mod:`qksweep.prune`) and, when training ends,
publishes it with the last epoch's checkpoint; the epoch logger uploads it as ``checkpoints/best``,
replacing the dense one, so ``qksweep best --export``, ``validate``
and ``predict`` get the pruned model. After a worker restart the best is chosen among the epochs
trained since the restart (every one of them pruned).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any


class BestPrunedCheckpoint:
    def __init__(self, metric: str, mode: str):
        self.metric, self.mode = metric, mode
        self.value: float | None = None
        self.epoch: int | None = None
        self.dir: Path | None = None

    def offer(self, checkpoint_dir: str | Path, metrics: dict[str, Any]) -> bool:
        """Keep a copy of ``checkpoint_dir`` when this pruned epoch beats the best so far."""
        v = metrics.get(self.metric)
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        if self.value is not None and not (v > self.value if self.mode == "max" else v < self.value):
            return False
        if self.dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="qksweep-best-pruned-"))
        for f in Path(checkpoint_dir).iterdir():
            if f.is_file():
                shutil.copyfile(f, self.dir / f.name)
        self.value, self.epoch = float(v), int(metrics.get("epoch", 0))
        return True

    def copy_to(self, dest: str | Path) -> bool:
        """Copy the best pruned checkpoint's files into ``dest`` (the last reported checkpoint's publish
        folder: the epoch logger uploads it as ``checkpoints/best``). False when no pruned epoch was kept."""
        if self.dir is None:
            return False
        Path(dest).mkdir(parents=True, exist_ok=True)
        for f in self.dir.iterdir():
            shutil.copyfile(f, Path(dest) / f.name)
        return True

    def close(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
