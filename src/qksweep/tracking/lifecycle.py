"""One MLflow run's life, the same for ``qksweep train``, every sweep trial and the sweep's parent run:
found again by its tags (so a restart, a retry or a resume never makes a second one) or created with
its params, tags and files; closed with a status and a reason through the run folder's pending file,
so that an MLflow server away at the end loses nothing (``qksweep flush`` sends it later)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ..config import flatten
from . import pending, runs

if TYPE_CHECKING:
    from ..config import Config


@dataclass(frozen=True)
class TrackedRun:
    uri: str
    run_id: str
    folder: str | None  # the run's folder: its pending file (None: the run has none yet)
    created: bool


def mask_config(d: dict[str, Any]) -> dict[str, Any]:
    """The config as a dict with no password or bucket key in it (params, config.yaml)."""
    d = dict(d)
    if "tracking" in d:
        d["tracking"] = {**d["tracking"], "uri": runs.mask_secrets(d["tracking"]["uri"])}
    if isinstance(d.get("run"), dict) and isinstance(d["run"].get("storage"), str):  # s3://KEY:SECRET@bucket
        d["run"] = {**d["run"], "storage": runs.mask_secrets(d["run"]["storage"])}
    return d


def run_params(cfg: Config, resolved: dict[str, Any] | None = None) -> dict[str, Any]:
    """Flattened config for a run's MLflow params (the sweep section is the parent's business);
    ``resolved`` (e.g. the model's resolved ``model.neuron.*`` settings) replaces the keys under its prefixes."""
    d = mask_config(cfg.to_dict())
    d.pop("sweep", None)
    d["model"] = {k: v for k, v in d["model"].items() if not (k == "neuron" and v is None)}
    out = flatten(d)
    if resolved:
        prefixes = {k.rsplit(".", 1)[0] for k in resolved}
        out = {k: v for k, v in out.items() if not any(k.startswith(p + ".") for p in prefixes)}
        out.update(resolved)
    return out


def config_file(cfg: Config) -> dict[str, str]:
    """``config.yaml`` as a run logs it."""
    return {"config.yaml": yaml.safe_dump(mask_config(cfg.to_dict()), sort_keys=False)}


def open_run(uri: str, experiment: str, lookup: dict[str, str], *, run_name: str, params: dict[str, Any],
             folder: str | None, tags: dict[str, str] | None = None, files: dict[str, str] | None = None) -> TrackedRun:
    """The run whose tags are ``lookup``, reopened RUNNING if it exists; otherwise created with
    ``params`` and ``files`` (name -> text, logged at the artifact root). ``tags`` are set either way.
    Closings an earlier attempt left in ``folder``'s pending file are dropped: the run runs again."""
    c = runs.client(uri)
    run_id, created = runs.get_or_create_run(c, runs.experiment_id(c, experiment), lookup, run_name=run_name,
                                             params=params)
    if tags:
        runs.set_tags(c, run_id, tags)
    if created and files:
        with tempfile.TemporaryDirectory() as tmp:
            for name, text in files.items():
                (Path(tmp) / name).write_text(text)
            runs.log_artifact_dir(uri, run_id, tmp, "")
    if folder:
        pending.restarted(folder)
    return TrackedRun(uri, run_id, folder, created)


def close_run(run: TrackedRun, status: str, *, tags: dict[str, str] | None = None, checkpoint: str | None = None,
              records: list[dict[str, Any]] | None = None, finalize: bool | None = None, wait_s: float | None = None,
              label: str = "", resume_hint: str | None = None, if_running: bool = False) -> bool:
    """Send what the run's pending file holds and ``records``, then close the run with ``status`` and
    ``tags`` (FINISHED: with its last checkpoint and learning curves, unless ``finalize`` says otherwise).
    If MLflow stays away (``QKSWEEP_MLFLOW_END_WAIT_S``, 30 s), all of it stays in the pending file and
    stderr says what is missing and where it is: the job itself still ends normally. True when MLflow
    has everything."""
    close = pending.close_record(run.uri, run.run_id, status, tags=tags, checkpoint=checkpoint,
                                 finalize=status == "FINISHED" if finalize is None else finalize, if_running=if_running)
    return pending.finish(run.uri, run.run_id, run.folder, [*(records or []), close], wait_s=wait_s, label=label,
                          resume_hint=resume_hint)
