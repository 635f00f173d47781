"""Optuna searcher and Tune schedulers built from ``sweep.searcher`` / ``sweep.scheduler``."""

from __future__ import annotations

import logging
import math
from typing import Any

import optuna
from ray.tune.schedulers import (ASHAScheduler, FIFOScheduler, HyperBandScheduler, MedianStoppingRule,
                                 TrialScheduler)
from ray.tune.search.optuna import OptunaSearch

from ..config import Bound, Config
from ..names import METRIC_MODES, MLFLOW_RUN_ID
from ..search_spaces import ParamSpec, make_define_by_run

log = logging.getLogger("qksweep.searcher")

TUNE_TRIAL_ATTR = "tune_trial_id"  # user attribute of each Optuna trial: its Tune trial id
DEAD_CONSTRAINT = "firing_rate"  # the Optuna constraint a trial stopped by sweep.stop_on.firing_rate violates


SAMPLER_CLASSES = {"tpe": "TPESampler", "random": "RandomSampler", "cmaes": "CmaEsSampler", "gp": "GPSampler",
                   "nsga2": "NSGAIISampler", "qmc": "QMCSampler", "grid": "GridSampler"}
# arguments qksweep gives itself: from sweep.searcher.seed, the space, or the sweep's own needs
OWN_ARGUMENTS = {"seed", "search_space"}


def sampler_name(cfg: Config) -> str:
    s = cfg.sweep.searcher
    if s.name == "random" or cfg.sweep.scheduler.population_based:  # PBT's first population is random
        return "random"  # `searcher: {name: random}` is random search too
    return s.sampler


def sampler_kwargs(cfg: Config, specs: list[ParamSpec]) -> dict[str, Any]:
    """What the sampler is built with: qksweep's defaults, then ``n_startup_trials``, then ``options``."""
    s, name = cfg.sweep.searcher, sampler_name(cfg)
    kw: dict[str, Any] = {"seed": s.seed}
    if name == "tpe":
        # constraints reach TPE/NSGA-II through Trial.set_constraint (Optuna 5), see HonestOptunaSearch
        kw.update(multivariate=True, constant_liar=True)
    if name == "cmaes":
        kw.update(warn_independent_sampling=False)
    if name == "grid":
        kw["search_space"] = {sp.key: sp.values() for sp in specs}
    if s.n_startup_trials and name in ("tpe", "gp"):
        kw["n_startup_trials"] = s.n_startup_trials
    kw.update(s.options)
    return kw


def make_sampler(cfg: Config, specs: list[ParamSpec] | None = None) -> optuna.samplers.BaseSampler:
    """The Optuna sampler of a config that passed :func:`qksweep.checks.check_sweep`."""
    name = sampler_name(cfg)
    cls = PicklableNSGAIISampler if name == "nsga2" else getattr(optuna.samplers, SAMPLER_CLASSES[name])
    return cls(**sampler_kwargs(cfg, specs or []))


class PicklableNSGAIISampler(optuna.samplers.NSGAIISampler):
    """NSGA-II that Tune can pickle into the sweep's state. Optuna 5.1's genetic samplers keep a
    ``threading.Lock`` for their generation cache and no ``__getstate__``, so saving the Tuner failed
    with ``cannot pickle '_thread.lock' object``. The lock is made anew on unpickling and the cache
    (derived from the study) is read again."""

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_thread_lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        import threading

        self.__dict__.update(state)
        if "_cached_study_id" in state:  # Optuna >= 5.1: the generation cache and its lock
            self._thread_lock = threading.Lock()
            self._cached_study_id = None


class HonestOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna the truth about early-stopped trials.

    Ray's OptunaSearch reports intermediate values at Tune's ``training_iteration`` and tells a trial
    that ASHA stopped as COMPLETE with its truncated score, so TPE would treat a 1-epoch score as a
    finished run's. Here intermediate values are reported at the trial's own ``epoch`` (a restored
    trial keeps its fidelity), and a trial that ended before ``max_epochs`` without an error is told
    as PRUNED: TPE then ranks it by its last intermediate value at that step, below the complete ones.
    """

    def __init__(self, *args, max_epochs: int, constraints: dict | None = None, dead: Any = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self._max_epochs = max_epochs
        self._constraints = constraints or {}
        self._dead = dead  # sweep.stop_on.firing_rate: the band outside which a network counts as dead
        self._last_epoch: dict[str, int] = {}
        self._reported_epoch: dict[str, int] = {}  # last step told to Optuna per trial

    def _setup_study(self, mode):
        super()._setup_study(mode)
        names = self._metric if isinstance(self._metric, list) else [self._metric]
        if self._ot_study.metric_names is None and all(names):
            import warnings

            try:  # Optuna's plots and dashboards then label the axes with the metrics, not "Objective 0"
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # ExperimentalWarning
                    self._ot_study.set_metric_names(list(names))
            except Exception:  # noqa: BLE001 - labels only
                pass

    def suggest(self, trial_id: str):
        """Ray's suggest, plus the Tune trial id on the Optuna trial: `qksweep resume` fails the study's
        trials whose Tune trial the restored sweep does not know (orchestrator/orphans.py)."""
        out = super().suggest(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None:
            ot_trial.set_user_attr(TUNE_TRIAL_ATTR, trial_id)
            from ..kill_points import kill_point

            kill_point("optuna_trial")
        return out

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        epoch = result.get("epoch")
        if epoch is not None:
            self._last_epoch[trial_id] = int(epoch)
        self._link_run(trial_id, result)
        if isinstance(self.metric, list) or trial_id in self._completed_trials or epoch is None:
            return
        ot_trial = self._ot_trials.get(trial_id)
        value = result.get(self.metric)
        if ot_trial is None or value is None:
            return
        if self._reported_epoch.get(trial_id, -1) >= int(epoch):  # the last result comes again with on_trial_complete
            return
        try:
            ot_trial.report(float(value), int(epoch))
            self._reported_epoch[trial_id] = int(epoch)
        except (NotImplementedError, RuntimeError, ValueError) as e:  # intermediate values only feed pruned trials' ranking
            log.warning("Optuna did not take trial %s's epoch %s: %s", trial_id, epoch, e)

    def _link_run(self, trial_id: str, result: dict) -> None:
        """The trial's MLflow run id on its Optuna trial (from optuna-dashboard to the run), once."""
        run_id = result.get(MLFLOW_RUN_ID)
        ot_trial = self._ot_trials.get(trial_id)
        linked = self.__dict__.setdefault("_linked", set())  # absent in a searcher pickled before it existed
        if not run_id or ot_trial is None or trial_id in linked:
            return
        try:
            ot_trial.set_user_attr(MLFLOW_RUN_ID, str(run_id))
            linked.add(trial_id)
        except Exception as e:  # noqa: BLE001 - a link for people; never fail the sweep for it
            log.warning("could not record trial %s's MLflow run on its Optuna trial: %s", trial_id, e)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        if self._ot_study._storage.get_trial(ot_trial._trial_id).state.is_finished():
            # told before the driver was killed, and Tune's state saved before that: Optuna refuses a second tell
            self._completed_trials.add(trial_id)
            return
        if result and not error:
            self.on_trial_result(trial_id, result)  # Tune hands the result that stopped a trial only here
        epoch = int((result or {}).get("epoch", self._last_epoch.get(trial_id, 0)))
        stopped_early = not error and result is not None and epoch < self._max_epochs
        dead = self.dead_violation(result or {}) if not error else None
        try:
            for key, value in zip(self._constraints, self.constraint_values(result or {})):
                ot_trial.set_constraint(key, value)
            ot_trial.set_user_attr("epochs", epoch)
            ot_trial.set_user_attr("stopped_early", stopped_early)
            if dead is not None:
                # a dead network is infeasible, not merely pruned: TPE ranks it below every feasible trial,
                # NSGA-II's constrained domination below every feasible one (it reads COMPLETE trials only,
                # so a multi-objective trial is told with its last values)
                ot_trial.set_constraint(DEAD_CONSTRAINT, dead)
                ot_trial.set_user_attr("stopped_by", "firing_rate")
                if isinstance(self.metric, list):
                    values = [float(result[m]) for m in self.metric]
                    self._ot_study.tell(ot_trial, values)
                else:
                    self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.PRUNED)
                self._completed_trials.add(trial_id)
                return
            if stopped_early:
                # Value recorded with its fidelity as a user attr; the state says it did not finish.
                self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.PRUNED)
                self._completed_trials.add(trial_id)
                return
        except Exception as e:  # noqa: BLE001 - fall back to Ray's handling (error, missing value)
            log.warning("Optuna did not take trial %s's end as qksweep tells it (%s); Ray's OptunaSearch tells it instead",
                        trial_id, str(e).splitlines()[0] if str(e) else type(e).__name__)
        super().on_trial_complete(trial_id, result, error)

    def dead_violation(self, result: dict) -> float | None:
        """How far a trial the firing-rate rule stopped was outside the band (> 0), or None."""
        if self._dead is None or result.get("stopped_by") != "firing_rate":
            return None
        rate = result.get("snn/firing_rate")
        band = Bound(min=self._dead.low, max=self._dead.high)
        gap = band.violation(float(rate)) if isinstance(rate, (int, float)) else 1.0
        return max(gap, 1e-6)  # the rule fired, so the trial is infeasible however close the last rate was

    def constraint_values(self, result: dict) -> list[float]:
        """One value per constraint, > 0 when violated; a trial rejected before launch (static
        constraint, no result) counts as violating all of them."""
        out = []
        for key, bound in self._constraints.items():
            v = result.get(key)
            out.append(bound.violation(float(v)) if isinstance(v, (int, float)) else 1.0)
        return out


