"""qksweep: sweeps of ViTs and QKFormers on Ray Tune, Optuna and MLflow.

    import qksweep
    res = qksweep.sweep("configs/digits_qkformer.yaml", num_samples=4)
    print(res.best_config, res.best_metrics, res.best_run_id)
"""

from .api import continue_trial, results, resume, sweep, train

__all__ = ["train", "sweep", "resume", "continue_trial", "results"]
