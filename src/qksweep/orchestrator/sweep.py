"""Building, running and restoring Tuners: ``qksweep sweep`` and ``qksweep resume``."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..checks import check_reachable, check_sweep, prepare_inputs
from ..config import DEFAULT_STORAGE, Config, ConfigError, flatten
from ..names import REPORTED_METRICS
from ..search_spaces import ParamSpec, expand_space, parse_space
from ..tracking import runs
from ..storage import STATE_FILE, SweepFiles, is_uri, probe, storage_root
from ..tracking.lifecycle import TrackedRun, close_run, config_file, mask_config, open_run
from ..trainables.train import JobFailed



@dataclass
class SweepResult:
    name: str
    best_config: dict[str, Any] | None
    best_metrics: dict[str, Any]
    best_trial_id: str | None
    best_run_id: str | None
    parent_run_id: str | None
    trials: Any  # pandas.DataFrame
    storage_path: str
    num_errors: int


def default_sweep_name(cfg: Config) -> str:
    return f"{cfg.experiment}-{time.strftime('%Y%m%d-%H%M%S')}"


def sweep_files(cfg: Config, name: str) -> SweepFiles:
    """The sweep's folder under run.storage: a local/shared path, or a bucket URI with a local cache."""
    return SweepFiles(storage_root(cfg), name)


def max_concurrent(cfg: Config, resources: dict[str, float]) -> int:
    """How many trials the cluster can actually run at once (no trial waits for workers)."""
    if cfg.sweep.max_concurrent:
        return cfg.sweep.max_concurrent
    per_trial_cpu = cfg.run.workers * cfg.run.cpus_per_worker
    fits = math.floor(resources.get("CPU", 1) / per_trial_cpu + 1e-9)
    if cfg.run.gpus_per_worker:
        fits = min(fits, math.floor(resources.get("GPU", 0) / (cfg.run.workers * cfg.run.gpus_per_worker) + 1e-9))
    return max(1, min(fits, cfg.sweep.num_samples))


def _trainable(cfg: Config, name: str, parent_run_id: str | None):
    from ray import tune

    from ..trainables.trial import trial_driver

    launcher = cfg.trial_launcher()
    pbt_keys: tuple[str, ...] = ()
    if cfg.sweep.scheduler.population_based:  # the keys PBT may change, logged each epoch as pbt/<key>
        from .pbt import mutable

        pbt_keys = tuple(s.key for s in mutable(parse_space(cfg.sweep.space)))
    fn = tune.with_parameters(trial_driver, base=cfg.to_dict(), sweep=name, parent_run_id=parent_run_id,
                              launcher=launcher, pbt_keys=pbt_keys)
    if launcher == "tune":  # the trial trains in its own process: it holds the worker's resources
        resources = {"cpu": cfg.run.cpus_per_worker, "gpu": cfg.run.gpus_per_worker}
        return tune.with_resources(fn, {k: v for k, v in resources.items() if v})
    # The driver only launches and watches the Train run: it takes no CPU, so N trials of one worker
    # each fit on N CPUs. Ray refuses an empty bundle, so it asks for a token of memory instead.
    return tune.with_resources(fn, {"cpu": 0, "memory": 64 * 1024**2})


def _tune_run_config(cfg: Config, name: str, callbacks: list, sync, stop=None) -> Any:
    """Tune's RunConfig. Trials of the ``tune`` launcher keep their checkpoints in their Tune trial folder
    (``run.keep_checkpoints`` by the sweep's first metric, the latest always kept) and a failed one is
    retried ``run.max_failures`` times from its last checkpoint, as Ray Train does for its workers; a
    trial on Ray Train is retried by Train first, then once by Tune."""
    from ray import tune

    metric, mode = cfg.sweep.metrics[0], cfg.sweep.modes[0]
    in_trial = cfg.trial_launcher() == "tune"
    return tune.RunConfig(
        name=name, storage_path=storage_root(cfg), callbacks=callbacks, sync_config=sync, verbose=0, stop=stop,
        failure_config=tune.FailureConfig(max_failures=cfg.run.max_failures if in_trial else 1),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=cfg.checkpoints_kept(), checkpoint_score_attribute=metric,
                                                checkpoint_score_order=mode) if in_trial else None)


