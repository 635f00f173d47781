"""The checks that need more than the schema: the model registry's shapes, data folders, optimizer and
scheduler names, the tracking URI, storage, GPUs, the distillation teacher, and for a sweep its space,
metrics, constraints, searcher and scheduler and every model the space can sample. They run before Ray
or MLflow is touched and raise one-line :class:`~qksweep.config.ConfigError` (exit code 2).

:mod:`qksweep.config` is the pure schema and imports nothing else from the package; this module is
where the registries meet it."""

from __future__ import annotations

import itertools
import math

from .config import SCHEDULERS, STATIC_CONSTRAINTS, Config, ConfigError, known_num_classes, suggest
from .names import REPORTED_METRICS
from .search_spaces import SHAPE_KEYS, ParamSpec, apply_sample, parse_space

TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "file")


def check_tracking_uri(uri: str) -> None:
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""
    if scheme not in TRACKING_SCHEMES:
        raise ConfigError(
            f"tracking.uri '{uri.split('@')[-1]}' has an unsupported scheme: use sqlite:///mlflow.db, "
            "http://HOST:PORT (an mlflow server) or a database URI such as postgresql://..."
        )
    if scheme == "file":
        raise ConfigError("tracking.uri: MLflow 3 refuses the plain file store; use sqlite:///mlflow.db or an mlflow server")


def check_model(cfg: Config) -> None:
    """The model request (name, shapes, ``model.neuron``) through the registry, without building it."""
    from .models import ModelArgError, check_model_args

    in_chans, frames = input_shape(cfg)
    over = cfg.model.overrides()
    if frames is not None:
        over["time_steps"] = frames
    try:
        check_model_args(cfg.model.name, num_classes=known_num_classes(cfg.data) or 10, in_chans=in_chans,
                         img_size=cfg.data.img_size, **over)
    except ModelArgError as e:
        raise ConfigError(f"config: {e}") from None


def input_shape(cfg: Config) -> tuple[int, int | None]:
    """The model's input channels and, for event data, its time steps (``data.frames``), read from the
    data config without touching the disk; a data name the registry does not know reads as images."""
    from .data import DataError, data_shape

    try:
        return data_shape(cfg.data)
    except DataError:
        return 3, None  # check_data names the unknown dataset


def check_event_input(cfg: Config) -> None:
    """Event frames feed a spiking model one time step per frame: the model's time steps follow
    ``data.frames``, its input channels are the data's, and image-only settings are refused."""
    from .models import model_info

    in_chans, frames = input_shape(cfg)
    m, d = cfg.model, cfg.data
    if m.in_chans is not None and m.in_chans != in_chans:
        what = "event frames have 2 channels (ON/OFF polarity)" if frames else "images have 3 channels (RGB)"
        raise ConfigError(f"config: model.in_chans={m.in_chans} but {d.name} {what}: remove model.in_chans "
                          f"(it follows the data) or set it to {in_chans}")
    if frames is None:
        return
    if not model_info(m.name).is_spiking:
        raise ConfigError(f"config: data.name={d.name} gives event frames [T, 2, H, W] for a spiking model, and "
                          f"{m.name} is not one: use model.name: qkformer_dvs (or another SNN)")
    if m.time_steps is not None and m.time_steps != frames:
        raise ConfigError(f"config: model.time_steps={m.time_steps} but data.frames={frames}: on event data the "
                          f"model runs one time step per frame; remove model.time_steps (it follows data.frames) "
                          f"or set data.frames: {m.time_steps}")
    if cfg.optim.cutmix > 0:
        raise ConfigError("config: optim.cutmix cuts image boxes and does not apply to event frames; use "
                          "optim.mixup (the official DVS recipe) and set optim.cutmix: 0")


PROBE_TIMEOUT_S = 3.0


