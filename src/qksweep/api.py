"""The Python API. The ``qksweep`` command is a thin layer over these functions.

Every function accepts a YAML path, a dict or a :class:`~qksweep.config.Config`, plus ``-s``-style
override strings (``overrides=["optim.lr=3e-4"]``) and keyword overrides with ``__`` for dots
(``optim__lr=3e-4``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import Config, check_config, load_config
from .trainables.launcher import TrainResult, run_training


def resolve(config: "str | Path | dict[str, Any] | Config", overrides: list[str] | None = None, **kw: Any) -> Config:
    """Load, override and fully check a config (raises ConfigError with one line). Relative paths
    become absolute here, in the driver: Ray workers and Tune trials run in other directories."""
    return absolute_paths(check_config(load_config(config, overrides, **kw)))


def absolute_paths(cfg: Config) -> Config:
    cfg = cfg.model_copy(deep=True)
    if cfg.data.root and "://" not in cfg.data.root:
        cfg.data.root = str(Path(cfg.data.root).expanduser().resolve())
    if "://" not in cfg.run.storage:
        cfg.run.storage = str(Path(cfg.run.storage).expanduser().resolve())
    uri = cfg.tracking.uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////") and uri != "sqlite:///:memory:":
        cfg.tracking.uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).expanduser().resolve())
    return cfg


def train(config: "str | Path | dict[str, Any] | Config", overrides: list[str] | None = None, **kw: Any) -> TrainResult:
    """One training run through Ray Train, logged to MLflow as a run with no parent."""
    cfg = resolve(config, overrides, **kw)
    return run_training(cfg)


def sweep(config: "str | Path | dict[str, Any] | Config", overrides: list[str] | None = None, *,
          name: str | None = None, num_samples: int | None = None, **kw: Any):
    """A Tune sweep (Optuna + ASHA by default) with an MLflow parent run and one child per trial.
    Returns a :class:`~qksweep.orchestrator.sweep.SweepResult`."""
    from .orchestrator.sweep import run_sweep

    extra = list(overrides or [])
    if num_samples is not None:
        extra.append(f"sweep.num_samples={num_samples}")
    cfg = resolve(config, extra, **kw)
    return run_sweep(cfg, name=name)


def resume(name_or_path: str, *, storage: str | None = None):
    """Continue an interrupted sweep where it stopped (unfinished and errored trials resume)."""
    from .orchestrator.sweep import resume_sweep

    return resume_sweep(name_or_path, storage=storage)