def _parent_run(cfg: Config, name: str, warm=None) -> str | None:
    """The sweep's parent run: its params (no search space: that is ``search_space.yaml``) and files."""
    if not cfg.tracking.enabled:
        return None
    d = mask_config(cfg.to_dict())  # no password or bucket key in params
    d["sweep"] = dict(d["sweep"])
    space = d["sweep"].pop("space")
    files = {**config_file(cfg), "search_space.yaml": yaml.safe_dump(expand_space(space), sort_keys=False)}
    tags = {} if warm is None else {"qksweep.warm_start_from": warm.source,
                                    "qksweep.warm_start_trials": str(len(warm.trials)),
                                    "qksweep.warm_start_skipped": str(warm.skipped)}
    return open_run(cfg.tracking.uri, cfg.experiment, {runs.KIND: "sweep", runs.SWEEP: name}, run_name=name,
                    params=flatten(d), folder=None, files=files, tags=tags or None).run_id


def _build_tuner(cfg: Config, name: str, specs: list[ParamSpec], parent_run_id: str | None, files: SweepFiles,
                 concurrency: int, warm=None):
    from ray import tune

    from ..tracking.sweep_callback import SweepTracker
    from .searcher import SweepStudyStorage, make_scheduler, make_searcher

    # a storage object, not a URL: pickled into Tune's state, it follows the sweep to another machine
    study_storage = SweepStudyStorage(files.optuna_url, sweep=name)
    if warm is not None:
        from .warm_start import seed_study

        seed_study(study_storage, name, cfg, warm)
    space = None
    if cfg.sweep.scheduler.population_based:  # Tune takes no searcher beside PBT: its random sampling
        import optuna

        from .pbt import make_generator, param_space

        searcher, space = make_generator(cfg), param_space(specs)
        # the study stays empty (what reads a sweep's study finds one): PBT's trials change their values
        optuna.create_study(storage=study_storage, study_name=name, direction="maximize" if cfg.sweep.modes[0] == "max"
                            else "minimize", load_if_exists=True)
    else:
        searcher = make_searcher(cfg, specs, study_storage, study_name=name)
    from ray.tune.logger import JsonLoggerCallback

    # each trial's result.json (one line per epoch): ResultGrid's trials table and best-epoch metrics read
    # it; the other automatic loggers (CSV, TensorBoard) stay off (TUNE_DISABLE_AUTO_CALLBACK_LOGGERS)
    from ..cluster.placement import make_watch

    # frees what Train runs that died while reserving workers leave (cluster/placement.py); says why the
    # sweep waits when no trial makes progress
    from .console import ConsoleEvents

    callbacks: list = [JsonLoggerCallback(), make_watch(), ConsoleEvents()]
    if parent_run_id:
        callbacks.append(SweepTracker(cfg.tracking.uri, cfg.experiment, name, parent_run_id, epochs=cfg.optim.epochs,
                                      scheduler=cfg.sweep.scheduler.name, optuna_storage=study_storage,
                                      constraints=dict(cfg.sweep.constraints)))
    scheduler = make_scheduler(cfg, specs)
    from .budget import make_budget

    budget = make_budget(cfg, files)
    if budget is not None:  # one object as stopper and callback: it pickles once into the sweep's state
        callbacks.append(budget)
    from .moasha import RungRecords, keeps_rungs

    if keeps_rungs(scheduler):  # Tune saves no scheduler state: ASHA's and MOASHA's rungs ride on a callback's
        callbacks.append(RungRecords(scheduler))
    sync = None
    if files.remote:
        from .sync import SyncSweepFiles

        callbacks.append(SyncSweepFiles(files))
        # Tune uploads its experiment state at most every sync_period (300 s by default): a resume
        # after a crash starts from the last upload, so keep it recent (a few small files)
        sync = tune.SyncConfig(sync_period=30)
    return tune.Tuner(
        _trainable(cfg, name, parent_run_id), param_space=space,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=cfg.sweep.num_samples,
                                    max_concurrent_trials=concurrency, reuse_actors=cfg.reuse_trial_actors()),
        run_config=_tune_run_config(cfg, name, callbacks, sync, stop=budget),
    )