def _bounded(fn, timeout: float):
    """``fn()`` in a daemon thread, waited for at most ``timeout`` s: a name lookup that hangs (no
    resolver answer) cannot hold a command longer than its probe. Returns fn's error, or None."""
    import threading

    box: list[BaseException | None] = [TimeoutError(f"no answer within {timeout:g} s")]

    def run() -> None:
        try:
            fn()
            box[0] = None
        except BaseException as e:  # noqa: BLE001 - handed back to the caller, who words it
            box[0] = e

    t = threading.Thread(target=run, daemon=True, name="qksweep-probe")
    t.start()
    t.join(timeout)
    return box[0]


def _why(e: BaseException, timeout: float) -> str:
    import socket

    reason = getattr(e, "reason", e)
    if isinstance(reason, (socket.timeout, TimeoutError)) or "timed out" in str(reason):
        return f"no answer within {timeout:g} s"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, socket.gaierror):
        return "unknown host"
    text = str(reason).splitlines()[0] if str(reason) else type(reason).__name__
    return text[:160]


def _url_parts(uri: str, what: str, example: str):
    """(scheme, host, port) of an http(s) URL, or a one-line ConfigError."""
    from urllib.parse import urlsplit

    from .tracking.runs import mask_secrets

    shown = mask_secrets(uri)
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in uri):
        raise ConfigError(f"{what} '{shown}' contains white space or control characters: use {example}")
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as e:
        raise ConfigError(f"{what} '{shown}' is not a valid URL ({e}): use {example}") from None
    if not parts.hostname:
        raise ConfigError(f"{what} '{shown}' names no host: use {example}")
    return parts.scheme.lower(), parts.hostname, port


def _mlflow_headers() -> dict[str, str]:
    """The credentials MLflow's own client would send (its environment variables)."""
    import base64
    import os

    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    return {}


def check_tracking_server(uri: str, *, what: str = "tracking.uri", timeout: float = PROBE_TIMEOUT_S) -> None:
    """An ``http(s)://`` tracking URI must answer like an MLflow server within ``timeout`` seconds (one GET
    of ``/api/2.0/mlflow/experiments/search``), before anything is logged or Ray starts; other schemes
    are left to :func:`check_tracking_uri`. A server that answers 5xx is there: MLflow's own retries
    take it from there. ``what`` names where the URI came from (``tracking.uri``, ``--tracking-uri``)."""
    import json
    import os
    import ssl
    import urllib.error
    import urllib.request

    from .tracking.runs import mask_secrets

    if not uri.lower().startswith(("http://", "https://")):
        return
    example = "http://HOST:PORT of an `mlflow server`"
    scheme, _, _ = _url_parts(uri, what, example)
    shown = mask_secrets(uri)
    url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
    ctx = None
    if scheme == "https":
        if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
            ctx = ssl._create_unverified_context()  # noqa: S323 - what MLflow does when told so
        else:
            ctx = ssl.create_default_context(cafile=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or None)
    answer: dict = {}

    def get() -> None:
        req = urllib.request.Request(url, headers=_mlflow_headers())
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as r:  # noqa: S310 - http(s) only
            answer["body"] = r.read(65536)

    err = _bounded(get, timeout + 1.0)
    fix = f"start it (`mlflow server --host 127.0.0.1 --port PORT`) or fix {what}"
    if isinstance(err, urllib.error.HTTPError):
        if err.code in (401, 403):
            raise ConfigError(f"the MLflow server at {shown} refused the request (HTTP {err.code}): set "
                              "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)")
        if err.code >= 500:
            return
        raise ConfigError(f"{what} {shown} answered HTTP {err.code} to MLflow's API: not an MLflow tracking server; "
                          "check its host, port and path")
    if err is not None:
        raise ConfigError(f"{what} {shown}: no MLflow server answers there ({_why(err, timeout)}); {fix}")
    try:
        body = json.loads(answer["body"] or b"{}")
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ConfigError(f"{what} {shown} did not answer like an MLflow tracking server; check its host, port and path")


