"""The Ray Train launch: a ``TorchTrainer`` over :func:`train_loop`, used by ``qksweep train``,
by every sweep trial and by ``qksweep continue``."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import Config, flatten
from ..storage import checkpoint_uri, join
from ..tracking import pending, runs
from ..tracking.callback import MLflowEpochLogger


class JobFailed(RuntimeError):
    """The job itself failed (exit code 1)."""


def storage_root(cfg: Config) -> str:
    """Ray Train wants an absolute path or a URI (``s3://``, ``gs://``: handed to Ray as it is)."""
    from ..storage import is_uri, local_path

    s = cfg.run.storage
    return s if is_uri(s) else local_path(s)


def run_dir(cfg: Config, run_name: str) -> str:
    """The Train run's folder (its checkpoints, and MLflow's pending file when the server is away)."""
    return join(storage_root(cfg), run_name)  # a URI keeps its ?endpoint_override=... after the path


def run_params(cfg: Config) -> dict[str, Any]:
    """Flattened config for MLflow params (the sweep section is the parent's business)."""
    d = mask_config(cfg.to_dict())
    d.pop("sweep", None)
    return flatten(d)


def make_trainer(cfg: Config, *, run_name: str, run_id: str | None, callbacks: list | None = None,
                 label: str = "", echo: bool = True, extra: dict[str, Any] | None = None,
                 resume_from: str | None = None):
    import ray.train

    from .entry import train_loop  # imports the loop (timm, SpikingJelly) only in the worker

    gpus = cfg.run.gpus_per_worker
    resources = {"CPU": cfg.run.cpus_per_worker}
    if gpus:
        resources["GPU"] = gpus
    metric, mode = cfg.sweep.metrics[0], cfg.sweep.modes[0]
    cbs = list(callbacks or [])
    if run_id and cfg.tracking.enabled:
        cbs.insert(0, MLflowEpochLogger(cfg.tracking.uri, run_id, metric=metric, mode=mode,
                                        epochs=cfg.optim.epochs, label=label, echo=echo,
                                        run_dir=run_dir(cfg, run_name)))
    run_config = ray.train.RunConfig(
        name=run_name,
        storage_path=storage_root(cfg),
        failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints,
                                                     checkpoint_score_attribute=metric,
                                                     checkpoint_score_order=mode),
        callbacks=cbs,
        logging_config=ray.train.LoggingConfig(log_level="WARNING"),
    )
    loop_config = {"config": cfg.to_dict(), "run_id": run_id, "tracking_uri": cfg.tracking.uri if run_id else None}
    if resume_from:  # Train V2: the loop loads it when the run has no checkpoint of its own yet
        loop_config["resume_from"] = resume_from
    loop_config.update(extra or {})
    trainer_cls, backend = trainer_class(cfg.run.workers, gpus)
    return without_ray_data(trainer_cls)(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.run.workers, use_gpu=gpus > 0,
                                               resources_per_worker=resources),
        run_config=run_config,
        **backend,
    )


def trainer_class(workers: int, gpus: float) -> tuple[type, dict[str, Any]]:
    """``TorchTrainer`` (process group: gloo on CPU, NCCL on GPU) for several workers or any GPU; for one
    CPU worker, its base class ``DataParallelTrainer`` with Ray's plain backend.

    A single CPU worker has nothing to synchronise: the loop never calls ``torch.distributed`` when the
    world size is 1. ``TorchConfig`` would still set up a one-member gloo group, and, because its module
    imports torch, whichever process unpickles it imports torch: the trial driver (to build the trainer)
    and the Train controller (to run the backend), ~1.4-1.7 s of CPU each, both on the path to the
    trial's first step. The worker runs the same ``train_loop`` either way."""
    if workers == 1 and not gpus:
        from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

        return DataParallelTrainer, {}
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer, {"torch_config": TorchConfig(backend="nccl" if gpus > 0 else "gloo")}


def without_ray_data(trainer_cls):
    """``trainer_cls`` minus Ray Data's ``DatasetsCallback`` when the trainer is given no Ray Datasets
    (qksweep never gives it any: the loop builds its own tensors or DataLoaders).

    That callback starts a ``DatasetManager`` actor for every Train run (one more Python process,
    importing Ray Data and pyarrow) and ships Ray Data's context to each worker, whose unpickling
    imports Ray Data there too, between the worker's start and its first step. With datasets, or on
    a Ray whose trainer has no such hook, the class is returned unchanged."""
    try:
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    except ImportError:
        return trainer_cls
    if not hasattr(trainer_cls, "_create_default_callbacks"):
        return trainer_cls

    class Trainer(trainer_cls):
        def _create_default_callbacks(self):
            cbs = super()._create_default_callbacks()
            if getattr(self, "datasets", None):
                return cbs
            return [cb for cb in cbs if not isinstance(cb, DatasetsCallback)]

    Trainer.__name__ = Trainer.__qualname__ = trainer_cls.__name__
    return Trainer


