"""``models:/NAME@ALIAS`` and ``models:/NAME/VERSION``: the registered model version a URI names and the
qksweep run and checkpoint it was made from (``tools/mlflow_model.py`` registers them)."""

from __future__ import annotations

import re
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

    from .runs import client, mask_secrets

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


