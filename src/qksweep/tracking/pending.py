"""What could not reach MLflow, kept in the run's storage until it can.

When the tracking server is away, the epoch logger (in the Train controller) keeps each epoch it could
not log in ``<run.storage>/<run name>/mlflow_pending.jsonl``, next to the run's checkpoints, tries again
at every later epoch and once more, for longer, when the trial ends; whatever still could not be sent
stays in the file, and ``qksweep flush`` (or ``qksweep resume``) sends it later. The file is the buffer:
it is rewritten without the records that got through, and removed when empty, so the controller holds
nothing in memory between epochs.

One JSON object a line, in the order things happened:

- ``{"type": "epoch", "uri", "run_id", "epoch", "metrics": [[key, value, timestamp_ms, step], ...], "tags"}``:
  one reported epoch (spectra included, ``epoch`` last so that a run holds the epoch only once the whole
  batch is in). Sending it twice is harmless: the timestamps are kept, and MLflow's stores drop a metric
  identical in key, value, step and timestamp. An epoch the run already holds is skipped.
- ``{"type": "best", "uri", "run_id", "metric", "mode", "value", "checkpoint"}``: upload that checkpoint as
  ``checkpoints/best`` if it beats what the run has.
- ``{"type": "artifacts", "uri", "run_id", "checkpoint", "folder", "artifact_path"}``: upload the folder
  ``folder`` of that checkpoint as ``artifact_path`` (what rank 0 published with its last epoch: the
  spectral plots, the best pruned checkpoint as ``checkpoints/best``).
- ``{"type": "inputs", "uri", "run_id", "datasets": [{name, digest, source_type, source, profile, context}]}``:
  the run's train and validation sets as MLflow dataset inputs (those it does not hold yet).
- ``{"type": "close", "uri", "run_id", "status", "tags", "checkpoint", ...}``: close the run (FINISHED with the
  last checkpoint and learning curves, KILLED, FAILED, or ``auto``: as the sweep callback decides for a
  trial Tune stopped). ``run_id`` may be null, with ``experiment`` and ``lookup`` tags to find the run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from mlflow.entities import Metric

from ..config import DEFAULT_STORAGE
from ..storage import TRIALS_DIR
from . import runs
from .finalize import finalize_run

log = logging.getLogger("qksweep.tracking")

PENDING_FILE = "mlflow_pending.jsonl"


def epoch_wait_s() -> float:
    """How long one epoch may wait for MLflow before its metrics go to the pending file."""
    return float(os.environ.get("QKSWEEP_MLFLOW_EPOCH_WAIT_S", "3"))


def end_wait_s() -> float:
    """How long the end of a trial or run waits for MLflow to come back."""
    return float(os.environ.get("QKSWEEP_MLFLOW_END_WAIT_S", "30"))


def pending_path(run_dir: str | Path) -> str:
    from ..storage import join  # a URI keeps its ?endpoint_override=... query after the path

    return join(str(run_dir), PENDING_FILE)


# --- the file (a local path, or a URI through pyarrow's filesystems) -------------------------------------

def _fs(path: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(path)


def read_records(path: str) -> list[dict[str, Any]]:
    if "://" in path:
        import pyarrow.fs

        fs, p = _fs(path)
        if fs.get_file_info(p).type == pyarrow.fs.FileType.NotFound:
            return []
        with fs.open_input_stream(p) as f:
            text = f.read().decode()
    else:
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            return []
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash mid-write: the rest is still good
            log.warning("skipping a damaged line in %s", path)
    return out


def write_records(path: str, records: list[dict[str, Any]]) -> None:
    """Replace the file's contents (atomically on a local disk); remove it when nothing is left."""
    text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
    if "://" in path:
        fs, p = _fs(path)
        if not records:
            try:
                fs.delete_file(p)
            except (FileNotFoundError, OSError):
                pass
            return
        fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(p) as f:
            f.write(text.encode())
        return
    target = Path(path)
    if not records:
        target.unlink(missing_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, target)


def append_records(path: str, records: list[dict[str, Any]]) -> None:
    if not records:
        return
    if "://" in path:  # object stores cannot append
        write_records(path, read_records(path) + records)
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.writelines(json.dumps(r, separators=(",", ":")) + "\n" for r in records)


# --- records ---------------------------------------------------------------------------------------------

