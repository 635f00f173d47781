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
