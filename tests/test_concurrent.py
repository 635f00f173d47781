"""Two sweeps at once on one store (issue 20.4): started together from two shells, as two users on one
machine would, against one SQLite MLflow store and one ``run.storage``, with different names. Each
``qksweep sweep`` starts its own local Ray. Both must finish with every run and every epoch present:
SQLite serialises the two writers (MLflow calls retry a locked database within their deadline), each
sweep keeps its own folder and Optuna study, and neither touches the other's runs."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
from collections import Counter

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from .conftest import tiny_config

pytestmark = pytest.mark.slow

NAMES = ("left", "right")
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][A-Za-z0-9]|\r")


def assert_plain_events(out: str, name: str, tids: list[str]) -> None:
    """The whole console of a sweep off a terminal: its opening line, per trial "started", each epoch once
    and "finished", then the best trial; every line one of these."""
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert lines[0].startswith(f"sweep {name}: 2 trials, up to 1 at a time, random + none; storage "), lines[:3]
    end = next(i for i, ln in enumerate(lines) if ln.startswith("best trial "))
    events = lines[1:end]
    if events and events[-1].startswith("checkpoints: each trial keeps its best and last; freed "):
        events = events[:-1]  # the end-of-sweep clean-up, when Ray had kept more than best and last
    for t in tids:
        mine = [ln for ln in events if t in ln]
        assert re.fullmatch(rf"trial {t} started: optim\.lr=[0-9.e-]+", mine[0]), mine
        assert [ln.split()[1] for ln in mine[1:3]] == ["epoch", "epoch"] and [ln.split()[2] for ln in mine[1:3]] == ["1/2", "2/2"], mine
        assert re.fullmatch(rf"trial {t} finished: 2 epochs, val/loss [0-9.]+, best [0-9.]+", mine[3]) and len(mine) == 4, mine
    assert len(events) == 4 * len(tids), [ln for ln in events if not any(t in ln for t in tids)]
    assert "\x1b[" not in out and "pid=" not in out, out[-2000:]


def test_two_sweeps_at_once_on_one_store_both_finish_with_every_run(workdir):
    cfg = tiny_config(workdir, optim={"epochs": 2, "warmup_epochs": 0})
    cfg["sweep"] = {"metric": "val/loss", "mode": "min", "num_samples": 2, "max_concurrent": 1,
                    "searcher": {"sampler": "random", "seed": 0}, "scheduler": {"name": "none"},
                    "space": {"optim.lr": {"loguniform": [1e-3, 1e-2]}}}
    (workdir / "sweep.yaml").write_text(yaml.safe_dump(cfg))
    # each starts its own local Ray; the console is the CLI's own (conftest turns Ray's log dedup off)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_DEDUP_LOGS")}
    # "left" writes to a pipe (plain event lines); "right" to a pseudo-terminal (the live view)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    procs = {"left": subprocess.Popen([sys.executable, "-m", "qksweep.cli", "sweep", "sweep.yaml", "--name", "left"],
                                      cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True),
             "right": subprocess.Popen([sys.executable, "-m", "qksweep.cli", "sweep", "sweep.yaml", "--name", "right"],
                                       cwd=workdir, env={**env, "TERM": "xterm-256color", "COLUMNS": "160"},
                                       stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, start_new_session=True)}
    os.close(slave)
    screen: list[bytes] = []

    def read_terminal():
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's last writer is gone
                break
            if not chunk:
                break
            screen.append(chunk)

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    outs = {}
    try:
        outs["left"] = procs["left"].communicate(timeout=420)[0]
        procs["right"].wait(timeout=420)
        reader.join(timeout=30)
        outs["right"] = b"".join(screen).decode("utf-8", "replace")
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, 9)
        os.close(master)
    for n, p in procs.items():
        assert p.returncode == 0, f"sweep {n} exited {p.returncode}:\n{outs[n][-3000:]}"

    c = MlflowClient(cfg["tracking"]["uri"])
    exp = c.get_experiment_by_name("test")
    for n in NAMES:
        runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`qksweep.sweep` = '{n}'")
        trials = [r for r in runs if r.data.tags.get("qksweep.kind") == "trial"]
        parents = [r for r in runs if r.data.tags.get("qksweep.kind") == "sweep"]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED", (n, [r.info.status for r in parents])
        per_trial = Counter(r.data.tags["qksweep.trial_id"] for r in trials)
        assert len(per_trial) == 2 and set(per_trial.values()) == {1}, (n, per_trial)
        for r in trials:
            assert r.info.status == "FINISHED", (n, r.info.run_id, r.info.status)
            assert r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id, (n, r.data.tags)
            for key in ("epoch", "val/loss", "train/loss"):
                steps = sorted(m.step for m in c.get_metric_history(r.info.run_id, key))
                assert steps == [1, 2], (n, key, steps)
        tids = sorted(r.data.tags["qksweep.trial_id"] for r in trials)
        if n == "left":  # off a pipe: one plain line per event, every epoch once, nothing else, no colour codes
            assert_plain_events(outs[n], n, tids)
        else:  # on a terminal: the live view, its last frame with both trials finished; no epoch lines
            view = ANSI.sub("", outs[n])
            assert "\x1b[" in outs[n] and "sweep right: 2/2 trials  |  0 running, 2 finished, 0 stopped, 0 failed" in view, view[-3000:]
            assert all(re.search(rf"{t}\s*│\s*finished\s*│\s*[0-9.e-]+\s*│\s*2/2\s*│", view) for t in tids), view[-3000:]
            assert not re.search(r"^\[[0-9a-f_]+\] epoch ", view, re.M) and "pid=" not in view, view[-3000:]
        # what the console left out is in the sweep's log: the trials' own epoch lines among them
        log = (workdir / "results" / n / "sweep.log").read_text()
        assert all(f"[{t}] epoch 2/2" in log for t in tids) and "\x1b[" not in log, log[-2000:]
        study = optuna.load_study(study_name=None, storage=f"sqlite:///{workdir / 'results' / n / 'optuna.db'}")
        assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"], (n, study.trials)
        assert {t.user_attrs["mlflow_run_id"] for t in study.trials} == {r.info.run_id for r in trials}
    top = sorted(p.name for p in (workdir / "results").iterdir())
    assert set(NAMES) <= set(top), top
