"""SNN-aware sweeps end to end: accuracy vs energy as two objectives with a Pareto front, a static
constraint that keeps a too-large model from ever starting, and the firing-rate stop rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from qksweep import api

from .conftest import run_cli, tiny_config

pytestmark = pytest.mark.slow


def test_two_objective_sweep_pareto_and_static_constraint(ray_session, workdir):
    cfg = tiny_config(workdir, optim={"epochs": 2}, snn={"val_batches": 1})
    cfg["sweep"] = {
        "metric": ["val/top1", "snn/energy_mj"], "mode": ["max", "min"], "num_samples": 4,
        "searcher": {"sampler": "nsga2", "seed": 0}, "scheduler": {"name": "none"},
        "space": {"model.num_heads": {"choice": [1, 2]}, "model.head_dim": {"choice": [4, 32]},
                  "model.time_steps": {"choice": [1, 2]}},
        # widths 4·heads·head_dim: head_dim 32 gives 0.33M-1.3M parameters, over the limit
        "constraints": {"params_m": {"max": 0.1}},
    }
    api.sweep(cfg, name="pareto")
    uri = cfg["tracking"]["uri"]
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("test")
    trials = [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("qksweep.kind") == "trial"]
    assert len(trials) == 4
    for r in trials:
        hd = int(r.data.params["model.head_dim"])
        if hd == 32:  # never started: no epoch, closed with the reason
            assert r.info.status == "KILLED" and r.data.tags["qksweep.stopped_by"] == "constraint"
            assert "params_m" in r.data.tags["qksweep.constraint_violated"] and not c.get_metric_history(r.info.run_id, "epoch")
        else:
            assert r.info.status == "FINISHED"
            assert r.data.metrics["snn/energy_mj"] > 0 and 0 < r.data.metrics["snn/firing_rate"] < 1
            assert r.data.tags["qksweep.snn.energy.e_ac_pj"]
    out = run_cli("best", "pareto", "--pareto", "--format", "json", "--tracking-uri", uri, cwd=workdir, timeout=120)
    assert out.returncode == 0, out.stderr
    front = json.loads(out.stdout)
    assert front and all(set(p["values"]) == {"val/top1", "snn/energy_mj"} for p in front)
    # Optuna was told each trial's constraint value: feasible (<= 0) for the launched ones
    import optuna

    db = Path(cfg["run"]["storage"]) / "pareto" / "optuna.db"
    study = optuna.load_study(study_name="pareto", storage=f"sqlite:///{db}")
    assert len(study.trials) == 4 and study.metric_names == ["val/top1", "snn/energy_mj"]
    for t in study.trials:
        assert (t.constraints["params_m"] <= 0) == (t.params["model.head_dim"] == 4), (t.params, t.constraints)


def test_firing_rate_rule_stops_a_saturated_network(ray_session, workdir):
    # a rate band no real network satisfies: the rule must fire after `patience` validations
    # and the searcher tells Optuna the trial was infeasible (a dead network), not merely pruned
    import optuna

    cfg = tiny_config(workdir, optim={"epochs": 4}, snn={"val_batches": 1})
    cfg["sweep"] = {"stop_on": {"firing_rate": {"low": 0.0, "high": 1e-6, "patience": 2}}, "num_samples": 1,
                    "scheduler": {"name": "none"}, "space": {"model.neuron.tau": {"uniform": [1.5, 3.0]}}}
    res = api.sweep(cfg, name="dead")
    c = MlflowClient(cfg["tracking"]["uri"])
    run = c.get_run(res.best_run_id)
    assert run.data.tags["qksweep.stopped_by"] == "firing_rate" and run.info.status == "KILLED"
    assert "firing rate" in run.data.tags["qksweep.stop_reason"]
    assert sorted(m.step for m in c.get_metric_history(res.best_run_id, "epoch")) == [1, 2]
    assert run.data.tags["qksweep.neuron"] == "lif" and 1.5 <= float(run.data.params["model.neuron.tau"]) <= 3.0
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{Path(cfg['run']['storage']) / 'dead' / 'optuna.db'}")
    (t,) = study.trials
    assert t.state == optuna.trial.TrialState.PRUNED and t.constraints["firing_rate"] > 0
    assert sorted(t.intermediate_values) == [1, 2]


@pytest.mark.parametrize("sampler", ["tpe", "random", "nsga2", "cmaes", "gp"])
def test_every_sampler_survives_the_pickle_into_tunes_state(workdir, sampler):
    # Tune pickles the searcher, sampler included, into the sweep's state (Optuna 5.1's NSGA-II held a lock)
    import pickle

    import optuna

    from qksweep.config import Config
    from qksweep.orchestrator.searcher import make_sampler

    cfg = tiny_config(workdir)
    cfg["sweep"] = {"searcher": {"sampler": sampler, "seed": 0}, "space": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}}
    if sampler == "nsga2":
        cfg["sweep"].update(metric=["val/top1", "val/loss"], mode=["max", "min"], scheduler={"name": "none"})
    s = pickle.loads(pickle.dumps(make_sampler(Config.model_validate(cfg))))
    directions = ["maximize", "minimize"] if sampler == "nsga2" else ["maximize"]
    study = optuna.create_study(sampler=s, directions=directions)
    for _ in range(3):
        t = study.ask()
        x = t.suggest_float("x", 0.0, 1.0)
        study.tell(t, [x, x] if sampler == "nsga2" else x)
    assert len(study.trials) == 3 and pickle.loads(pickle.dumps(s)) is not None


def test_searcher_name_random_is_random_search(workdir):
    import optuna

    from qksweep.config import Config
    from qksweep.orchestrator.searcher import make_sampler

    cfg = tiny_config(workdir)
    cfg["sweep"] = {"searcher": {"name": "random", "seed": 3}, "space": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}}
    assert isinstance(make_sampler(Config.model_validate(cfg)), optuna.samplers.RandomSampler)
    cfg["sweep"]["searcher"] = {"name": "optuna", "seed": 3}
    assert isinstance(make_sampler(Config.model_validate(cfg)), optuna.samplers.TPESampler)


@pytest.mark.parametrize("sampler", ["tpe", "gp"])
def test_n_startup_trials_hands_over_to_the_model_sooner(workdir, sampler):
    # same seed: the random start-up trials agree, then the model-guided trial departs from Optuna's default
    import optuna

    from qksweep.config import Config
    from qksweep.orchestrator.searcher import make_sampler

    def first_three(**searcher):
        cfg = tiny_config(workdir)
        cfg["sweep"] = {"searcher": {"sampler": sampler, "seed": 0, **searcher},
                        "space": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}}
        study = optuna.create_study(sampler=make_sampler(Config.model_validate(cfg)), direction="maximize")
        xs = []
        for _ in range(3):
            t = study.ask()
            xs.append(t.suggest_float("x", 0.0, 1.0))
            study.tell(t, -(xs[-1] - 0.3) ** 2)
        return xs

    short, default = first_three(n_startup_trials=2), first_three()
    assert short[:2] == default[:2] and short[2] != default[2]