def log_config_artifact(cfg: Config, run_id: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "config.yaml"
        p.write_text(yaml.safe_dump(mask_config(cfg.to_dict()), sort_keys=False))
        runs.log_artifact_file(cfg.tracking.uri, run_id, p)


def mask_config(d: dict[str, Any]) -> dict[str, Any]:
    d = dict(d)
    if "tracking" in d:
        d["tracking"] = {**d["tracking"], "uri": runs.mask_secrets(d["tracking"]["uri"])}
    if isinstance(d.get("run"), dict) and isinstance(d["run"].get("storage"), str):  # s3://KEY:SECRET@bucket
        d["run"] = {**d["run"], "storage": runs.mask_secrets(d["run"]["storage"])}
    return d


@dataclass
class TrainResult:
    run_id: str | None
    run_name: str
    metrics: dict[str, Any]
    checkpoint_path: str | None
    storage_path: str
    history: list[dict[str, Any]] = field(default_factory=list)


def default_run_name(cfg: Config) -> str:
    return f"{cfg.experiment}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_training(cfg: Config, *, run_name: str | None = None, tags: dict[str, str] | None = None,
                 resume_from: str | None = None) -> TrainResult:
    """One ``qksweep train``: an MLflow run with no parent, found again by its run name."""
    from ..cluster.connect import ensure_ray
    from ..storage import probe

    name = run_name or cfg.run.name or default_run_name(cfg)
    probe(cfg.run.storage)  # a missing or unreachable bucket: one line, before the MLflow run
    run_id = None
    c = None
    if cfg.tracking.enabled:
        c = runs.client(cfg.tracking.uri)
        exp = runs.experiment_id(c, cfg.experiment)
        run_id, created = runs.get_or_create_run(c, exp, {runs.KIND: "train", runs.RUN_NAME: name},
                                                 run_name=name, params=run_params(cfg))
        if tags:
            runs.set_tags(c, run_id, tags)
        if created:
            log_config_artifact(cfg, run_id)
        pending.restarted(run_dir(cfg, name))
    ensure_ray()
    trainer = make_trainer(cfg, run_name=name, run_id=run_id, resume_from=resume_from)
    try:
        result = trainer.fit()
    except KeyboardInterrupt:
        if c:
            close_run(cfg, run_id, name, "KILLED", tags={"qksweep.stopped_by": "user"}, wait_s=5)
        raise
    except Exception as e:  # noqa: BLE001 - Ray wraps worker errors; report their first line
        msg = first_line(e)
        if c:
            close_run(cfg, run_id, name, "FAILED", tags={"qksweep.error": msg})
        raise JobFailed(f"training failed: {msg}") from e
    if c:
        close_run(cfg, run_id, name, "FINISHED", checkpoint=checkpoint_uri(storage_root(cfg), result.checkpoint))
    metrics = {k: v for k, v in (result.metrics or {}).items() if not k.startswith("_")}
    return TrainResult(run_id=run_id, run_name=name, metrics=metrics,
                       checkpoint_path=checkpoint_uri(storage_root(cfg), result.checkpoint),
                       storage_path=join(storage_root(cfg), name))


def close_run(cfg: Config, run_id: str, run_name: str, status: str, *, tags: dict[str, str] | None = None,
              checkpoint: str | None = None, wait_s: float | None = None, label: str = "",
              resume_hint: str | None = None, if_running: bool = False) -> bool:
    """Send what the run's pending file holds, then close the run (FINISHED: with its last checkpoint and
    learning curves). If MLflow stays away (``QKSWEEP_MLFLOW_END_WAIT_S``, 30 s), both stay in the pending
    file and stderr says what is missing and where it is: the job itself still ends normally."""
    close = pending.close_record(cfg.tracking.uri, run_id, status, tags=tags, checkpoint=checkpoint,
                                 finalize=status == "FINISHED", if_running=if_running)
    return pending.finish(cfg.tracking.uri, run_id, run_dir(cfg, run_name), close, wait_s=wait_s, label=label,
                          resume_hint=resume_hint)


def first_line(e: BaseException) -> str:
    """The innermost error's first line (Ray wraps worker exceptions several times)."""
    seen = e
    while seen.__cause__ is not None:
        seen = seen.__cause__
    text = str(seen).strip() or type(seen).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):  # the last line of a remote traceback holds "ErrType: message"
        if ":" in ln and not ln.startswith(("File ", "Traceback")):
            return runs.mask_secrets(ln)[:500]
    return runs.mask_secrets(lines[0] if lines else type(seen).__name__)[:500]