def run_sweep(cfg: Config, *, name: str | None = None) -> SweepResult:
    from ..cluster.connect import cluster_resources, ensure_ray
    from ..cluster.placement import reclaim_finished_jobs

    from .warm_start import read_warm_start

    from .searcher import sampler_name

    specs = check_sweep(cfg)
    name = name or default_sweep_name(cfg)
    check_reachable(cfg)  # a cluster or tracking server that does not answer: one line, before Ray or MLflow
    probe(cfg.run.storage)  # a bucket that is missing or unreachable: one line, before anything is written
    files = sweep_files(cfg, name)
    if files.exists():
        raise ConfigError(f"sweep '{name}' already exists at {files.location}: continue it with "
                          f"`qksweep resume {name}` or pick another --name")
    prepare_inputs(cfg, specs)  # event data integrated to frames once here, before any trial reads it
    warm = None
    if cfg.sweep.warm_start:  # the earlier sweep's trials, read and checked before anything is written
        try:
            source = find_sweep(cfg.sweep.warm_start, cfg.run.storage, purpose="to warm-start from")
        except ConfigError as e:
            raise ConfigError(f"sweep.warm_start: {e}") from None
        warm = read_warm_start(cfg, specs, source)
    ensure_ray()
    reclaim_finished_jobs()  # a killed earlier driver's Train runs would hold the CPUs this sweep needs
    concurrency = max_concurrent(cfg, cluster_resources())
    parent_run_id = _parent_run(cfg, name, warm)
    files.prepare_new()
    (files.local / STATE_FILE).write_text(json.dumps({"name": name, "config": cfg.to_dict(), "parent_run_id": parent_run_id,
                                                      "concurrency": concurrency}, indent=1))
    files.upload()
    print(f"sweep {name}: {cfg.sweep.num_samples} trials, up to {concurrency} at a time, "
          f"{sampler_name(cfg)} + {cfg.sweep.scheduler.name}; storage {files.location}"
          + (f"; MLflow {runs.mask_secrets(cfg.tracking.uri)}" if cfg.tracking.enabled else ""))
    if warm is not None:
        print(warm.summary())
    from .console import session

    with session(cfg, name, files.local, list(cfg.sweep.space)):  # the live view; Ray's messages to sweep.log
        tuner = _build_tuner(cfg, name, specs, parent_run_id, files, concurrency, warm)
        return _fit(tuner, cfg, name, parent_run_id, files)


def find_sweep(name_or_path: str, storage: str | None = None, *, purpose: str = "to resume") -> SweepFiles:
    """The sweep named NAME under ``storage`` (a path or a bucket URI, default ./qksweep_results), or
    the sweep at a path or URI (``s3://bucket/prefix/NAME``). For a URI its files are downloaded."""
    from ..storage import check_uri
    from ..tracking.runs import mask_secrets

    if is_uri(name_or_path):  # the sweep's own URI: its parent is the storage
        base, sep, query = name_or_path.partition("?")
        parent, _, name = base.rstrip("/").rpartition("/")
        if "://" not in parent or not parent.split("://", 1)[1]:
            raise ConfigError(f"'{name_or_path}' names a bucket, not a sweep: pass s3://BUCKET/PREFIX/NAME")
        candidates = [(parent + sep + query, name)]
    else:
        p = Path(name_or_path).expanduser()
        if p.is_absolute() or "/" in name_or_path:
            candidates = [(str(p.resolve().parent), p.resolve().name)]
        elif storage and is_uri(storage):
            candidates = [(storage, name_or_path)]
        else:
            candidates = [(str(Path(storage or DEFAULT_STORAGE).expanduser().resolve()), name_or_path),
                          (str(Path.cwd()), name_or_path)]
    for root, name in candidates:
        check_uri(root)
        probe(root)
        files = SweepFiles(root, name)
        if files.has_state():
            files.download()
            return files
    files = SweepFiles(*candidates[0])
    known = files.known_sweeps()
    from ..config import suggest

    where = mask_secrets(candidates[0][0])
    hint = suggest(name_or_path, known) or (f"; known sweeps: {', '.join(known[:8])}" if known else f"; no sweeps under {where}")
    raise ConfigError(f"no sweep '{name_or_path}' {purpose}{hint}")


