"""A trial's best checkpoint as an MLflow model: logged with ``mlflow.pytorch`` (signature and input
example), registered under a name with an alias (``champion`` by default), and ``models:/NAME@ALIAS`` or
``models:/NAME/VERSION`` read back by ``validate``, ``predict``, ``attention`` and ``spectrum``.

The registered version is tagged with the qksweep checkpoint it was made from (``qksweep.checkpoint``),
so qksweep's own tools load the same weights from the run's checkpoint artifact (with its config and
normalisation), while ``mlflow.pyfunc.load_model("models:/NAME@champion").predict(batch)`` serves it
anywhere qksweep is installed.

The model is saved pickled (``serialization_format="pickle"``), not as MLflow 3's default ``pt2``
(``torch.export``): SpikingJelly 2.0's neurons run as custom operators (``torch.ops.sj_lif``) that a
``pt2`` file names but cannot load unless SpikingJelly registered them first, so a pt2 QKFormer fails to
load in a fresh process."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError

MODEL_URI_RE = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[0-9]+))$")
ARTIFACT = "model"


def is_model_uri(text: str) -> bool:
    return text.startswith("models:/")


def _parse(text: str) -> tuple[str, str | None, str | None]:
    m = MODEL_URI_RE.match(text)
    if not m:
        raise ConfigError(f"'{text}' is not a registered model URI: use models:/NAME@ALIAS or models:/NAME/VERSION")
    return m["name"], m["alias"], m["version"]


def model_version(text: str, uri: str):
    """The MLflow ``ModelVersion`` a ``models:/`` URI names, or one line naming what is not there."""
    from mlflow.exceptions import MlflowException

    from ..tracking.runs import client, mask_secrets

    name, alias, version = _parse(text)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():  # never make an empty store
        raise ConfigError(f"no registered model '{name}': there is no MLflow store at {uri} (pass --tracking-uri)")
    c = client(uri)
    try:
        return c.get_model_version_by_alias(name, alias) if alias else c.get_model_version(name, version)
    except MlflowException:
        pass
    try:
        c.get_registered_model(name)
    except MlflowException:
        raise ConfigError(f"no registered model '{name}' in {mask_secrets(uri)}: `qksweep best SWEEP --register "
                          f"{name}` registers a sweep's best trial") from None
    raise ConfigError(f"registered model '{name}' has no {'alias ' + repr(alias) if alias else 'version ' + version} in "
                      f"{mask_secrets(uri)}: the MLflow UI's Models page lists its versions and aliases") from None


def source_run(text: str, uri: str) -> tuple[str, str]:
    """(run id, checkpoint artifact) of the version a ``models:/`` URI names."""
    mv = model_version(text, uri)
    if not mv.run_id:
        raise ConfigError(f"{text} was not registered from a qksweep run (it names no run)")
    return mv.run_id, (mv.tags or {}).get("qksweep.checkpoint", "checkpoints/best")


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


def register_run(uri: str, run_id: str, name: str, *, alias: str = "champion", which: str = "best",
                 tags: dict[str, str] | None = None) -> Registered:
    """Log run ``run_id``'s ``which`` checkpoint as an MLflow pytorch model (in that run, artifact ``model``),
    register it as ``name`` and point ``alias`` at the new version. The run's status is left as it was."""
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
    c = client(uri)
    status = retrying(lambda: c.get_run(run_id), what="run lookup").info.status
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pytorch.log_model(model, name=ARTIFACT, signature=infer_signature(example, out),
                                            input_example=example, pip_requirements=requirements(),
                                            registered_model_name=name, serialization_format="pickle")
    finally:  # start_run(run_id=...) reopened the run: put its status back (KILLED stays KILLED)
        retrying(lambda: c.set_terminated(run_id, status=status), what="run status")
    version = str(info.registered_model_version)
    checkpoint = (loaded.checkpoint or "").split(" ")[-1] if loaded.checkpoint else f"checkpoints/{which}"
    for k, v in {"qksweep.checkpoint": checkpoint, "qksweep.run_id": run_id, **(tags or {})}.items():
        retrying(lambda k=k, v=v: c.set_model_version_tag(name, version, k, v), what="model version tag")
    retrying(lambda: c.set_registered_model_alias(name, alias, version), what="model alias")
    return Registered(name, version, alias, run_id, f"models:/{name}@{alias}")
