"""Helpers shared by the benchmark scripts (imported as ``_common`` from ``bench/``).

Nothing here is imported by Ray workers: functions that run inside Ray live in the scripts' own
``__main__`` so that cloudpickle ships them by value.
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


# ------------------------------------------------------------------------------------------ output


def emit(obj: dict[str, Any]) -> None:
    """The one JSON object every script prints on its last line."""
    sys.stdout.flush()
    print(json.dumps(clean(obj), sort_keys=False), flush=True)


def clean(x: Any) -> Any:
    """JSON-safe: NaN/inf become None, numpy scalars become Python numbers, floats are rounded."""
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        try:
            x = x.item()
        except (ValueError, AttributeError):
            pass
    if isinstance(x, float):
        if not math.isfinite(x):
            return None
        if abs(x) >= 1e5:  # timestamps and large counts keep their digits
            return round(x, 3)
        return float(f"{x:.6g}")
    return x


_T0 = time.perf_counter()


def log(*args: Any) -> None:
    """Progress lines go to stderr (stdout's last line stays the JSON), with the seconds since start."""
    print(f"[{time.perf_counter() - _T0:6.1f}s]", *args, file=sys.stderr, flush=True)


def median(xs: Iterable[float]) -> float:
    xs = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    return statistics.median(xs) if xs else float("nan")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


# ------------------------------------------------------------------------------------------ machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "host": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        info["mem_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1)
    except (ValueError, OSError, AttributeError):
        pass
    try:
        info["loadavg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("qksweep", "torch", "ray", "mlflow", "optuna", "timm", "spikingjelly", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


# ------------------------------------------------------------------------------------------ configs


def load_yaml(name: str) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((CONFIGS / name).read_text())


def with_overrides(d: dict[str, Any], **sections: dict[str, Any]) -> dict[str, Any]:
    import copy

    d = copy.deepcopy(d)
    for k, v in sections.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    return d


# ------------------------------------------------------------------------------------------ bare loop


class BareLoop:
    """A plain in-process PyTorch loop on exactly what ``train_loop`` builds for a config
    (``build_data``/``build_model``/``build_batches``/``build_criterion``, timm optimizer and
    scheduler stepped per update) without Ray, MLflow, checkpoints, metric sums or spectra.

    ``hook(step)`` (if given) is called after every optimizer update, where the loop calls
    the spectral monitor.
    """

    def __init__(self, cfg_dict: dict[str, Any]):
        import torch
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2

        from qksweep.api import resolve
        from qksweep.data import build_data
        from qksweep.trainables.core import build_batches, build_criterion, build_model, seed_everything

        cfg = resolve(cfg_dict)
        self.cfg = cfg
        seed_everything(cfg.run.seed)
        self.device = torch.device("cpu")
        self.bundle = build_data(cfg.data, seed=cfg.run.seed)
        self.model = build_model(cfg, self.bundle).to(self.device)
        self.spiking = bool(getattr(self.model, "is_spiking", False))
        o = cfg.optim
        self.optimizer = create_optimizer_v2(self.model, opt=o.name, lr=o.lr, weight_decay=o.weight_decay,
                                             momentum=o.momentum, layer_decay=o.layer_decay)
        self.train_batches, self.val_batches = build_batches(cfg, self.bundle, rank=0, world=1, device=self.device)
        self.scheduler, _ = create_scheduler_v2(self.optimizer, sched=o.sched, num_epochs=o.epochs,
                                                warmup_epochs=o.warmup_epochs, warmup_lr=o.warmup_lr,
                                                min_lr=o.min_lr, step_on_epochs=False,
                                                updates_per_epoch=max(1, len(self.train_batches)))
        self.criterion = build_criterion(cfg, False)
        self.updates = 0
        self.epoch = 0

    def reset(self) -> None:
        if self.spiking:
            from spikingjelly.activation_based import functional

            functional.reset_net(self.model)

    def step(self, x, y) -> None:
        out = self.model(x)
        loss = self.criterion(out, y)
        loss.backward()
        self.reset()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        self.scheduler.step_update(num_updates=self.updates)

    def train_epoch(self, hook: Callable[[int], Any] | None = None, max_steps: int | None = None) -> dict[str, float]:
        """One epoch, timed like ``train_loop`` times ``samples_per_s`` (epoch start to the end of the
        last update, before validation)."""
        t0 = time.perf_counter()
        self.model.train()
        self.train_batches.set_epoch(self.epoch)
        n = 0
        for i, (x, y) in enumerate(self.train_batches):
            if max_steps is not None and i >= max_steps:
                break
            self.step(x, y)
            if hook is not None:
                hook(self.updates)
            n += len(y)
        self.epoch += 1
        self.scheduler.step(self.epoch)
        train_s = time.perf_counter() - t0
        return {"samples": n, "train_s": train_s, "samples_per_s": n / train_s}

    def validate(self) -> dict[str, float]:
        from contextlib import nullcontext

        from qksweep.trainables.core import evaluate

        return evaluate(self.model, self.val_batches, world=1, spiking=self.spiking, autocast=nullcontext,
                        num_classes=self.bundle.num_classes)


# ------------------------------------------------------------------------------------------ Ray/Tune records


def tune_trials(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Every trial of a Tune experiment, read from its newest ``experiment_state-*.json``:
    ``trial_id``, ``status``, ``start_time`` (wall clock when Tune set the trial RUNNING),
    ``last_result`` (with ``time_total_s``) and ``metric_analysis`` (max/min/avg per metric).

    (``SweepResult.trials`` is read from per-trial result files that qksweep turns off with
    ``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS``, so it can be empty; the experiment state always holds
    these.)"""
    files = sorted(Path(sweep_dir).glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        return []
    state = json.loads(files[-1].read_text())
    out = []
    for entry in state.get("trial_data", []):
        trial_json, meta_json = entry[0], entry[1]
        trial = json.loads(trial_json) if isinstance(trial_json, str) else trial_json
        meta = json.loads(meta_json) if isinstance(meta_json, str) else meta_json
        out.append({
            "trial_id": trial.get("trial_id"),
            "status": trial.get("status"),
            "config": trial.get("config"),
            "start_time": meta.get("start_time"),
            "last_result_time": meta.get("last_result_time"),
            "last_result": meta.get("last_result") or {},
            "metric_analysis": meta.get("metric_analysis") or {},
        })
    return out


def trial_curve(sweep_dir: str | Path, trial_id: str,
                keys: tuple[str, ...] = ("val/top1", "val/loss", "epoch_time_s")) -> list[dict[str, Any]]:
    """One trial's reports, epoch by epoch, read from the ``result.json`` Tune's JSON logger writes in
    the trial's folder (one line per report): ``epoch``, ``time_total_s`` (trainable start, or its reset
    when the process was reused, to this report), ``time_this_iter_s`` and ``keys``. A restored trial
    reports an epoch again: the last report of each epoch is kept."""
    sweep_dir = Path(sweep_dir)
    files = [p for p in sweep_dir.glob("*/result.json") if trial_id in p.parent.name]
    if not files:
        return []
    by_epoch: dict[int, dict[str, Any]] = {}
    for line in files[0].read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if "epoch" not in r:
            continue
        row = {"epoch": int(r["epoch"]), "time_total_s": r.get("time_total_s"), "time_this_iter_s": r.get("time_this_iter_s")}
        row.update({k: r.get(k) for k in keys})
        by_epoch[row["epoch"]] = row
    return [by_epoch[e] for e in sorted(by_epoch)]


def checkpoint_times(run_dir: str | Path) -> list[float]:
    """Wall-clock times (epoch seconds) at which rank 0 reported a checkpoint: parsed from Ray Train's
    default checkpoint folder names ``checkpoint_%Y-%m-%d_%H-%M-%S.%f`` (the storage context names the
    folder when ``report`` is called), or, for a trial trained in its own Tune process (folders
    ``checkpoint_000003``, written by the report itself), the folder's modification time."""
    from datetime import datetime

    times = []
    for p in Path(run_dir).glob("checkpoint_*"):
        stamp = p.name[len("checkpoint_"):]
        try:
            times.append(datetime.strptime(stamp, "%Y-%m-%d_%H-%M-%S.%f").timestamp())
        except ValueError:
            if stamp.isdigit():
                times.append(p.stat().st_mtime)
    return sorted(times)


def trial_checkpoint_dir(sweep_dir: str | Path, sweep: str, trial_id: str) -> Path:
    """Where a sweep trial's checkpoints are: its Train run's folder beside the sweep's
    (``run.launcher: train``) or its Tune trial folder inside the sweep's (``tune``)."""
    sweep_dir = Path(sweep_dir)
    train_dir = sweep_dir.parent / f"{sweep}-{trial_id}"
    if list(train_dir.glob("checkpoint_*")):
        return train_dir
    return next((p for p in sweep_dir.glob(f"*{trial_id}*") if p.is_dir()), train_dir)


def metric_history(tracking_uri: str, run_id: str, key: str) -> list[tuple[int, float, int]]:
    """(step, value, timestamp_ms) of one MLflow metric, by step."""
    from mlflow.tracking import MlflowClient

    hist = MlflowClient(tracking_uri).get_metric_history(run_id, key)
    return sorted((h.step, h.value, h.timestamp) for h in hist)


def shutdown_ray() -> None:
    """Stop Ray before the JSON line, so that no late worker log line lands after it."""
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001 - best effort
        pass
    sys.stdout.flush()
    sys.stderr.flush()
