"""What a ``TorchTrainer`` is handed as its per-worker function: a thin entry that imports the
training loop only where it runs.

``TorchTrainer`` pickles its function by reference, so whichever process builds the trainer (the
``qksweep train`` driver, a sweep's trial driver) imports that function's module. Importing
``loop`` there would load timm, SpikingJelly and the model zoo in the trial driver before it
even starts the Train controller — seconds of a trial's start-up on a 2-CPU machine, for
nothing. This module imports nothing heavy; the Train worker imports ``loop`` when it calls in.
"""

from __future__ import annotations

from typing import Any


def train_loop(loop_config: dict[str, Any]) -> None:
    from ..kill_points import kill_point
    from .loop import train_loop as _train_loop

    kill_point("train_run")

    _train_loop(loop_config)
