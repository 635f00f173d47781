"""The Tune trial driver: one trial = a small function that builds and fits a ``TorchTrainer``.

Ray 2.60's Train V2 pattern: the Train run's name is derived from the Tune trial id, so a restarted
trial (a retry, or a restored sweep) finds its own checkpoints and resumes instead of starting at
epoch 0. The trial's MLflow run is found again by its tags, so there is exactly one per trial.
"""

from __future__ import annotations

import json
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from ..search_spaces import apply_sample
from ..tracking import runs
from .launcher import first_line, log_config_artifact, make_trainer, run_params


class PublicTuneReport(TuneReportCallback):
    """TuneReportCallback without the private ``_``-keys (per-update spectra go to MLflow only)."""

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        clean = [{k: v for k, v in m.items() if not k.startswith("_")} for m in metrics]
        super().after_report(run_context, clean, checkpoint)


def trial_run_name(sweep: str, trial_id: str) -> str:
    return f"{sweep}-{trial_id}"


def trial_tags(sweep: str, trial_id: str, parent_run_id: str | None) -> dict[str, str]:
    tags = {runs.KIND: "trial", runs.SWEEP: sweep, runs.TRIAL: trial_id}
    if parent_run_id:
        tags[runs.PARENT] = parent_run_id
    return tags


def trial_driver(sample: dict[str, Any], *, base: dict[str, Any], sweep: str, parent_run_id: str | None) -> None:
    import ray.tune

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = apply_sample(base, sample)
    name = trial_run_name(sweep, trial_id)
    run_id = None
    c = None
    if cfg.tracking.enabled:
        c = runs.client(cfg.tracking.uri)
        exp = runs.experiment_id(c, cfg.experiment)
        lookup = {runs.KIND: "trial", runs.SWEEP: sweep, runs.TRIAL: trial_id}
        params = run_params(cfg)
        params.update({k: v for k, v in sample.items() if k not in params})  # derived keys, e.g. model.head_dim
        run_id, created = runs.get_or_create_run(c, exp, lookup, run_name=name, params=params)
        if created:
            runs.set_tags(c, run_id, {**trial_tags(sweep, trial_id, parent_run_id),
                                      "qksweep.searched": json.dumps(sorted(sample)),
                                      "qksweep.metric": cfg.sweep.metrics[0], "qksweep.mode": cfg.sweep.modes[0]})
            log_config_artifact(cfg, run_id)
    trainer = make_trainer(cfg, run_name=name, run_id=run_id, callbacks=[PublicTuneReport()],
                           label=f"[{trial_id}] ")
    try:
        result = trainer.fit()
    except Exception as e:
        if c:
            runs.close_if_running(c, run_id, "FAILED", {"qksweep.error": first_line(e)})
        raise RuntimeError(first_line(e)) from None
    if c:
        runs.finalize_run(cfg.tracking.uri, run_id, result.checkpoint.path if result.checkpoint else None)
