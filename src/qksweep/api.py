"""The Python API. The ``qksweep`` command is a thin layer over these functions.

Every function accepts a YAML path, a dict or a :class:`~qksweep.config.Config`, plus ``-s``-style
override strings (``overrides=["optim.lr=3e-4"]``) and keyword overrides with ``__`` for dots
(``optim__lr=3e-4``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .checks import check_config
from .config import DEFAULT_STORAGE, DEFAULT_TRACKING_URI, Config, load_config
from .trainables.train import TrainResult, run_training


def resolve(config: "str | Path | dict[str, Any] | Config", overrides: list[str] | None = None, **kw: Any) -> Config:
    """Load, override and fully check a config (raises ConfigError with one line). Relative paths
    become absolute here, in the driver: Ray workers and Tune trials run in other directories."""
    return absolute_paths(check_config(load_config(config, overrides, **kw)))


def absolute_paths(cfg: Config) -> Config:
    cfg = cfg.model_copy(deep=True)
    if cfg.data.root and "://" not in cfg.data.root:
        cfg.data.root = str(Path(cfg.data.root).expanduser().resolve())
    d = cfg.distill
    if d.teacher and "://" not in d.teacher and Path(d.teacher).expanduser().exists():
        d.teacher = str(Path(d.teacher).expanduser().resolve())
    if d.teacher_checkpoint and "://" not in d.teacher_checkpoint:
        d.teacher_checkpoint = str(Path(d.teacher_checkpoint).expanduser().resolve())
    from .storage import is_uri, local_path

    if not is_uri(cfg.run.storage):  # a path, or file://PATH
        cfg.run.storage = local_path(cfg.run.storage)
    uri = cfg.tracking.uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////") and uri != "sqlite:///:memory:":
        cfg.tracking.uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).expanduser().resolve())
    return cfg


def train(config: "str | Path | dict[str, Any] | Config", overrides: list[str] | None = None, **kw: Any) -> TrainResult:
    """One training run through Ray Train, logged to MLflow as a run with no parent."""
    cfg = resolve(config, overrides, **kw)
    return run_training(cfg)


def sweep(config: "str | Path | dict[str, Any] | Config", overrides: list[str] | None = None, *,
          name: str | None = None, num_samples: int | None = None, warm_start: str | None = None, **kw: Any):
    """A Tune sweep (Optuna + ASHA by default) with an MLflow parent run and one child per trial.
    ``warm_start``: an earlier sweep (name, folder or URI) whose trials seed the study (``sweep.warm_start``).
    Returns a :class:`~qksweep.orchestrator.sweep.SweepResult`."""
    import json

    from .orchestrator.sweep import run_sweep

    extra = list(overrides or [])
    if num_samples is not None:
        extra.append(f"sweep.num_samples={num_samples}")
    if warm_start is not None:
        extra.append(f"sweep.warm_start={json.dumps(warm_start)}")  # a YAML string, whatever it holds
    cfg = resolve(config, extra, **kw)
    return run_sweep(cfg, name=name)


def resume(name_or_path: str, *, storage: str | None = None, num_samples: int | None = None):
    """Continue an interrupted sweep where it stopped (unfinished and errored trials resume). MLflow
    records its trials kept while the server was away are sent first (see :func:`flush_mlflow`).
    ``num_samples``: extend the sweep to that many trials in all (also one a budget ended)."""
    from .checks import check_reachable
    from .orchestrator.sweep import check_extension, check_not_ended, find_sweep, resume_sweep, stored_config

    import json

    from .storage import STATE_FILE

    files = find_sweep(name_or_path, storage)  # no such sweep: one line, before anything is sent or started
    state = json.loads((files.local / STATE_FILE).read_text())
    if num_samples is None:
        check_not_ended(state)  # a budget ended it: complete, say so (SweepComplete)
    else:
        check_extension(state, num_samples)  # more trials than planned, or one line
    check_reachable(stored_config(state))
    flush_mlflow(name_or_path, storage=storage, wait_s=10, quiet=True)
    return resume_sweep(name_or_path, storage=storage, num_samples=num_samples)


def gc(name_or_path: str, *, storage: str | None = None, keep_best: int | None = None, dry_run: bool = False):
    """Remove the checkpoints a sweep no longer needs from its storage: of every finished trial all but its
    best and last, and with ``keep_best`` every checkpoint of the trials outside the K best (MLflow keeps
    their best and last as artifacts). Trials not over are left alone. Returns a
    :class:`~qksweep.orchestrator.gc.GcResult`; nothing is removed with ``dry_run``."""
    import json

    from .checks import check_tracking_server
    from .orchestrator.gc import collect
    from .orchestrator.sweep import find_sweep, stored_config
    from .storage import STATE_FILE

    files = find_sweep(name_or_path, storage, purpose="to clean up")
    state = json.loads((files.local / STATE_FILE).read_text())
    cfg = stored_config(state)
    parent = state.get("parent_run_id") if cfg.tracking.enabled else None
    if parent and not dry_run:
        check_tracking_server(cfg.tracking.uri, what="the sweep's tracking URI")
    return collect(files, cfg, keep_best=keep_best, dry_run=dry_run, parent_run_id=parent)


def flush_mlflow(*targets: str, storage: str | None = None, wait_s: float = 30, quiet: bool = False):
    """Send what runs kept in their ``mlflow_pending.jsonl`` while the tracking server was away (epochs,
    best checkpoints, closing the run). ``targets``: pending files, run or sweep folders, or sweep names
    under ``storage``; none: everything under ``storage``. Returns the per-file results; files emptied
    are removed."""
    from .tracking import pending

    found = [p for t in (targets or (storage or DEFAULT_STORAGE,)) for p in pending.find_files(t, storage)]
    results = [pending.flush_file(p, wait_s) for p in dict.fromkeys(found)]
    if not quiet:
        for r in results:
            print(f"{r.path}: sent {r.sent} record(s)" + (
                f"; still pending: {pending.summarize(r.left)} (MLflow: "
                f"{str(r.error).splitlines()[0][:160] if r.error else 'no answer'})" if r.left else "; file removed"))
        if not results:
            print("nothing pending")
    return results


def continue_trial(run_id: str, *, epochs: int | None = None, overrides: list[str] | None = None,
                   tracking_uri: str | None = None) -> TrainResult:
    """Train a finished trial (or train run) further from its last checkpoint, as a new MLflow run
    tagged ``qksweep.continued_from``. ``epochs`` is the new total (default: the run's own budget)."""
    import os
    import tempfile

    import yaml

    from .config import ConfigError
    from .trainables.checkpoint import load_checkpoint
    from .tracking.runs import mask_secrets

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    from .checks import check_ray_address, check_tracking_server, check_tracking_uri

    check_tracking_uri(uri)
    check_ray_address()
    check_tracking_server(uri, what="tracking URI")
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        raise ConfigError(f"no MLflow store at {uri}: pass --tracking-uri")
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    from .tracking.runs import client

    c = client(uri)
    try:
        run = c.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"no MLflow run '{run_id}' at {mask_secrets(uri)}: `qksweep runs` lists run ids") from None
    tmp = Path(tempfile.mkdtemp(prefix="qksweep-continue-"))
    try:
        cfg_file = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="config.yaml", dst_path=str(tmp), tracking_uri=uri)
    except (MlflowException, OSError):
        raise ConfigError(f"run {run_id} has no config.yaml artifact: it was not made by qksweep") from None
    ckpt_dir = None
    for source in ("checkpoints/last", "checkpoints/best"):
        try:
            ckpt_dir = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=source, dst_path=str(tmp), tracking_uri=uri)
            break
        except (MlflowException, OSError):
            continue
    if ckpt_dir is None:
        raise ConfigError(f"run {run_id} has no checkpoint artifact (checkpoints/last or checkpoints/best) to continue from")
    state, _ = load_checkpoint(ckpt_dir)
    done = int(state["epoch"])
    base = yaml.safe_load(Path(cfg_file).read_text())
    extra = list(overrides or []) + [f"tracking.uri={uri}"]
    if epochs is not None:
        extra.append(f"optim.epochs={epochs}")
    cfg = resolve(base, extra)
    if cfg.optim.epochs <= done:
        raise ConfigError(f"run {run_id} already trained {done} epochs: pass --epochs greater than {done}")
    name = f"{run.info.run_name or run_id}-continued-{int(__import__('time').time())}"
    return run_training(cfg, run_name=name, tags={"qksweep.continued_from": run_id}, resume_from=str(ckpt_dir))


def results(sweep_name: str, *, tracking_uri: str | None = None, experiment: str | None = None, **kw: Any):
    """The trials of a sweep as MLflow holds them (works for sweeps run anywhere)."""
    import os

    from .orchestrator.results import sweep_results

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    return sweep_results(uri, sweep_name, experiment=experiment, **kw)
