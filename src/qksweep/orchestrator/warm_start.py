"""Warm starts: a new sweep's Optuna study seeded with an earlier sweep's trials (``sweep.warm_start``,
``qksweep sweep CONFIG --warm-start SWEEP``).

The earlier sweep is found as ``qksweep resume`` finds one (a name under ``run.storage``, its folder, or
its bucket URI). Its finished trials are added to the new study with their params and values, its
pruned ones with their intermediate values (as :class:`~.searcher.HonestOptunaSearch` told them), and
the constraint values either carried; the sampler then starts informed. They are study trials only:
Tune never trains them, and ``sweep.num_samples`` counts the new trials. A trial whose params are not
exactly the new space's keys, or whose values fall outside it, is skipped and counted.

:func:`read_warm_start` reads and checks everything before Ray starts or anything is written (a missing
sweep or one that optimised other metrics is refused in one line); :func:`seed_study` writes the trials
into the new sweep's study.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import optuna

from ..config import Config, ConfigError
from ..storage import OPTUNA_DB

if TYPE_CHECKING:
    from ..search_spaces import ParamSpec
    from ..storage import SweepFiles

FROM_ATTR, NUMBER_ATTR = "qksweep.warm_start_from", "qksweep.warm_start_trial"
SEEDED_STATES = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


@dataclass
class WarmStart:
    source: str  # the earlier sweep's location (secrets masked)
    trials: list[optuna.trial.FrozenTrial] = field(default_factory=list)
    skipped: int = 0

    def summary(self) -> str:
        done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in self.trials)
        line = (f"warm start from {self.source}: {len(self.trials)} trials seed the study "
                f"({done} finished, {len(self.trials) - done} pruned)")
        if self.skipped:
            line += f"; {self.skipped} skipped: their params are outside this sweep's space"
        return line


def read_warm_start(cfg: Config, specs: list["ParamSpec"], files: "SweepFiles") -> WarmStart:
    """The trials to seed from the earlier sweep at ``files`` (``cfg.sweep.warm_start``, found by
    ``orchestrator.sweep.find_sweep``), checked against the new space."""
    db = files.local / OPTUNA_DB
    if not db.is_file():
        raise ConfigError(f"sweep.warm_start: sweep '{files.name}' at {files.location} has no Optuna study "
                          "(it stopped before its first trial): warm-start from another sweep")
    study = optuna.load_study(study_name=None, storage=files.optuna_url)
    _check_objectives(cfg, study, files.name)
    by_key = {s.key: s for s in specs}
    ws = WarmStart(source=files.location)
    for t in study.get_trials(deepcopy=False, states=SEEDED_STATES):
        if set(t.params) != set(by_key) or not all(by_key[k].contains(v) for k, v in t.params.items()):
            ws.skipped += 1
            continue
        ws.trials.append(_copy(t, {k: by_key[k].distribution() for k in t.params}, files.name))
    return ws


def _check_objectives(cfg: Config, study: optuna.Study, name: str) -> None:
    """The earlier study's values mean the same as this sweep's: same metrics, same directions."""
    want = ["minimize" if m == "min" else "maximize" for m in cfg.sweep.modes]
    have = [d.name.lower() for d in study.directions]
    names = study.metric_names
    if (names is not None and list(names) != cfg.sweep.metrics) or have != want:
        theirs = ", ".join(f"{n} ({d[:3]})" for n, d in zip(names or ["?"] * len(have), have))
        ours = ", ".join(f"{m} ({d})" for m, d in zip(cfg.sweep.metrics, cfg.sweep.modes))
        raise ConfigError(f"sweep.warm_start: sweep '{name}' optimised {theirs}, this sweep {ours}: its values would "
                          "mislead the sampler; warm-start from a sweep of the same sweep.metric and sweep.mode")


def _copy(t: optuna.trial.FrozenTrial, distributions: dict, source: str) -> optuna.trial.FrozenTrial:
    from .searcher import TUNE_TRIAL_ATTR

    complete = t.state == optuna.trial.TrialState.COMPLETE
    attrs = {k: v for k, v in t.user_attrs.items() if k != TUNE_TRIAL_ATTR}  # no Tune trial of this sweep
    return optuna.trial.create_trial(
        state=t.state, values=t.values if complete else None, params=dict(t.params), distributions=distributions,
        intermediate_values=dict(t.intermediate_values), constraints=dict(t.constraints) or None,
        user_attrs={**attrs, FROM_ATTR: source, NUMBER_ATTR: t.number})


def seed_study(storage: optuna.storages.BaseStorage, study_name: str, cfg: Config, ws: WarmStart) -> None:
    """Create the new sweep's study and add the warm-start trials to it (before the searcher opens it)."""
    directions = ["minimize" if m == "min" else "maximize" for m in cfg.sweep.modes]
    study = optuna.create_study(storage=storage, study_name=study_name, directions=directions, load_if_exists=True)
    study.add_trials(ws.trials)