def epoch_record(uri: str, run_id: str, m: dict[str, Any], *, tags: dict[str, str] | None = None,
                 ts: int | None = None) -> dict[str, Any]:
    """One reported epoch as a record: its public metrics at step=epoch, then its spectra, ``epoch`` last."""
    epoch = int(m.get("epoch", 0))
    ts = ts or int(time.time() * 1000)
    items = [[k, v, ts, epoch] for k, v in runs.iter_metrics(m) if k != "epoch"]
    for step, spec in m.get("_spec", []) or []:
        items += [[k, float(v), ts, int(step)] for k, v in spec.items()]
    if "epoch" in m:
        items.append(["epoch", float(m["epoch"]), ts, epoch])
    return {"type": "epoch", "uri": uri, "run_id": run_id, "epoch": epoch, "metrics": items, "tags": tags or {}}


def metrics_record(uri: str, run_id: str, metrics: dict[str, float], step: int) -> dict[str, Any]:
    ts = int(time.time() * 1000)
    return {"type": "epoch", "uri": uri, "run_id": run_id, "epoch": None,
            "metrics": [[k, float(v), ts, step] for k, v in metrics.items() if runs._is_number(v)], "tags": {}}


def close_record(uri: str, run_id: str | None, status: str, *, tags: dict[str, str] | None = None,
                 checkpoint: str | None = None, finalize: bool = True, **extra) -> dict[str, Any]:
    return {"type": "close", "uri": uri, "run_id": run_id, "status": status, "tags": tags or {},
            "checkpoint": checkpoint, "finalize": finalize, **extra}


# --- sending ---------------------------------------------------------------------------------------------

