"""Optional features of the training loop, each one small object beside the loop (an *extra*).

The loop (:mod:`..loop`) knows only the :class:`~.base.Extra` protocol (:mod:`.base`); every hook is a no-op here and
an extra overrides what it needs. The features are assembled in one place, :func:`build_extras`, in
the order their hooks run (EMA before the spectral monitor that measures the EMA model too, the SNN
meter before the firing-rate rule that reads its metrics). Adding a feature is a new file in this
folder plus one line in :func:`build_extras`; the loop body does not change.

An extra lives on every worker unless its ``build`` returns None on ranks other than 0 (what only rank
0 measures: spectra, SNN counts). Anything that runs a collective (an evaluation, an all-reduce) must
exist on every rank.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from ...names import PUBLISH_DIR
from ..core import Core, all_max
from .base import Extra
from .distill import Distillation
from .ema import EMA
from .lineage import DatasetInputs, SystemMetrics
from .pbt import PBTValues
from .progress import Progress
from .prune import Pruning
from .snn import FiringRateStop, SNNMeasures
from .spectral import SpectralMonitorExtra, SpectralStop

__all__ = ["Extra", "agree_stop", "around_all", "build_extras", "publish_all"]


def build_extras(core: Core, loop_config: dict[str, Any]) -> list[Extra]:
    """The run's extras in hook order. One line per feature."""
    ema = EMA.build(core)
    spectral = SpectralMonitorExtra.build(core, ema)
    extras = [
        ema,
        spectral,
        SpectralStop.build(core, spectral),
        SNNMeasures.build(core),
        FiringRateStop.build(core),
        Distillation.build(core, loop_config),
        Pruning.build(core),
        DatasetInputs.build(core),
        SystemMetrics.build(core, loop_config),
        Progress.build(core, loop_config),
        PBTValues.build(core, loop_config),
    ]
    return [e for e in extras if e is not None]


@contextmanager
def around_all(extras: list[Extra], batch: int, n_images: int) -> Iterator[None]:
    """Every extra's :meth:`Extra.measuring` context around one validation forward."""
    with ExitStack() as stack:
        for e in extras:
            stack.enter_context(e.measuring(batch, n_images))
        yield


STOPPED_ELSEWHERE = Extra()  # what the other ranks get when rank 0's extra asked (its label lives on rank 0)


def agree_stop(extras: list[Extra], core: Core) -> Extra | None:
    """Whether to stop, the same on every rank: rank 0 gets the extra whose request wins (its first),
    the others :data:`STOPPED_ELSEWHERE` (their lists lack rank 0's own extras), or None for all."""
    asked = [i + 1 for i, e in enumerate(extras) if e.stop_request()]
    code = int(all_max(torch.tensor(asked[0] if asked else 0, device=core.device), core.world))
    if code == 0:
        return None
    return extras[code - 1] if core.rank == 0 else STOPPED_ELSEWHERE


def publish_all(extras: list[Extra], checkpoint_dir: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for e in extras:
        out.update(e.publish(checkpoint_dir / PUBLISH_DIR))
    return out

