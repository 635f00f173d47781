"""Sweep-level artifacts on the parent run: the results table and Optuna's plots.

Called as trials finish and once at the end of a sweep; each call overwrites the previous files,
so the parent run always shows the current state. PNGs come from ``optuna.visualization.matplotlib``;
interactive HTML (plotly.js embedded, viewable offline) is added when ``plotly`` is installed.
A plot that cannot be drawn (too few trials or params, importance evaluator failing) is skipped with
a log line; nothing here ever fails the sweep it documents.
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
import warnings
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from . import browse, runs

log = logging.getLogger("qksweep.tracking")

PLOTS_DIR = "plots"
RESULTS_FILE = "results.csv"


def have_plotly() -> bool:
    return importlib.util.find_spec("plotly") is not None


def write_sweep_artifacts(uri: str, parent_run_id: str, study=None, trials_df=None, *,
                          strict: bool = False) -> list[PurePosixPath]:
    """Log ``results.csv`` and (given an Optuna ``study``) ``plots/optuna_*.png|html`` to the parent run.

    ``trials_df`` defaults to :func:`~qksweep.tracking.browse.list_trials` of the parent's sweep.
    Returns the artifact paths logged, relative to the parent run's artifact root. Errors (MLflow
    away, a broken table) are logged and skipped unless ``strict``: a sweep never fails on its plots.
    """
    logged: list[PurePosixPath] = []
    c = runs.client(uri)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        try:
            if trials_df is None:
                trials_df = _trials_of(c, uri, parent_run_id)
            if trials_df is not None:
                csv = root / RESULTS_FILE
                csv.write_text(browse.format_trials(trials_df, "csv"))
                runs.log_artifact_file(uri, parent_run_id, csv)
                logged.append(PurePosixPath(RESULTS_FILE))
        except Exception as e:  # noqa: BLE001
            if strict:
                raise
            log.warning("could not log %s to sweep run %s: %s", RESULTS_FILE, parent_run_id, _first(e))
        if study is not None:
            plots = root / PLOTS_DIR
            plots.mkdir()
            try:
                files = study_plots(study, plots)
                if files:
                    runs.log_artifact_dir(uri, parent_run_id, plots, PLOTS_DIR)
                    logged += [PurePosixPath(PLOTS_DIR) / f.name for f in files]
            except Exception as e:  # noqa: BLE001
                if strict:
                    raise
                log.warning("could not log Optuna plots to sweep run %s: %s", parent_run_id, _first(e))
    return logged


def _trials_of(c, uri: str, parent_run_id: str):
    parent = runs.retrying(lambda: c.get_run(parent_run_id), what="run lookup")
    sweep = parent.data.tags.get(browse.SWEEP)
    if not sweep:
        log.warning("run %s is not a sweep parent (no %s tag): no results.csv", parent_run_id, browse.SWEEP)
        return None
    found = browse.trial_runs(c, uri, exp_ids=[parent.info.experiment_id], sweep=sweep)
    return browse.trials_frame(c, found, parallel=browse.is_http(uri))


def _usable(study) -> list:
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return [t for t in study.get_trials(deepcopy=False) if t.state in states]


def study_plots(study, out: Path) -> list[Path]:
    """Draw the study's plots into ``out``; returns the files written (none with < 2 usable trials)."""
    usable = _usable(study)
    if len(usable) < 2:
        log.info("study %s has %d complete/pruned trials: no Optuna plots yet", study.study_name, len(usable))
        return []
    import optuna.visualization.matplotlib as vm

    html = have_plotly()
    if html:
        import optuna.visualization as vp
    multi = len(study.directions) > 1
    params = sorted({k for t in usable for k in t.params})
    jobs: list[tuple[str, Callable[..., Any], Callable[..., Any] | None]] = []
    if multi:
        if len(study.directions) in (2, 3):
            jobs.append(("pareto_front", vm.plot_pareto_front, vp.plot_pareto_front if html else None))
        else:
            log.info("study has %d objectives: no Pareto front plot", len(study.directions))
    else:
        jobs.append(("optimization_history", vm.plot_optimization_history, vp.plot_optimization_history if html else None))
        if any(t.intermediate_values for t in usable):
            jobs.append(("intermediate_values", vm.plot_intermediate_values, vp.plot_intermediate_values if html else None))
        if len(params) >= 2:
            jobs.append(("param_importances", vm.plot_param_importances, vp.plot_param_importances if html else None))
            jobs.append(("parallel_coordinate", vm.plot_parallel_coordinate, vp.plot_parallel_coordinate if html else None))
        if params:
            jobs.append(("slice", vm.plot_slice, vp.plot_slice if html else None))
    written: list[Path] = []
    for name, mpl_fn, plotly_fn in jobs:
        written += _draw(name, study, mpl_fn, plotly_fn, out)
    return written


def _draw(name: str, study, mpl_fn, plotly_fn, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    stem = f"optuna_{name}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna's ExperimentalWarning on every matplotlib plot
        try:
            ax = mpl_fn(study)
            fig = _figure(ax)
            panels = len(fig.axes) - 1 if name == "slice" else 1  # slice: one panel per param + a colorbar
            fig.set_size_inches(max(7.0, 3.6 * panels + 1.0), 4.8)
            fig.savefig(out / f"{stem}.png", dpi=90, bbox_inches="tight")
            files.append(out / f"{stem}.png")
        except Exception as e:  # noqa: BLE001 - too few distinct values, importance evaluator errors, ...
            log.warning("skipped Optuna plot %s: %s", name, _first(e))
        finally:
            plt.close("all")
        if plotly_fn is not None:
            try:
                plotly_fn(study).write_html(str(out / f"{stem}.html"), include_plotlyjs=True, full_html=True)
                files.append(out / f"{stem}.html")
            except Exception as e:  # noqa: BLE001
                log.warning("skipped Optuna HTML plot %s: %s", name, _first(e))
    return files


def _figure(ax):
    import numpy as np

    first = np.asarray(ax, dtype=object).flat[0]
    return first.figure


def _first(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]
