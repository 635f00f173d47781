"""Closing a finished run: its last checkpoint and learning curves as artifacts, then FINISHED (or KILLED
when a stop rule ended it)."""

from __future__ import annotations

from . import runs
from .plots import log_learning_curves


def finalize_run(uri: str, run_id: str, checkpoint_path: str | None) -> None:
    """Last checkpoint and learning curves as artifacts, then FINISHED. Safe to repeat."""
    if checkpoint_path:
        from ray.train import Checkpoint

        with Checkpoint(checkpoint_path).as_directory() as d:
            runs.log_checkpoint_dir(runs.client(uri), run_id, d, "checkpoints/last")
    log_learning_curves(uri, run_id)
    c = runs.client(uri)
    stopped = runs.retrying(lambda: c.get_run(run_id), what="run status").data.tags.get("qksweep.stopped_by")
    runs.finish_run(c, run_id, "KILLED" if stopped else "FINISHED")

