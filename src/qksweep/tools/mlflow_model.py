"""A trial's best checkpoint as an MLflow model: logged with ``mlflow.pytorch`` (signature and input
example), registered under a name with an alias (``champion`` by default), and ``models:/NAME@ALIAS`` or
``models:/NAME/VERSION`` read back by ``validate``, ``predict``, ``attention`` and ``spectrum`` (the
lookup is ``tracking/models.py``).

The registered version is tagged with the qksweep checkpoint it was made from (``qksweep.checkpoint``),
so qksweep's own tools load the same weights from the run's checkpoint artifact (with its config and
normalisation), while ``mlflow.pyfunc.load_model("models:/NAME@champion").predict(batch)`` serves it
anywhere qksweep is installed.

The model is saved pickled (``serialization_format="pickle"``), not as MLflow 3's default ``pt2``
(``torch.export``): SpikingJelly 2.0's neurons run as custom operators (``torch.ops.sj_lif``) that a
``pt2`` file names but cannot load unless SpikingJelly registered them first, so a pt2 QKFormer fails to
load in a fresh process."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from ..tracking.models import ARTIFACT


@dataclass
class Registered:
    name: str
    version: str
    alias: str
    run_id: str
    model_uri: str  # models:/NAME@ALIAS


def requirements() -> list[str]:
    """Pinned to what logged the model (MLflow's own inference would load the model once more to find out)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("torch", "timm", "spikingjelly", "mlflow", "qksweep"):
        try:
            out.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            continue
    return out


@contextmanager
def _tracking(uri: str, experiment_id: str | None = None):
    """MLflow's fluent model API reads the global tracking URI and active experiment (a logged model is made
    in the active experiment, whatever its run's): these while the block runs."""
    import mlflow
    import mlflow.tracking.fluent as fluent

    before, exp_before = mlflow.get_tracking_uri(), fluent._active_experiment_id
    mlflow.set_tracking_uri(uri)
    try:
        if experiment_id is not None:
            mlflow.set_experiment(experiment_id=experiment_id)
        yield
    finally:
        mlflow.set_tracking_uri(before)
        fluent._active_experiment_id = exp_before


def log_model(uri: str, run_id: str, *, which: str = "best", registered_model_name: str | None = None):
    """Log run ``run_id``'s ``which`` checkpoint (as MLflow holds it) into that run as an MLflow pytorch model
    (artifact ``model``), with a signature and an input example of the model's input shape; returns MLflow's
    ``ModelInfo``. The run's status is not touched (no run is started or ended)."""
    import logging

    import mlflow
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    from ..data import data_shape
    from ..models.serving import ServingModel
    from ..tracking.runs import client, retrying
    from .source import load_source

    loaded = load_source(run_id, tracking_uri=uri, which=which)
    model = ServingModel(loaded.model).eval()
    in_chans, frames = data_shape(loaded.cfg.data)
    size = loaded.cfg.data.img_size
    shape = (2, frames, in_chans, size, size) if frames is not None else (2, in_chans, size, size)
    example = np.zeros(shape, dtype=np.float32)
    with torch.no_grad():
        out = model(torch.from_numpy(example)).numpy()
    artifact = (loaded.checkpoint or "").split(" ")[-1] or f"checkpoints/{which}"  # "run ID checkpoints/best"
    exp = retrying(lambda: client(uri).get_run(run_id), what="run lookup").info.experiment_id
    quiet = logging.getLogger("mlflow.pytorch")  # its warning about pickles: the module's docstring says why
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    with _tracking(uri, exp):
        try:
            return mlflow.pytorch.log_model(model, name=ARTIFACT, signature=infer_signature(example, out),
                                            input_example=example, pip_requirements=requirements(),
                                            registered_model_name=registered_model_name, serialization_format="pickle",
                                            run_id=run_id, tags={"qksweep.checkpoint": artifact, "qksweep.run_id": run_id})
        finally:
            quiet.setLevel(level)


def logged_models(uri: str, experiment_ids: list[str], run_id: str | None = None) -> dict:
    """run id -> the newest model qksweep logged in that run (``tracking.log_model``), in one search."""
    import mlflow

    where = f"source_run_id = '{run_id}'" if run_id else None
    with _tracking(uri):
        found = mlflow.search_logged_models(experiment_ids=experiment_ids, filter_string=where, output_format="list")
    out: dict = {}
    for m in found:
        rid = (m.tags or {}).get("qksweep.run_id")
        if m.name == ARTIFACT and rid == m.source_run_id and (rid not in out or m.creation_timestamp > out[rid].creation_timestamp):
            out[rid] = m
    return out


def logged_model(uri: str, run_id: str):
    """The model qksweep logged in run ``run_id``, or None."""
    from ..tracking.runs import client, retrying

    exp = retrying(lambda: client(uri).get_run(run_id), what="run lookup").info.experiment_id
    return logged_models(uri, [exp], run_id).get(run_id)


def register_run(uri: str, run_id: str, name: str, *, alias: str = "champion", which: str = "best",
                 tags: dict[str, str] | None = None) -> Registered:
    """Register run ``run_id``'s model as ``name`` (logging it first when the run has none: a trial ASHA
    stopped, or ``tracking.log_model: false``) and point ``alias`` at the new version."""
    import mlflow

    from ..tracking.runs import client, retrying

    c = client(uri)
    existing = logged_model(uri, run_id) if which == "best" else None
    if existing is not None:
        with _tracking(uri):
            version = str(mlflow.register_model(existing.model_uri, name).version)
        checkpoint = (existing.tags or {}).get("qksweep.checkpoint", "checkpoints/best")
    else:
        info = log_model(uri, run_id, which=which, registered_model_name=name)
        version = str(info.registered_model_version)
        checkpoint = f"checkpoints/{which}"
    for k, v in {"qksweep.checkpoint": checkpoint, "qksweep.run_id": run_id, **(tags or {})}.items():
        retrying(lambda k=k, v=v: c.set_model_version_tag(name, version, k, v), what="model version tag")
    retrying(lambda: c.set_registered_model_alias(name, alias, version), what="model alias")
    return Registered(name, version, alias, run_id, f"models:/{name}@{alias}")
