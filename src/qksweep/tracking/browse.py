"""Browse what MLflow holds: sweeps, their trials, plain training runs.

Reads MLflow only (any tracking URI: SQLite file, database, ``http(s)://`` server), never Ray's
storage, so results stay browsable after the Ray results folder is gone. Runs are found by the
``qksweep.*`` tags (see DESIGN.md, "MLflow layout").
"""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
from mlflow.entities import ViewType

from . import runs

KIND, SWEEP, TRIAL = runs.KIND, runs.SWEEP, runs.TRIAL
SEARCHED, METRIC, MODE = "qksweep.searched", "qksweep.metric", "qksweep.mode"
STOPPED_BY, ERROR = "qksweep.stopped_by", "qksweep.error"
DEFAULT_METRIC, DEFAULT_MODE = "val/top1", "max"
PAGE = 1000
FORMATS = ("table", "json", "csv")
# metrics that are better when smaller, for sorting a metric that is not the sweep's own
_LOWER_IS_BETTER = ("loss", "error", "err", "time", "_s", "nll", "perplexity", "ece")


class BrowseError(ValueError):
    """Nothing to browse (no such sweep, experiment or store), said in one line (exit 2)."""


# ---------------------------------------------------------------- lookups

def _check_store(uri: str) -> None:
    """Refuse to browse a local store that does not exist (MLflow would silently create an empty one)."""
    path = None
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):].split("?", 1)[0]
        if path in ("", ":memory:"):
            return
    elif uri.startswith("file://"):
        path = uri[len("file://"):]
    elif "://" not in uri and not uri.startswith(("databricks", "uc:")):
        path = uri
    if path is not None and not Path(path).exists():
        raise BrowseError(f"no MLflow store at {runs.mask_secrets(uri)} (nothing has been logged there yet); "
                          "pass the tracking URI your runs used (config `tracking.uri`)")


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _client(uri: str):
    _check_store(uri)
    return runs.client(uri)


def _quote(value: str) -> str:
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise BrowseError(f"name {value!r} holds both kinds of quotes and cannot be searched for")


def experiment_ids(c, uri: str, experiment: str | None = None) -> list[str]:
    """The id of ``experiment`` (by name or id), or of every active experiment."""
    if experiment is not None:
        exp = runs.retrying(lambda: c.get_experiment_by_name(experiment), what="experiment lookup")
        if exp is None and str(experiment).isdigit():
            try:
                exp = c.get_experiment(str(experiment))
            except Exception:  # noqa: BLE001 - not an id either
                exp = None
        if exp is None or exp.lifecycle_stage == "deleted":
            raise BrowseError(f"no experiment named '{experiment}' in MLflow at {runs.mask_secrets(uri)}; "
                              "`qksweep runs` lists sweeps and their experiments")
        return [exp.experiment_id]
    ids: list[str] = []
    token = None
    while True:
        page = runs.retrying(lambda: c.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=PAGE,
                                                          page_token=token), what="experiment search")
        ids += [e.experiment_id for e in page]
        token = getattr(page, "token", None)
        if not token:
            return ids


def search_all(c, exp_ids: list[str], filter_string: str, order_by: list[str] | None = None,
               limit: int | None = None) -> list:
    """Every run matching ``filter_string``, paging through ``max_results``."""
    out: list = []
    if not exp_ids:
        return out
    token = None
    while True:
        n = PAGE if limit is None else min(PAGE, limit - len(out))
        page = runs.retrying(lambda: c.search_runs(exp_ids, filter_string=filter_string, run_view_type=ViewType.ACTIVE_ONLY,
                                                   max_results=n, order_by=order_by, page_token=token),
                             what="run search")
        out += list(page)
        token = getattr(page, "token", None)
        if not token or (limit is not None and len(out) >= limit):
            return out


def find_sweep_parent(uri: str, sweep: str, experiment: str | None = None):
    """The parent run of sweep ``sweep`` (the latest one if several share the name)."""
    c = _client(uri)
    return _find_parent(c, uri, sweep, experiment_ids(c, uri, experiment))


def _find_parent(c, uri: str, sweep: str, exp_ids: list[str]):
    filt = f"tags.`{KIND}` = 'sweep' and tags.`{SWEEP}` = {_quote(sweep)}"
    found = search_all(c, exp_ids, filt, order_by=["attributes.start_time DESC"], limit=1)
    if not found:
        raise BrowseError(f"no sweep named '{sweep}' in MLflow at {runs.mask_secrets(uri)}; `qksweep runs` lists sweeps")
    return found[0]


# ---------------------------------------------------------------- values

