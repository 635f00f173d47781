"""The Tune trial driver. A trial trains one of two ways (``run.launcher``, see :mod:`.session`):

- ``tune`` (one worker, the default): the shared loop runs in the trial's own process through Tune's
  function API; its checkpoints are the Tune trial's, so a retried or restored trial resumes from them.
- ``train``: the trial is a small function that builds and fits a ``TorchTrainer`` (Ray 2.60's Train
  V2 pattern). The Train run's name is derived from the Tune trial id, so a restarted trial finds its
  own checkpoints and resumes instead of starting at epoch 0.

Either way the trial's MLflow run is found again by its tags, so there is exactly one per trial, and
the same epoch logger (``tracking/callback.py``) writes each epoch once.
"""

from __future__ import annotations

import json
from typing import Any

from ..kill_points import kill_point
from ..names import MLFLOW_RUN_ID
from ..search_spaces import apply_sample
from ..storage import checkpoint_uri, join, storage_root, trial_storage
from ..tracking import pending, runs
from ..tracking.lifecycle import TrackedRun, close_run, config_file, open_run, run_params
from .launcher import make_trainer
from .model_log import on_last_epoch
from .report import LastReportGuard, PublicTuneReport, tune_keeps_train_checkpoints


def trial_run_name(sweep: str, trial_id: str) -> str:
    return f"{sweep}-{trial_id}"


def trial_tags(sweep: str, trial_id: str, parent_run_id: str | None) -> dict[str, str]:
    tags = {runs.KIND: "trial", runs.SWEEP: sweep, runs.TRIAL: trial_id}
    if parent_run_id:
        tags[runs.PARENT] = parent_run_id
    return tags


def trial_driver(sample: dict[str, Any], *, base: dict[str, Any], sweep: str, parent_run_id: str | None,
                 launcher: str = "train", pbt_keys: tuple[str, ...] = ()) -> None:
    import ray.tune

    from .extras.pbt import current_values

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = apply_sample(base, sample)
    # what every launch path hands the loop besides the config: the trial (a checkpoint records who wrote
    # it) and, under PBT, the values the scheduler may change (logged each epoch as pbt/<key>)
    extra = {"trial_id": trial_id, "repeats": cfg.sweep.repeats,
             "pbt_values": current_values(cfg.to_dict(), list(pbt_keys))}
    name = trial_run_name(sweep, trial_id)
    under = trial_storage(storage_root(cfg), sweep, trial_id)  # <storage>/<sweep>/trials (older sweeps: beside it)
    run: TrackedRun | None = None
    seed_runs: list[str] = []
    if cfg.tracking.enabled:
        try:
            run = _trial_run(cfg, sweep, trial_id, sample, parent_run_id, name, join(under, name))
            if cfg.sweep.repeats > 1:
                seed_runs = _seed_runs(cfg, sweep, trial_id, run, name)
        except Exception as e:  # noqa: BLE001 - no run to log into: this trial cannot start (Tune retries it)
            raise RuntimeError(f"MLflow at {runs.mask_secrets(cfg.tracking.uri)} did not answer when the trial "
                               f"started ({runs.first_line(e)}); the trial did not train. `qksweep resume {sweep}` "
                               f"runs it again") from None
        kill_point("mlflow_run")
    rejected = static_violation(cfg)
    if rejected:  # never started: no Train run, no worker; the run records why
        if run:
            close_run(run, "KILLED", records=[pending.metrics_record(run.uri, run.run_id, {rejected[0]: rejected[1]}, 0)],
                      tags={"qksweep.stopped_by": "constraint", "qksweep.constraint_violated": rejected[2]},
                      if_running=True, label=f"[{trial_id}] ", resume_hint=f"qksweep resume {sweep}")
        return
    label = f"[{trial_id}] "
    try:
        checkpoint = (fit_in_trial if launcher == "tune" else fit_on_train)(cfg, run, name, label, under, seed_runs,
                                                                           extra)
        kill_point("train_done")
    except Exception as e:
        if run:
            close_run(run, "FAILED", tags={"qksweep.error": runs.first_line(e)}, if_running=True,
                      label=label, resume_hint=f"qksweep resume {sweep}")
        raise RuntimeError(runs.first_line(e)) from None
    if run:  # MLflow away for good: the trial still ends normally; stderr names what is missing and where
        close_run(run, "FINISHED", checkpoint=checkpoint_uri(storage_root(cfg), checkpoint),
                  label=label, resume_hint=f"qksweep resume {sweep}")