def stored_config(state: dict[str, Any]) -> Config:
    """The config a sweep's state file holds. A sweep started before ``run.launcher`` existed trained its
    trials as Train runs, whose checkpoints are where only that launcher looks: it resumes on Ray Train."""
    conf = dict(state["config"])
    if "launcher" not in conf.get("run", {}):
        conf["run"] = {**conf.get("run", {}), "launcher": "train"}
    return Config.model_validate(conf)


class SweepComplete(Exception):
    """``qksweep resume`` of a sweep a budget ended: there is nothing to resume."""


def check_not_ended(state: dict[str, Any]) -> None:
    if state.get("ended_by"):
        raise SweepComplete(f"sweep {state['name']} is complete: it ended by {state['ended_by']}; nothing to resume "
                            f"(`qksweep best {state['name']}` shows its best trial; `qksweep resume {state['name']} "
                            f"--num-samples N` extends it)")


def check_extension(state: dict[str, Any], num_samples: int) -> int:
    """The sweep's planned trial count, when ``num_samples`` extends it (one line otherwise)."""
    have = int(state["config"]["sweep"]["num_samples"])
    if num_samples <= have:
        raise ConfigError(f"--num-samples {num_samples}: sweep {state['name']} already has {have} trials planned; "
                          f"give more than {have} to extend it")
    return have


def extend(files: SweepFiles, state: dict[str, Any], num_samples: int) -> dict[str, Any]:
    """``resume --num-samples N``: the sweep goes on to N trials in all, also one a budget ended (its budgets
    count afresh: the state file no longer says it ended). Tune's search generator, which stops sampling
    at the count it was started with, is told the new count in its saved state."""
    have = check_extension(state, num_samples)
    if state["config"]["sweep"].get("scheduler", {}).get("name") in ("pbt", "pb2"):
        raise ConfigError(f"--num-samples: sweep {state['name']} is population-based; its population is fixed when it "
                          "starts: start a new sweep with a larger sweep.num_samples")
    import pickle

    import pyarrow.fs as pafs

    from ..storage import filesystem, local_path

    fs, base = filesystem(files.tune_path) if files.remote else (pafs.LocalFileSystem(), local_path(files.tune_path))
    found = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
                   if i.base_name.startswith("search_gen_state-") and i.base_name.endswith(".json"))
    if not found:
        raise ConfigError(f"sweep {state['name']} at {files.location} has no saved search state to extend: "
                          "start a new sweep with --warm-start from it")
    with fs.open_input_stream(found[-1]) as f:
        gen = pickle.loads(f.read())  # Tune writes it with cloudpickle; it reads back with pickle
    gen["total_samples"], gen["finished"] = num_samples, False
    with fs.open_output_stream(found[-1]) as f:
        f.write(pickle.dumps(gen))
    state = {**state, "config": {**state["config"], "sweep": {**state["config"]["sweep"], "num_samples": num_samples}}}
    state.pop("ended_by", None)
    (files.local / STATE_FILE).write_text(json.dumps(state, indent=1))
    files.upload()
    print(f"sweep {state['name']}: extended from {have} to {num_samples} trials")
    return state


