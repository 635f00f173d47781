"""``spectral:``: the singular values of the weight matrices every ``spectral.every`` updates (rank 0;
``spec/*`` metrics, and ``spec_ema/*`` for the EMA model), with the plots and last spectra published as
the run's ``spectral/`` artifacts; and ``sweep.stop_on.spec_sigma_max_growth``, the rule that stops a
run whose largest singular value grows too fast."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core import Core
from ...names import PUBLISH_DIR
from .base import Extra


class MonitorGroup:
    """The base model's monitor and, with EMA on, the EMA model's (``spec_ema/``), as one."""

    def __init__(self, monitors):
        self.monitors = monitors

    def maybe_measure(self, step: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for m in self.monitors:
            out.update(m.maybe_measure(step))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {str(i): m.state_dict() for i, m in enumerate(self.monitors)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for i, m in enumerate(self.monitors):
            if str(i) in state:
                m.load_state_dict(state[str(i)])

    def save_artifacts(self, out_dir) -> list:
        files = []
        for m in self.monitors:
            sub = Path(out_dir) / m.prefix if len(self.monitors) > 1 else Path(out_dir)
            files += m.save_artifacts(sub)
        return files


def make_monitor(cfg, model, ema_module=None) -> MonitorGroup | None:
    """The spectral monitors of ``model`` (and of ``ema_module``) as the config asks; None with spectra off."""
    if not cfg.spectral.enabled:
        return None
    from ...models import default_spectral_targets
    from ...spectral import SpectralMonitor

    s = cfg.spectral
    targets = s.targets or default_spectral_targets(cfg.model.name)
    kw = dict(targets=targets, topk=s.topk, interval=s.interval, every=s.every, on_cpu=s.on_cpu, split_qkv=s.split_qkv)
    monitors = [SpectralMonitor(model, prefix="spec", **kw)]
    if ema_module is not None:
        monitors.append(SpectralMonitor(ema_module, prefix="spec_ema", **kw))
    return MonitorGroup(monitors)


class SpectralMonitorExtra(Extra):
    name = "spectral"

    def __init__(self, monitor: MonitorGroup):
        self.monitor = monitor
        self.last: dict[str, float] = {}  # the latest update's measurement ({} when it measured nothing)
        self.buffer: list[tuple[int, dict[str, float]]] = []  # this epoch's (step, spectra), logged per step

    @classmethod
    def build(cls, core: Core, ema=None) -> SpectralMonitorExtra | None:
        if core.rank != 0:
            return None
        monitor = make_monitor(core.cfg, core.model, ema.module if ema is not None else None)
        return cls(monitor) if monitor is not None else None

    def state_dict(self) -> Any:
        return self.monitor.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self.monitor.load_state_dict(state)

    def after_update(self, step: int) -> None:
        self.last = self.monitor.maybe_measure(step)
        if self.last:
            self.buffer.append((step, self.last))

    def epoch_metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        out, self.buffer = ({"_spec": self.buffer} if self.buffer else {}), []
        return out

    def publish(self, directory: Path) -> dict[str, str]:
        if not self.monitor.save_artifacts(directory / "spectral"):
            return {}
        return {"spectral": f"{PUBLISH_DIR}/spectral"}


class SpectralStop(Extra):
    """Exists on every rank (the workers agree on its request on measuring steps); only rank 0's, which
    sees the measurements, ever asks."""

    name = "stop_rule"
    stopped_by = "spectral"

    def __init__(self, core: Core, rule, spectral: SpectralMonitorExtra | None):
        self.every, self.rule, self.spectral = core.cfg.spectral.every, rule, spectral
        self.reason: str | None = None

    @classmethod
    def build(cls, core: Core, spectral: SpectralMonitorExtra | None) -> SpectralStop | None:
        growth = core.cfg.sweep.stop_on.spec_sigma_max_growth
        if not growth or not core.cfg.spectral.enabled:
            return None
        from ...spectral import SpectralStopRule

        return cls(core, SpectralStopRule(growth), spectral)

    def state_dict(self) -> Any:
        return self.rule.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self.rule.load_state_dict(state)

    def after_update(self, step: int) -> None:
        if self.spectral is not None and self.spectral.last and self.reason is None:
            self.reason = self.rule.check(self.spectral.last)

    def stop_sync_due(self, step: int) -> bool:
        return step % self.every == 0  # the monitor's measuring steps, which every rank knows

    def stop_request(self) -> str | None:
        return self.reason
