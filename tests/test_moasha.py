"""MOASHA, multi-objective successive halving (issue 15.3): the ordering at a rung, ASHA's asynchronous
rule, the config checks, and a real accuracy-vs-energy sweep killed and resumed: some trials stopped
at a rung, the rung records restored, the Pareto front made of finished trials only."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
from ray.tune.schedulers import TrialScheduler

from qksweep import api
from qksweep.config import Config, ConfigError
from qksweep.orchestrator.moasha import (
    MOASHAScheduler,
    RungRecords,
    crowding_distances,
    nondominated_ranks,
    promotion_order,
    rung_milestones,
)

from .conftest import run_cli, tiny_config

C, S = TrialScheduler.CONTINUE, TrialScheduler.STOP


def test_nondominated_ranks_and_crowding():
    pts = [[0, 3], [1, 1], [3, 0], [2, 2], [3, 3], [1, 1]]  # minimised
    assert nondominated_ranks(pts) == [0, 0, 0, 1, 2, 0]
    front = [[0, 3], [1, 2], [2, 1.5], [3, 0]]
    d = crowding_distances(front)
    assert d[0] == d[3] == math.inf and d[1] == pytest.approx(2 / 3 + 1.5 / 3) and d[2] == pytest.approx(2 / 3 + 2 / 3)
    # front 0 first; inside it the ends (inf), then by crowding: [1.1, 1.9] has [1, 2] close on one side
    # only (distance 2/3 + 2/3), [1, 2] has it close on both axes (1.1/3 + 1.1/3); the dominated last
    assert promotion_order([[0, 3], [1, 2], [1.1, 1.9], [3, 0], [4, 4]]) == [0, 3, 2, 1, 4]


@pytest.mark.parametrize("grace,rf,max_t", [(1, 2, 4), (1, 3, 12), (2, 3, 12), (1, 2, 9), (3, 2, 3)])
def test_rungs_are_ashas(grace, rf, max_t):
    # Ray's ASHA has rungs grace * rf^k up to max_t, and stops every trial at max_t itself
    from ray.tune.schedulers.async_hyperband import _Bracket

    ray_rungs = [m for m, _ in _Bracket(grace, max_t, rf, 0)._rungs if m < max_t]
    assert rung_milestones(grace, rf, max_t) == sorted(set(ray_rungs), reverse=True)


def test_asynchronous_rule_at_a_rung():
    s = MOASHAScheduler(metrics=["val/top1", "snn/energy_mj"], modes=["max", "min"], max_t=4, grace_period=1,
                        reduction_factor=2)
    pt = s._point
    assert s.judge("a", 1, pt({"val/top1": 0.5, "snn/energy_mj": 2.0})) == C  # first at the rung goes on
    assert s.judge("b", 1, pt({"val/top1": 0.4, "snn/energy_mj": 3.0})) == S  # dominated by a: 1 of 2 goes on
    assert s.judge("c", 1, pt({"val/top1": 0.3, "snn/energy_mj": 1.0})) == C  # on the front, an end: kept
    assert s.judge("d", 1, pt({"val/top1": 0.45, "snn/energy_mj": 1.5})) == S  # on the front but crowded, 2 of 4 go on
    assert s.judge("a", 1, pt({"val/top1": 0.0, "snn/energy_mj": 9.0})) == C  # judged once per rung
    assert s.judge("a", 2, pt({"val/top1": 0.6, "snn/energy_mj": 2.0})) == C  # next rung: first there
    assert s.stopped == {"b": 1, "d": 1} and sorted(s.rungs[1]) == ["a", "b", "c", "d"]
    # the state Tune keeps for the callback comes back into a new scheduler (as after `qksweep resume`)
    t = MOASHAScheduler(metrics=["val/top1", "snn/energy_mj"], modes=["max", "min"], max_t=4, grace_period=1,
                        reduction_factor=2)
    RungRecords(t).set_state(pickle.loads(pickle.dumps(RungRecords(s).get_state())))
    assert t.rungs == s.rungs and t.stopped == s.stopped
    assert t.judge("e", 1, pt({"val/top1": 0.1, "snn/energy_mj": 5.0})) == S  # judged against the restored rung


def _cfg(workdir, **sweep) -> dict:
    cfg = tiny_config(workdir, optim={"epochs": 4, "warmup_epochs": 0}, snn={"val_batches": 1})
    cfg["sweep"] = {"metric": ["val/top1", "snn/energy_mj"], "mode": ["max", "min"], "num_samples": 6,
                    "max_concurrent": 2, "searcher": {"sampler": "random", "seed": 0},
                    "scheduler": {"name": "moasha", "grace_period": 1, "reduction_factor": 2},
                    "space": {"model.time_steps": {"choice": [1, 2, 3]}, "optim.lr": {"loguniform": [3e-4, 1e-2]}},
                    **sweep}
    return cfg


@pytest.mark.parametrize("sweep,words", [
    ({"metric": "val/top1", "mode": "max"}, "ranks trials on several metrics"),
    ({"scheduler": {"name": "asha"}}, "use moasha"),
])
def test_config_checks(workdir, sweep, words):
    from qksweep.checks import check_sweep

    with pytest.raises(ConfigError, match=words):
        check_sweep(Config.model_validate(_cfg(workdir, **sweep)))


def _rung_state(sweep_dir: Path) -> dict:
    files = sorted(sweep_dir.glob("callback-states-*.pkl"))  # by session time stamp (a sync rewrites them all)
    assert files, list(sweep_dir.iterdir())
    state = pickle.loads(files[-1].read_bytes())
    (moasha,) = [s["moasha"] for s in state.values() if s and "moasha" in s]
    return moasha


def _finished_before(sweep_dir: Path) -> set[str]:
    files = sorted(sweep_dir.glob("experiment_state-*.json"))
    out = set()
    for entry in json.loads(files[-1].read_text())["trial_data"]:
        trial = json.loads(entry[0]) if isinstance(entry[0], str) else entry[0]
        if trial.get("status") == "TERMINATED":
            out.add(trial["trial_id"])
    return out


@pytest.mark.slow
def test_sweep_stops_at_rungs_survives_a_kill_and_keeps_the_pareto_front_right(ray_session, workdir):
    from .test_orphans import _sweep_killed_at
    from .test_sweep import trial_runs

    cfg = _cfg(workdir)
    name = "mo"
    _sweep_killed_at(ray_session, workdir, cfg, name, "optuna_trial@5")
    sweep_dir = workdir / "results" / name
    before = _rung_state(sweep_dir)
    done_before = _finished_before(sweep_dir)
    recorded_before = {t for r in before["rungs"].values() for t in r}
    assert recorded_before & done_before, (before, done_before)  # finished trials recorded: they never report again

    api.resume(name, storage=str(workdir / "results"))
    after = _rung_state(sweep_dir)
    for rung, records in before["rungs"].items():
        assert set(records) <= set(after["rungs"][rung]), (rung, records, after)  # restored, not started afresh

    uri = cfg["tracking"]["uri"]
    c, trials, parents = trial_runs(uri, name)
    assert len(trials) == 6 and parents[0].info.status == "FINISHED"
    assert not [r for r in trials if r.info.status == "RUNNING"]
    stopped = [r for r in trials if r.data.tags.get("qksweep.stopped_by") == "moasha"
               and int(r.data.tags["qksweep.stopped_at_epoch"]) < 4]
    assert stopped and all(r.info.status == "KILLED" for r in stopped)
    assert set(after["stopped"]) == {r.data.tags["qksweep.trial_id"] for r in stopped}
    for r in trials:  # every epoch once
        steps = [m.step for m in c.get_metric_history(r.info.run_id, "epoch")]
        assert steps == sorted(set(steps)) and steps[0] == 1

    out = run_cli("best", name, "--pareto", "--format", "json", "--tracking-uri", uri, cwd=workdir, timeout=120)
    assert out.returncode == 0, out.stderr
    front = json.loads(out.stdout)
    finished = {r.info.run_id: r for r in trials if r.info.status == "FINISHED"}
    assert front and {p["run_id"] for p in front} <= set(finished)

    def vec(r):
        return (-r.data.metrics["val/top1"], r.data.metrics["snn/energy_mj"])

    pts = {rid: vec(r) for rid, r in finished.items()}
    expected = {rid for rid, p in pts.items()
                if not any(all(a <= b for a, b in zip(q, p)) and q != p for q in pts.values())}
    assert {p["run_id"] for p in front} == expected
    plots = [a.path for a in c.list_artifacts(parents[0].info.run_id, "plots")]
    assert any("pareto" in p for p in plots), plots


def test_ashas_rungs_travel_in_the_callback_state_too():
    # Ray's controller saves no scheduler state: without RungRecords a resumed ASHA judges the next trial
    # at a rung as if it were the first there
    from types import SimpleNamespace

    from ray.tune.schedulers import ASHAScheduler

    def asha():
        return ASHAScheduler(time_attr="epoch", metric="val/top1", mode="max", max_t=4, grace_period=1,
                             reduction_factor=2)

    def result(a, tid, v):
        trial = SimpleNamespace(trial_id=tid)
        a.on_trial_add(None, trial)
        return a.on_trial_result(None, trial, {"epoch": 1, "val/top1": v})

    a = asha()
    assert result(a, "x", 0.9) == C
    fresh, restored = asha(), asha()
    RungRecords(restored).set_state(pickle.loads(pickle.dumps(RungRecords(a).get_state())))
    assert result(fresh, "y", 0.5) == C and result(restored, "y", 0.5) == S