def check_ray_address(address: str | None = None, *, timeout: float = PROBE_TIMEOUT_S) -> None:
    """The Ray cluster a run joins (``address`` or ``RAY_ADDRESS``: ``HOST:PORT`` of its GCS, or
    ``ray://HOST:PORT``) must accept a connection within ``timeout`` seconds. Nothing to check without
    one (a local Ray is started), for ``auto`` (Ray looks for a local cluster), or when this process is
    already connected."""
    import os
    import socket

    a = (address or os.environ.get("RAY_ADDRESS") or "").strip()
    if not a or a in ("auto", "local"):
        return
    try:
        import ray

        if ray.is_initialized():
            return
    except ImportError:  # pragma: no cover - ray is a dependency
        pass
    src = "RAY_ADDRESS" if not address else "the Ray address"
    example = "HEAD:6379 (the cluster's GCS), or unset RAY_ADDRESS to start a local Ray"
    scheme = a.split("://", 1)[0].lower() if "://" in a else ""
    if scheme not in ("", "ray"):
        raise ConfigError(f"{src}={a}: a run joins a cluster by its GCS address; use {example} "
                          "(http://HEAD:8265 is the dashboard, for qksweep submit --address)")
    _, host, port = _url_parts(a if scheme else f"ray://{a}", src, example)
    if port is None:
        raise ConfigError(f"{src}={a} gives no port: use {example}")
    err = _bounded(lambda: socket.create_connection((host, port), timeout=timeout).close(), timeout + 1.0)
    if err is not None:
        raise ConfigError(f"{src}={a}: nothing answers at {host}:{port} ({_why(err, timeout)}); start the cluster "
                          "(`ray start --head`) or unset RAY_ADDRESS to run on a local Ray")


def check_reachable(cfg: Config) -> None:
    """What a run joins, before it starts Ray or logs anything: the Ray cluster and the tracking server
    (the bucket of ``run.storage`` is probed by :func:`qksweep.storage.probe`)."""
    check_ray_address()
    if cfg.tracking.enabled:
        check_tracking_server(cfg.tracking.uri)


def check_config(cfg: Config) -> Config:
    """Everything that can be checked before Ray or MLflow is touched: model shapes, data folders,
    optimizer and scheduler names, the tracking URI."""
    from timm.optim import list_optimizers

    from .data import DataError, check_data
    from .storage import check_uri

    check_tracking_uri(cfg.tracking.uri)
    check_uri(cfg.run.storage)  # s3:// or gs:// (static here: the bucket is probed when a run starts)
    try:
        check_data(cfg.data)
    except DataError as e:
        raise ConfigError(f"config: {e}") from None
    check_event_input(cfg)
    check_model(cfg)
    opts = list_optimizers()
    if cfg.optim.name.lower() not in opts:
        raise ConfigError(f"config: optim.name '{cfg.optim.name}' is not a timm optimizer{suggest(cfg.optim.name, opts)}")
    if cfg.optim.sched not in SCHEDULERS:
        raise ConfigError(f"config: optim.sched '{cfg.optim.sched}' is not one of {', '.join(SCHEDULERS)}{suggest(cfg.optim.sched, list(SCHEDULERS))}")
    if cfg.optim.layer_decay is not None and not cfg.model.name.startswith("vit_"):
        raise ConfigError("config: optim.layer_decay needs a model with layer groups (timm ViTs); remove it for SNNs")
    if (cfg.optim.mixup > 0 or cfg.optim.cutmix > 0) and cfg.data.batch_size % 2:
        raise ConfigError(f"config: data.batch_size={cfg.data.batch_size} must be even when mixup/cutmix is on")
    if cfg.sweep.stop_on.spec_sigma_max_growth and not cfg.spectral.enabled:
        raise ConfigError("config: sweep.stop_on.spec_sigma_max_growth needs spectral.enabled: true")
    if cfg.run.launcher == "tune" and cfg.run.workers > 1:
        raise ConfigError(f"config: run.launcher: tune trains one worker in the trial's own process, but "
                          f"run.workers={cfg.run.workers}: set run.launcher: train (or auto), or run.workers: 1")
    if cfg.sweep.reuse_actors is True and cfg.trial_launcher() == "train":
        raise ConfigError("config: sweep.reuse_actors: true reuses trial processes that train themselves, but these "
                          "trials train on Ray Train (run.workers > 1 or run.launcher: train): remove the key or set it false")
    if cfg.run.gpus_per_worker > 0:
        check_gpus_available(cfg)
    if cfg.distill.enabled:
        from .distill import check_distill

        check_distill(cfg.distill, cfg.data, cfg.tracking.uri)
    return cfg


