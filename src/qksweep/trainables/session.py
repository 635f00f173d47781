"""What the training loop sees of where it runs: its rank, the world size, its device, the checkpoint to
resume from, and where each epoch's report goes. Two launch paths give it one:

- :func:`train_session`: a Ray Train worker (``TorchTrainer``: ``qksweep train``, ``continue``, and sweep
  trials of several workers or ``run.launcher: train``). Reports go to Train's controller, whose
  callbacks log to MLflow and forward to Tune.
- :class:`TuneSession`: the trial's own process, through Ray Tune's function API (``ray.tune.report``,
  ``ray.tune.get_checkpoint``), for one-worker trials. No Train controller, worker, synchronisation
  actor or placement-group cleaner is started; the same MLflow epoch logger runs in the trial process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .report import tune_result


@dataclass
class Session:
    rank: int
    world: int
    device: torch.device
    get_checkpoint: Callable[[], Any]
    report: Callable[[dict[str, Any], Any], None]  # (metrics, ray.train.Checkpoint or None)
    ray_train: bool = True  # DataLoaders are prepared by Ray Train (sampler, device transfer)
    checkpoint_root: Callable[[], str | None] = lambda: None  # the folder reports persist checkpoints into


def _train_checkpoint_root() -> str | None:
    import ray.train

    try:
        return ray.train.get_context().get_storage().experiment_fs_path
    except Exception:  # noqa: BLE001 - only used to name the folder and to clear a half-written copy
        return None


def _tune_checkpoint_root() -> str | None:
    import ray.tune

    try:
        return ray.tune.get_context().get_storage().trial_fs_path  # in run.storage (get_trial_dir is Ray's local copy)
    except Exception:  # noqa: BLE001 - as above
        return None


def train_session() -> Session:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    return Session(rank=ctx.get_world_rank(), world=ctx.get_world_size(), device=ray.train.torch.get_device(),
                   get_checkpoint=ray.train.get_checkpoint,
                   report=lambda metrics, checkpoint: ray.train.report(metrics, checkpoint=checkpoint),
                   checkpoint_root=_train_checkpoint_root)


@dataclass
class TuneSession:
    """A one-worker trial inside its Tune function trainable.

    Each report persists the checkpoint to the trial's folder (Tune's own storage, its ``CheckpointConfig``)
    and then, before Tune sees the result, hands the full metrics and the persisted checkpoint to
    ``after_persist`` (the MLflow epoch logger): Tune's function API blocks the training thread in
    ``report`` until the trial may go on, and ends the thread right there when the scheduler stops the
    trial, so anything after ``report`` would never run for an ASHA-stopped trial's last epoch. Tune gets
    the public metrics (no ``_``-keys) plus the trial's static figures."""

    gpus: float
    static: dict[str, Any] = field(default_factory=dict)
    after_persist: Callable[[dict[str, Any], Any], None] | None = None
    last_checkpoint: Any = None  # the last persisted checkpoint, for the run's close
    _full: dict[str, Any] | None = None

    def session(self) -> Session:
        import logging

        import ray.tune

        # Ray logs "Checkpoint successfully created at: ..." at INFO for every report: one line per epoch
        # between the epoch lines (on Ray Train the controller's logger is quieted the same way)
        logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)

        device = torch.device("cuda", 0) if self.gpus and torch.cuda.is_available() else torch.device("cpu")
        self._hook()
        return Session(rank=0, world=1, device=device, get_checkpoint=ray.tune.get_checkpoint,
                       report=self.report, ray_train=False, checkpoint_root=_tune_checkpoint_root)

    def _hook(self) -> None:
        # Ray's own report (auto-filled metrics, checkpoint index, persistence, artifact sync) runs as it
        # is; only its hand-over to Tune's main thread is preceded by the logger (Ray 2.60's _TrainSession)
        from ray.train._internal.session import get_session
        from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

        s = get_session()
        hand_over = s._report_training_result

        def logged_then_handed_over(result) -> None:
            if result.checkpoint is not None:
                self.last_checkpoint = result.checkpoint
                # as TuneReportCallback gives it for trials on Ray Train: the sweep callback closes a trial
                # Tune stopped (ASHA, max_t) with this checkpoint as the run's last
                result.metrics[CHECKPOINT_PATH_KEY] = result.checkpoint.path
            full, self._full = self._full, None  # only this report's: Tune's final RESULT_DUPLICATE has none
            if self.after_persist is not None and full is not None:
                self.after_persist(full, result.checkpoint)
            hand_over(result)

        s._report_training_result = logged_then_handed_over

    def report(self, metrics: dict[str, Any], checkpoint) -> None:
        import ray.tune

        self._full = metrics
        public = tune_result(self.static, metrics)
        tune_ckpt = ray.tune.Checkpoint(checkpoint.path) if checkpoint is not None else None
        ray.tune.report(public, checkpoint=tune_ckpt)
