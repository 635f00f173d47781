"""Dead-network stop: a trial whose mean firing rate stays out of range is stopped."""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

__all__ = ["FiringRateStopRule"]


def _fmt(x: float) -> str:
    return f"{x:.0e}" if 0 < abs(x) < 1e-2 else f"{x:g}"


class FiringRateStopRule:
    """Stop when ``metrics[key]`` (the mean firing rate) is below ``low`` or above ``high``
    for ``patience`` consecutive :meth:`check` calls (one per validation).

    :meth:`check` returns the reason, e.g. ``"mean firing rate 0.00e+00 below 1e-04 for 2
    validations"``, once the rule fires (and on every later out-of-range check), else
    ``None``.  A check without the key (or with NaN) neither counts nor resets the streak.
    """

    def __init__(self, low: float = 1e-4, high: float = 0.9, patience: int = 2, key: str = "snn/firing_rate") -> None:
        if not (math.isfinite(low) and math.isfinite(high)) or low > high:
            raise ValueError(f"need finite low <= high, got low={low!r}, high={high!r}")
        if int(patience) < 1:
            raise ValueError(f"patience={patience!r} must be >= 1")
        self.low = float(low)
        self.high = float(high)
        self.patience = int(patience)
        self.key = key
        self.streak = 0
        self.side: Optional[str] = None  # 'below' | 'above' | 'outside' (both, mixed)
        self.last: Optional[float] = None

    def check(self, metrics: Mapping[str, Any]) -> Optional[str]:
        value = metrics.get(self.key)
        if value is None:
            return None
        value = float(value)
        if math.isnan(value):
            return None
        self.last = value
        side = "below" if value < self.low else "above" if value > self.high else None
        if side is None:
            self.streak, self.side = 0, None
            return None
        self.side = side if self.streak == 0 or self.side == side else "outside"
        self.streak += 1
        return self.reason() if self.streak >= self.patience else None

    def reason(self) -> Optional[str]:
        """The stop reason if the rule has fired, else ``None``."""
        if self.streak < self.patience or self.last is None:
            return None
        bound = {
            "below": f"below {_fmt(self.low)}",
            "above": f"above {_fmt(self.high)}",
        }.get(self.side or "", f"outside [{_fmt(self.low)}, {_fmt(self.high)}]")
        n = self.streak
        return f"mean firing rate {self.last:.2e} {bound} for {n} validation{'s' if n != 1 else ''}"

    @property
    def fired(self) -> bool:
        return self.streak >= self.patience

    def reset(self) -> None:
        self.streak, self.side, self.last = 0, None, None

    def state_dict(self) -> dict[str, Any]:
        return {
            "low": self.low,
            "high": self.high,
            "patience": self.patience,
            "key": self.key,
            "streak": self.streak,
            "side": self.side,
            "last": self.last,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the streak (thresholds stay those of the constructor unless given)."""
        self.low = float(state.get("low", self.low))
        self.high = float(state.get("high", self.high))
        self.patience = int(state.get("patience", self.patience))
        self.key = str(state.get("key", self.key))
        self.streak = int(state.get("streak", 0))
        self.side = state.get("side")
        last = state.get("last")
        self.last = None if last is None else float(last)
