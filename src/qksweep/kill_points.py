"""Kill points for the tests of what a SIGKILL leaves behind (tests/test_orphans.py).

``QKSWEEP_TEST_KILL_AT=NAME@K`` (read only by tests, never set by qksweep): the process that reaches kill
point NAME for the K-th time in the sweep (counted in ``<marker>.seen``; one trial at a time) writes
``NAME PID`` to ``QKSWEEP_TEST_KILL_MARKER`` and then waits, so that nothing after that point happens
before the test SIGKILLs the sweep. The points, in the order a trial's pieces come into
being (DEVELOPERS.md, "A trial's pieces"): ``optuna_trial`` (the sweep driver asked Optuna for the trial),
``mlflow_run`` (the trial's driver made its MLflow run), ``train_run`` (its Train worker started),
``train_done`` (its Train run has trained every epoch; the driver has not closed the MLflow run yet).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV, MARKER = "QKSWEEP_TEST_KILL_AT", "QKSWEEP_TEST_KILL_MARKER"


def kill_point(name: str) -> None:
    at = os.environ.get(ENV)
    if not at or at.partition("@")[0] != name or not os.environ.get(MARKER):
        return
    marker = Path(os.environ[MARKER])
    seen = marker.with_name(marker.name + ".seen")
    with open(seen, "a") as f:
        f.write(f"{name}\n")
    if len(seen.read_text().splitlines()) < int(at.partition("@")[2] or 1):
        return
    marker.write_text(f"{name} {os.getpid()}")
    time.sleep(600)  # the test kills the sweep now; bounded in case it never does