# sweep name -> the Optuna database URL on this machine (set by `qksweep resume`, see SweepStudyStorage)
_RELOCATED: dict[str, str] = {}


class SweepStudyStorage(optuna.storages.RDBStorage):
    """The sweep's Optuna study (SQLite). Tune pickles the searcher, with this storage and its URL, into
    the sweep's state; a sweep resumed on another machine, or from another cache folder, keeps its
    working copy elsewhere, so unpickling opens the URL registered for the sweep by :func:`relocate_study`."""

    def __init__(self, url: str, *, sweep: str):
        super().__init__(url)
        self.sweep = sweep

    def __setstate__(self, state: dict) -> None:
        url = _RELOCATED.get(state.get("sweep", ""))
        super().__setstate__({**state, "url": url} if url else state)


def relocate_study(sweep: str, url: str) -> None:
    _RELOCATED[sweep] = url


def make_searcher(cfg: Config, specs: list[ParamSpec], storage: "optuna.storages.BaseStorage | None", *,
                  study_name: str = "qksweep") -> HonestOptunaSearch:
    """The sweep's searcher; its study is named after the sweep (one study per ``optuna.db``: readers
    load it with ``study_name=None``, which also opens a sweep's from before, named ``qksweep``)."""
    metrics, modes = cfg.sweep.metrics, cfg.sweep.modes
    return HonestOptunaSearch(
        space=make_define_by_run(specs),
        metric=metrics if len(metrics) > 1 else metrics[0],
        mode=modes if len(modes) > 1 else modes[0],
        sampler=make_sampler(cfg, specs),
        points_to_evaluate=[dict(p) for p in cfg.sweep.enqueue] or None,  # Optuna enqueue_trial, in order
        storage=storage,
        study_name=study_name,
        max_epochs=cfg.optim.epochs,
        constraints=dict(cfg.sweep.constraints),
        dead=cfg.sweep.stop_on.firing_rate,
    )


def rung_metric(cfg: Config) -> tuple[str, str]:
    """The metric and mode a one-metric scheduler ranks trials on: ``sweep.scheduler.metric`` (mode as
    given, else sweep.mode for sweep.metric, else the metric's own direction), or sweep.metric's first."""
    s = cfg.sweep.scheduler
    metric = s.metric or cfg.sweep.metrics[0]
    if s.mode:
        return metric, s.mode
    if metric in cfg.sweep.metrics:
        return metric, cfg.sweep.modes[cfg.sweep.metrics.index(metric)]
    mode = METRIC_MODES.get(metric)
    if mode is None:  # checks.check_search_algorithms refuses this before a scheduler is built
        raise ValueError(f"sweep.scheduler.metric '{metric}' has no known direction: give sweep.scheduler.mode")
    return metric, mode


