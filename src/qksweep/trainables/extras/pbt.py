"""Population-based training (``sweep.scheduler.name: pbt | pb2``), as the trial's run sees it: each epoch
logs ``pbt/<key>``, the value of every key the scheduler may change (the run's params keep the values the
trial started with), and the first epoch after the trial copied another trial's checkpoint records it as
the tag ``qksweep.pbt.exploit.<epoch>``: from which trial, at which epoch, with which values it went on.
The checkpoint carries the trial that wrote it, which is how a restored run tells a copy from its own."""

from __future__ import annotations

import json
from typing import Any

from ..core import Core
from .base import Extra

VALUE_PREFIX = "pbt/"
EXPLOIT_TAG = "qksweep.pbt.exploit."


class PBTValues(Extra):
    name = "pbt"

    def __init__(self, values: dict[str, float], trial_id: str | None):
        self.values, self.trial_id = values, trial_id
        self.copied: dict[str, Any] | None = None

    @classmethod
    def build(cls, core: Core, loop_config: dict[str, Any]) -> PBTValues | None:
        values = loop_config.get("pbt_values")
        return cls(dict(values), loop_config.get("trial_id")) if values and core.rank == 0 else None

    def state_dict(self) -> dict[str, Any]:
        return {"trial_id": self.trial_id}

    def load_state_dict(self, state: Any) -> None:
        donor = (state or {}).get("trial_id")
        if donor and self.trial_id and donor != self.trial_id:
            self.copied = {"from_trial": donor}

    def epoch_metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {f"{VALUE_PREFIX}{k}": v for k, v in self.values.items()}
        if self.copied is not None:
            epoch = int(metrics["epoch"])
            note = {**self.copied, "at_epoch": epoch - 1, **self.values}
            out["_tags"] = {**(metrics.get("_tags") or {}), f"{EXPLOIT_TAG}{epoch}": json.dumps(note, sort_keys=True)}
            self.copied = None
        return out


def current_values(config: dict[str, Any], keys: list[str]) -> dict[str, float]:
    """The numeric values of ``keys`` (dotted) in a config dict."""
    out = {}
    for key in keys:
        node: Any = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, (int, float)) and not isinstance(node, bool):
            out[key] = float(node)
    return out