def parse_value(text: Any) -> Any:
    """An MLflow param string back to a typed value: ``"128"`` → 128, ``"1e-3"`` → 0.001, ``"None"`` → None."""
    if not isinstance(text, str):
        return text
    s = text.strip()
    if s in ("None", "null", ""):
        return None
    if s in ("True", "true"):
        return True
    if s in ("False", "false"):
        return False
    try:
        return int(s)
    except ValueError:
        pass
    try:
        return float(s)
    except ValueError:
        pass
    if s[:1] in "[{":
        try:
            return json.loads(s)
        except ValueError:
            pass
    return text


def searched_keys(run) -> list[str]:
    raw = run.data.tags.get(SEARCHED)
    if not raw:
        return []
    try:
        keys = json.loads(raw)
    except ValueError:
        return []
    return [str(k) for k in keys] if isinstance(keys, list) else []


def metric_and_mode(run, metric: str | None = None) -> tuple[str, str]:
    """The run's objective: the ``qksweep.metric``/``qksweep.mode`` tags, else its ``sweep.*`` params."""
    tags, params = run.data.tags, run.data.params
    own = tags.get(METRIC) or params.get("sweep.metric") or DEFAULT_METRIC
    mode = tags.get(MODE) or params.get("sweep.mode") or DEFAULT_MODE
    if metric is not None and metric != own:
        return metric, guess_mode(metric)
    return own, (mode if mode in ("max", "min") else DEFAULT_MODE)


def guess_mode(metric: str) -> str:
    name = metric.lower()
    return "min" if any(t in name for t in _LOWER_IS_BETTER) else "max"


def status_of(run) -> str:
    s = run.info.status
    if s == "KILLED":
        by = run.data.tags.get(STOPPED_BY)  # the scheduler's name (asha, ...) or "user" (Ctrl-C)
        return f"stopped ({by})" if by and by != "user" else "killed"
    return {"FINISHED": "finished", "FAILED": "failed", "RUNNING": "running", "SCHEDULED": "scheduled"}.get(s, s.lower())


