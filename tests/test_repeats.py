"""sweep.repeats: one configuration, several seeds side by side in one trial (trainables/repeats.py)."""

from __future__ import annotations

import statistics

import pytest

from qksweep.trainables.checkpoint import load_checkpoint

from .conftest import tiny_config
from .loop_harness import run_loop

KEYS = ("val/top1", "val/loss", "train/loss", "train/top1")


def test_repeats_report_the_mean_of_seeds_that_train_as_they_would_alone(tmp_path):
    cfg = tiny_config(tmp_path)
    alone = [run_loop(tiny_config(tmp_path, run={"seed": 1 + i}), tmp_path / f"alone{i}") for i in range(2)]
    both = run_loop(cfg, tmp_path / "both", extra={"repeats": 2})
    assert [m["epoch"] for m, _ in both] == [1, 2]
    for e, (m, ckpt) in enumerate(both):
        seeds = [alone[i][e][0] for i in range(2)]
        for i in range(2):  # each seed as its own run would have it (own random state kept between epochs)
            assert {k: m["_seeds"][i][k] for k in KEYS} == {k: seeds[i][k] for k in KEYS}
        for k in KEYS:
            assert m[k] == pytest.approx(statistics.fmean(s[k] for s in seeds), abs=1e-12)
            assert m[f"{k}_std"] == pytest.approx(statistics.stdev(s[k] for s in seeds), abs=1e-12)
        assert "epoch_std" not in m and "lr_std" not in m
        # seed 0 at the checkpoint's root (what continue/validate read), seed 1 under seeds/1
        root, _ = load_checkpoint(ckpt)
        assert root["epoch"] == e + 1 and load_checkpoint(ckpt / "seeds" / "1")[0]["epoch"] == e + 1
        assert root["model"].keys() == load_checkpoint(alone[0][e][1])[0]["model"].keys()


def test_repeats_resume_each_seed_from_its_part_of_the_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, optim={"epochs": 3})
    whole = run_loop(cfg, tmp_path / "whole", extra={"repeats": 2})
    resumed = run_loop(cfg, tmp_path / "resumed", resume=whole[0][1], extra={"repeats": 2})
    assert [m["epoch"] for m, _ in resumed] == [2, 3]
    for (a, _), (b, _) in zip(whole[1:], resumed):
        assert [s["val/loss"] for s in a["_seeds"]] == [s["val/loss"] for s in b["_seeds"]]
    assert resumed[0][0]["_replay"]["_seeds"] == whole[0][0]["_seeds"]  # the resumed epoch, for MLflow


@pytest.mark.slow
def test_a_repeated_sweep_tells_the_searcher_the_mean_and_logs_each_seed_as_a_nested_run(ray_session, workdir):
    import optuna
    from mlflow.tracking import MlflowClient

    from qksweep import api

    cfg = tiny_config(workdir, optim={"epochs": 2, "warmup_epochs": 0})
    cfg["sweep"] = {"metric": "val/loss", "mode": "min", "num_samples": 2, "max_concurrent": 2, "repeats": 2,
                    "searcher": {"sampler": "random", "seed": 0}, "scheduler": {"name": "none"},
                    "space": {"optim.lr": {"loguniform": [1e-3, 1e-2]}}}
    res = api.sweep(cfg, name="rep")
    c = MlflowClient(cfg["tracking"]["uri"])
    exp = c.get_experiment_by_name("test").experiment_id
    found = c.search_runs([exp], filter_string="tags.`qksweep.sweep` = 'rep'")
    trials = [r for r in found if r.data.tags["qksweep.kind"] == "trial"]
    seeds = [r for r in found if r.data.tags["qksweep.kind"] == "seed"]
    assert len(trials) == 2 and len(seeds) == 4 and len(res.trials) == 2
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{workdir / 'results' / 'rep' / 'optuna.db'}")
    for t in trials:
        mine = sorted((r for r in seeds if r.data.tags["mlflow.parentRunId"] == t.info.run_id),
                      key=lambda r: r.data.tags["qksweep.seed_index"])
        assert [r.data.params["run.seed"] for r in mine] == ["1", "2"] and t.data.params["run.seed"] == "1"
        assert t.data.tags["qksweep.repeats"] == "2"
        assert t.info.status == "FINISHED" and all(r.info.status == "FINISHED" for r in mine)
        for key in ("val/loss", "val/top1"):
            per_seed = [{m.step: m.value for m in c.get_metric_history(r.info.run_id, key)} for r in mine]
            mean = {m.step: m.value for m in c.get_metric_history(t.info.run_id, key)}
            std = {m.step: m.value for m in c.get_metric_history(t.info.run_id, f"{key}_std")}
            assert sorted(mean) == sorted(per_seed[0]) == sorted(per_seed[1]) == [1, 2]
            for e in (1, 2):
                assert mean[e] == pytest.approx(statistics.fmean(s[e] for s in per_seed), rel=1e-9)
                assert std[e] == pytest.approx(statistics.stdev(s[e] for s in per_seed), rel=1e-6, abs=1e-12)
        told, = [ot for ot in study.trials if ot.user_attrs.get("mlflow_run_id") == t.info.run_id]
        assert told.value == pytest.approx(t.data.metrics["val/loss"], rel=1e-9)  # the searcher saw the mean
    assert len(api.results("rep", tracking_uri=cfg["tracking"]["uri"], experiment="test").trials) == 2  # not seeds
