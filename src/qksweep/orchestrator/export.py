"""The best trial of a sweep, and exporting it: config, checkpoint and metrics in one folder.

Reads MLflow only, so it works on any tracking URI once the sweep has logged there. The exported
``config.yaml`` is the trial's own artifact, re-runnable as is with ``qksweep train config.yaml``;
``checkpoint/`` (``checkpoint.pt`` + ``config.json``) loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from ..tracking import browse, runs

log = logging.getLogger("qksweep.export")

CHECKPOINT_SOURCES = ("checkpoints/best", "checkpoints/last")
CKPT_FILE, CKPT_CONFIG = "checkpoint.pt", "config.json"


class ExportError(ValueError):
    """The best trial cannot be found or exported (one line, exit 2)."""


def best_trial(uri: str, sweep: str, *, metric: str | None = None, experiment: str | None = None,
               mode: str | None = None) -> dict[str, Any]:
    """The trial of ``sweep`` with the best value of its metric over all its epochs.

    ``metric``/``mode`` default to the sweep's own (``qksweep.metric``/``qksweep.mode`` tags).
    Failed trials count only when no other trial logged the metric; ties go to the earlier trial.
    Returns ``run_id, trial_id, sweep, experiment_id, status, metric, mode, value`` (the best),
    ``best_epoch, final`` (the last value), ``epochs, params`` (searched, typed), ``all_params``
    (every param, as logged) and ``config`` (the run's ``config.yaml``, or None when it has none).
    """
    try:
        c = browse._client(uri)
        exp_ids = browse.experiment_ids(c, uri, experiment)
        found = browse.trial_runs(c, uri, exp_ids=exp_ids, sweep=sweep)
        if not found:
            browse._find_parent(c, uri, sweep, exp_ids)
            raise ExportError(f"sweep '{sweep}' has no trials in MLflow at {runs.mask_secrets(uri)} yet")
    except browse.BrowseError as e:
        raise ExportError(str(e)) from None
    picked = None
    for allow_failed in (False, True):
        for r in found:
            if r.info.status == "FAILED" and not allow_failed:
                continue
            m, md = browse.metric_and_mode(r, metric)
            md = mode or md
            hist = runs.retrying(lambda r=r, m=m: c.get_metric_history(r.info.run_id, m), what="metric history")
            value, step = browse.best_of(hist, md)
            if value is None:
                continue
            if picked is None or (value > picked[1] if md == "max" else value < picked[1]):
                picked = (r, value, step, m, md)
        if picked is not None:
            break
    if picked is None:
        name = metric or browse.metric_and_mode(found[0])[0]
        raise ExportError(f"no trial of sweep '{sweep}' has logged {name} yet ({len(found)} trials); "
                          "`qksweep runs` shows their status")
    r, value, step, m, md = picked
    final = r.data.metrics.get(m)
    epoch = r.data.metrics.get("epoch")
    return {
        "run_id": r.info.run_id,
        "trial_id": r.data.tags.get(browse.TRIAL),
        "sweep": sweep,
        "experiment_id": r.info.experiment_id,
        "status": browse.status_of(r),
        "metric": m,
        "mode": md,
        "value": value,
        "best_epoch": step,
        "final": final if final is None or math.isfinite(final) else None,
        "epochs": int(epoch) if epoch is not None and math.isfinite(epoch) else None,
        "params": {k: browse.parse_value(r.data.params.get(k)) for k in browse.searched_keys(r)},
        "all_params": dict(r.data.params),
        "config": _load_config(c, r.info.run_id),
        "final_metrics": {k: v for k, v in r.data.metrics.items() if math.isfinite(v)},
    }


def _load_config(c, run_id: str) -> dict[str, Any] | None:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            p = runs.retrying(lambda: c.download_artifacts(run_id, "config.yaml", tmp), what="artifact download", attempts=2)
        except Exception as e:  # noqa: BLE001 - missing artifact: MlflowException or OSError, by store
            why = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            log.warning("run %s has no config.yaml artifact (%s)", run_id, why)
            return None
        return yaml.safe_load(Path(p).read_text())


def _artifact_names(c, run_id: str, path: str) -> set[str]:
    try:
        items = runs.retrying(lambda: c.list_artifacts(run_id, path), what="artifact listing", attempts=2)
    except Exception:  # noqa: BLE001
        return set()
    return {Path(i.path).name for i in items if not i.is_dir}


def export_best(uri: str, sweep: str, out_dir: str | Path, *, metric: str | None = None,
                experiment: str | None = None, mode: str | None = None) -> list[Path]:
    """Write the best trial of ``sweep`` to ``out_dir``; returns the paths written.

    ``out_dir/config.yaml`` (the trial's config artifact), ``out_dir/checkpoint/`` (from the run's
    ``checkpoints/best``, else ``checkpoints/last``; absent when the run has neither) and
    ``out_dir/metrics.json``. Refuses an ``out_dir`` that exists and is not empty. The folder is
    assembled next to ``out_dir`` and renamed into place, so a failed export leaves nothing behind.
    """
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"export folder '{out}' already exists and is not empty: pass a new or empty folder")
    best = best_trial(uri, sweep, metric=metric, experiment=experiment, mode=mode)
    c = runs.client(uri)
    rid = best["run_id"]
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        stage.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the export is an ordinary folder
        _write_config(c, best, stage)
        source = _write_checkpoint(c, rid, stage)
        summary = {k: best[k] for k in ("sweep", "run_id", "trial_id", "experiment_id", "status", "metric", "mode",
                                         "best_epoch", "final", "epochs", "params")}
        summary["best"] = best["value"]
        summary["final_metrics"] = best["final_metrics"]
        summary["checkpoint"] = "checkpoint" if source else None
        summary["checkpoint_source"] = source
        summary["tracking_uri"] = runs.mask_secrets(uri)
        (stage / "metrics.json").write_text(json.dumps(browse._plain(summary), indent=1, sort_keys=False) + "\n")
        if out.exists():
            out.rmdir()  # empty, checked above
        stage.rename(out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    written = [out / "config.yaml"]
    if source:
        written += sorted(p for p in (out / "checkpoint").rglob("*") if p.is_file())
    written.append(out / "metrics.json")
    return written


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_config(c, best: dict[str, Any], stage: Path) -> None:
    rid = best["run_id"]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            p = runs.retrying(lambda: c.download_artifacts(rid, "config.yaml", tmp), what="artifact download", attempts=2)
            shutil.copyfile(p, stage / "config.yaml")  # byte for byte: what `qksweep train` ran
            return
        except Exception:  # noqa: BLE001 - fall back to the checkpoint's config.json below
            pass
    for src in CHECKPOINT_SOURCES:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                p = c.download_artifacts(rid, f"{src}/{CKPT_CONFIG}", tmp)
            except Exception:  # noqa: BLE001
                continue
            cfg = json.loads(Path(p).read_text())
            if isinstance(cfg.get("tracking"), dict) and "uri" in cfg["tracking"]:
                cfg["tracking"]["uri"] = runs.mask_secrets(cfg["tracking"]["uri"])
            (stage / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
            log.warning("run %s has no config.yaml artifact: wrote it from %s/%s", rid, src, CKPT_CONFIG)
            return
    raise ExportError(f"trial run {rid} of sweep '{best['sweep']}' has no config.yaml artifact nor checkpoint config: "
                      "nothing to re-run it from")


def _write_checkpoint(c, rid: str, stage: Path) -> str | None:
    for src in CHECKPOINT_SOURCES:
        if CKPT_FILE not in _artifact_names(c, rid, src):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            local = runs.retrying(lambda: c.download_artifacts(rid, src, tmp), what="checkpoint download")
            shutil.copytree(local, stage / "checkpoint")
        return src
    log.warning("run %s has no checkpoint artifact (%s): exported config and metrics only", rid, " or ".join(CHECKPOINT_SOURCES))
    return None


def pareto_front(uri: str, sweep: str, *, experiment: str | None = None) -> list[dict[str, Any]]:
    """The non-dominated finished trials of a multi-objective sweep, from the final value of each
    objective (``qksweep.objectives`` tag: metric → max/min), best first on the first objective."""
    try:
        c = browse._client(uri)
        found = browse.trial_runs(c, uri, exp_ids=browse.experiment_ids(c, uri, experiment), sweep=sweep)
    except browse.BrowseError as e:
        raise ExportError(str(e)) from None
    if not found:
        raise ExportError(f"sweep '{sweep}' has no trials in MLflow at {runs.mask_secrets(uri)}")
    objectives = json.loads(found[0].data.tags.get("qksweep.objectives") or "{}")
    if len(objectives) < 2:
        raise ExportError(f"sweep '{sweep}' has one objective; --pareto needs sweep.metric as a list of metrics")
    points = []
    for r in found:
        if r.info.status != "FINISHED":
            continue
        vals = {m: r.data.metrics.get(m) for m in objectives}
        if all(v is not None and math.isfinite(v) for v in vals.values()):
            points.append({"run_id": r.info.run_id, "trial_id": r.data.tags.get(browse.TRIAL), "values": vals,
                           "params": {k: browse.parse_value(r.data.params.get(k)) for k in browse.searched_keys(r)}})
    sign = {m: (1 if mode == "max" else -1) for m, mode in objectives.items()}

    def dominates(a, b) -> bool:
        ge = all(sign[m] * a["values"][m] >= sign[m] * b["values"][m] for m in objectives)
        gt = any(sign[m] * a["values"][m] > sign[m] * b["values"][m] for m in objectives)
        return ge and gt

    front = [p for p in points if not any(dominates(q, p) for q in points if q is not p)]
    first = next(iter(objectives))
    return sorted(front, key=lambda p: -sign[first] * p["values"][first])
