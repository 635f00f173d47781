"""Checkpoint save/load. One file, ``checkpoint.pt``, loadable with ``torch.load(weights_only=True)``,
plus ``config.json`` so a checkpoint alone is enough to rebuild its model (validate, predict, spectrum)."""

from __future__ import annotations

import json
import random
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
        config = json.loads(cfg_file.read_text()) if cfg_file.exists() else state.get("config_json") and json.loads(state["config_json"])
    except json.JSONDecodeError:
        raise CheckpointError(f"checkpoint '{p}': {CONFIG_FILE} is not valid JSON") from None
    if not config:
        raise CheckpointError(f"checkpoint '{p}' has no {CONFIG_FILE}: cannot tell which model it holds")
    return state, config
