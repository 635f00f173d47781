"""qksweep: sweeps of ViTs and QKFormers on Ray Tune, Optuna and MLflow.

    import qksweep
    res = qksweep.sweep("configs/digits_qkformer.yaml", num_samples=4)
    print(res.best_config, res.best_metrics, res.best_run_id)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["train", "sweep", "resume", "continue_trial", "results"]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qksweep")
    except PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
        return "0+unknown"


__version__ = _version()

if TYPE_CHECKING:
    from .api import continue_trial, results, resume, sweep, train


def __getattr__(name: str) -> Any:
    # Lazy (PEP 562): a Ray Train worker imports qksweep.trainables.loop, and an eager
    # ``from .api import ...`` here would drag the launcher, MLflow and pandas into every worker
    # process before its first step.
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'qksweep' has no attribute {name!r}")