def fit_on_train(cfg, run: TrackedRun | None, name: str, label: str, under: str, seed_runs: list[str],
                 extra: dict[str, Any]):
    """The trial as a Ray Train run (folder ``under/name``); its epochs reach MLflow through the Train
    controller's callbacks."""
    report = PublicTuneReport(result_static(cfg, run))
    guard = LastReportGuard()
    if cfg.sweep.scheduler.population_based:  # PBT copies checkpoints between trials through Tune
        tune_keeps_train_checkpoints()
    train_name, resume_from = train_generation(name)
    trainer = make_trainer(cfg, run_name=train_name, run_id=run and run.run_id, callbacks=[report], label=label,
                           storage_path=under, extra=extra, seed_runs=seed_runs, resume_from=resume_from,
                           run_dir=join(under, name))
    checkpoint = trainer.fit().checkpoint
    guard.drain()  # the last epoch reached Tune before this function returns (Ray 2.60 race, see report.py)
    return checkpoint


def train_generation(name: str) -> tuple[str, str | None]:
    """The Train run a trial on Ray Train fits now, and the checkpoint it starts from when it has none of its
    own. Train V2 resumes a run from its own latest checkpoint, found by its name: ``name`` as a rule, and
    the run holding the checkpoint Tune restores the trial from. A trial that copied another trial's
    checkpoint (PBT's exploit) goes on as a new Train run, ``name-pbt<time>``, from that checkpoint."""
    import time

    import ray.tune

    ckpt = ray.tune.get_checkpoint()
    if ckpt is None:
        return name, None
    holder = ckpt.path.rstrip("/").split("/")[-2]  # <train run>/checkpoint_...
    if holder == name or holder.startswith(f"{name}-pbt"):
        return holder, None
    return f"{name}-pbt{time.strftime('%Y%m%d%H%M%S')}", ckpt.path


def fit_in_trial(cfg, run: TrackedRun | None, name: str, label: str, under: str, seed_runs: list[str],
                 extra: dict[str, Any]):
    """The trial in this process (Tune's function API): the epoch logger runs here, after each checkpoint
    is persisted and before Tune sees the epoch. Returns the last checkpoint."""
    import ray.tune

    from ..tracking.callback import MLflowEpochLogger
    from .launcher import loop_config
    from .loop import train_loop
    from .session import TuneSession

    after = None
    if run is not None:
        logger = MLflowEpochLogger(cfg.tracking.uri, run.run_id, metric=cfg.sweep.metrics[0], mode=cfg.sweep.modes[0],
                                   epochs=cfg.optim.epochs, label=label, run_dir=join(under, name),
                                   on_last_epoch=on_last_epoch(cfg, run.run_id, label), seed_runs=seed_runs)
        after = lambda metrics, checkpoint: logger.after_report(None, [metrics], checkpoint)  # noqa: E731
    ts = TuneSession(gpus=cfg.run.gpus_per_worker, static=result_static(cfg, run), after_persist=after)
    session = ts.session()
    kill_point("train_run")
    train_loop(loop_config(cfg, extra={**extra, "run_id": run and run.run_id}), session=session)
    return ts.last_checkpoint or ray.tune.get_checkpoint()  # restored with no epoch left: the one it had


