"""Processes opening a fresh SQLite MLflow store at the same moment (two sweeps started together) all
get a working store: MLflow creates and migrates the database on first use, and without the open lock
in ``tracking.runs.client`` the second process fails inside alembic ("Online migration expected to
match one row"), which is what CI saw once from two concurrent sweeps."""

from __future__ import annotations

import subprocess
import sys

OPEN = """
import sys
from qksweep.tracking import runs
c = runs.client(sys.argv[1])
runs.experiment_id(c, "qksweep-open")
print("ok", len(c.search_experiments()))
"""


def test_four_processes_opening_one_new_sqlite_store_all_succeed(tmp_path):
    for attempt in range(1):  # one fresh database: without the lock, 3 of 4 processes failed in each of 3 tries
        uri = f"sqlite:///{tmp_path / f'fresh{attempt}.db'}"
        procs = [subprocess.Popen([sys.executable, "-c", OPEN, uri], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for _ in range(4)]
        outs = [p.communicate(timeout=120)[0] for p in procs]
        for p, out in zip(procs, outs):
            assert p.returncode == 0, out[-2000:]
            assert out.strip().splitlines()[-1] == "ok 2", out[-500:]  # Default + qksweep-open
