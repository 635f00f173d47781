"""Population-based training: ``sweep.scheduler.name: pbt`` (Ray Tune's ``PopulationBasedTraining``) and
``pb2`` (Ray Tune's ``PB2``: the new values from a GP bandit, scikit-learn's, within the space's bounds).

Tune refuses a searcher beside PBT, so the first population (``sweep.num_samples`` trials) is sampled at
random from ``sweep.space`` by Tune's ``BasicVariantGenerator`` (seed ``sweep.searcher.seed``; ``sweep.enqueue``
points first). Every ``perturbation_interval`` epochs a trial in the bottom ``quantile_fraction`` copies the
config and the latest checkpoint of one in the top, then perturbs the *mutable* keys of the space: those
a run restored from a checkpoint can take up (:data:`MUTABLE`: optimiser and regularisation values and
distillation weights; the loop's restore lets the config win over the checkpoint for them). Other keys of
the space are sampled once per trial and follow the checkpoint they belong to when a trial copies another.

A trial copies a donor only at the donor's own epoch (:class:`SameEpoch`): each trial's MLflow run then holds
each epoch once, 1 to ``optim.epochs``. Ray's PBT would also copy a donor whose last checkpoint is an
interval behind or ahead, which moves the copying trial back or forward in epochs. In synchronous mode
(``synch: true``, qksweep's default) every trial meets the others at each interval, so the donors are
always at the same epoch; asynchronously (``synch: false``) trials drift apart when there are more trials
than slots, and most copies are skipped (seen in ``bench/pbt_vs_asha.py``: 3 trials, 2 slots, none made).
"""

from __future__ import annotations

import logging
from typing import Any

from ray.tune.schedulers import PopulationBasedTraining
from ray.tune.schedulers.pb2 import PB2 as RayPB2
from ray.tune.search import BasicVariantGenerator

from ..config import Config
from ..search_spaces import ParamSpec

log = logging.getLogger("qksweep.pbt")

# keys a trial can change while it trains: the loop builds its optimiser, loss, mixup and distillation
# from the config and restores only their state from a checkpoint (trainables/checkpoint.py)
MUTABLE = ("optim.lr", "optim.weight_decay", "optim.momentum", "optim.smoothing", "optim.mixup", "optim.cutmix",
           "optim.mixup_prob", "optim.clip_grad", "distill.alpha", "distill.tau")


def mutable(specs: list[ParamSpec]) -> list[ParamSpec]:
    return [s for s in specs if s.key in MUTABLE]


def tune_domain(spec: ParamSpec):
    """The Ray Tune domain that samples what ``spec`` samples."""
    from ray import tune

    a = spec.args
    if spec.values() is not None and spec.dist != "randint":
        return tune.choice(spec.values())
    return {"randint": lambda: tune.randint(a[0], a[1]), "uniform": lambda: tune.uniform(a[0], a[1]),
            "loguniform": lambda: tune.loguniform(a[0], a[1]), "quniform": lambda: tune.quniform(a[0], a[1], a[2]),
            }[spec.dist]()


def param_space(specs: list[ParamSpec]) -> dict[str, Any]:
    return {s.key: tune_domain(s) for s in specs}


def make_generator(cfg: Config) -> BasicVariantGenerator:
    return BasicVariantGenerator(points_to_evaluate=[dict(p) for p in cfg.sweep.enqueue] or None,
                                 random_state=cfg.sweep.searcher.seed, max_concurrent=0)


class KeepInSpace:
    """PBT's explore step multiplies a number by 0.8 or 1.2 (or resamples it): the result is put back inside
    the space (clipped to its bounds, on its step, an integer for an integer range)."""

    def __init__(self, specs: list[ParamSpec]):
        self.specs = {s.key: s for s in mutable(specs)}

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        for key, s in self.specs.items():
            if key not in config or s.values() is not None:
                continue
            lo, hi = s.args[0], s.args[1]
            v = min(max(float(config[key]), lo), hi)
            if s.dist == "quniform":
                v = min(max(lo + round((v - lo) / s.args[2]) * s.args[2], lo), hi)
            config[key] = v
        return config


class SameEpoch:
    """A trial copies a donor only where the donor's checkpoint is at the trial's own epoch (see the module),
    and not after its last epoch (nothing would train with the new values; the trial's last checkpoint
    would be the donor's)."""

    last_epoch: int | None = None

    def _exploit(self, tune_controller, trial, trial_to_clone):
        mine = (self._trial_state[trial].last_result or {}).get(self._time_attr)
        theirs = (self._trial_state[trial_to_clone].last_result or {}).get(self._time_attr)
        if self.last_epoch is not None and mine is not None and mine >= self.last_epoch:
            return
        if mine != theirs:
            log.info("pbt: trial %s at epoch %s does not copy trial %s, whose checkpoint is at epoch %s",
                     trial.trial_id, mine, trial_to_clone.trial_id, theirs)
            return
        super()._exploit(tune_controller, trial, trial_to_clone)


class ResumableSynch:
    """``synch: true`` after ``qksweep resume``: Tune restores the scheduler as it was when the sweep started,
    with its first perturbation time. Once every trial has met at the next one, Ray's PBT sets the one
    after to ``max(that + interval, the latest trial time)``, which equals where the restored trials already
    are, and as it runs only trials behind that time, every trial then waited for good (seen here). When no
    trial runs and every waiting one is at or past that time, the next perturbation moves one interval on."""

    def choose_trial_to_run(self, tune_controller):
        from ray.tune.experiment import Trial

        trial = super().choose_trial_to_run(tune_controller)
        if trial is not None or not self._synch:
            return trial
        trials = tune_controller.get_trials()
        waiting = [t for t in trials if t.status in (Trial.PENDING, Trial.PAUSED)]
        if not waiting or any(t.status == Trial.RUNNING for t in trials):
            return None
        times = [self._trial_state[t].last_train_time for t in trials if t in self._trial_state]
        if all(self._trial_state[t].last_train_time >= self._next_perturbation_sync for t in waiting):
            self._next_perturbation_sync = max(times) + self._perturbation_interval
            return super().choose_trial_to_run(tune_controller)
        return None


class PBT(SameEpoch, ResumableSynch, PopulationBasedTraining):
    pass


class PB2(SameEpoch, ResumableSynch, RayPB2):
    pass


def make_pbt(cfg: Config, specs: list[ParamSpec], metric: str, mode: str):
    """The scheduler of a config that passed :func:`qksweep.checks.check_pbt`, ranking trials on ``metric``
    (``searcher.rung_metric``: sweep.scheduler.metric, else sweep.metric)."""
    s = cfg.sweep.scheduler
    common: dict[str, Any] = dict(time_attr="epoch", metric=metric, mode=mode,
                                  perturbation_interval=s.perturbation_interval, quantile_fraction=s.quantile_fraction,
                                  synch=s.synch, require_attrs=True, log_config=False)
    if s.name == "pb2":
        sched = PB2(hyperparam_bounds={sp.key: [float(sp.args[0]), float(sp.args[1])] for sp in mutable(specs)},
                    custom_explore_fn=KeepInSpace(specs), **common)
    else:
        mutations = {sp.key: (sp.values() if sp.values() is not None else tune_domain(sp)) for sp in mutable(specs)}
        sched = PBT(hyperparam_mutations=mutations, resample_probability=s.resample_probability,
                    custom_explore_fn=KeepInSpace(specs), **common)
    sched.last_epoch = cfg.optim.epochs
    return sched

