"""``bench/asha_replay.py``: ASHA replayed on recorded learning curves through the scheduler qksweep
builds, trials started in order as slots free up. Synthetic curves, no Ray cluster."""

from __future__ import annotations

import sys

import pytest

from .conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import asha_replay  # noqa: E402


def _trial(tid, losses, top1s, epoch_s=10.0, startup_s=5.0):
    curve = [{"epoch": e + 1, "val/loss": loss, "val/top1": top1, "time_total_s": startup_s + epoch_s * (e + 1)}
             for e, (loss, top1) in enumerate(zip(losses, top1s))]
    return {"trial_id": tid, "curve": curve}


TRIALS = [
    _trial("a", [2.00, 1.0, 0.5], [0.103, 0.6, 0.90]),
    _trial("b", [2.10, 1.5, 1.0], [0.103, 0.4, 0.70]),
    _trial("c", [1.90, 0.8, 0.4], [0.103, 0.7, 0.95]),
    _trial("d", [2.20, 1.6, 1.2], [0.103, 0.3, 0.60]),
]
BASE = {"optim": {"epochs": 3}, "sweep": {"metric": "val/top1", "mode": "max", "space": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}}}


def test_replay_stops_as_rays_asha_would_in_start_order():
    # one at a time, grace 1, rf 2: at epoch 1 on val/loss, b (worse than a) stops, c (better than the
    # median of a and b) goes on, d stops; on val/top1 every trial ties at chance and none stops there
    sched, eff = asha_replay.scheduler_for(BASE, 3, {"grace_period": 1, "reduction_factor": 2, "metric": "val/loss"})
    assert eff["rungs"] == [1, 2]
    out = asha_replay.replay(TRIALS, sched, concurrency=1)
    assert out["stopped_at"] == [3, 1, 3, 1]
    assert out["trial_seconds"] == 35 + 15 + 35 + 15 and out["full_trial_seconds"] == 4 * 35
    assert out["compute_ratio"] == 140 / 100 and out["best_gap"] == 0.0 and out["best_trial_kept"]

    sched, _ = asha_replay.scheduler_for(BASE, 3, {"grace_period": 1, "reduction_factor": 2})
    assert asha_replay.replay(TRIALS, sched, concurrency=1)["stopped_at"][:2] == [3, 2]  # b: at chance at 1, worse at 2


def test_two_at_a_time_judges_by_what_arrived_first():
    # a and b start together and reach epoch 1 at once (a first); c and d only start when a slot frees
    sched, _ = asha_replay.scheduler_for(BASE, 3, {"grace_period": 1, "reduction_factor": 2, "metric": "val/loss"})
    out = asha_replay.replay(TRIALS, sched, concurrency=2)
    assert out["stopped_at"] == [3, 1, 3, 1]


def test_synchronous_halving_keeps_the_top_of_each_full_rung():
    out = asha_replay.sync_halving(TRIALS, [1, 2], 2, "val/loss", "min")
    assert out["stopped_at"] == [2, 1, 3, 1]  # epoch 1 keeps c, a; epoch 2 keeps c


def test_signal_and_the_oracle_bound():
    assert asha_replay.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert asha_replay.spearman([1, 1, 1, 1], [1, 2, 3, 4]) is None  # all tied: no ranking
    sig = asha_replay.signal(TRIALS, epochs=(1, 2))
    assert sig["1"]["distinct_top1"] == 1 and sig["1"]["spearman_top1"] is None
    assert sig["2"]["spearman_loss"] == pytest.approx(1.0)  # at epoch 2 the loss orders the trials as their final best does
    orc = asha_replay.oracle(TRIALS, first_rungs=(1,))
    assert orc["first_rung_1"] == pytest.approx(140 / (35 + 3 * 15)) and orc["best_trial_share"] == 0.25
