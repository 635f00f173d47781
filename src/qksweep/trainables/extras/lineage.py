"""What a run was trained on and with: its datasets as MLflow inputs (``mlflow.log_input``'s entities:
name, digest, source, profile with the split sizes), and, with ``tracking.system_metrics: true``, MLflow's
own system-metrics monitor (CPU, memory, disk, network; GPU utilisation and memory where NVML answers)
sampling the process that trains.

The loop never writes to MLflow itself: the dataset description travels with the first epoch's report
(``_dataset``) and the epoch logger sends it with that epoch (kept in the pending file through an
outage, logged once per run). The monitor is MLflow's: a thread of rank 0 that logs ``system/*`` metrics
to the run every ``tracking.system_metrics_interval_s``."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from ..core import Core
from .base import Extra

DATA_KEYS = ("name", "root", "img_size", "val_fraction", "train_size", "val_size", "frames", "split_by", "num_classes")


def describe_datasets(core: Core) -> list[dict[str, Any]]:
    """The train and validation sets as MLflow dataset entities (plain dicts): the same data config and
    sizes give the same digest in every run and every sweep."""
    d, b = core.cfg.data, core.bundle
    conf = {k: getattr(d, k) for k in DATA_KEYS}
    if conf["root"]:
        conf["root"] = os.path.abspath(os.path.expanduser(conf["root"]))
    source = conf["root"] or ("sklearn.datasets.load_digits" if d.name == "digits" else f"qksweep:{d.name}")
    out = []
    for split, ds in (("train", b.train), ("validation", b.val)):
        profile = {"num_rows": len(ds), "num_classes": b.num_classes, "in_chans": b.in_chans}
        if b.frames is not None:
            profile["frames"] = b.frames
        key = json.dumps({"split": split, **conf, **profile, "classes": b.class_names}, sort_keys=True, default=str)
        out.append({"name": f"{d.name}-{split}", "digest": hashlib.sha256(key.encode()).hexdigest()[:8],
                    "source_type": "local" if conf["root"] else "code", "source": json.dumps({"uri": source}),
                    "profile": json.dumps(profile), "context": "training" if split == "train" else "validation"})
    return out


class DatasetInputs(Extra):
    """Hands the dataset description to the epoch logger with this process's first epoch (rank 0)."""

    name = "datasets"

    def __init__(self, core: Core):
        self.core, self.sent = core, False

    @classmethod
    def build(cls, core: Core) -> DatasetInputs | None:
        return cls(core) if core.rank == 0 and core.cfg.tracking.enabled else None

    def epoch_metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        if self.sent:
            return {}
        self.sent = True
        return {"_dataset": describe_datasets(self.core)}


class SystemMetrics(Extra):
    """MLflow's ``SystemMetricsMonitor`` on the trial's run, in the process that trains (rank 0)."""

    name = "system_metrics"

    def __init__(self, run_id: str, uri: str, interval_s: float):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, samples_before_logging=1,
                                            resume_logging=True, tracking_uri=uri)
        self.monitor.start()

    @classmethod
    def build(cls, core: Core, loop_config: dict[str, Any]) -> SystemMetrics | None:
        t = core.cfg.tracking
        if core.rank != 0 or not (t.enabled and t.system_metrics) or not loop_config.get("run_id"):
            return None
        return cls(loop_config["run_id"], t.uri, t.system_metrics_interval_s)

    def close(self) -> None:
        self.monitor.finish()
