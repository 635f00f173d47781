"""The Tune trial driver: one trial = a small function that builds and fits a ``TorchTrainer``.

Ray 2.60's Train V2 pattern: the Train run's name is derived from the Tune trial id, so a restarted
trial (a retry, or a restored sweep) finds its own checkpoints and resumes instead of starting at
epoch 0. The trial's MLflow run is found again by its tags, so there is exactly one per trial.
"""

from __future__ import annotations

import json
from typing import Any

from ..kill_points import kill_point
from ..search_spaces import apply_sample
from ..storage import checkpoint_uri
from ..tracking import pending, runs
from .launcher import close_run, first_line, log_config_artifact, make_trainer, run_dir, run_params, storage_root
from .report import PublicTuneReport


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
        try:
            c = runs.client(cfg.tracking.uri)
            run_id = _trial_run(c, cfg, sweep, trial_id, sample, parent_run_id, name)
        except Exception as e:  # noqa: BLE001 - no run to log into: this trial cannot start (Tune retries it)
            raise RuntimeError(f"MLflow at {runs.mask_secrets(cfg.tracking.uri)} did not answer when the trial "
                               f"started ({first_line(e)}); the trial did not train. `qksweep resume {sweep}` "
                               f"runs it again") from None
        pending.restarted(run_dir(cfg, name))
        kill_point("mlflow_run")
    rejected = static_violation(cfg)
    if rejected:  # never started: no Train run, no worker; the run records why
        if c:
            runs.log_metrics(c, run_id, {rejected[0]: rejected[1]}, step=0)
            runs.close_if_running(c, run_id, "KILLED", {"qksweep.stopped_by": "constraint",
                                                        "qksweep.constraint_violated": rejected[2]})
        return
    label = f"[{trial_id}] "
    report = PublicTuneReport(static_values(cfg))
    trainer = make_trainer(cfg, run_name=name, run_id=run_id, callbacks=[report], label=label)
    try:
        result = trainer.fit()
    except Exception as e:
        if c:
            close_run(cfg, run_id, name, "FAILED", tags={"qksweep.error": first_line(e)}, if_running=True,
                      label=label, resume_hint=f"qksweep resume {sweep}")
        raise RuntimeError(first_line(e)) from None
    if c:  # MLflow away for good: the trial still ends normally; stderr names what is missing and where
        close_run(cfg, run_id, name, "FINISHED", checkpoint=checkpoint_uri(storage_root(cfg), result.checkpoint),
                  label=label, resume_hint=f"qksweep resume {sweep}")


def _trial_run(c, cfg, sweep: str, trial_id: str, sample: dict[str, Any], parent_run_id: str | None, name: str) -> str:
    """The trial's MLflow run, found by its tags or created with its params, tags and config."""
    exp = runs.experiment_id(c, cfg.experiment)
    lookup = {runs.KIND: "trial", runs.SWEEP: sweep, runs.TRIAL: trial_id}
    params = run_params(cfg)
    params.update({k: v for k, v in sample.items() if k not in params})  # derived keys, e.g. model.head_dim
    run_id, created = runs.get_or_create_run(c, exp, lookup, run_name=name, params=params)
    if created:
        runs.set_tags(c, run_id, {**trial_tags(sweep, trial_id, parent_run_id),
                                  "qksweep.searched": json.dumps(sorted(sample)),
                                  "qksweep.metric": cfg.sweep.metrics[0], "qksweep.mode": cfg.sweep.modes[0],
                                  "qksweep.objectives": json.dumps(dict(zip(cfg.sweep.metrics, cfg.sweep.modes)))})
        log_config_artifact(cfg, run_id)
    return run_id


def static_values(cfg) -> dict[str, float]:
    """The values of the static constraints the sweep names (parameter count, activation memory)."""
    from ..config import STATIC_CONSTRAINTS

    wanted = [k for k in cfg.sweep.constraints if k in STATIC_CONSTRAINTS]
    if not wanted:
        return {}
    from ..snn import static_checks

    out = {}
    for key in wanted:
        if key == "params_m":
            out[key] = static_checks.param_count_m(cfg)
        else:
            out[key] = static_checks.activation_memory_estimate_gb(
                cfg.model.name, cfg.model.overrides(), cfg.data.img_size, cfg.data.batch_size,
                cfg.model.time_steps)
    return out


def static_violation(cfg) -> tuple[str, float, str] | None:
    """(key, value, message) of the first static constraint the trial's config breaks."""
    for key, value in static_values(cfg).items():
        bound = cfg.sweep.constraints[key]
        if bound.violation(value) > 0:
            return key, value, f"{key}={value:.4g} outside [{bound.min}, {bound.max}]"
    return None