def resume_sweep(name_or_path: str, storage: str | None = None, num_samples: int | None = None) -> SweepResult:
    from ray import tune

    from ..cluster.connect import ensure_ray
    from ..cluster.placement import reclaim_finished_jobs
    from .searcher import relocate_study

    files = find_sweep(name_or_path, storage)
    state = json.loads((files.local / STATE_FILE).read_text())
    if num_samples is not None:
        state = extend(files, state, num_samples)
    check_not_ended(state)
    cfg = stored_config(state)
    name, parent_run_id = state["name"], state["parent_run_id"]
    if not tune.Tuner.can_restore(files.tune_path):
        raise ConfigError(f"sweep '{name}' at {files.location} has no Tune state to restore (it stopped before its "
                          "first trial); start it again")
    ensure_ray()
    reclaim_finished_jobs()  # the killed driver's Train runs, where the cluster outlived it
    if parent_run_id:
        c = runs.client(cfg.tracking.uri)
        runs.retrying(lambda: c.update_run(parent_run_id, status="RUNNING"), what="run reopen")
    relocate_study(name, files.optuna_url)  # the study Tune's pickled searcher opens is this machine's copy
    from .orphans import close_orphans

    close_orphans(cfg, name, files.tune_path, files.optuna_url)  # trials the killed driver had not recorded
    print(f"resuming sweep {name} from {files.location}")
    from .budget import forget
    from .console import session

    forget(files)  # the budget's restored copies share one state (budget.py)
    with session(cfg, name, files.local, list(cfg.sweep.space)):
        tuner = tune.Tuner.restore(files.tune_path, trainable=_trainable(cfg, name, parent_run_id),
                                   resume_unfinished=True, resume_errored=True)
        return _fit(tuner, cfg, name, parent_run_id, files)


def _fit(tuner, cfg: Config, name: str, parent_run_id: str | None, files: SweepFiles) -> SweepResult:
    from ..cluster.placement import alive_train_actors, current_job, job_placement_groups, release_placement_groups

    before, actors_before = job_placement_groups(), alive_train_actors(current_job()) or frozenset()
    try:
        try:
            with tune_interrupt_probe() as stopped:
                grid = tuner.fit()
        finally:
            release_placement_groups(before, actors_before=actors_before)  # what stopped Train runs reserved as they died
            _final_upload(files)
        from .budget import reason_ended

        reason = None if stopped.fired else reason_ended(files)  # a budget spent: complete, not interrupted
        if stopped.fired or (reason is None and interrupted(grid, cfg.sweep.num_samples)):  # Tune catches Ctrl-C itself
            raise SweepInterrupted(f"sweep {name} interrupted; its state is saved: `qksweep resume {name}` continues it")
    except KeyboardInterrupt:
        if parent_run_id:
            close_run(TrackedRun(cfg.tracking.uri, parent_run_id, str(files.local), False), "KILLED",
                      tags={"qksweep.stopped_by": "user"}, finalize=False, wait_s=5)
        raise
    import optuna

    from .orphans import fail_study_trials

    study = optuna.load_study(study_name=None, storage=files.optuna_url)
    if reason is not None:  # Tune stopped every trial without telling any callback: close what is open
        from .budget import close_after_budget

        closed, _ = close_after_budget(cfg, name, reason, study)
        print(f"sweep {name} ended by {reason}" + (f"; {closed} running trial(s) closed KILLED" if closed else ""))
    if fail_study_trials(study) or reason is not None:  # complete: no Tune trial will tell a trial still RUNNING
        _final_upload(files)
    result = summarize(grid, cfg, name, parent_run_id, files.tune_path)
    _clean_checkpoints(cfg, files, parent_run_id)
    _log_missing_models(cfg, name)
    if parent_run_id:  # an MLflow server that is away leaves the parent's closing in the sweep folder's pending file
        from ..tracking.sweep_callback import close_parent_run

        tags = {"qksweep.best_run_id": result.best_run_id or "", "qksweep.best_trial_id": result.best_trial_id or ""}
        if reason is not None:
            tags["qksweep.ended_by"] = reason
        close_parent_run(cfg.tracking.uri, parent_run_id, str(files.local), name=name, study=study,
                         ok=result.best_trial_id is not None, tags=tags,
                         best_metrics={k: v for k, v in result.best_metrics.items() if k in REPORTED_METRICS})
    if result.best_trial_id is None:
        raise JobFailed(f"sweep {name}: every trial failed ({result.num_errors} errors); see `qksweep runs --sweep {name}`")
    return result