def prepare_inputs(cfg: Config, specs: list[ParamSpec] = ()) -> None:
    """One-off work on the inputs in the driver, before Ray starts: downloads asked for, and SpikingJelly's
    conversion of event data to frames -- for every ``data.frames`` / ``data.split_by`` the sweep's space can
    sample -- so no trial waits on (or races to write) a frame cache."""
    from .data import DataError, prepare_data

    keys = ("data.frames", "data.split_by")
    grids = [(s.key, s.values()) for s in specs if s.key in keys and s.values()]
    base = cfg.to_dict()
    for combo in itertools.product(*[v for _, v in grids]):
        point = cfg if not grids else apply_sample(base, dict(zip((k for k, _ in grids), combo)))
        try:
            prepare_data(point.data)
        except DataError as e:
            raise ConfigError(f"config: {e}") from None


def check_gpus_available(cfg: Config) -> None:
    """GPUs asked for where none exist (locally, with no RAY_ADDRESS) are refused before Ray starts."""
    import os

    if os.environ.get("RAY_ADDRESS"):
        return
    import torch

    have = torch.cuda.device_count()
    need = cfg.run.gpus_per_worker * cfg.run.workers
    if have < need:
        raise ConfigError(
            f"config: run.gpus_per_worker={cfg.run.gpus_per_worker} × run.workers={cfg.run.workers} needs {need:g} GPUs "
            f"but this machine has {have}: set run.gpus_per_worker=0 or submit to a cluster with GPUs"
        )


def check_sweep(cfg: Config) -> list[ParamSpec]:
    """Everything about a sweep that can be refused before Ray starts; returns the parsed space."""
    if not cfg.sweep.space:
        raise ConfigError("sweep.space is empty: give at least one key to search, or include a preset (include: qkformer)")
    specs = parse_space(cfg.sweep.space)
    for metric in cfg.sweep.metrics:
        if metric not in REPORTED_METRICS:
            raise ConfigError(f"sweep.metric '{metric}' is never reported by the training loop; choose one of "
                              f"{', '.join(m for m in REPORTED_METRICS if '/' in m)}{suggest(metric, list(REPORTED_METRICS))}")
        if metric.startswith("val_ema/") and not cfg.optim.ema:
            raise ConfigError(f"sweep.metric '{metric}' needs optim.ema: true")
        if metric.startswith("snn/") and not cfg.snn.enabled:
            raise ConfigError(f"sweep.metric '{metric}' needs snn.enabled: true")
    for key, bound in cfg.sweep.constraints.items():
        if key not in STATIC_CONSTRAINTS and key not in REPORTED_METRICS:
            raise ConfigError(f"sweep.constraints.{key}: not a reported metric nor one of {', '.join(STATIC_CONSTRAINTS)}"
                              f"{suggest(key, list(REPORTED_METRICS))}")
        if bound.min is None and bound.max is None:
            raise ConfigError(f"sweep.constraints.{key}: give min, max or both")
    for key in cfg.sweep.stop_at:
        if key not in cfg.sweep.metrics:
            raise ConfigError(f"sweep.stop_at.{key}: not one of sweep.metric ({', '.join(cfg.sweep.metrics)}); stop_at "
                              "ends the sweep when a trial reaches a value of a searched metric"
                              f"{suggest(key, cfg.sweep.metrics)}")
    check_search_algorithms(cfg)
    check_sampler(cfg, specs)
    check_space_validity(cfg, specs)
    check_enqueue(cfg, specs)
    return specs


