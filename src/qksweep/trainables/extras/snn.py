"""``snn:``: spikes, synaptic operations and energy counted on the first ``snn.val_batches`` validation
batches of each epoch (rank 0; ``snn/*``), the ANN-equivalent energy for ViTs so both families sit on
one energy axis, the energy assumptions as run tags; and ``sweep.stop_on.firing_rate``, the rule that
stops a network whose firing rate stays out of range."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, ContextManager

from ..core import Core
from .base import Extra


class SNNMeasures(Extra):
    def __init__(self, core: Core):
        from ...snn import ENERGY_ASSUMPTIONS, SNNMeter, ann_energy_mj

        self.batches = core.cfg.snn.val_batches
        self.tags = {f"qksweep.{k}": v for k, v in ENERGY_ASSUMPTIONS.items()}  # sent once per worker start
        self.meter, self.static = None, {}
        if core.spiking:
            self.meter = SNNMeter(core.model)
        else:
            size = core.cfg.data.img_size
            core.model.eval()  # a counting forward must not move BatchNorm statistics
            self.static = {"snn/energy_mj": ann_energy_mj(core.model, (1, 3, size, size))}
            core.model.train()

    @classmethod
    def build(cls, core: Core) -> SNNMeasures | None:
        return cls(core) if core.cfg.snn.enabled and core.rank == 0 else None

    def measuring(self, batch: int, n_images: int) -> ContextManager:
        if self.meter is None or batch >= self.batches:
            return nullcontext()
        return self.meter.measuring(n_images=n_images)

    def epoch_metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        out = dict(self.static)
        if self.meter is not None:
            out.update(self.meter.compute())
            self.meter.reset()
        if self.tags:
            out["_tags"], self.tags = self.tags, {}
        return out


class FiringRateStop(Extra):
    name = "fr_rule"
    stopped_by = "firing_rate"

    def __init__(self, rule):
        self.rule = rule
        self.reason: str | None = None

    @classmethod
    def build(cls, core: Core) -> FiringRateStop | None:
        r = core.cfg.sweep.stop_on.firing_rate
        if r is None or not core.cfg.snn.enabled or not core.spiking or core.rank != 0:
            return None
        from ...snn import FiringRateStopRule

        return cls(FiringRateStopRule(low=r.low, high=r.high, patience=r.patience))

    def state_dict(self) -> Any:
        return self.rule.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self.rule.load_state_dict(state)

    def epoch_metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        if self.reason is None:
            self.reason = self.rule.check(metrics)
        return {}

    def stop_request(self) -> str | None:
        return self.reason
