"""A sweep's results as one object: its parent run, the trials table and the best trial.

What ``qksweep.api.results(...)`` and ``qksweep runs SWEEP`` / ``qksweep best SWEEP`` show. Reads
MLflow only (see :mod:`qksweep.tracking.browse`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from ..tracking import browse


@dataclass
class SweepResults:
    sweep: str
    parent_run_id: str
    experiment_id: str
    status: str
    metric: str
    mode: str
    trials: pd.DataFrame
    best: dict[str, Any] | None = None
    counts: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        """A few lines: the sweep, trial counts by status, the best trial."""
        counts = ", ".join(f"{n} {s}" for s, n in self.counts.items()) or "no trials"
        lines = [f"sweep '{self.sweep}' ({self.status}, parent run {self.parent_run_id}): {len(self.trials)} trials: {counts}"]
        if self.best is not None:
            params = ", ".join(f"{k}={v}" for k, v in self.best["params"].items())
            lines.append(f"best: trial {self.best['trial_id']} (run {self.best['run_id']}) "
                         f"{self.metric} {self.best['value']:.4g} at epoch {self.best['best_epoch']}"
                         + (f"  [{params}]" if params else ""))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        best = None if self.best is None else {k: v for k, v in self.best.items() if k not in ("all_params",)}
        return browse._plain({
            "sweep": self.sweep, "parent_run_id": self.parent_run_id, "experiment_id": self.experiment_id,
            "status": self.status, "metric": self.metric, "mode": self.mode, "counts": self.counts,
            "best": best, "trials": browse.records(self.trials),
        })


def sweep_results(uri: str, sweep: str, *, experiment: str | None = None, sort: str | None = None,
                  limit: int | None = None, metric: str | None = None) -> SweepResults:
    """The sweep's parent, its trials (sorted best first unless ``sort`` says otherwise) and its best trial."""
    from .export import ExportError, best_trial

    parent = browse.find_sweep_parent(uri, sweep, experiment)
    df = browse.list_trials(uri, experiment=experiment, sweep=sweep, sort=sort, metric=metric,
                            limit=limit if sort is not None else None)
    modes = df.attrs.get("modes") or {}
    if metric is None:
        metric, mode = next(iter(modes.items()), browse.metric_and_mode(parent))
    else:
        mode = modes.get(metric) or browse.guess_mode(metric)
    if sort is None and f"best {metric}" in df.columns:
        df = browse._sorted(df, f"best {metric}", mode == "max")
        df = (df.head(limit) if limit is not None else df).reset_index(drop=True)
    try:
        best = best_trial(uri, sweep, metric=metric, experiment=experiment)
    except ExportError:
        best = None
    counts = df["status"].value_counts().to_dict() if len(df) else {}
    return SweepResults(sweep=sweep, parent_run_id=parent.info.run_id, experiment_id=parent.info.experiment_id,
                        status=browse.status_of(parent), metric=metric, mode=mode, trials=df, best=best,
                        counts={str(k): int(v) for k, v in counts.items()})
