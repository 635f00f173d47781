"""Sweep budgets (``sweep.time_budget_s``, ``sweep.stop_at``, ``sweep.patience``): the sweep ends before
``num_samples`` when one is spent.

:class:`SweepBudget` is a Tune ``Stopper`` (Tune asks ``stop_all`` after every step and then stops every
trial and the searcher) and a Tune ``Callback`` (trial results and completions count towards
``stop_at`` and ``patience``). It is one object in both places, so it pickles once into the sweep's
state and a resumed sweep goes on counting with the same object. Tune closes the trials it stops this
way without any trial callback: :func:`close_after_budget` then closes their MLflow runs KILLED with the
reason and tells Optuna what they reached, and the sweep's state file records ``ended_by`` so that
``qksweep resume`` says the sweep is complete instead of starting it again.

``time_budget_s`` counts this driver's time: a sweep resumed after an interruption gets it afresh.
``patience`` counts trials that ended without an error (ASHA-stopped ones too): N of them in a row
without a better value of the first ``sweep.metric`` than the best so far ends the sweep.
"""

from __future__ import annotations

import math
import time
from typing import Any

from ray.tune import Callback
from ray.tune.stopper import Stopper

ENDED_BY = "qksweep.ended_by"


class SweepBudget(Stopper, Callback):
    def __init__(self, files, *, metric: str, mode: str, modes: dict[str, str], time_budget_s: float | None = None,
                 stop_at: dict[str, float] | None = None, patience: int | None = None):
        self.files = files  # the sweep's SweepFiles: its state file records why the sweep ended
        self.metric, self.mode, self.modes = metric, mode, modes
        self.time_budget_s, self.stop_at, self.patience = time_budget_s, dict(stop_at or {}), patience
        self.ended_by: str | None = None
        self._recorded = False
        self._started: float | None = None
        self._best: float | None = None
        self._trial_best: dict[str, float] = {}
        self._since_best = 0

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_started": None}  # a monotonic clock means nothing in another process

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A restored sweep unpickles its budget twice: Tune's stopper and the callback come back as two
        objects (one from ``tuner.pkl``, one from the experiment state), and each half of the bookkeeping
        (values noted by the stopper, trials counted by the callback) would go to a different one. Every
        copy of one sweep's budget in this process shares one state, merged from what each copy knew.
        A sweep extended after a budget ended it (``resume --num-samples``): its state file no longer says
        it ended, so the budgets count afresh."""
        key = str(state["files"].local)
        live = _LIVE.get(key)
        if live is None:
            self.__dict__.update(state)
            _LIVE[key] = self.__dict__
        else:
            _merge(live, state)
            self.__dict__ = live
        if self.ended_by is not None:
            try:
                still = ended_by(self.files)
            except (OSError, ValueError, KeyError):
                still = self.ended_by
            if still is None:
                self.ended_by, self._recorded, self._since_best = None, False, 0

    # ------------------------------------------------------------ Stopper

    def __call__(self, trial_id: str, result: dict) -> bool:
        self._note(trial_id, result)
        for key, threshold in self.stop_at.items():
            v = result.get(key)
            if self.ended_by is None and _number(v) and _reached(float(v), threshold, self.modes[key]):
                op = ">=" if self.modes[key] == "max" else "<="
                self.ended_by = (f"stop_at: {key} {op} {threshold:g} (trial {trial_id}: {float(v):.4g} at epoch "
                                 f"{int(result.get('epoch', 0))})")
        return False  # no single trial is stopped: stop_all ends them all

    def stop_all(self) -> bool:
        now = time.monotonic()
        if self._started is None:
            self._started = now
        if self.ended_by is None and self.time_budget_s is not None and now - self._started >= self.time_budget_s:
            self.ended_by = f"time_budget_s: {self.time_budget_s:g} s spent"
        if self.ended_by is not None and not self._recorded:
            record_ended_by(self.files, self.ended_by)
            self._recorded = True
        return self.ended_by is not None

    # ------------------------------------------------------------ Callback

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        if self.patience is None or self.ended_by is not None:
            return
        value = self._trial_best.get(trial.trial_id)
        if value is not None and (self._best is None or _better(value, self._best, self.mode)):
            self._best, self._since_best = value, 0
            return
        self._since_best += 1
        if self._since_best >= self.patience:
            best = "none" if self._best is None else f"{self._best:.4g}"
            self.ended_by = (f"patience: {self.patience} finished trials in a row without a better {self.metric} "
                             f"than {best}")

    def _note(self, trial_id: str, result: dict) -> None:
        v = result.get(self.metric)
        if _number(v):
            old = self._trial_best.get(trial_id)
            if old is None or _better(float(v), old, self.mode):
                self._trial_best[trial_id] = float(v)


# sweep folder -> the one state every unpickled copy of that sweep's budget shares (see __setstate__)
_LIVE: dict[str, dict[str, Any]] = {}


def _merge(live: dict[str, Any], other: dict[str, Any]) -> None:
    """What ``other`` knew, added to ``live``: each trial's best value, the sweep's best, the count."""
    mode = live["mode"]
    for tid, v in other.get("_trial_best", {}).items():
        old = live["_trial_best"].get(tid)
        if old is None or _better(v, old, mode):
            live["_trial_best"][tid] = v
    if other.get("_best") is not None and (live.get("_best") is None or _better(other["_best"], live["_best"], mode)):
        live["_best"] = other["_best"]
    live["_since_best"] = max(live.get("_since_best", 0), other.get("_since_best", 0))
    live["ended_by"] = live.get("ended_by") or other.get("ended_by")
    live["_recorded"] = live.get("_recorded") or other.get("_recorded")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _better(a: float, b: float, mode: str) -> bool:
    return a > b if mode == "max" else a < b


def _reached(v: float, threshold: float, mode: str) -> bool:
    return v >= threshold if mode == "max" else v <= threshold


def record_ended_by(files, reason: str) -> None:
    """``ended_by`` in the sweep's state file (written whole, so a kill never leaves half of it)."""
    import json
    import os

    from ..storage import STATE_FILE

    path = files.local / STATE_FILE
    state = json.loads(path.read_text())
    state["ended_by"] = reason
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)