def check_enqueue(cfg: Config, specs: list[ParamSpec]) -> None:
    """``sweep.enqueue``: every key in the space, every value one the space can sample, and the config
    of each point (the rest of it as in the config file) valid."""
    by_key = {s.key: s for s in specs}
    for i, point in enumerate(cfg.sweep.enqueue):
        where = f"sweep.enqueue[{i}]"
        if not point:
            raise ConfigError(f"{where} is empty: give the searched keys to evaluate first, e.g. {{optim.lr: 1.0e-3}}")
        for key, v in point.items():
            spec = by_key.get(key)
            if spec is None:
                raise ConfigError(f"{where}: '{key}' is not in sweep.space{suggest(key, list(by_key))}; an enqueued "
                                  "configuration sets searched keys only (put fixed values in the config itself)")
            if not spec.contains(v):
                shown = list(spec.args[0]) if spec.dist == "choice" else list(spec.args)
                raise ConfigError(f"{where}: {key}={v!r} is outside sweep.space.{key} ({spec.dist} {shown}): "
                                  "widen the space or change the value")
        try:
            apply_sample(cfg.to_dict(), dict(point))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None


SINGLE_AND_MULTI_OBJECTIVE = ("tpe", "random", "nsga2", "qmc", "grid")


def check_search_algorithms(cfg: Config) -> None:
    """The scheduler and sampler fit the metrics and the epochs (``orchestrator.searcher`` builds them
    from a config that passed here)."""
    s, multi = cfg.sweep.scheduler, len(cfg.sweep.metrics) > 1
    if s.population_based:
        check_pbt(cfg)
    if s.name == "moasha" and not multi:
        raise ConfigError("sweep.scheduler.name 'moasha' ranks trials on several metrics; give sweep.metric as a list "
                          "(e.g. [val/top1, snn/energy_mj]) or use asha for one metric")
    if s.name != "none":
        if multi and s.name != "moasha":
            raise ConfigError(f"sweep.scheduler.name '{s.name}' stops trials on one metric; with several sweep.metric "
                              "entries use moasha (multi-objective ASHA) or none")
        max_t = s.max_t or cfg.optim.epochs
        if s.grace_period is not None and s.grace_period > max_t:
            raise ConfigError(f"sweep.scheduler.grace_period={s.grace_period} exceeds max_t={max_t} (optim.epochs): lower it")
    check_rung_metric(cfg)
    sampler = cfg.sweep.searcher.sampler
    if multi and sampler not in SINGLE_AND_MULTI_OBJECTIVE:
        raise ConfigError(f"sweep.searcher.sampler '{sampler}' is single-objective; use tpe or nsga2 with several metrics")


def check_pbt(cfg: Config) -> None:
    """Population-based training (``orchestrator/pbt.py``): one metric, something it can change while trials
    train, and none of what only an Optuna searcher or several seeds per trial have."""
    from .orchestrator.pbt import MUTABLE

    sw, name = cfg.sweep, cfg.sweep.scheduler.name
    if len(sw.metrics) > 1:
        raise ConfigError(f"sweep.scheduler.name '{name}' ranks trials on one metric; give one sweep.metric, or use "
                          "moasha for several")
    specs = parse_space(sw.space)
    keys = [s for s in specs if s.key in MUTABLE]
    if not keys:
        raise ConfigError(f"sweep.scheduler.name '{name}' changes values while trials train, and sweep.space has none "
                          f"it can change: add one of {', '.join(MUTABLE)}")
    if name == "pb2":
        discrete = [s for s in keys if s.values() is not None]
        if discrete:
            raise ConfigError(f"sweep.scheduler.name 'pb2' models continuous values, but sweep.space.{discrete[0].key} is "
                              f"{discrete[0].dist}: make it uniform or loguniform, or use pbt")
    if sw.scheduler.perturbation_interval >= cfg.optim.epochs:
        raise ConfigError(f"sweep.scheduler.perturbation_interval={sw.scheduler.perturbation_interval} leaves no "
                          f"perturbation within optim.epochs={cfg.optim.epochs}: make it smaller than the epochs")
    if sw.repeats > 1:
        raise ConfigError(f"sweep.repeats={sw.repeats} with sweep.scheduler.name '{name}': a trial that copies another "
                          "copies one checkpoint, not one per seed; use repeats with asha or none")
    if sw.warm_start:
        raise ConfigError(f"sweep.warm_start seeds an Optuna study, which sweep.scheduler.name '{name}' does not use "
                          "(Ray Tune samples PBT's first population at random): drop it")
    if sw.searcher.options or sw.searcher.n_startup_trials:
        raise ConfigError(f"sweep.searcher options are for an Optuna sampler, which sweep.scheduler.name '{name}' does "
                          "not use (Ray Tune samples PBT's first population at random): drop them")