def _clean_checkpoints(cfg: Config, files: SweepFiles, parent_run_id: str | None) -> None:
    """Every trial is over: each keeps its best and last checkpoint in the storage (``gc.py``). A clean-up
    that fails leaves the sweep's result as it is and says so."""
    import logging

    from .gc import collect, human

    try:
        res = collect(files, cfg, parent_run_id=parent_run_id)
    except Exception as e:  # noqa: BLE001 - the sweep is done; `qksweep gc` can do this later
        logging.getLogger("qksweep").warning("could not clean the sweep's checkpoints (%s); `qksweep gc %s` does it later",
                                             runs.first_line(e), files.name)
        return
    if res.plan.remove:
        print(f"checkpoints: each trial keeps its best and last; freed {human(res.plan.freed)} "
              f"({human(res.before)} -> {human(res.after)}); `qksweep gc {files.name} --keep-best K` frees more")


def _log_missing_models(cfg: Config, name: str) -> None:
    """``tracking.log_model``: the trials that ended before their last epoch (stopped by ASHA or a rule, or
    closed by a budget) have no model yet: each gets its best checkpoint's now, once the sweep is over (a
    trial that trained to its end logged its own). A model that cannot be made is one warning line."""
    if not (cfg.tracking.enabled and cfg.tracking.log_model):
        return
    import logging

    from ..tools.mlflow_model import log_model, logged_models
    from ..tracking import browse

    log = logging.getLogger("qksweep")
    try:
        c = runs.client(cfg.tracking.uri)
        exp_ids = browse.experiment_ids(c, cfg.tracking.uri, cfg.experiment)
        found = browse.trial_runs(c, cfg.tracking.uri, exp_ids=exp_ids, sweep=name)
        have = logged_models(cfg.tracking.uri, exp_ids)  # one search for every trial's model
    except Exception as e:  # noqa: BLE001 - the sweep's result stands; `best --register` logs a model when asked
        log.warning("could not look up the trials' MLflow models (%s)", runs.first_line(e))
        return
    made = 0
    for r in found:
        if r.info.status == "FAILED" or r.info.run_id in have or not c.list_artifacts(r.info.run_id, "checkpoints/best"):
            continue
        try:
            log_model(cfg.tracking.uri, r.info.run_id)
            made += 1
        except Exception as e:  # noqa: BLE001
            log.warning("the MLflow model of trial %s was not logged (%s)", r.data.tags.get(runs.TRIAL), runs.first_line(e))
    if made:
        print(f"models: logged the best checkpoint of {made} trial(s) that ended early as MLflow models")


def _final_upload(files: SweepFiles) -> None:
    """The study and state as they stand, also after Ctrl-C (no-op for a local path)."""
    import logging

    try:
        files.upload()
    except Exception as e:  # noqa: BLE001 - Tune's own state is already in the bucket; say what is missing
        logging.getLogger("qksweep").warning("could not upload the sweep's Optuna study to %s (%s); it stays in %s",
                                             files.location, runs.mask_secrets(str(e).splitlines()[0] if str(e) else type(e).__name__),
                                             files.local)


