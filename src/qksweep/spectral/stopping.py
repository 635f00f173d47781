"""Spectral early-stopping rule: stop a trial whose weight spectrum blows up.

Pure Python (no Ray): feed it the metrics dict of :meth:`SpectralMonitor.maybe_measure`
(or any dict holding ``<prefix>/<module>/sigma_max`` keys) and stop the trial when
:meth:`SpectralStopRule.check` returns a reason string.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

__all__ = ["sigma_growth", "SpectralStopRule"]

_SUFFIX = "/sigma_max"


def sigma_growth(history_first: float, current: float) -> float:
    """``current / history_first``; ``inf`` when the first value is <= 0 and current > 0,
    ``nan`` when either value is non-finite (or both are 0)."""
    a, b = float(history_first), float(current)
    if not (math.isfinite(a) and math.isfinite(b)):
        return float("nan")
    if a <= 0.0:
        return float("inf") if b > 0.0 else float("nan")
    return b / a


def _split(key: str) -> tuple[str, str]:
    """``"spec/blocks.0.attn.qkv/sigma_max"`` -> ``("spec", "blocks.0.attn.qkv")``."""
    body = key[: -len(_SUFFIX)]
    prefix, sep, module = body.partition("/")
    return (prefix, module) if sep else ("", body)


class SpectralStopRule:
    """Trigger when any ``.../sigma_max`` exceeds ``max_growth`` x its first measured value.

    The reference value of each key is its first finite, strictly positive
    measurement (a zero-initialised layer gets its reference at its first non-zero
    measurement, so it cannot trigger on "infinite growth"). A non-finite value
    (NaN/Inf) triggers immediately. :meth:`check` returns ``None`` or a reason like
    ``"spec sigma_max of blocks.0.attn.qkv grew 12.3x (limit 10)"``.
    """

    def __init__(self, max_growth: float) -> None:
        max_growth = float(max_growth)
        if not max_growth > 0 or not math.isfinite(max_growth):
            raise ValueError(f"max_growth must be a positive finite number, got {max_growth}")
        self.max_growth = max_growth
        self.first: dict[str, float] = {}

    def check(self, metrics: Mapping[str, Any]) -> str | None:
        worst: tuple[float, str] | None = None
        for key, value in metrics.items():
            if not (isinstance(key, str) and key.endswith(_SUFFIX)):
                continue
            try:
                v = float(value)
            except (TypeError, ValueError):
                continue
            prefix, module = _split(key)
            tag = f"{prefix} " if prefix else ""
            if not math.isfinite(v):
                return f"{tag}sigma_max of {module} is non-finite ({v})"
            ref = self.first.get(key)
            if ref is None:
                if v > 0.0:
                    self.first[key] = v
                continue
            g = sigma_growth(ref, v)
            if g > self.max_growth and (worst is None or g > worst[0]):
                worst = (g, f"{tag}sigma_max of {module} grew {g:.1f}x (limit {self.max_growth:g})")
        return None if worst is None else worst[1]

    def reset(self) -> None:
        self.first.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"max_growth": self.max_growth, "first": dict(self.first)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.first = {str(k): float(v) for k, v in state.get("first", {}).items()}