def check_rung_metric(cfg: Config) -> None:
    """``sweep.scheduler.metric`` / ``mode``: a reported metric (what it needs switched on), with a known
    direction or a mode, for a scheduler that ranks on one metric."""
    from .names import METRIC_MODES

    s = cfg.sweep.scheduler
    if s.metric is None:
        if s.mode is not None:
            raise ConfigError(f"sweep.scheduler.mode={s.mode} without sweep.scheduler.metric: the scheduler ranks on "
                              "sweep.metric in sweep.mode; give the metric it should rank on, or remove the mode")
        return
    if s.name in ("none", "moasha"):
        what = "nothing ranks trials" if s.name == "none" else "moasha ranks on the sweep.metric list"
        raise ConfigError(f"sweep.scheduler.metric is set but sweep.scheduler.name is {s.name} ({what}): remove it")
    if s.metric not in REPORTED_METRICS:
        raise ConfigError(f"sweep.scheduler.metric '{s.metric}' is never reported by the training loop; choose one of "
                          f"{', '.join(m for m in REPORTED_METRICS if '/' in m)}{suggest(s.metric, list(REPORTED_METRICS))}")
    if s.metric.startswith("val_ema/") and not cfg.optim.ema:
        raise ConfigError(f"sweep.scheduler.metric '{s.metric}' needs optim.ema: true")
    if s.metric.startswith("snn/") and not cfg.snn.enabled:
        raise ConfigError(f"sweep.scheduler.metric '{s.metric}' needs snn.enabled: true")
    if s.mode is None and s.metric not in cfg.sweep.metrics and s.metric not in METRIC_MODES:
        raise ConfigError(f"sweep.scheduler.metric '{s.metric}' has no known direction: give sweep.scheduler.mode "
                          "(max or min)")


def check_sampler(cfg: Config, specs: list[ParamSpec]) -> None:
    """``grid`` over discrete keys only, and ``sweep.searcher.options`` the sampler's own arguments:
    names from its signature, values it accepts (it is built here once, before Ray starts)."""
    import inspect

    import optuna

    from .orchestrator.searcher import OWN_ARGUMENTS, SAMPLER_CLASSES, make_sampler, sampler_name

    s, name = cfg.sweep.searcher, sampler_name(cfg)
    if name == "grid":
        continuous = [sp for sp in specs if sp.values() is None]
        if continuous:
            raise ConfigError(f"sweep.searcher.sampler 'grid' needs discrete keys, but sweep.space.{continuous[0].key} is "
                              f"{continuous[0].dist}: make it a choice (or an int range), or use another sampler")
        size = math.prod(len(sp.values()) for sp in specs)
        if cfg.sweep.num_samples > size:
            raise ConfigError(f"sweep.num_samples={cfg.sweep.num_samples} exceeds the grid's {size} combinations: "
                              f"set it to {size} or widen sweep.space")
    cls = getattr(optuna.samplers, SAMPLER_CLASSES[name])
    params = inspect.signature(cls.__init__).parameters
    known = [k for k in params if k not in ("self", *OWN_ARGUMENTS)]
    for key in s.options:
        if key in OWN_ARGUMENTS:
            raise ConfigError(f"sweep.searcher.options.{key}: qksweep sets it itself "
                              + ("(sweep.searcher.seed)" if key == "seed" else "(from sweep.space)") + "; remove it")
        if key not in params:
            raise ConfigError(f"sweep.searcher.options.{key}: {cls.__name__} has no argument '{key}'"
                              f"{suggest(key, known)}; its arguments: {', '.join(known)}")
    if "n_startup_trials" in s.options and s.n_startup_trials is not None:
        raise ConfigError("sweep.searcher.n_startup_trials and sweep.searcher.options.n_startup_trials are both set: keep one")
    try:
        make_sampler(cfg, specs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"sweep.searcher.options: {cls.__name__} refused them ({str(e).splitlines()[0][:200]})") from None


