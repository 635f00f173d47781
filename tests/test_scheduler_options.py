"""Early stopping that pays (issue 18.3): the metric ASHA ranks trials on at a rung
(``sweep.scheduler.metric``), grace period and reduction factor derived from the budget when the config
leaves them out, and TPE's start-up count sized to ``num_samples``. None of these tests starts Ray."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from ray.tune.schedulers import TrialScheduler

from qksweep.checks import check_sweep
from qksweep.config import ConfigError, load_config
from qksweep.orchestrator.searcher import asha_rungs, make_scheduler, scheduler_settings

from .conftest import ROOT, tiny_config

C, S = TrialScheduler.CONTINUE, TrialScheduler.STOP


def _cfg(tmp, scheduler=None, epochs=4, **sweep):
    cfg = tiny_config(tmp, optim={"epochs": epochs, "warmup_epochs": 0})
    cfg["sweep"] = {"metric": "val/top1", "mode": "max", "num_samples": 4,
                    "scheduler": {"name": "asha", **(scheduler or {})},
                    "space": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}, **sweep}
    return load_config(cfg)


def _report(sched, tid, **result):
    trial = SimpleNamespace(trial_id=tid)
    if tid not in sched._trial_info:
        sched.on_trial_add(None, trial)
    return sched.on_trial_result(None, trial, result)


def test_asha_ranks_on_the_rung_metric_where_top1_ties(tmp_path):
    # every trial at chance after the first epoch: on val/top1 a tie continues every one of them, on
    # val/loss the one with the higher loss stops
    def run(**scheduler):
        cfg = _cfg(tmp_path, {"grace_period": 1, "reduction_factor": 2, **scheduler})
        check_sweep(cfg)
        sched = make_scheduler(cfg)
        first = _report(sched, "a", epoch=1, **{"val/top1": 0.103, "val/loss": 2.20})
        second = _report(sched, "b", epoch=1, **{"val/top1": 0.103, "val/loss": 2.29})
        return first, second

    assert run() == (C, C)
    assert run(metric="val/loss") == (C, S)
    cfg = _cfg(tmp_path, {"metric": "val/loss"})
    assert (scheduler_settings(cfg)["metric"], scheduler_settings(cfg)["mode"]) == ("val/loss", "min")
    # the sweep's own metric keeps the sweep's mode; a metric with no known direction takes the one given
    cfg = _cfg(tmp_path, {"metric": "val/loss"}, metric="val/loss", mode="min")
    assert scheduler_settings(cfg)["mode"] == "min"
    cfg = _cfg(tmp_path, {"metric": "step", "mode": "max"})
    check_sweep(cfg)
    assert (make_scheduler(cfg)._metric, make_scheduler(cfg)._mode) == ("step", "max")


@pytest.mark.parametrize("scheduler,sweep,words", [
    ({"metric": "val/los"}, {}, "sweep.scheduler.metric 'val/los' is never reported by the training loop; choose one of"),
    ({"metric": "val/loss", "name": "none"}, {}, "sweep.scheduler.metric is set but sweep.scheduler.name is none"),
    ({"metric": "val/loss", "name": "moasha"}, {"metric": ["val/top1", "val/loss"], "mode": ["max", "min"]},
     "sweep.scheduler.metric is set but sweep.scheduler.name is moasha"),
    ({"mode": "min"}, {}, "sweep.scheduler.mode=min without sweep.scheduler.metric"),
    ({"metric": "step"}, {}, "sweep.scheduler.metric 'step' has no known direction: give sweep.scheduler.mode"),
    ({"metric": "val_ema/loss"}, {}, "sweep.scheduler.metric 'val_ema/loss' needs optim.ema: true"),
])
def test_bad_rung_metric_is_one_line_before_ray(tmp_path, scheduler, sweep, words):
    with pytest.raises(ConfigError) as e:
        check_sweep(_cfg(tmp_path, scheduler, **sweep))
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
    cfg = _cfg(tmp_path, {"metric": "snn/sops"})
    cfg.snn.enabled = False
    with pytest.raises(ConfigError, match="sweep.scheduler.metric 'snn/sops' needs snn.enabled: true"):
        check_sweep(cfg)


def test_rungs_are_rays(tmp_path):
    from ray.tune.schedulers.async_hyperband import _Bracket

    for grace, rf, max_t in [(2, 3, 12), (1, 3, 12), (1, 4, 12), (3, 3, 12), (4, 3, 12), (1, 2, 4), (20, 3, 300),
                             (1, 2.5, 12)]:
        ray_rungs = sorted(m for m, _ in _Bracket(grace, max_t, rf, 0)._rungs if m < max_t)
        assert asha_rungs(grace, rf, max_t) == ray_rungs, (grace, rf, max_t)


def test_grace_period_left_out_is_derived_from_the_budget(tmp_path):
    def settings(epochs, warmup, **scheduler):
        cfg = _cfg(tmp_path, scheduler, epochs=epochs)
        cfg.optim.warmup_epochs = warmup
        check_sweep(cfg)
        st = scheduler_settings(cfg)
        if st["rungs"]:
            assert make_scheduler(cfg)._brackets[0]._rungs[-1][0] == st["grace_period"]  # what Ray's ASHA gets
        return st["grace_period"], st["reduction_factor"], st["rungs"]

    assert settings(12, 1) == (2, 3.0, [2, 6])            # the main job: nothing to rank after one epoch
    assert settings(12, 0) == (2, 3.0, [2, 6])
    assert settings(12, 3) == (4, 3.0, [4])               # nor before the warm-up has ended
    assert settings(300, 20) == (21, 3.0, [21, 63, 189])
    assert settings(300, 0) == (12, 3.0, [12, 36, 108])   # no earlier than max_t / rf³: three rungs at most
    assert settings(2, 0) == (2, 3.0, [])                 # two epochs: nothing worth ranking before the end
    assert settings(12, 1, grace_period=1, reduction_factor=4) == (1, 4.0, [1, 4])  # given values win
    assert settings(12, 1, max_t=6) == (2, 3.0, [2])
