"""Warm starts (issue 16.1): ``sweep.enqueue`` evaluates given configurations first; ``--warm-start``
seeds a new sweep's Optuna study with an earlier sweep's finished and pruned trials."""

from __future__ import annotations

import optuna
import pytest
from mlflow.tracking import MlflowClient

from qksweep import api
from qksweep.checks import check_sweep
from qksweep.config import ConfigError, load_config
from qksweep.orchestrator.warm_start import FROM_ATTR
from qksweep.search_spaces import parse_entry

from .conftest import tiny_config

SPACE = {"optim.lr": {"loguniform": [1e-4, 1e-2]}, "model.num_heads": {"choice": [1, 2]}}


def _cfg(tmp, **sweep):
    cfg = tiny_config(tmp, optim={"epochs": 2, "warmup_epochs": 0})
    cfg["sweep"] = {"metric": "val/loss", "mode": "min", "num_samples": 2, "max_concurrent": 1,
                    "searcher": {"sampler": "tpe", "seed": 5, "n_startup_trials": 2},
                    "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2}, "space": dict(SPACE), **sweep}
    return cfg


@pytest.mark.parametrize("entry,inside,outside", [
    ({"choice": [2, 4]}, [2, 4, 4.0], [3, "4", True]),
    ({"randint": [1, 4]}, [1, 3], [4, 0, 1.5]),
    ({"int": [2, 6], "step": 2}, [2, 4, 6], [3, 8]),
    ({"loguniform": [1e-4, 1e-2]}, [1e-4, 3e-3, 1e-2], [1e-5, 0.1, "x"]),
    ({"quniform": [2, 4, 0.5]}, [2, 2.5, 4], [2.2, 4.5]),
])
def test_a_space_entry_knows_its_own_values(entry, inside, outside):
    spec = parse_entry("model.mlp_ratio", entry)
    assert all(spec.contains(v) for v in inside)
    assert not any(spec.contains(v) for v in outside)


@pytest.mark.parametrize("point,words", [
    ({"optim.weight_decay": 0.1}, "'optim.weight_decay' is not in sweep.space"),
    ({"optim.lr": 0.5}, "optim.lr=0.5 is outside sweep.space.optim.lr"),
    ({"model.num_heads": 3}, "model.num_heads=3 is outside sweep.space.model.num_heads"),
    ({}, "sweep.enqueue[0] is empty"),
])
def test_enqueued_points_outside_the_space_are_refused_before_ray(tmp_path, point, words):
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace(".", r"\.")):
        check_sweep(load_config(_cfg(tmp_path, enqueue=[point])))


def test_an_enqueued_point_inside_the_space_passes(tmp_path):
    check_sweep(load_config(_cfg(tmp_path, enqueue=[{"optim.lr": 2e-3, "model.num_heads": 2}, {"optim.lr": 1e-3}])))


def _study(storage_root, name):
    return optuna.load_study(study_name=None, storage=f"sqlite:///{storage_root / name / 'optuna.db'}")


def _trial_runs(cfg, sweep):
    c = MlflowClient(cfg["tracking"]["uri"])
    exp = c.get_experiment_by_name("test")
    return c, c.search_runs([exp.experiment_id],
                            filter_string=f"tags.`qksweep.sweep` = '{sweep}' and tags.`qksweep.kind` = 'trial'")


@pytest.mark.slow
def test_enqueued_configs_run_first_and_a_warm_start_seeds_the_study_without_training(ray_session, workdir, capsys):
    # the earlier sweep: the paper's recipe enqueued first, then TPE
    first = _cfg(workdir, num_samples=4, enqueue=[{"optim.lr": 1.5e-3, "model.num_heads": 2}])
    api.sweep(first, name="earlier")
    earlier = _study(workdir / "results", "earlier")
    assert earlier.trials[0].params == {"optim.lr": 1.5e-3, "model.num_heads": 2}
    done = [t for t in earlier.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(done) == 4

    # the new sweeps search a narrower lr range: trials of the earlier one outside it are skipped
    narrow = {**SPACE, "optim.lr": {"loguniform": [1e-3, 1e-2]}}
    outside = sum(t.params["optim.lr"] < 1e-3 for t in done)
    api.sweep(_cfg(workdir, num_samples=1, space=narrow), name="cold")
    capsys.readouterr()
    api.sweep(_cfg(workdir, num_samples=1, space=narrow), name="warm", warm_start="earlier")
    out = capsys.readouterr().out
    assert f"{4 - outside} trials seed the study" in out
    assert (f"{outside} skipped" in out) == bool(outside)

    warm, cold = _study(workdir / "results", "warm"), _study(workdir / "results", "cold")
    seeded = [t for t in warm.trials if FROM_ATTR in t.user_attrs]
    assert len(seeded) == 4 - outside and len(warm.trials) == len(seeded) + 1
    assert {t.user_attrs["qksweep.warm_start_trial"] for t in seeded} == {
        t.number for t in done if t.params["optim.lr"] >= 1e-3}
    pruned = [t for t in seeded if t.state == optuna.trial.TrialState.PRUNED]
    assert all(t.intermediate_values for t in pruned)  # pruned ones keep their epochs
    new_warm, = [t for t in warm.trials if FROM_ATTR not in t.user_attrs]
    new_cold, = cold.trials
    assert new_warm.params != new_cold.params  # same seed: the seeded trials informed the sampler

    c, trial_runs = _trial_runs(first, "warm")
    assert len(trial_runs) == 1  # the seeded trials were not trained again
    assert trial_runs[0].data.params["optim.lr"] == str(new_warm.params["optim.lr"])
    parent, = c.search_runs([trial_runs[0].info.experiment_id],
                            filter_string="tags.`qksweep.sweep` = 'warm' and tags.`qksweep.kind` = 'sweep'")
    assert parent.data.tags["qksweep.warm_start_from"].endswith("earlier")
    assert parent.data.tags["qksweep.warm_start_trials"] == str(4 - outside)


def test_warm_start_from_a_sweep_of_other_metrics_is_refused(workdir):
    """Read from a finished sweep's study, refused before the new sweep writes anything."""
    root = workdir / "results" / "earlier"
    root.mkdir(parents=True)
    (root / "qksweep_sweep.json").write_text("{}")
    study = optuna.create_study(storage=f"sqlite:///{root / 'optuna.db'}", study_name="earlier", direction="maximize")
    study.set_metric_names(["val/top1"])
    cfg = _cfg(workdir, warm_start="earlier")
    with pytest.raises(ConfigError, match=r"optimised val/top1 \(max\), this sweep val/loss \(min\)"):
        api.sweep(cfg, name="new")
    assert not (workdir / "results" / "new").exists()
