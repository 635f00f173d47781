"""Shared fixtures: one local Ray for the in-process tests, and tiny configs that train in seconds."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def tiny_config(tmp: Path, **sections) -> dict:
    """A QKFormer small enough that an epoch on digits takes about a second."""
    cfg = {
        "experiment": "test",
        "model": {"name": "qkformer_cifar", "embed_dim": 32, "num_heads": 2, "depth": 2, "mlp_ratio": 2, "time_steps": 1},
        "data": {"name": "digits", "img_size": 8, "batch_size": 64},
        "optim": {"epochs": 2, "warmup_epochs": 0, "lr": 3e-3},
        "run": {"workers": 1, "seed": 1, "storage": str(tmp / "results"), "max_failures": 2},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}"},
        "spectral": {"enabled": False},
    }
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return cfg


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from qksweep.cluster.connect import ensure_ray

    ensure_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_cli(*args: str, cwd: Path, timeout: float = 600, env: dict | None = None):
    import subprocess

    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "qksweep.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=e)
