"""The Ray Train launch: builds the ``TorchTrainer`` over :func:`train_loop` that ``qksweep train``
(``train.py``), sweep trials on Ray Train (``trial.py``) and ``qksweep continue`` fit. Opening and
closing their MLflow runs is ``tracking/lifecycle.py``'s."""

from __future__ import annotations

from typing import Any

from ..config import Config
from ..storage import join, storage_root
from ..tracking.callback import MLflowEpochLogger


def make_trainer(cfg: Config, *, run_name: str, run_id: str | None, callbacks: list | None = None,
                 label: str = "", echo: bool = True, extra: dict[str, Any] | None = None,
                 resume_from: str | None = None, storage_path: str | None = None, seed_runs: list[str] | None = None,
                 run_dir: str | None = None):
    """The trainer of Train run ``run_name`` in ``storage_path`` (default ``run.storage``); its MLflow pending
    file lives in ``run_dir`` (default the Train run's folder)."""
    import ray.train

    from .entry import train_loop  # imports the loop (timm, SpikingJelly) only in the worker

    gpus = cfg.run.gpus_per_worker
    resources = {"CPU": cfg.run.cpus_per_worker}
    if gpus:
        resources["GPU"] = gpus
    metric, mode = cfg.sweep.metrics[0], cfg.sweep.modes[0]
    storage_path = storage_path or storage_root(cfg)
    cbs = list(callbacks or [])
    if run_id and cfg.tracking.enabled:
        from .model_log import on_last_epoch

        cbs.insert(0, MLflowEpochLogger(cfg.tracking.uri, run_id, metric=metric, mode=mode,
                                        epochs=cfg.optim.epochs, label=label, echo=echo,
                                        run_dir=run_dir or join(storage_path, run_name),
                                        on_last_epoch=on_last_epoch(cfg, run_id, label), seed_runs=seed_runs))
    run_config = ray.train.RunConfig(
        name=run_name,
        storage_path=storage_path,
        failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoints_kept(),
                                                     checkpoint_score_attribute=metric,
                                                     checkpoint_score_order=mode),
        callbacks=cbs,
        logging_config=ray.train.LoggingConfig(log_level="WARNING"),
    )
    trainer_cls, backend = trainer_class(cfg.run.workers, gpus)
    return without_ray_data(trainer_cls)(
        train_loop,
        train_loop_config=loop_config(cfg, resume_from=resume_from, extra={**(extra or {}), "run_id": run_id}),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.run.workers, use_gpu=gpus > 0,
                                               resources_per_worker=resources),
        run_config=run_config,
        **backend,
    )


def loop_config(cfg: Config, *, resume_from: str | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``train_loop`` is handed. The loop never writes to MLflow (what it publishes travels with its
    reports); it may read a teacher run."""
    out: dict[str, Any] = {"config": cfg.to_dict(), "tracking_uri": cfg.tracking.uri}
    if resume_from:  # the loop loads it when the run has no checkpoint of its own yet
        out["resume_from"] = resume_from
    out.update(extra or {})
    return out


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
