"""Checkpoint clean-up (issue 16.6): what the plan keeps, on made-up trials (the real sweep, the end-of-sweep
clean-up and `qksweep gc` on it are in test_sweep.py's four-trial test)."""

from __future__ import annotations

import json

from qksweep.orchestrator.gc import Ckpt, TrialCkpts, _reported, plan

from .conftest import run_cli


def trial(tid: str, status: str, values: list[float | None], *, stray: bool = False) -> TrialCkpts:
    ckpts = [Ckpt(tid, f"/s/{tid}/checkpoint_{i:06d}", i + 1, v, 100) for i, v in enumerate(values)]
    if stray:  # a folder the trial never reported (a copy cut short)
        ckpts.append(Ckpt(tid, f"/s/{tid}/checkpoint_999999", None, None, 7))
    return TrialCkpts(tid, status, ckpts)


def names(cs: list[Ckpt]) -> set[str]:
    return {c.path.rsplit("/", 2)[-2] + "/" + c.path.rsplit("_", 1)[-1] for c in cs}


def test_finished_trials_keep_best_and_last_running_ones_everything():
    trials = [trial("a", "TERMINATED", [0.5, 0.9, 0.7, 0.6], stray=True),
              trial("b", "RUNNING", [0.2, 0.3, 0.4]),
              trial("c", "ERROR", [0.8])]
    p = plan(trials, "max")
    assert names(p.keep) == {"a/000001", "a/000003", "b/000000", "b/000001", "b/000002", "c/000000"}
    assert names(p.remove) == {"a/000000", "a/000002", "a/999999"} and p.freed == 207
    assert p.running == ["b"]
    # min mode: the best is the lowest; a tie goes to the later epoch
    p = plan([trial("a", "TERMINATED", [0.5, 0.4, 0.4, 0.6])], "min")
    assert names(p.keep) == {"a/000002", "a/000003"}


def test_keep_best_removes_every_checkpoint_of_the_other_finished_trials():
    trials = [trial("a", "TERMINATED", [0.5, 0.6]), trial("b", "TERMINATED", [0.9, 0.1]),
              trial("c", "TERMINATED", [None]), trial("d", "PENDING", [])]
    p = plan(trials, "max", keep_best=1)
    assert names(p.keep) == {"b/000000", "b/000001"}
    assert names(p.remove) == {"a/000000", "a/000001", "c/000000"}
    p = plan(trials, "max", keep_best=2)  # a trial that reported no value ranks last
    assert names(p.remove) == {"a/000000", "c/000000"} and p.running == ["d"]  # a: best is last


def test_reported_reads_result_json_and_survives_a_cut_line(tmp_path):
    rows = [{"epoch": 1, "val/top1": 0.5, "checkpoint_path": str(tmp_path / "checkpoint_000000")},
            {"epoch": 2, "val/top1": float("nan"), "checkpoint_dir_name": "checkpoint_000001"},
            {"epoch": 2, "val/top1": 0.7, "checkpoint_path": str(tmp_path / "checkpoint_000001")},  # after a restart
            {"epoch": 3, "val/top1": 0.8}]
    (tmp_path / "result.json").write_text("\n".join(json.dumps(r) for r in rows) + '\n{"epoch": 4, "val/to')
    assert _reported(str(tmp_path), "val/top1") == {"checkpoint_000000": (1, 0.5), "checkpoint_000001": (2, 0.7)}
    assert _reported(str(tmp_path / "missing"), "val/top1") == {}


def test_gc_of_a_sweep_that_is_not_there_is_one_line_exit_2(tmp_path):
    out = run_cli("gc", "nope", "--storage", str(tmp_path), cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "no sweep 'nope' to clean up" in out.stderr, out.stderr
    out = run_cli("gc", "nope", "--keep-best", "0", cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and "--keep-best" in out.stderr and "Traceback" not in out.stderr, out.stderr