def _trial_run(cfg, sweep: str, trial_id: str, sample: dict[str, Any], parent_run_id: str | None,
               name: str, folder: str) -> TrackedRun:
    """The trial's MLflow run, found by its tags or created with its params, tags and config."""
    from ..models import run_neuron_params

    neuron_params, neuron_tags = run_neuron_params(cfg.model)
    params = run_params(cfg, neuron_params)
    params.update({k: v for k, v in sample.items() if k not in params})  # derived keys, e.g. model.head_dim
    tags = {**trial_tags(sweep, trial_id, parent_run_id), **neuron_tags, "qksweep.searched": json.dumps(sorted(sample)),
            "qksweep.metric": cfg.sweep.metrics[0], "qksweep.mode": cfg.sweep.modes[0],
            "qksweep.objectives": json.dumps(dict(zip(cfg.sweep.metrics, cfg.sweep.modes)))}
    if cfg.sweep.repeats > 1:
        tags["qksweep.repeats"] = str(cfg.sweep.repeats)
    return open_run(cfg.tracking.uri, cfg.experiment, {runs.KIND: "trial", runs.SWEEP: sweep, runs.TRIAL: trial_id},
                    run_name=name, params=params, folder=folder, tags=tags, files=config_file(cfg))


def _seed_runs(cfg, sweep: str, trial_id: str, run: TrackedRun, name: str) -> list[str]:
    """``sweep.repeats``: one MLflow run per seed, nested under the trial's run (found again by its tags), with
    the trial's params at its own ``run.seed``. The trial's run logs the mean; these, each seed's epochs.
    They close with the trial's run (``runs.finish_run``)."""
    from ..models import run_neuron_params

    neuron_params, _ = run_neuron_params(cfg.model)
    out = []
    for i in range(cfg.sweep.repeats):
        seeded = cfg.model_copy(update={"run": cfg.run.model_copy(update={"seed": cfg.run.seed + i})})
        lookup = {runs.KIND: runs.SEED_KIND, runs.SWEEP: sweep, runs.TRIAL: trial_id, runs.SEED_INDEX: str(i)}
        out.append(open_run(cfg.tracking.uri, cfg.experiment, lookup, run_name=f"{name}-seed{i}",
                            params=run_params(seeded, neuron_params), folder=None,
                            tags={runs.PARENT: run.run_id}).run_id)
    return out


def result_static(cfg, run: TrackedRun | None) -> dict[str, Any]:
    """What every Tune result of the trial carries besides the epoch's metrics: the static constraint
    values and the trial's MLflow run id (the searcher records it on the Optuna trial)."""
    out: dict[str, Any] = dict(static_values(cfg))
    if run is not None:
        out[MLFLOW_RUN_ID] = run.run_id
    return out


def static_values(cfg) -> dict[str, float]:
    """The values of the static constraints the sweep names (parameter count, activation memory)."""
    from ..config import STATIC_CONSTRAINTS

    wanted = [k for k in cfg.sweep.constraints if k in STATIC_CONSTRAINTS]
    if not wanted:
        return {}
    from ..data import data_shape
    from ..snn import static_checks

    in_chans, frames = data_shape(cfg.data)  # event data: 2 channels, one time step per frame
    out = {}
    for key in wanted:
        if key == "params_m":
            out[key] = static_checks.param_count_m(cfg, in_chans=in_chans)
        else:
            out[key] = static_checks.activation_memory_estimate_gb(
                cfg.model.name, cfg.model.overrides(), cfg.data.img_size, cfg.data.batch_size,
                frames or cfg.model.time_steps, in_chans=in_chans)
    return out


def static_violation(cfg) -> tuple[str, float, str] | None:
    """(key, value, message) of the first static constraint the trial's config breaks."""
    for key, value in static_values(cfg).items():
        bound = cfg.sweep.constraints[key]
        if bound.violation(value) > 0:
            return key, value, f"{key}={value:.4g} outside [{bound.min}, {bound.max}]"
    return None
