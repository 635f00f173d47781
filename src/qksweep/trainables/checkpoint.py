"""Checkpoint save/load. One file, ``checkpoint.pt``, loadable with ``torch.load(weights_only=True)``,
plus ``config.json`` so a checkpoint alone is enough to rebuild its model (validate, predict, spectrum).

A training checkpoint is the core's state plus each extra's under its name, built by
:func:`training_state` and put back by :func:`restore_training_state`, the one place that knows the
layout: ``model`` (permanent weights), ``optimizer``, ``scheduler``, ``scaler`` (float16 only),
``epoch``, ``updates``, ``epochs_planned``, ``rng``, ``metrics`` (the epoch's report, replayed after a
restart), then ``ema``, ``spectral``, ``stop_rule``, ``fr_rule``, ``prune_masks``, ``pbt`` as the extras have them.
"""

from __future__ import annotations

import errno
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

CKPT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or not one of ours (one line, exit 2)."""


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = random.getstate()
    random.setstate((py[0], tuple(state["python"]), py[2]))
    np_state = list(np.random.get_state())
    np_state[1] = state["numpy"].numpy().astype(np.uint32)
    np.random.set_state(tuple(np_state))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (a full disk, a read-only folder): the trial fails with this
    one line, which names the folder, and the sweep goes on. Not bad input (that is :class:`CheckpointError`)."""


# what a storage that cannot take a file says: full, over quota, read-only, refused, failing
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG}
WRITE_TEXTS = ("No space left", "Disk quota", "Read-only file system", "Permission denied", "File too large")


def is_write_failure(e: OSError) -> bool:
    """Whether ``e`` is the storage refusing a file (pyarrow's copy errors carry the errno in their text)."""
    return e.errno in WRITE_ERRNOS or any(t in str(e) for t in WRITE_TEXTS)


def write_error(e: OSError, *, epoch: int, where: str | Path | None) -> CheckpointWriteError:
    """One line for a checkpoint write that failed: the epoch, the folder, the system's reason, the fix."""
    text = str(e).strip()
    reason = e.strerror or (text.splitlines()[0][:200] if text else type(e).__name__)
    if "No space left" in text:
        reason = "no space left on device"
    elif "Read-only file system" in text:
        reason = "read-only file system"
    return CheckpointWriteError(f"the epoch {epoch} checkpoint could not be written to {where or 'its folder'} "
                                f"({reason}): free space there or point run.storage at a writable place")


def checkpoint_dirs(root: str | Path | None) -> set[str]:
    """The checkpoint folders under a local ``root`` (none for a bucket or a folder not made yet)."""
    if not root or not Path(root).is_dir():
        return set()
    return {str(p) for p in Path(root).glob("checkpoint_*") if p.is_dir()}


def remove_partial(root: str | Path | None, before: set[str]) -> list[str]:
    """Remove the checkpoint folders that appeared under ``root`` since ``before`` was taken (a copy that
    failed half way), so that a full disk gets that space back for the trials after this one. The older,
    complete checkpoints stay."""
    gone = sorted(checkpoint_dirs(root) - before)
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def save_checkpoint(directory: str | Path, state: dict[str, Any], config: dict[str, Any]) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    torch.save(state, d / CKPT_FILE)
    (d / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    return d


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """Returns (state, config). Accepts a checkpoint directory or the ``checkpoint.pt`` file itself."""
    p = Path(directory)
    if p.is_file():
        p = p.parent
    f = p / CKPT_FILE
    if not f.exists():
        raise CheckpointError(f"checkpoint '{directory}' has no {CKPT_FILE}: pass a qksweep checkpoint directory or file")
    try:
        state = torch.load(f, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for corrupt files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint '{f}' cannot be read ({first[:160]}): it is corrupt or not a qksweep checkpoint") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint '{f}' is not a qksweep checkpoint (no 'model' entry)")
    cfg_file = p / CONFIG_FILE
    try:
        config = json.loads(cfg_file.read_text()) if cfg_file.exists() else None
    except json.JSONDecodeError:
        raise CheckpointError(f"checkpoint '{p}': {CONFIG_FILE} is not valid JSON") from None
    if not config:
        raise CheckpointError(f"checkpoint '{p}' has no {CONFIG_FILE}: cannot tell which model it holds")
    return state, config


def training_state(core, extras, *, epoch: int, updates: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint of a :class:`~qksweep.trainables.core.Core` and its extras after ``epoch`` epochs."""
    from ..prune import plain_state_dict  # the model's weights with any pruning made permanent

    state: dict[str, Any] = {
        "model": plain_state_dict(core.model), "optimizer": core.optimizer.state_dict(),
        "scheduler": core.scheduler.state_dict(), "epoch": epoch, "updates": updates,
        "epochs_planned": core.cfg.optim.epochs, "rng": rng_state(), "metrics": metrics,
    }
    if core.scaler.is_enabled():
        state["scaler"] = core.scaler.state_dict()
    for e in extras:
        if e.name and (s := e.state_dict()) is not None:
            state[e.name] = s
    return state


# what the config sets in each optimizer param group: a restored run trains with its config's values (a
# PBT trial that copied another's checkpoint goes on with its perturbed lr; `continue -s optim.lr=...`)
GROUP_HYPERPARAMETERS = ("lr", "initial_lr", "weight_decay", "momentum")


def restore_training_state(state: dict[str, Any], core, extras) -> tuple[int, int]:
    """Put ``state`` back into the core and its extras; returns (epochs done, updates done). The state is
    the checkpoint's (weights, optimizer moments, the extras' state, the random state); the hyperparameters
    are the config's: the optimizer's groups keep the values the core was built with, and the lr schedule
    is the fresh one at the restored update count (only ``plateau``, which learns from the run, is
    restored, for a checkpoint planned for the same number of epochs)."""
    core.model.load_state_dict(state["model"])
    for e in extras:
        if e.name and e.name in state:
            e.load_state_dict(state[e.name])
    wanted = [{k: g[k] for k in GROUP_HYPERPARAMETERS if k in g} for g in core.optimizer.param_groups]
    core.optimizer.load_state_dict(state["optimizer"])
    for group, values in zip(core.optimizer.param_groups, wanted):
        group.update(values)
    if core.cfg.optim.sched == "plateau" and int(state.get("epochs_planned", core.cfg.optim.epochs)) == core.cfg.optim.epochs:
        core.scheduler.load_state_dict(state["scheduler"])
    if "scaler" in state:
        core.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    epoch, updates = int(state["epoch"]), int(state["updates"])
    core.scheduler.step_update(num_updates=updates)
    return epoch, updates


def load_resumable(ckpt, device) -> dict[str, Any]:
    """Load the checkpoint to resume from; if it is corrupt, fall back to the newest earlier checkpoint
    of the same run (kept alongside it in the run's storage) with a warning."""
    import logging

    try:
        with ckpt.as_directory() as d:
            return load_checkpoint(d, map_location=device)[0]
    except CheckpointError as err:
        here = Path(ckpt.path)
        if "://" in ckpt.path or not here.parent.is_dir():
            raise
        for older in sorted((p for p in here.parent.glob("checkpoint_*") if p.is_dir() and p.name < here.name), reverse=True):
            try:
                state = load_checkpoint(older, map_location=device)[0]
            except CheckpointError:
                continue
            logging.getLogger("qksweep").warning("%s; resuming from the previous checkpoint %s (epoch %s)",
                                                 err, older.name, state.get("epoch"))
            return state
        raise