class tune_interrupt_probe:
    """Tells whether Tune's own Ctrl-C handler fired during ``fit``: Tune installs its handler over
    ours and puts ours back only when a signal arrives, so finding ours in place afterwards means
    the sweep was interrupted (Tune then returns normally, with trials it closed as TERMINATED)."""

    def __enter__(self):
        import signal
        import threading

        self.fired = False
        self._active = threading.current_thread() is threading.main_thread()
        if self._active:
            self._previous = signal.getsignal(signal.SIGINT)
            self._sentinel = lambda *_: (_ for _ in ()).throw(KeyboardInterrupt())
            signal.signal(signal.SIGINT, self._sentinel)
        return self

    def __exit__(self, *exc):
        import signal

        if self._active:
            self.fired = signal.getsignal(signal.SIGINT) is self._sentinel
            signal.signal(signal.SIGINT, self._previous)
        return False


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) stopped the sweep; Tune saved its state (exit code 130)."""


def interrupted(grid, num_samples: int) -> bool:
    trials = grid._experiment_analysis.trials  # ResultGrid hides trial statuses otherwise
    unfinished = [t for t in trials if t.status not in ("TERMINATED", "ERROR")]
    return bool(unfinished) or len(trials) < num_samples


def summarize(grid, cfg: Config, name: str, parent_run_id: str | None, storage_path: str) -> SweepResult:
    metric, mode = cfg.sweep.metrics[0], cfg.sweep.modes[0]
    df = grid.get_dataframe()
    best_config = best_metrics = best_trial = best_run = None
    picked: dict[str, Any] = {}
    try:
        # "all": the best epoch of any trial — the same rule as `qksweep best` and checkpoints/best
        best = grid.get_best_result(metric=metric, mode=mode, scope="all", filter_nan_and_inf=True)
    except (RuntimeError, KeyError, ValueError):
        best = None
    if parent_run_id:
        # the trial `qksweep best` prints (MLflow, ties to the earlier trial): Tune breaks ties its own way
        try:
            from .export import best_trial as mlflow_best

            picked = mlflow_best(cfg.tracking.uri, name, experiment=cfg.experiment, metric=metric, mode=mode)
            same = [r for r in grid if _result_trial_id(r) == picked["trial_id"]]
            if same:
                best, best_run = same[0], picked["run_id"]
        except Exception as e:  # noqa: BLE001 - MLflow away, no metric logged: Tune's pick stands, no run id
            print(f"could not read the best trial from MLflow ({runs.mask_secrets(str(e).splitlines()[0][:160])}); "
                  f"Tune's best is shown without its run id; `qksweep best {name}` reads MLflow later")
    tune_has_it = best is not None and metric in (best.metrics or {})
    if best is not None and (tune_has_it or best_run):
        # MLflow's pick stands even when Tune holds no result for it: a trial that finished its last epoch
        # after the killed driver's last state save is restarted on resume, and its restored Train run,
        # having no epoch left, reports nothing to Tune (DEVELOPERS.md, "A trial that had finished")
        best_trial = _result_trial_id(best)
        from ..search_spaces import apply_sample

        best_config = apply_sample(cfg.to_dict(), best.config).to_dict()
        best_metrics = best_epoch_metrics(best, metric, mode) if tune_has_it else {}
        if best_run and picked.get("best_epoch") is not None:
            # MLflow's epochs, as `qksweep best` reads them: a trial ASHA stopped may log one more epoch
            # after Tune's last result, and that epoch can be its best
            best_metrics = mlflow_epoch_metrics(cfg.tracking.uri, best_run, int(picked["best_epoch"])) or best_metrics
        best_metrics["searched"] = dict(best.config)
    return SweepResult(name=name, best_config=best_config, best_metrics=best_metrics or {}, best_trial_id=best_trial,
                       best_run_id=best_run, parent_run_id=parent_run_id, trials=df, storage_path=storage_path,
                       num_errors=grid.num_errors)


def _result_trial_id(result) -> str | None:
    """A Tune result's trial id: from its metrics, or (a trial with no result) from its folder's name,
    ``trial_driver_<id>_<n>_...``."""
    tid = (result.metrics or {}).get("trial_id")
    if tid:
        return tid
    parts = Path(str(result.path)).name.split("_")
    return parts[2] if len(parts) > 2 and parts[:2] == ["trial", "driver"] else None


def mlflow_epoch_metrics(uri: str, run_id: str, step: int) -> dict[str, Any]:
    """The reported metrics a run logged at epoch ``step`` (empty when MLflow cannot say)."""
    try:
        c = runs.client(uri)
        logged = runs.retrying(lambda: c.get_run(run_id), what="run lookup").data.metrics
        out = {}
        for key in (k for k in REPORTED_METRICS if k in logged):  # one history call per metric the run has
            hist = runs.retrying(lambda key=key: c.get_metric_history(run_id, key), what="metric history")
            at = [m.value for m in hist if m.step == step]
            if at:
                out[key] = at[-1]
        return out
    except Exception:  # noqa: BLE001 - MLflow away: Tune's view of the epoch stands
        return {}


def best_epoch_metrics(result, metric: str, mode: str) -> dict[str, Any]:
    """The metrics of the trial's best epoch (Result.metrics holds only its last report)."""
    df = result.metrics_dataframe
    if df is None or metric not in df or df[metric].dropna().empty:
        return {k: v for k, v in result.metrics.items() if k in REPORTED_METRICS}
    row = df.loc[df[metric].idxmax() if mode == "max" else df[metric].idxmin()]
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items() if k in REPORTED_METRICS}
