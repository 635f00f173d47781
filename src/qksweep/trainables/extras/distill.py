"""``distill:``: a frozen teacher's logits added to the student's loss (``train/kd_loss``), and the
teacher's own validation accuracy reported with the first epoch of each worker start."""

from __future__ import annotations

from typing import Any

import torch

from ..core import Core, all_sum
from .base import Extra


class Distillation(Extra):
    def __init__(self, core: Core, teacher: torch.nn.Module):
        self.core, self.teacher, d = core, teacher, core.cfg.distill
        self.kind, self.alpha, self.tau = d.kind, d.alpha, d.tau
        self.sums = torch.zeros(2, dtype=torch.float64, device=core.device)  # kd loss * n, n
        ev = core.evaluate(teacher)  # every rank: the evaluation sums over all workers
        self.first = {"distill/teacher_top1": ev["top1"], "distill/teacher_loss": ev["loss"]}

    @classmethod
    def build(cls, core: Core, loop_config: dict[str, Any]) -> Distillation | None:
        """The teacher is loaded once per worker (from ``loop_config['tracking_uri']`` when it names a run)."""
        if not core.cfg.distill.enabled:
            return None
        from ...distill import load_teacher

        uri = loop_config.get("tracking_uri") or core.cfg.tracking.uri
        b = core.bundle
        teacher = load_teacher(core.cfg.distill, num_classes=b.num_classes, tracking_uri=uri, device=core.device,
                               student_data=core.cfg.data, student_mean=b.mean, student_std=b.std)
        return cls(core, teacher.to(core.device))

    def loss(self, loss: torch.Tensor, out: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
        from ...distill.losses import distill_loss

        # the same (mixed, augmented) batch the student saw
        loss, kd = distill_loss(loss, out, self.teacher(x), kind=self.kind, alpha=self.alpha, tau=self.tau)
        self.sums[0] += kd.detach().double() * n
        self.sums[1] += n
        return loss

    def epoch_metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        kd, n = all_sum(self.sums, self.core.world).tolist()
        self.sums.zero_()
        out, self.first = {"train/kd_loss": kd / max(n, 1.0), **self.first}, {}
        return out
