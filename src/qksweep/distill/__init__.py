"""Knowledge distillation (``distill:`` config section): a frozen teacher's logits added to the
student's loss in the shared training loop.

- :mod:`.losses`: ``soft_kd_loss`` (KL at temperature tau, × tau²), ``hard_kd_loss`` (DeiT), ``distill_loss``.
- :mod:`.teacher`: ``load_teacher`` (run id, checkpoint, or timm name + weights file) and ``check_distill``.
"""

from .losses import distill_loss, hard_kd_loss, soft_kd_loss
from .teacher import Teacher, check_distill, load_teacher

__all__ = ["Teacher", "check_distill", "distill_loss", "hard_kd_loss", "load_teacher", "soft_kd_loss"]