def _finite(values: Iterable[float]) -> list[float]:
    return [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def best_of(history: list, mode: str) -> tuple[float | None, int | None]:
    """(best value, its step) of a metric history."""
    pts = [(m.value, m.step) for m in history if math.isfinite(m.value)]
    if not pts:
        return None, None
    pick = max if mode == "max" else min
    value = pick(v for v, _ in pts)
    return value, min(s for v, s in pts if v == value)


def _histories(c, pairs: list[tuple[str, str]], parallel: bool = False) -> dict[tuple[str, str], list]:
    """Metric histories of (run_id, key) pairs; ``parallel``: a few requests at a time (for an HTTP server)."""
    def get(pair):
        rid, key = pair
        return pair, runs.retrying(lambda: c.get_metric_history(rid, key), what="metric history")

    if not parallel or len(pairs) <= 2:
        return dict(map(get, pairs))
    with ThreadPoolExecutor(max_workers=min(8, len(pairs))) as pool:
        return dict(pool.map(get, pairs))


# ---------------------------------------------------------------- the table

def trial_runs(c, uri: str, *, exp_ids: list[str], sweep: str | None = None) -> list:
    """Trial runs of ``sweep`` or, without one, every trial and plain training run, oldest first."""
    order = ["attributes.start_time ASC"]
    if sweep is not None:
        return search_all(c, exp_ids, f"tags.`{KIND}` = 'trial' and tags.`{SWEEP}` = {_quote(sweep)}", order)
    found = search_all(c, exp_ids, f"tags.`{KIND}` = 'trial'", order) + search_all(c, exp_ids, f"tags.`{KIND}` = 'train'", order)
    return sorted(found, key=lambda r: r.info.start_time or 0)


def list_trials(tracking_uri: str, *, experiment: str | None = None, sweep: str | None = None,
                sort: str | None = None, limit: int | None = None, metric: str | None = None) -> pd.DataFrame:
    """One row per trial of ``sweep`` (or per trial and ``qksweep train`` run when no sweep is given).

    Columns: ``run_id`` (then ``kind``, trial or train, when no sweep is given), ``sweep``,
    ``trial_id``, ``status`` (finished, stopped (asha), failed, running, killed), the searched params
    (typed), ``<metric>`` (final value), ``best <metric>`` (max or min over epochs, by the sweep's
    mode), ``epochs`` (the last epoch), ``duration_s``. Oldest first unless sorted.
    ``sort``: any column or metric name, ``-name``/``+name`` to force the direction; metrics sort
    best first (descending for max-mode ones). ``metric`` overrides the sweep's objective.
    ``df.attrs``: ``modes`` ({metric: max|min}), ``errors`` ({run_id: first error line}), ``sort``.
    """
    if limit is not None and limit < 0:
        raise BrowseError(f"limit must be >= 0, got {limit}")
    c = _client(tracking_uri)
    exp_ids = experiment_ids(c, tracking_uri, experiment)
    found = trial_runs(c, tracking_uri, exp_ids=exp_ids, sweep=sweep)
    if sweep is not None and not found:
        _find_parent(c, tracking_uri, sweep, exp_ids)  # raises the "no sweep named" error when there is none
    return trials_frame(c, found, sort=sort, limit=limit, metric=metric, with_kind=sweep is None,
                        parallel=is_http(tracking_uri))


def trials_frame(c, found: list, *, sort: str | None = None, limit: int | None = None,
                 metric: str | None = None, with_kind: bool = False, parallel: bool = False) -> pd.DataFrame:
    """The :func:`list_trials` table of already-searched runs (``with_kind``: add a ``kind`` column)."""
    modes: dict[str, str] = {}
    objective: dict[str, str] = {}
    param_cols: list[str] = []
    for r in found:
        m, mode = metric_and_mode(r, metric)
        objective[r.info.run_id] = m
        modes.setdefault(m, mode)
        for k in searched_keys(r):
            if k not in param_cols:
                param_cols.append(k)
    metric_cols = list(modes)

    rows = []
    errors = {}
    now_ms = int(time.time() * 1000)
    for r in found:
        info, data = r.info, r.data
        row: dict[str, Any] = {
            "run_id": info.run_id,
            "kind": data.tags.get(KIND),
            "sweep": data.tags.get(SWEEP),
            "trial_id": data.tags.get(TRIAL),
            "status": status_of(r),
        }
        keys = set(searched_keys(r))
        for k in param_cols:
            row[k] = parse_value(data.params.get(k)) if k in keys else None
        for m in metric_cols:
            row[m] = data.metrics.get(m) if objective[info.run_id] == m else None
            row[f"best {m}"] = None
        epoch = data.metrics.get("epoch")
        row["epochs"] = int(epoch) if epoch is not None and math.isfinite(epoch) else None
        end = info.end_time or (now_ms if info.status == "RUNNING" else None)
        row["duration_s"] = round((end - info.start_time) / 1000.0, 3) if end and info.start_time else None
        if data.tags.get(ERROR):
            errors[info.run_id] = data.tags[ERROR]
        rows.append(row)

    columns = ["run_id", *(["kind"] if with_kind else []), "sweep", "trial_id", "status", *param_cols]
    for m in metric_cols:
        columns += [m, f"best {m}"]
    columns += ["epochs", "duration_s"]
    df = pd.DataFrame(rows, columns=columns)
    df.attrs.update(modes=dict(modes), errors=errors, sort=None)

    key, descending = _sort_key(df, sort, modes, found)
    by_best = key is not None and key.startswith("best ")
    if key is not None and key not in df.columns:  # a metric that is not a column yet: its final values
        df[key] = [r.data.metrics.get(key) for r in found]
    if key is not None and not by_best:
        df = _sorted(df, key, descending)
    if limit is not None and not by_best:
        df = df.head(limit)
    # best values need one history request per run: fetch only for the rows kept
    ids = set(df["run_id"])
    pairs = [(r.info.run_id, objective[r.info.run_id]) for r in found if r.info.run_id in ids]
    hist = _histories(c, pairs, parallel)
    best = {rid: best_of(hist[(rid, m)], modes[m])[0] for rid, m in pairs}
    for m in metric_cols:
        df[f"best {m}"] = [best.get(rid) if objective.get(rid) == m else None for rid in df["run_id"]]
    if by_best:
        df = _sorted(df, key, descending)
        if limit is not None:
            df = df.head(limit)
    df = df.reset_index(drop=True)
    kept = set(df["run_id"])
    df.attrs.update(modes=dict(modes), errors={k: v for k, v in errors.items() if k in kept}, sort=key)
    return _tidy(df, param_cols)


_PLAIN_COLS = ("run_id", "kind", "sweep", "trial_id", "status", "epochs", "duration_s")


def _sort_key(df: pd.DataFrame, sort: str | None, modes: dict[str, str], found: list) -> tuple[str | None, bool]:
    """(column or metric to sort by, descending?). Metrics sort best first; other columns ascending."""
    if not sort:
        return None, False
    key, forced = sort.strip(), None
    if key[:1] in "+-" and key[1:] and key not in df.columns:
        forced, key = key[0] == "-", key[1:]
    metric = key[5:] if key.startswith("best ") else key
    if key in df.columns:
        if key in _PLAIN_COLS or (metric not in modes and not key.startswith("best ")):
            natural = False  # params, ids, durations: ascending
        else:
            natural = modes.get(metric, guess_mode(metric)) == "max"
    elif not found:
        return None, False
    elif any(key in r.data.metrics for r in found):
        natural = modes.get(key, guess_mode(key)) == "max"
    else:
        cols = ", ".join(df.columns)
        raise BrowseError(f"cannot sort by '{sort}': not a column ({cols}) nor a metric these runs logged")
    return key, natural if forced is None else forced


def _sorted(df: pd.DataFrame, key: str, descending: bool) -> pd.DataFrame:
    col = df[key]
    numeric = pd.to_numeric(col, errors="coerce")
    if numeric.notna().sum() == col.notna().sum():  # numbers (or trial ids like 0001) sort as numbers
        order = numeric
    else:
        order = col.astype("string")
    return df.assign(_k=order).sort_values("_k", ascending=not descending, na_position="last", kind="stable").drop(columns="_k")


def _tidy(df: pd.DataFrame, param_cols: list[str]) -> pd.DataFrame:
    """Integer columns without NaN-forced floats; params keep their own types."""
    if "epochs" in df.columns:
        df["epochs"] = df["epochs"].astype("Int64")
    for k in param_cols:
        vals = [v for v in df[k] if v is not None and not (isinstance(v, float) and math.isnan(v))]
        if vals and all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
            df[k] = df[k].astype("Int64")
    return df


# ---------------------------------------------------------------- sweeps

def list_sweeps(tracking_uri: str, *, experiment: str | None = None) -> pd.DataFrame:
    """One row per sweep parent run: ``sweep, experiment, run_id, status, trials, metric, mode, started``."""
    c = _client(tracking_uri)
    exp_ids = experiment_ids(c, tracking_uri, experiment)
    parents = search_all(c, exp_ids, f"tags.`{KIND}` = 'sweep'", ["attributes.start_time DESC"])
    names = {}
    for eid in {p.info.experiment_id for p in parents}:
        try:
            names[eid] = c.get_experiment(eid).name
        except Exception:  # noqa: BLE001
            names[eid] = eid
    rows = []
    for p in parents:
        sweep = p.data.tags.get(SWEEP)
        trials = search_all(c, [p.info.experiment_id], f"tags.`{runs.PARENT}` = '{p.info.run_id}'") if sweep else []
        metric, mode = metric_and_mode(trials[0] if trials else p)
        finals = _finite(t.data.metrics.get(metric, float("nan")) for t in trials)
        rows.append({
            "sweep": sweep, "experiment": names[p.info.experiment_id], "run_id": p.info.run_id,
            "status": status_of(p), "trials": len(trials), "metric": metric, "mode": mode,
            "best final": (max(finals) if mode == "max" else min(finals)) if finals else None,
            "started": pd.Timestamp(p.info.start_time, unit="ms").strftime("%Y-%m-%d %H:%M:%S") if p.info.start_time else None,
        })
    cols = ["sweep", "experiment", "run_id", "status", "trials", "metric", "mode", "best final", "started"]
    return pd.DataFrame(rows, columns=cols)


# ---------------------------------------------------------------- output

def _plain(v: Any) -> Any:
    """A JSON-native value: numpy/pandas scalars unwrapped, NaN/NA → None."""
    if v is None or v is pd.NA or v is pd.NaT:
        return None
    if hasattr(v, "item") and not isinstance(v, (list, dict, str)):
        try:
            v = v.item()
        except (ValueError, AttributeError):
            pass
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (str, int, float, bool)):
        return v
    return str(v)


def records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return [{str(k): _plain(v) for k, v in zip(df.columns, row)} for row in df.itertuples(index=False, name=None)]


def format_trials(df: pd.DataFrame, fmt: str = "table") -> str:
    """``table`` (aligned text, failed trials' errors below it), ``json`` (a list of row objects) or ``csv``."""
    if fmt == "json":
        return json.dumps(records(df), indent=1)
    if fmt == "csv":
        return df.to_csv(index=False, lineterminator="\n", float_format=lambda x: f"{x:.6g}")
    if fmt != "table":
        raise BrowseError(f"unknown format '{fmt}': use one of {', '.join(FORMATS)}")
    if df.empty:
        return "no runs found"
    shown = df.copy()
    for col in shown.columns:
        shown[col] = [_cell(v) for v in shown[col]]
    text = shown.to_string(index=False)
    errors = df.attrs.get("errors") or {}
    if errors:
        text += "\n" + "\n".join(f"failed {rid}: {msg}" for rid, msg in errors.items())
    return text


def _cell(v: Any) -> str:
    v = _plain(v)
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e-3 or abs(v) >= 1e5 else f"{v:.4f}".rstrip("0").rstrip(".") or "0"
    return str(v)