def ended_by(files) -> str | None:
    import json

    from ..storage import STATE_FILE

    return json.loads((files.local / STATE_FILE).read_text()).get("ended_by")


def forget(files) -> None:
    """Before a restore: the copies unpickled from now on share a state of their own (not one an earlier
    restore of the same sweep in this process left)."""
    _LIVE.pop(str(files.local), None)


def reason_ended(files) -> str | None:
    """Why the sweep ended, after ``fit``: its state file's ``ended_by``, or what this process's budget
    decided (recorded now when no copy of it had recorded it yet)."""
    reason = ended_by(files)
    if reason is None:
        live = _LIVE.get(str(files.local))
        reason = live.get("ended_by") if live else None
        if reason is not None:
            record_ended_by(files, reason)
    return reason


def make_budget(cfg, files) -> SweepBudget | None:
    s = cfg.sweep
    if s.time_budget_s is None and not s.stop_at and s.patience is None:
        return None
    return SweepBudget(files, metric=s.metrics[0], mode=s.modes[0], modes=dict(zip(s.metrics, s.modes)),
                       time_budget_s=s.time_budget_s, stop_at=s.stop_at, patience=s.patience)


def close_after_budget(cfg, sweep: str, reason: str, study) -> tuple[int, int]:
    """What Tune's stop of every trial left open: trial runs still RUNNING are closed KILLED with the
    reason; Optuna trials still RUNNING are told PRUNED at what they reached (FAIL if they never
    reported). Returns (runs closed, study trials told)."""
    import optuna

    from ..tracking import runs

    closed = 0
    if cfg.tracking.enabled:
        c = runs.client(cfg.tracking.uri)
        exp = runs.experiment_id(c, cfg.experiment)
        found = runs.retrying(lambda: c.search_runs(
            [exp], filter_string=f"tags.`{runs.SWEEP}` = '{sweep}' and tags.`{runs.KIND}` = 'trial' "
                                 "and attributes.status = 'RUNNING'", max_results=10_000), what="run search")
        for r in found:
            logged = runs.logged_steps(c, r.info.run_id, "epoch")
            runs.finish_run(c, r.info.run_id, "KILLED", {"qksweep.stopped_by": "budget", ENDED_BY: reason,
                                                         "qksweep.stopped_at_epoch": str(max(logged) if logged else 0)})
            closed += 1
    told = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        state = optuna.trial.TrialState.PRUNED if t.intermediate_values else optuna.trial.TrialState.FAIL
        study.tell(t.number, state=state)
        told += 1
    return closed, told