def asha_rungs(grace_period: int, reduction_factor: float, max_t: int) -> list[float]:
    """The epochs at which Ray's ASHA decides (its ``_Bracket`` milestones ``grace · rf^k``), ascending,
    below ``max_t`` (a trial reaching ``max_t`` stops there anyway)."""
    n = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1)
    rungs = (grace_period * reduction_factor**k for k in range(n))
    return [int(m) if float(m).is_integer() else m for m in rungs if m < max_t]


def scheduler_settings(cfg: Config) -> dict[str, Any]:
    """How ``sweep.scheduler`` is built: ``max_t`` (default optim.epochs), ``grace_period`` and
    ``reduction_factor`` (derived from ``max_t`` where the config leaves them out), the rung ``metric``
    and ``mode``, and ASHA's ``rungs``."""
    s = cfg.sweep.scheduler
    max_t = s.max_t or cfg.optim.epochs
    rf = s.reduction_factor if s.reduction_factor is not None else DEFAULT_REDUCTION_FACTOR
    grace = (s.grace_period if s.grace_period is not None
             else default_grace_period(max_t, rf, cfg.optim.warmup_epochs))
    metric, mode = rung_metric(cfg) if len(cfg.sweep.metrics) == 1 or s.metric else (None, None)
    return {"name": s.name, "max_t": max_t, "grace_period": grace, "reduction_factor": rf, "metric": metric,
            "mode": mode, "rungs": asha_rungs(grace, rf, max_t) if grace <= max_t else []}


# sweep.scheduler.reduction_factor when the config gives none: 3 (replayed on the main job's curves, 4 and 6
# saved no more at 12-24 trials: with few trials at a rung, who arrives first decides more than 1/rf)
DEFAULT_REDUCTION_FACTOR = 3.0
MAX_DEFAULT_RUNGS = 3


def default_grace_period(max_t: int, reduction_factor: float, warmup_epochs: int = 0) -> int:
    """The grace period when the config gives none: not before epoch 2, not before the first epoch after
    the warm-up, and no earlier than ``max_t / rf**3`` (at most three rungs below ``max_t``); never past
    ``max_t``.

    Why (``bench/results/2026-12-07-asha_replay.json``): after one epoch every trial of the main job was at
    chance (val/loss ln 10 ± 1e-4, val/top1 0.100 or 0.103), with its warm-up epoch and without one, and
    what little differed ranked the trials backwards (Spearman -0.78 and -0.84 against their final best:
    the wide networks, the good ones, start slower), so a rung there stops the good trials. One epoch
    later the ranking is positive (val/loss 0.48), two epochs later strong (0.90)."""
    floor = math.ceil(max_t / reduction_factor**MAX_DEFAULT_RUNGS)
    return max(1, min(max_t, max(2, warmup_epochs + 1, floor)))


def make_scheduler(cfg: Config, specs: list[ParamSpec] | None = None) -> TrialScheduler:
    """The Tune scheduler of a config that passed :func:`qksweep.checks.check_sweep` (PBT needs its space)."""
    s = cfg.sweep.scheduler
    if s.name == "none":
        return FIFOScheduler()
    if s.population_based:
        from .pbt import make_pbt

        return make_pbt(cfg, specs or [], *rung_metric(cfg))
    st = scheduler_settings(cfg)
    max_t, grace, rf = st["max_t"], st["grace_period"], st["reduction_factor"]
    if s.name == "moasha":
        from .moasha import MOASHAScheduler

        return MOASHAScheduler(metrics=cfg.sweep.metrics, modes=cfg.sweep.modes, max_t=max_t,
                               grace_period=grace, reduction_factor=rf)
    common: dict[str, Any] = dict(time_attr="epoch", metric=st["metric"], mode=st["mode"])
    if s.name == "asha":
        return ASHAScheduler(max_t=max_t, grace_period=grace, reduction_factor=rf, **common)
    if s.name == "hyperband":
        return HyperBandScheduler(max_t=max_t, reduction_factor=rf, **common)
    if s.name == "median":
        return MedianStoppingRule(grace_period=grace, min_samples_required=3, **common)
    raise AssertionError(s.name)
