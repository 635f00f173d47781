"""``qksweep train``: one Train run with its own MLflow run (no parent), found again by its run name,
so the same name continues from its last checkpoint."""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config
from ..console import train_console
from ..storage import checkpoint_uri, join, run_dir, storage_root
from ..tracking import runs
from ..tracking.lifecycle import TrackedRun, close_run, config_file, open_run, run_params
from .launcher import make_trainer


class JobFailed(RuntimeError):
    """The job itself failed (exit code 1)."""


@dataclass
class TrainResult:
    run_id: str | None
    run_name: str
    metrics: dict[str, Any]
    checkpoint_path: str | None
    storage_path: str
    history: list[dict[str, Any]] = field(default_factory=list)


def _log_path(cfg: Config, name: str) -> Path:
    """``train.log`` in the run's folder (for a bucket ``run.storage``, in the local cache)."""
    from ..console import TRAIN_LOG
    from ..storage import cache_root, is_uri

    base = cache_root() / "runs" / name if is_uri(cfg.run.storage) else Path(run_dir(cfg, name))
    return base / TRAIN_LOG


def default_run_name(cfg: Config) -> str:
    return f"{cfg.experiment}-{time.strftime('%Y%m%d-%H%M%S')}"


@contextmanager
def _caller_sigint_kept():
    """Train V2's ``fit`` on the main thread installs a SIGINT handler that holds its controller's handle,
    and leaves it there: the TrainController actor (a Python process) outlived every ``api.train`` of a
    notebook, and a later Ctrl-C there went to a finished run. The caller's handler goes back once fit ends,
    and with it the last reference to the controller, which Ray then stops."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_training(cfg: Config, *, run_name: str | None = None, tags: dict[str, str] | None = None,
                 resume_from: str | None = None) -> TrainResult:
    """One ``qksweep train``: open (or find) its MLflow run, fit the trainer, close the run with how it ended."""
    from ..checks import check_reachable, prepare_inputs
    from ..cluster.connect import ensure_ray
    from ..storage import probe

    name = run_name or cfg.run.name or default_run_name(cfg)
    check_reachable(cfg)  # a cluster or tracking server that does not answer: one line, before Ray or MLflow
    probe(cfg.run.storage)  # a missing or unreachable bucket: one line, before the MLflow run
    prepare_inputs(cfg)  # downloads asked for, event data integrated to frames: before the MLflow run
    run: TrackedRun | None = None
    if cfg.tracking.enabled:
        from ..models import run_neuron_params

        print(f"train {name}: MLflow {runs.mask_secrets(cfg.tracking.uri)}, experiment {cfg.experiment}")

        neuron_params, neuron_tags = run_neuron_params(cfg.model)
        run = open_run(cfg.tracking.uri, cfg.experiment, {runs.KIND: "train", runs.RUN_NAME: name}, run_name=name,
                       params=run_params(cfg, neuron_params), folder=run_dir(cfg, name),
                       tags={**neuron_tags, **(tags or {})}, files=config_file(cfg))
    ensure_ray()
    trainer = make_trainer(cfg, run_name=name, run_id=run and run.run_id, resume_from=resume_from,
                           extra={"progress": True, "progress_label": name})
    try:
        with _caller_sigint_kept(), train_console(_log_path(cfg, name)):  # epochs; a bar on a terminal
            result = trainer.fit()
    except KeyboardInterrupt:
        if run:
            close_run(run, "KILLED", tags={"qksweep.stopped_by": "user"}, wait_s=5)
        raise
    except Exception as e:  # noqa: BLE001 - Ray wraps worker errors; report their first line
        msg = runs.first_line(e)
        if run:
            close_run(run, "FAILED", tags={"qksweep.error": msg})
        raise JobFailed(f"training failed: {msg}") from e
    checkpoint = checkpoint_uri(storage_root(cfg), result.checkpoint)
    if run:
        close_run(run, "FINISHED", checkpoint=checkpoint)
    metrics = {k: v for k, v in (result.metrics or {}).items() if not k.startswith("_")}
    return TrainResult(run_id=run and run.run_id, run_name=name, metrics=metrics, checkpoint_path=checkpoint,
                       storage_path=join(storage_root(cfg), name))
