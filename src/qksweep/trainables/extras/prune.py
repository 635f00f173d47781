"""``prune:``: magnitude pruning at ``prune.at_epoch``, then fine-tuning with the masks kept
(``prune/sparsity``). Checkpoints hold permanent weights (the core saves ``plain_state_dict``) plus the
masks under ``prune_masks``; a restarted worker re-applies them. Rank 0 keeps the best *pruned* epoch's
checkpoint and publishes it as the run's ``checkpoints/best`` (see :mod:`qksweep.prune.best`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core import Core
from ...names import PUBLISH_DIR
from .base import Extra


class Pruning(Extra):
    name = "prune_masks"

    def __init__(self, core: Core):
        self.model, self.p = core.model, core.cfg.prune
        self.pruned = False
        self.best = None
        if core.rank == 0:
            from ...prune.best import BestPrunedCheckpoint

            self.best = BestPrunedCheckpoint(core.cfg.sweep.metrics[0], core.cfg.sweep.modes[0])

    @classmethod
    def build(cls, core: Core) -> Pruning | None:
        return cls(core) if core.cfg.prune.enabled else None

    def state_dict(self) -> Any | None:
        from ...prune import masks

        return masks(self.model) if self.pruned else None

    def load_state_dict(self, state: Any) -> None:
        from ...prune import apply_masks

        apply_masks(self.model, state)  # the checkpoint holds permanent weights; fine-tuning keeps their masks
        self.pruned = True

    def before_epoch(self, epoch: int) -> None:
        if self.pruned or epoch < self.p.at_epoch:
            return
        from ...prune import apply_pruning

        apply_pruning(self.model, self.p.method, self.p.amount, self.p.scope)
        self.pruned = True

    def epoch_metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        if not self.pruned:
            return {}
        from ...prune import sparsity

        return {"prune/sparsity": sparsity(self.model)}

    def after_checkpoint(self, directory: Path, metrics: dict[str, Any]) -> None:
        if self.pruned and self.best is not None:
            self.best.offer(directory, metrics)

    def publish(self, directory: Path) -> dict[str, str]:
        if self.best is None or not self.best.copy_to(directory / "best_pruned"):
            return {}
        return {"checkpoints/best": f"{PUBLISH_DIR}/best_pruned"}

    def close(self) -> None:
        if self.best is not None:
            self.best.close()