MAX_COMBINATIONS = 20_000


def check_space_validity(base: Config, specs: list[ParamSpec]) -> None:
    """Build the config of every combination of shape-relevant values and check it with the model
    registry; a space that could produce an invalid model is refused before anything starts."""
    shape = [s for s in specs if s.key in SHAPE_KEYS]
    for s in shape:
        if s.values() is None:
            raise ConfigError(f"sweep.space.{s.key}: a shape key needs discrete values (choice, randint or int), not {s.dist}")
    grids = [s.values() for s in shape]
    total = math.prod(len(g) for g in grids) if grids else 1
    if total > MAX_COMBINATIONS:
        raise ConfigError(f"sweep.space: {total} combinations of shape keys is too many to verify; narrow "
                          f"{', '.join(s.key for s in shape)}")
    base_dict = base.to_dict()
    seen: set[tuple] = set()
    for combo in itertools.product(*grids):
        sample = dict(zip((s.key for s in shape), combo))
        try:
            cfg = apply_sample(base_dict, sample)
            key = (cfg.model.model_dump_json(), cfg.data.img_size, cfg.data.frames)
            if key in seen:
                continue
            seen.add(key)
            check_config(cfg)
        except ConfigError as e:
            point = ", ".join(f"{k}={v}" for k, v in sample.items())
            hint = "" if "model.head_dim" in sample else " (parametrise the width as model.num_heads × model.head_dim to make every sample valid)"
            raise ConfigError(f"sweep.space can sample an invalid model at {point}: {str(e).removeprefix('config: ')}{hint}") from None
    # the neuron keys together: every corner of their box (a reset at one key's bound must stay below a
    # threshold at another's), checked with the model (neuron keys on a ViT, attention thresholds on a ResNet)
    neuron = [s for s in specs if s.key.startswith("model.neuron.")]
    levels = ("model.neuron.v_reset", "model.neuron.v_threshold", "model.neuron.attn_v_threshold")
    box = [s for s in neuron if s.key in levels]
    points = [dict(zip((s.key for s in box), c)) for c in itertools.product(
        *[(s.values() or [s.args[0], s.args[1]]) for s in box])]
    points = [p for p in points if p] + [{s.key: v} for s in neuron for v in (s.values() or [s.args[0], s.args[1]])]
    for sample in points[:MAX_COMBINATIONS]:
        try:
            check_model(apply_sample(base_dict, sample))
        except ConfigError as e:
            point = ", ".join(f"{k}={v}" for k, v in sample.items())
            raise ConfigError(f"sweep.space can sample invalid neurons at {point}: {str(e).removeprefix('config: ')}") from None
    # the non-shape keys: one sample each at its bounds validates types and ranges
    for s in specs:
        if s.key in SHAPE_KEYS:
            continue
        vals = s.values() or [s.args[0], s.args[1]]
        for v in vals:
            try:
                apply_sample(base_dict, {s.key: v})
            except ConfigError as e:
                raise ConfigError(f"sweep.space.{s.key}: value {v!r} is not valid: {str(e).removeprefix('config: ')}") from None
