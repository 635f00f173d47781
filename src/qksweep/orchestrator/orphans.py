"""Trials a killed sweep driver left half-made, closed when the sweep resumes (issue 21).

A trial comes into being in pieces (DEVELOPERS.md, "A trial's pieces"): the sweep driver asks Optuna
for it, Tune starts its driver actor, which makes its MLflow run and then its Train run, and Tune
records the trial in its experiment state at most every 10 s. A driver SIGKILLed in between leaves an
Optuna trial RUNNING, and perhaps an MLflow run, for a Tune trial the restored sweep does not know:
`resume` then samples a new trial in its place, and the sweep would hold one run too many.

`qksweep resume` trusts Tune's restored state. Before the restored sweep runs, every MLflow trial run
of the sweep whose trial id that state does not know is closed KILLED, tagged
``qksweep.stopped_by=orphaned`` and re-tagged ``qksweep.kind=orphan`` (so `runs`, `best`, the results
table and the plots, which read trial runs only, leave it out; it stays in MLflow for the record). Every
RUNNING Optuna trial whose Tune trial is unknown is told FAIL (user attribute ``orphaned``). When a
sweep ends complete, any Optuna trial still RUNNING is failed the same way: no Tune trial will tell it.
"""

from __future__ import annotations

import logging

from ..tracking import runs

log = logging.getLogger("qksweep")

ORPHAN_KIND = "orphan"


def known_trial_ids(tune_path: str) -> set[str]:
    """The trial ids of the Tune state a restore starts from."""
    from ray.tune import ExperimentAnalysis

    return {t.trial_id for t in ExperimentAnalysis(tune_path).trials}


def close_orphan_runs(tracking_uri: str, experiment: str, sweep: str, known: set[str]) -> list[str]:
    """Close and re-tag the sweep's trial runs whose trial Tune does not know; returns their trial ids."""
    from ..tracking import browse

    c = runs.client(tracking_uri)
    exp_ids = browse.experiment_ids(c, tracking_uri, experiment)
    closed = []
    for r in browse.trial_runs(c, tracking_uri, exp_ids=exp_ids, sweep=sweep):
        trial_id = r.data.tags.get(runs.TRIAL)
        if trial_id in known:
            continue
        runs.set_tags(c, r.info.run_id, {runs.KIND: ORPHAN_KIND, "qksweep.stopped_by": "orphaned"})
        if r.info.status == "RUNNING":
            runs.finish_run(c, r.info.run_id, "KILLED")
        closed.append(trial_id or r.info.run_id)
    return closed


def fail_study_trials(study, known: set[str] | None = None) -> list[int]:
    """Tell FAIL to the study's RUNNING trials whose Tune trial is not in ``known`` (all RUNNING trials
    when ``known`` is None: the sweep is over). Returns their numbers."""
    import optuna

    from .searcher import TUNE_TRIAL_ATTR

    failed = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        tune_id = t.user_attrs.get(TUNE_TRIAL_ATTR)
        if known is not None and (tune_id is None or tune_id in known):
            continue  # a trial the restored sweep will tell itself (or one asked before ids were recorded)
        study._storage.set_trial_user_attr(t._trial_id, "orphaned", True)
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        failed.append(t.number)
    return failed


def close_orphans(cfg, sweep: str, tune_path: str, optuna_url: str) -> None:
    """Before a resumed sweep runs: close what the killed driver left for trials Tune does not know."""
    import optuna

    try:
        known = known_trial_ids(tune_path)
    except Exception as e:  # noqa: BLE001 - Tune's restore reads the same state and says what is wrong with it
        log.warning("could not read the sweep's Tune state to find orphaned trials (%s)", e)
        return
    if not known:  # a state Tune can restore has at least one trial: reading it went wrong, touch nothing
        return
    closed = close_orphan_runs(cfg.tracking.uri, cfg.experiment, sweep, known) if cfg.tracking.enabled else []
    failed = fail_study_trials(optuna.load_study(study_name=None, storage=optuna_url), known)
    if closed or failed:
        print(f"closed what the stopped driver left for {len(closed) or len(failed)} trial(s) it had started but "
              f"not yet recorded: MLflow run(s) of {', '.join(closed) or 'none'} (KILLED, qksweep.kind=orphan), "
              f"Optuna trial(s) {', '.join(map(str, failed)) or 'none'} (FAIL)")
