"""``optim.ema``: an exponential moving average of the weights (timm's ``ModelEmaV3``), updated after every
optimizer update and validated each epoch as ``val_ema/*``."""

from __future__ import annotations

from typing import Any

from timm.utils import ModelEmaV3

from ...names import VAL_EMA_LOSS, VAL_EMA_TOP1, VAL_EMA_TOP5
from ..core import Core
from .base import Extra


class EMA(Extra):
    name = "ema"

    def __init__(self, core: Core):
        self.core = core
        self.ema = ModelEmaV3(core.model, decay=core.cfg.optim.ema_decay)
        self.module = self.ema.module

    @classmethod
    def build(cls, core: Core) -> EMA | None:
        return cls(core) if core.cfg.optim.ema else None

    def state_dict(self) -> Any:
        return self.ema.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self.ema.load_state_dict(state)

    def after_update(self, step: int) -> None:
        self.ema.update(self.core.model, step=step)

    def epoch_metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        ev = self.core.evaluate(self.ema.module)  # every rank: the evaluation sums over all workers
        return {VAL_EMA_LOSS: ev["loss"], VAL_EMA_TOP1: ev["top1"], VAL_EMA_TOP5: ev["top5"]}