class Sender:
    """Sends records to MLflow, one run at a time, and remembers what each run already holds (the
    epochs logged and the best value of the checkpoint metric), read once on first contact."""

    def __init__(self, *, live: bool = False):
        self.live = live  # the epoch logger: a run Tune already closed takes no more epochs
        self._seen: dict[str, set[int]] = {}
        self._best: dict[tuple[str, str], float | None] = {}
        self._clients: dict[str, Any] = {}
        self._want: dict[str, set[tuple[str, str]]] = {}  # run -> (metric, mode) of its best-checkpoint records

    def _c(self, uri: str):
        if uri not in self._clients:
            self._clients[uri] = runs.client(uri)
        return self._clients[uri]

    def _call(self, fn, what: str, end: float):
        left = end - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"MLflow {what}: no time left")
        return runs.retrying(fn, what=what, attempts=1000, deadline_s=left)

    def seen(self, uri: str, run_id: str, end: float) -> set[int]:
        if run_id not in self._seen:
            hist = self._call(lambda: self._c(uri).get_metric_history(run_id, "epoch"), "metric history", end)
            self._seen[run_id] = {int(h.step) for h in hist}
        return self._seen[run_id]

    def best(self, uri: str, run_id: str, metric: str, mode: str, end: float) -> float | None:
        key = (run_id, metric)
        if key not in self._best:
            hist = self._call(lambda: self._c(uri).get_metric_history(run_id, metric), "metric history", end)
            vals = [h.value for h in hist if math.isfinite(h.value)]
            self._best[key] = (max(vals) if mode == "max" else min(vals)) if vals else None
        return self._best[key]

    def known(self, run_id: str) -> bool:
        return run_id in self._seen

    def seen_cached(self, run_id: str) -> set[int]:
        return self._seen.get(run_id, set())

    def send(self, records: list[dict[str, Any]], wait_s: float) -> tuple[list[dict[str, Any]], Exception | None]:
        """Send in order within ``wait_s`` seconds. Returns (what is left, the error that stopped it)."""
        end = time.monotonic() + wait_s
        running: dict[str, bool] = {}
        last_best: dict[tuple[str, str], int] = {}
        for i, r in enumerate(records):
            if r["type"] == "best":
                self._want.setdefault(r["run_id"], set()).add((r["metric"], r["mode"]))
                last_best[(r["run_id"], r["metric"])] = i
        # a later best record beats an earlier one of the same run (and Ray may have deleted the older checkpoint)
        records = [r for i, r in enumerate(records)
                   if r["type"] != "best" or last_best[(r["run_id"], r["metric"])] == i]
        for i, r in enumerate(records):
            try:
                self._send_one(r, end, running)
            except Exception as e:  # noqa: BLE001 - the server is away (or the time is up): keep the rest
                return records[i:], e
        return [], None

    def _send_one(self, r: dict[str, Any], end: float, running: dict[str, bool]) -> None:
        uri, run_id, kind = r["uri"], r.get("run_id"), r["type"]
        if kind == "close":
            if not self.live:  # a live run is never closed from here (see `restarted`)
                self._close(r, end)
            return
        # load what the run holds before sending anything to it (the best value must predate this batch)
        seen = self.seen(uri, run_id, end)
        for metric, mode in sorted(self._want.get(run_id, ())):
            self.best(uri, run_id, metric, mode, end)
        if self.live:
            if run_id not in running:
                run = self._call(lambda: self._c(uri).get_run(run_id), "run status", end)
                running[run_id] = run.info.status == "RUNNING"
            if not running[run_id]:
                return
        if kind == "epoch":
            if r["epoch"] is not None and r["epoch"] in seen:
                return
            items = [Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in r["metrics"]]
            for i in range(0, len(items), runs.MAX_METRICS_PER_BATCH):
                chunk = items[i : i + runs.MAX_METRICS_PER_BATCH]
                self._call(lambda: self._c(uri).log_batch(run_id, metrics=chunk), "metric logging", end)
            if r.get("tags"):
                tags = r["tags"]
                self._call(lambda: runs.set_tags(self._c(uri), run_id, tags), "tag logging", end)
            if r["epoch"] is not None:
                seen.add(int(r["epoch"]))
        elif kind == "best":
            self._send_best(r, end)
        elif kind == "artifacts":
            self._send_artifacts(r, end)
        elif kind == "inputs":
            self._send_inputs(r, end)
        else:
            raise ValueError(f"unknown pending record type {kind!r}")

    def _send_best(self, r: dict[str, Any], end: float) -> None:
        uri, run_id, metric, mode = r["uri"], r["run_id"], r["metric"], r["mode"]
        best, value = self._best.get((run_id, metric)), float(r["value"])
        if best is not None and not (value > best if mode == "max" else value < best):
            return
        ckpt = r["checkpoint"]
        if "://" not in ckpt and not Path(ckpt).exists():
            log.warning("best checkpoint %s of run %s is gone (Ray kept only newer ones); not uploaded", ckpt, run_id)
            return
        from ray.train import Checkpoint

        with Checkpoint(ckpt).as_directory() as d:
            self._call(lambda: runs.log_checkpoint_dir(self._c(uri), run_id, d, "checkpoints/best"), "artifact upload", end)
        self._best[(run_id, metric)] = value

    def _send_artifacts(self, r: dict[str, Any], end: float) -> None:
        """A folder the run published inside its last checkpoint, uploaded as ``artifact_path``."""
        uri, run_id, ckpt = r["uri"], r["run_id"], r["checkpoint"]
        if "://" not in ckpt and not Path(ckpt).exists():
            log.warning("checkpoint %s of run %s is gone; its %s artifacts are not uploaded", ckpt, run_id, r["artifact_path"])
            return
        from ray.train import Checkpoint

        with Checkpoint(ckpt).as_directory() as d:
            src = Path(d) / r["folder"]
            if src.is_dir():
                self._call(lambda: self._c(uri).log_artifacts(run_id, str(src), r["artifact_path"]), "artifact upload", end)

    def _send_inputs(self, r: dict[str, Any], end: float) -> None:
        """The run's datasets as MLflow inputs, those it does not hold yet (by name and digest)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        uri, run_id = r["uri"], r["run_id"]
        run = self._call(lambda: self._c(uri).get_run(run_id), "run inputs", end)
        held = {(i.dataset.name, i.dataset.digest) for i in (run.inputs.dataset_inputs if run.inputs else [])}
        new = [DatasetInput(Dataset(d["name"], d["digest"], d["source_type"], d["source"], profile=d["profile"]),
                            tags=[InputTag("mlflow.data.context", d["context"])])
               for d in r["datasets"] if (d["name"], d["digest"]) not in held]
        if new:
            self._call(lambda: self._c(uri).log_inputs(run_id, datasets=new), "dataset logging", end)

    def _close(self, r: dict[str, Any], end: float) -> None:
        uri, run_id = r["uri"], r.get("run_id")
        c = self._c(uri)
        if run_id is None:  # written by the sweep callback while the server was away: find the run by tags
            exp = self._call(lambda: runs.experiment_id(c, r["experiment"]), "experiment lookup", end)
            found = self._call(lambda: runs.find_run(c, exp, r["lookup"]), "run lookup", end)
            if found is None:
                return
            run_id = found.info.run_id
        status = r["status"]
        run = self._call(lambda: c.get_run(run_id), "run status", end)
        if status == "auto":  # a trial Tune ended while its driver could not close the run
            if run.info.status != "RUNNING":
                return
            seen = self.seen(uri, run_id, end)
            if (max(seen) if seen else 0) < int(r.get("epochs") or 0):
                tags = {"qksweep.stopped_by": r.get("scheduler") or "scheduler", **r.get("tags", {})}
                self._call(lambda: runs.finish_run(c, run_id, "KILLED", tags), "run termination", end)
                return
            status = "FINISHED"
        if status == "FINISHED" and r.get("finalize", True):
            ckpt = r.get("checkpoint")
            if ckpt and "://" not in ckpt and not Path(ckpt).exists():
                log.warning("last checkpoint %s of run %s is gone; closing the run without it", ckpt, run_id)
                ckpt = None
            self._call(lambda: finalize_run(uri, run_id, ckpt), "run finalization", end)
            return
        if r.get("if_running") and run.info.status != "RUNNING":
            return
        self._call(lambda: runs.finish_run(c, run_id, status, r.get("tags") or None), "run termination", end)


# --- whole files -----------------------------------------------------------------------------------------

@dataclass
class FlushResult:
    path: str
    sent: int = 0
    left: list[dict[str, Any]] = field(default_factory=list)
    error: Exception | None = None


def flush_file(path: str, wait_s: float, sender: Sender | None = None) -> FlushResult:
    """Send what ``path`` holds; rewrite it with what is left (removed when empty)."""
    records = read_records(path)
    if not records:
        return FlushResult(path)
    left, err = (sender or Sender()).send(records, wait_s)
    if len(left) != len(records):
        write_records(path, left)
    return FlushResult(path, sent=len(records) - len(left), left=left, error=err)


def summarize(records: Iterable[dict[str, Any]]) -> str:
    """'epochs 3-5 (27 values: train/loss, train/top1, ...), the best checkpoint, closing the run as FINISHED'"""
    records = list(records)
    epochs = sorted(r["epoch"] for r in records if r["type"] == "epoch" and r["epoch"] is not None)
    keys: list[str] = []
    n = 0
    for r in records:
        if r["type"] == "epoch":
            n += len(r["metrics"])
            keys += [k for k, *_ in r["metrics"] if k not in keys]
    parts = []
    if epochs:
        span = f"epoch {epochs[0]}" if len(epochs) == 1 else (
            f"epochs {epochs[0]}-{epochs[-1]}" if epochs == list(range(epochs[0], epochs[-1] + 1))
            else "epochs " + ", ".join(map(str, epochs)))
        shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} keys)" if len(keys) > 8 else "")
        parts.append(f"{span} ({n} values: {shown})")
    elif n:
        parts.append(f"{n} metric values ({', '.join(keys[:8])})")
    if any(r["type"] == "best" for r in records):
        parts.append("the best checkpoint")
    published = [r["artifact_path"] for r in records if r["type"] == "artifacts"]
    if published:
        parts.append("artifacts " + ", ".join(f"{p}/" for p in published))
    closes = [r["status"] for r in records if r["type"] == "close"]
    if closes:
        parts.append(f"closing the run ({closes[-1] if closes[-1] != 'auto' else 'as the sweep decides'})")
    return ", ".join(parts) or "nothing"


def unrecorded_message(uri: str, path: str, left: list[dict[str, Any]], err: Exception | None,
                       run_id: str | None, resume_hint: str | None = None) -> str:
    why = runs.mask_secrets(str(err).splitlines()[0][:160]) if err else "no answer"
    hint = f" (or `{resume_hint}`)" if resume_hint else ""
    return (f"MLflow at {runs.mask_secrets(uri)} did not answer ({why}): run {run_id} is missing "
            f"{summarize(left)}. Kept in {path}; `qksweep flush {path}`{hint} sends them once the server is back.")


def finish(uri: str, run_id: str, run_dir: str, close: dict[str, Any] | list[dict[str, Any]], *,
           wait_s: float | None = None, label: str = "", resume_hint: str | None = None) -> bool:
    """End of a run or trial: send what is pending, then ``close`` (the closing record, or the last
    records and it); what cannot be sent stays in the pending file and is named on stderr. True when
    MLflow has everything."""
    import sys

    path = pending_path(run_dir)
    records = read_records(path) + (close if isinstance(close, list) else [close])
    left, err = Sender().send(records, end_wait_s() if wait_s is None else wait_s)
    write_records(path, left)
    if left:
        print(f"{label}{unrecorded_message(uri, path, left, err, run_id, resume_hint)}", file=sys.stderr, flush=True)
    return not left


def restarted(run_dir: str) -> None:
    """A run starts (again): closings an earlier attempt left pending are stale (the run is RUNNING
    again); its pending metrics stay, for the new epoch logger to send."""
    path = pending_path(run_dir)
    records = read_records(path)
    kept = [r for r in records if r["type"] != "close"]
    if len(kept) != len(records):
        write_records(path, kept)


def keep(run_dir: str, records: list[dict[str, Any]]) -> str:
    path = pending_path(run_dir)
    append_records(path, records)
    return path


def find_files(target: str, storage: str | None = None) -> list[str]:
    """Pending files for a file, a run or sweep folder, or a sweep name (its folder and its trials')."""
    if "://" in target or (storage and "://" in storage):  # run.storage in a bucket
        return _find_in_bucket(target, storage)
    p = Path(target).expanduser()
    if p.is_file():
        return [str(p.resolve())]
    dirs: list[Path] = []
    if p.is_dir():
        dirs = [p]
    root = Path(storage or DEFAULT_STORAGE).expanduser()
    if not dirs and (root / target).is_dir():
        dirs = [root / target]
    found = []
    for d in dirs:
        if (d / PENDING_FILE).is_file():
            found.append(d / PENDING_FILE)
        found += sorted(d.glob(f"*/{PENDING_FILE}"))
        found += sorted(d.glob(f"{TRIALS_DIR}/*/{PENDING_FILE}"))  # a sweep's trial folders
        found += sorted(d.parent.glob(f"{d.name}-*/{PENDING_FILE}"))  # an older sweep's sit beside it
    return sorted({str(f.resolve()) for f in found})


def _find_in_bucket(target: str, storage: str | None) -> list[str]:
    """``find_files`` for a bucket: TARGET is a pending file's URI, a run or sweep URI, or a name under a
    URI ``storage``; a sweep's trial folders are in ``<sweep>/trials/`` (an older sweep's beside it,
    ``<storage>/<sweep>-<trial>/``)."""
    import pyarrow.fs

    from ..storage import filesystem, is_uri, join

    if is_uri(target):
        base = target
    elif storage and is_uri(storage) and "/" not in target:
        base = join(storage, target)
    else:
        return []
    head, sep, query = base.partition("?")
    if head.endswith("/" + PENDING_FILE):
        return [base]
    try:
        fs, path = filesystem(base)
        found = [join(base, PENDING_FILE)] if fs.get_file_info(f"{path}/{PENDING_FILE}").is_file else []
        for info in fs.get_file_info(pyarrow.fs.FileSelector(f"{path}/{TRIALS_DIR}", allow_not_found=True)):
            if info.type == pyarrow.fs.FileType.Directory and fs.get_file_info(f"{info.path}/{PENDING_FILE}").is_file:
                found.append(join(base, TRIALS_DIR, info.base_name, PENDING_FILE))  # the sweep's trial folders
        parent, _, name = path.rpartition("/")
        parent_uri = head.rstrip("/").rpartition("/")[0] + sep + query
        for info in fs.get_file_info(pyarrow.fs.FileSelector(parent, allow_not_found=True)):  # an older sweep's
            if (info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith(f"{name}-")
                    and fs.get_file_info(f"{info.path}/{PENDING_FILE}").is_file):
                found.append(join(parent_uri, info.base_name, PENDING_FILE))
    except Exception as e:  # noqa: BLE001 - nothing to flush is better than a resume that cannot start
        log.warning("could not look for pending MLflow records under %s: %s", runs.mask_secrets(base), e)
        return []
    return sorted(found)
