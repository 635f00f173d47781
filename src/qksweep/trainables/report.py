"""The Train→Tune report bridge, in a module of its own that imports nothing heavy: Ray pickles the
callback into the Train run's context, so the controller and every worker import this module when
they start (importing :mod:`qksweep.trainables.trial` there would load the config schema, MLflow and
the search spaces in each of them)."""

from __future__ import annotations

from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback


class PublicTuneReport(TuneReportCallback):
    """TuneReportCallback without the private ``_``-keys (per-update spectra go to MLflow only), plus
    the trial's static figures (``params_m``, ``act_mem_gb`` when constrained) in every result, so
    that the searcher can tell Optuna a launched trial's constraint values."""

    def __init__(self, static: dict[str, float] | None = None):
        super().__init__()
        self.static = dict(static or {})

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        clean = [{**self.static, **{k: v for k, v in m.items() if not k.startswith("_")}} for m in metrics]
        super().after_report(run_context, clean, checkpoint)
