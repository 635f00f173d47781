"""Sampler options (issue 16.5): ``sweep.searcher.options`` are the Optuna sampler's own arguments,
checked against its signature before Ray starts; ``qmc`` and ``grid`` join the samplers (grid over
discrete keys only)."""

from __future__ import annotations

import itertools

import optuna
import pytest

from qksweep import api
from qksweep.checks import check_sweep
from qksweep.config import ConfigError, load_config
from qksweep.orchestrator.searcher import make_sampler, sampler_kwargs
from qksweep.search_spaces import define_by_run

from .conftest import tiny_config

GRID_SPACE = {"model.num_heads": {"choice": [1, 2]}, "model.time_steps": {"randint": [1, 3]}}


def _cfg(tmp, searcher, space=None, **sweep):
    cfg = tiny_config(tmp, optim={"epochs": 1, "warmup_epochs": 0})
    cfg["sweep"] = {"metric": "val/loss", "mode": "min", "num_samples": 4, "searcher": searcher,
                    "scheduler": {"name": "none"}, "space": space or {"optim.lr": {"loguniform": [1e-4, 1e-2]}}, **sweep}
    return load_config(cfg)


def test_options_reach_the_sampler_over_qksweeps_defaults(tmp_path):
    cfg = _cfg(tmp_path, {"sampler": "tpe", "seed": 3, "options": {"multivariate": False, "n_ei_candidates": 8}})
    specs = check_sweep(cfg)
    assert sampler_kwargs(cfg, specs) == {"seed": 3, "multivariate": False, "constant_liar": True, "n_ei_candidates": 8}
    assert isinstance(make_sampler(cfg, specs), optuna.samplers.TPESampler)


@pytest.mark.parametrize("searcher,words", [
    ({"sampler": "tpe", "options": {"n_ei_candidate": 8}}, "TPESampler has no argument 'n_ei_candidate'; did you mean 'n_ei_candidates'"),
    ({"sampler": "tpe", "options": {"seed": 1}}, "options.seed: qksweep sets it itself (sweep.searcher.seed)"),
    ({"sampler": "tpe", "n_startup_trials": 2, "options": {"n_startup_trials": 3}}, "are both set"),
    ({"sampler": "qmc", "options": {"qmc_type": "nope"}}, "QMCSampler refused them"),
    ({"sampler": "grid"}, "'grid' needs discrete keys, but sweep.space.optim.lr is loguniform"),
])
def test_bad_sampler_options_are_one_line_before_ray(tmp_path, searcher, words):
    with pytest.raises(ConfigError) as e:
        check_sweep(_cfg(tmp_path, searcher))
    assert words in str(e.value), str(e.value)


def test_grid_larger_than_the_space_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="num_samples=5 exceeds the grid's 4 combinations"):
        check_sweep(_cfg(tmp_path, {"sampler": "grid"}, GRID_SPACE, num_samples=5))


def test_grid_visits_every_combination_once_and_qmc_stays_in_the_space(tmp_path):
    cfg = _cfg(tmp_path, {"sampler": "grid"}, GRID_SPACE)
    specs = check_sweep(cfg)
    study = optuna.create_study(sampler=make_sampler(cfg, specs))
    study.optimize(lambda t: define_by_run(t, tuple(specs)) or 0.0, n_trials=4)
    assert sorted(tuple(t.params.values()) for t in study.trials) == sorted(itertools.product([1, 2], [1, 2]))

    cfg = _cfg(tmp_path, {"sampler": "qmc", "seed": 1, "options": {"qmc_type": "halton"}})
    specs = check_sweep(cfg)
    runs = []
    for _ in range(2):
        study = optuna.create_study(sampler=make_sampler(cfg, specs))
        study.optimize(lambda t: define_by_run(t, tuple(specs)) or 0.0, n_trials=5)
        runs.append([t.params["optim.lr"] for t in study.trials])
    assert runs[0] == runs[1] and all(1e-4 <= v <= 1e-2 for v in runs[0])


def test_a_search_option_can_be_given_with_dash_s(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg["sweep"] = {"space": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}}
    got = api.resolve(cfg, ["sweep.searcher.options={n_ei_candidates: 12}"])
    assert got.sweep.searcher.options == {"n_ei_candidates": 12}


@pytest.mark.slow
def test_a_grid_sweep_on_ray_trains_each_combination(ray_session, workdir):
    cfg = _cfg(workdir, {"sampler": "grid"}, GRID_SPACE)
    res = api.sweep(cfg, name="grid")
    assert res.num_errors == 0
    seen = sorted(zip(res.trials["config/model.num_heads"], res.trials["config/model.time_steps"]))
    assert seen == sorted(itertools.product([1, 2], [1, 2]))
