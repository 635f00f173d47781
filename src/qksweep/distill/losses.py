"""Distillation losses: small pure functions on logits.

The soft loss is the formula of timm's ``LogitDistillationTask`` (``timm/task/distillation.py``),
which ties it to timm's own training task; here it is a function the shared loop can call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Hinton's soft-target loss: the KL divergence between the teacher's and the student's
    temperature-``tau`` distributions, batch mean, times ``tau²`` (so its gradients keep their scale
    as ``tau`` grows). ``F.kl_div(log p_student, log p_teacher)`` = KL(p_teacher ‖ p_student)."""
    log_s = F.log_softmax(student_logits.float() / tau, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / tau, dim=-1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * (tau * tau)


def hard_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """DeiT's hard distillation: cross-entropy against the teacher's top-1 class."""
    return F.cross_entropy(student_logits.float(), teacher_logits.argmax(dim=-1))


def distill_loss(base_loss: torch.Tensor, student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                 kind: str, alpha: float, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``((1 - alpha) · base_loss + alpha · kd, kd)``; ``base_loss`` is the usual criterion on the
    labels (label smoothing or mixup targets included)."""
    if kind == "soft":
        kd = soft_kd_loss(student_logits, teacher_logits, tau)
    elif kind == "hard":
        kd = hard_kd_loss(student_logits, teacher_logits)
    else:
        raise ValueError(f"distill.kind must be soft or hard, not {kind!r}")
    return (1.0 - alpha) * base_loss + alpha * kd, kd
