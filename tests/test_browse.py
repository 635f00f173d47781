"""Browsing MLflow: list_trials, format_trials, best_trial/export_best, sweep artifacts (fast, no Ray).

The store is built with MlflowClient directly, following DESIGN.md's MLflow layout: a sweep parent,
three trials (finished, stopped by ASHA, failed) and one plain ``qksweep train`` run.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from qksweep.orchestrator.export import ExportError, best_trial, export_best
from qksweep.orchestrator.results import sweep_results
from qksweep.tracking.browse import BrowseError, find_sweep_parent, format_trials, list_sweeps, list_trials
from qksweep.tracking.sweep_plots import have_plotly, write_sweep_artifacts

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

SWEEP = "demo"
EXPERIMENT = "qk-browse"
SEARCHED = ["model.embed_dim", "optim.lr"]
BASE = {"experiment": EXPERIMENT, "model": {"name": "vit_tiny", "embed_dim": 192, "depth": 2, "num_heads": 4},
        "data": {"name": "digits", "img_size": 32, "batch_size": 64},
        "optim": {"name": "adamw", "lr": 1.0e-3, "epochs": 3},
        "tracking": {"uri": "sqlite:///mlflow.db"},
        "sweep": {"metric": "val/top1", "mode": "max"}}
# trial -> (status, stopped_by/error, embed_dim, lr, val/top1 per epoch, val/loss per epoch, checkpoints)
TRIALS = {
    "t0": ("FINISHED", None, 128, 1.0e-3, [0.50, 0.80, 0.70], [1.2, 0.7, 0.8], ("best", "last")),
    "t1": ("KILLED", "asha", 256, 3.0e-4, [0.60, 0.76], [1.0, 0.5], ("last",)),
    "t2": ("FAILED", "RuntimeError: loss is NaN", 384, 2.5e-3, [0.30], [2.0], ()),
}


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)
    return out


def trial_config(embed_dim: int, lr: float) -> dict:
    cfg = json.loads(json.dumps(BASE))
    cfg["model"]["embed_dim"] = embed_dim
    cfg["optim"]["lr"] = lr
    return cfg


def _artifact_text(c: MlflowClient, run_id: str, name: str, text: str, path: str | None = None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / name
        p.write_text(text)
        c.log_artifact(run_id, str(p), path)


def _checkpoint(c: MlflowClient, run_id: str, cfg: dict, epoch: int, which: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        torch.save({"model": {"head.weight": torch.full((3, 4), float(epoch)), "head.bias": torch.zeros(3)},
                    "epoch": epoch}, d / "checkpoint.pt")
        (d / "config.json").write_text(json.dumps(cfg))
        c.log_artifacts(run_id, str(d), f"checkpoints/{which}")


def build_sweep(uri: str, artifact_location: str | None = None) -> dict:
    """Parent + 3 trials + 1 train run, as qksweep logs them. Returns {'exp_id', 'parent', 't0', 't1', 't2', 'train'}."""
    c = MlflowClient(tracking_uri=uri)
    exp_id = c.create_experiment(EXPERIMENT, artifact_location=artifact_location)
    ids: dict[str, str] = {"exp_id": exp_id}
    parent = c.create_run(exp_id, run_name=SWEEP, tags={"qksweep.kind": "sweep", "qksweep.sweep": SWEEP})
    pid = ids["parent"] = parent.info.run_id
    c.log_batch(pid, params=[Param(k, v) for k, v in flatten(BASE).items()])
    _artifact_text(c, pid, "config.yaml", yaml.safe_dump(BASE, sort_keys=False))
    _artifact_text(c, pid, "search_space.yaml", yaml.safe_dump({"model.embed_dim": {"choice": [128, 256, 384]},
                                                                "optim.lr": {"loguniform": [1e-4, 3e-3]}}))
    t = 1_700_000_000_000
    for n, (tid, (status, note, dim, lr, top1, loss, ckpts)) in enumerate(TRIALS.items()):
        cfg = trial_config(dim, lr)
        tags = {"mlflow.parentRunId": pid, "qksweep.kind": "trial", "qksweep.sweep": SWEEP,
                "qksweep.trial_id": f"{tid}_0000{n}", "qksweep.searched": json.dumps(SEARCHED),
                "qksweep.metric": "val/top1", "qksweep.mode": "max"}
        start = t + n * 1000
        run = c.create_run(exp_id, run_name=f"{SWEEP}-{tid}", tags=tags, start_time=start)
        rid = ids[tid] = run.info.run_id
        c.log_batch(rid, params=[Param(k, v) for k, v in flatten(cfg).items()])
        metrics = []
        for e, (acc, vl) in enumerate(zip(top1, loss), start=1):
            ts = start + e * 100
            vals = {"epoch": e, "train/loss": vl + 0.1, "train/top1": acc - 0.05, "val/loss": vl, "val/top1": acc,
                    "val/top5": min(1.0, acc + 0.15), "lr": lr / e, "samples_per_s": 900.0 + e, "epoch_time_s": 1.5}
            metrics += [Metric(k, float(v), ts, e) for k, v in vals.items()]
        c.log_batch(rid, metrics=metrics)
        _artifact_text(c, rid, "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
        for which in ckpts:
            best_epoch = 1 + max(range(len(top1)), key=top1.__getitem__)
            _checkpoint(c, rid, cfg, best_epoch if which == "best" else len(top1), which)
        if status == "KILLED":
            c.set_tag(rid, "qksweep.stopped_by", note)
        if status == "FAILED":
            c.set_tag(rid, "qksweep.error", note)
        c.set_terminated(rid, status=status, end_time=start + 100 * len(top1) + 50)
    run = c.create_run(exp_id, run_name="plain", tags={"qksweep.kind": "train", "qksweep.run_name": "plain"},
                       start_time=t + 10_000)
    ids["train"] = run.info.run_id
    c.log_batch(run.info.run_id, params=[Param(k, v) for k, v in flatten(BASE).items()],
                metrics=[Metric("val/top1", 0.55, t + 10_100, 1), Metric("epoch", 1, t + 10_100, 1)],
                tags=[RunTag("note", "x")])
    c.set_terminated(run.info.run_id, "FINISHED", end_time=t + 12_000)
    c.set_terminated(pid, "FINISHED", end_time=t + 13_000)
    return ids


def toy_study(n_trials: int = 6, directions: list[str] | None = None):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def objective(trial):
        dim = trial.suggest_categorical("model.embed_dim", [128, 256, 384])
        lr = trial.suggest_float("optim.lr", 1e-4, 3e-3, log=True)
        acc = 0.5 + dim / 1000 - abs(math.log10(lr) + 3) / 10
        for step in range(1, 4):
            trial.report(acc * step / 3, step) if directions is None else None
        return acc if directions is None else (acc, dim / 100)

    kw = {"directions": directions} if directions else {"direction": "maximize"}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), **kw)
    study.optimize(objective, n_trials=n_trials)
    return study


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    ids = build_sweep(uri, artifact_location=(root / "artifacts").as_uri())
    return uri, ids, root


# ------------------------------------------------------------------ list_trials

def test_list_trials_rows_columns_status(store):
    uri, ids, _ = store
    df = list_trials(uri, sweep=SWEEP)
    assert list(df.columns) == ["run_id", "sweep", "trial_id", "status", "model.embed_dim", "optim.lr",
                                "val/top1", "best val/top1", "epochs", "duration_s"]
    assert list(df["run_id"]) == [ids["t0"], ids["t1"], ids["t2"]]  # start order by default
    assert list(df["status"]) == ["finished", "stopped (asha)", "failed"]
    assert list(df["trial_id"]) == ["t0_00000", "t1_00001", "t2_00002"]
    assert list(df["model.embed_dim"]) == [128, 256, 384]  # typed, not MLflow's strings
    assert df["optim.lr"].tolist() == pytest.approx([1e-3, 3e-4, 2.5e-3])
    assert df["val/top1"].tolist() == pytest.approx([0.70, 0.76, 0.30])
    assert df["best val/top1"].tolist() == pytest.approx([0.80, 0.76, 0.30])
    assert list(df["epochs"]) == [3, 2, 1]
    assert df["duration_s"].tolist() == pytest.approx([0.35, 0.25, 0.15])
    assert df.attrs["errors"] == {ids["t2"]: "RuntimeError: loss is NaN"}
    assert df.attrs["modes"] == {"val/top1": "max"}


def test_list_trials_sorting_and_limit(store):
    uri, ids, _ = store
    assert list(list_trials(uri, sweep=SWEEP, sort="val/top1")["run_id"]) == [ids["t1"], ids["t0"], ids["t2"]]
    assert list(list_trials(uri, sweep=SWEEP, sort="best val/top1")["run_id"]) == [ids["t0"], ids["t1"], ids["t2"]]
    assert list(list_trials(uri, sweep=SWEEP, sort="+val/top1")["run_id"]) == [ids["t2"], ids["t0"], ids["t1"]]
    # a metric that is not a column: its final values, lower-is-better for losses
    by_loss = list_trials(uri, sweep=SWEEP, sort="val/loss")
    assert list(by_loss["run_id"]) == [ids["t1"], ids["t0"], ids["t2"]]
    assert by_loss["val/loss"].tolist() == pytest.approx([0.5, 0.8, 2.0])
    # params and plain columns ascending; "-" forces descending
    assert list(list_trials(uri, sweep=SWEEP, sort="optim.lr")["run_id"]) == [ids["t1"], ids["t0"], ids["t2"]]
    assert list(list_trials(uri, sweep=SWEEP, sort="-model.embed_dim")["run_id"]) == [ids["t2"], ids["t1"], ids["t0"]]
    assert list(list_trials(uri, sweep=SWEEP, sort="status")["status"]) == ["failed", "finished", "stopped (asha)"]
    top = list_trials(uri, sweep=SWEEP, sort="best val/top1", limit=1)
    assert list(top["run_id"]) == [ids["t0"]] and top["best val/top1"][0] == pytest.approx(0.8)
    assert len(list_trials(uri, sweep=SWEEP, limit=2)) == 2
    with pytest.raises(BrowseError, match="cannot sort by 'nope'"):
        list_trials(uri, sweep=SWEEP, sort="nope")


def test_list_trials_without_sweep_includes_train_runs(store):
    uri, ids, _ = store
    df = list_trials(uri)
    assert list(df["run_id"]) == [ids["t0"], ids["t1"], ids["t2"], ids["train"]]
    assert list(df["kind"]) == ["trial"] * 3 + ["train"]
    row = df.iloc[3]
    assert pd.isna(row["sweep"]) and row["status"] == "finished"
    assert row["val/top1"] == pytest.approx(0.55)  # the config's sweep.metric, from params
    assert row["best val/top1"] == pytest.approx(0.55)
    assert pd.isna(row["model.embed_dim"])  # not searched in a train run
    assert len(list_trials(uri, experiment=EXPERIMENT)) == 4


def test_search_pages_through_results(store, monkeypatch):
    from qksweep.tracking import browse

    uri, ids, _ = store
    monkeypatch.setattr(browse, "PAGE", 2)
    assert list(list_trials(uri)["run_id"]) == [ids["t0"], ids["t1"], ids["t2"], ids["train"]]
    assert len(list_trials(uri, sweep=SWEEP)) == 3


def test_unknown_names_are_one_line_errors(store, tmp_path):
    uri, ids, root = store
    for call in (lambda: list_trials(uri, sweep="nope"), lambda: find_sweep_parent(uri, "nope")):
        with pytest.raises(BrowseError) as e:
            call()
        msg = str(e.value)
        assert "no sweep named 'nope'" in msg and "qksweep runs" in msg and "\n" not in msg
    with pytest.raises(BrowseError, match="no experiment named 'other'"):
        list_trials(uri, experiment="other")
    missing = f"sqlite:///{tmp_path / 'absent.db'}"
    with pytest.raises(BrowseError, match="no MLflow store"):
        list_trials(missing)
    assert not (tmp_path / "absent.db").exists()  # browsing never creates a store
    with pytest.raises(ExportError, match="no sweep named 'nope'"):
        best_trial(uri, "nope")
    assert find_sweep_parent(uri, SWEEP).info.run_id == ids["parent"]


def test_format_trials_json_csv_table(store):
    uri, ids, _ = store
    df = list_trials(uri, sweep=SWEEP, sort="best val/top1")
    rows = json.loads(format_trials(df, "json"))
    assert [r["run_id"] for r in rows] == [ids["t0"], ids["t1"], ids["t2"]]
    first = rows[0]
    assert first["model.embed_dim"] == 128 and isinstance(first["model.embed_dim"], int)
    assert first["optim.lr"] == pytest.approx(1e-3) and first["epochs"] == 3
    assert first["status"] == "finished" and first["best val/top1"] == pytest.approx(0.8)
    assert set(first) == set(df.columns)
    back = pd.read_csv(io.StringIO(format_trials(df, "csv")))
    assert list(back.columns) == list(df.columns) and len(back) == 3
    assert back["best val/top1"].tolist() == pytest.approx([0.8, 0.76, 0.3])
    table = format_trials(df, "table")
    assert ids["t0"] in table and "stopped (asha)" in table
    assert f"failed {ids['t2']}: RuntimeError: loss is NaN" in table
    empty = df.iloc[0:0]
    assert json.loads(format_trials(empty, "json")) == [] and format_trials(empty) == "no runs found"
    with pytest.raises(BrowseError, match="unknown format"):
        format_trials(df, "xml")


def test_list_sweeps_and_results(store):
    uri, ids, _ = store
    sweeps = list_sweeps(uri)
    assert sweeps.to_dict("records")[0] | {"started": None} == {
        "sweep": SWEEP, "experiment": EXPERIMENT, "run_id": ids["parent"], "status": "finished", "trials": 3,
        "metric": "val/top1", "mode": "max", "best final": pytest.approx(0.76), "started": None}
    res = sweep_results(uri, SWEEP)
    assert res.parent_run_id == ids["parent"] and res.metric == "val/top1" and res.mode == "max"
    assert list(res.trials["run_id"]) == [ids["t0"], ids["t1"], ids["t2"]]  # best first
    assert res.counts == {"finished": 1, "stopped (asha)": 1, "failed": 1}
    assert res.best["run_id"] == ids["t0"]
    assert "best: trial t0_00000" in res.summary()
    json.dumps(res.to_dict())


# ------------------------------------------------------------------ best / export

def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_best_trial_picks_best_over_epochs(store):
    uri, ids, _ = store
    best = best_trial(uri, SWEEP)
    assert best["run_id"] == ids["t0"] and best["trial_id"] == "t0_00000"
    assert best["metric"] == "val/top1" and best["mode"] == "max"
    assert best["value"] == pytest.approx(0.80) and best["best_epoch"] == 2 and best["final"] == pytest.approx(0.70)
    assert best["params"] == {"model.embed_dim": 128, "optim.lr": 1e-3}
    assert best["config"] == trial_config(128, 1e-3)
    low = best_trial(uri, SWEEP, metric="val/loss")  # min mode guessed for a loss
    assert low["run_id"] == ids["t1"] and low["mode"] == "min" and low["value"] == pytest.approx(0.5)


def test_export_best_writes_loadable_files(store, tmp_path):
    uri, ids, _ = store
    out = tmp_path / "best"
    written = export_best(uri, SWEEP, out)
    names = sorted(str(p.relative_to(out)) for p in written)
    assert names == ["checkpoint/checkpoint.pt", "checkpoint/config.json", "config.yaml", "metrics.json"]
    assert all(p.is_file() for p in written)
    assert yaml.safe_load((out / "config.yaml").read_text()) == trial_config(128, 1e-3)
    state = torch.load(out / "checkpoint" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2 and torch.equal(state["model"]["head.weight"], torch.full((3, 4), 2.0))
    assert json.loads((out / "checkpoint" / "config.json").read_text())["model"]["embed_dim"] == 128
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["run_id"] == ids["t0"] and metrics["best"] == pytest.approx(0.8)
    assert metrics["final_metrics"]["val/top1"] == pytest.approx(0.7) and metrics["checkpoint_source"] == "checkpoints/best"
    assert sorted(os.listdir(tmp_path)) == ["best"]  # no staging folder left behind
    assert out.stat().st_mode & 0o755 == 0o755 & ~_umask()  # an ordinary folder, not mkdtemp's 0700

    with pytest.raises(ExportError, match="not empty") as e:
        export_best(uri, SWEEP, out)
    assert "\n" not in str(e.value)

    # checkpoints/last when the best trial (by val/loss: the ASHA-stopped t1) has no checkpoints/best
    empty = tmp_path / "by_loss"
    empty.mkdir()
    export_best(uri, SWEEP, empty, metric="val/loss")
    last = torch.load(empty / "checkpoint" / "checkpoint.pt", weights_only=True)
    assert last["epoch"] == 2
    m = json.loads((empty / "metrics.json").read_text())
    assert m["run_id"] == ids["t1"] and m["checkpoint_source"] == "checkpoints/last" and m["mode"] == "min"


# ------------------------------------------------------------------ sweep artifacts

def _artifacts(uri: str, run_id: str, path: str | None = None) -> set[str]:
    return {a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(run_id, path)}


def test_write_sweep_artifacts_logs_results_and_plots(store, tmp_path):
    uri, ids, _ = store
    study = toy_study(6)
    logged = write_sweep_artifacts(uri, ids["parent"], strict=True, study=study)
    pngs = {"optimization_history", "intermediate_values", "param_importances", "parallel_coordinate", "slice"}
    expected = {f"plots/optuna_{n}.png" for n in pngs}
    if have_plotly():
        expected |= {f"plots/optuna_{n}.html" for n in pngs}
    assert {str(p) for p in logged} == {"results.csv"} | expected
    assert "results.csv" in _artifacts(uri, ids["parent"])
    assert expected <= _artifacts(uri, ids["parent"], "plots")
    c = MlflowClient(tracking_uri=uri)
    csv = pd.read_csv(c.download_artifacts(ids["parent"], "results.csv", str(tmp_path)))
    assert list(csv["run_id"]) == [ids["t0"], ids["t1"], ids["t2"]]
    png = Path(c.download_artifacts(ids["parent"], "plots/optuna_slice.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # again, with a given table and one more trial: overwritten in place
    study.enqueue_trial({"model.embed_dim": 384, "optim.lr": 1e-3})
    study.optimize(lambda t: t.suggest_categorical("model.embed_dim", [128, 256, 384]) / 1000
                   + t.suggest_float("optim.lr", 1e-4, 3e-3, log=True) + 1.0, n_trials=1)
    assert len(study.trials) == 7 and study.best_trial.number == 6
    df = list_trials(uri, sweep=SWEEP, sort="best val/top1", limit=2)
    write_sweep_artifacts(uri, ids["parent"], strict=True, study=study, trials_df=df)
    csv = pd.read_csv(c.download_artifacts(ids["parent"], "results.csv", str(tmp_path / "again")))
    assert list(csv["run_id"]) == [ids["t0"], ids["t1"]]


def test_sweep_artifacts_edge_cases(store, caplog):
    uri, ids, _ = store
    import optuna

    one = toy_study(1)
    assert [str(p) for p in write_sweep_artifacts(uri, ids["parent"], strict=True, study=one)] == ["results.csv"]

    pareto = toy_study(5, directions=["maximize", "minimize"])
    logged = {str(p) for p in write_sweep_artifacts(uri, ids["parent"], strict=True, study=pareto)}
    assert "plots/optuna_pareto_front.png" in logged
    assert not any("optimization_history" in p or "slice" in p for p in logged)  # single-objective plots skipped

    # one param: no importances or parallel coordinates, and no error
    single = optuna.create_study(direction="minimize", sampler=optuna.samplers.RandomSampler(seed=1))
    single.optimize(lambda t: (t.suggest_float("optim.lr", 1e-4, 1e-2, log=True) - 1e-3) ** 2, n_trials=4)
    table = list_trials(uri, sweep=SWEEP)
    logged = {str(p) for p in write_sweep_artifacts(uri, ids["parent"], strict=True, study=single, trials_df=table)}
    assert "plots/optuna_slice.png" in logged and "plots/optuna_param_importances.png" not in logged

    # a study whose params cannot all be plotted (a constant one): importance skipped with a log line
    const = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=2))
    const.optimize(lambda t: t.suggest_float("a.x", 0, 1) + t.suggest_categorical("a.y", [1]), n_trials=3)
    with caplog.at_level(logging.WARNING, logger="qksweep.tracking"):
        logged = {str(p) for p in write_sweep_artifacts(uri, ids["parent"], strict=True, study=const)}
    assert "plots/optuna_optimization_history.png" in logged

    # not strict (how a sweep calls it): a missing parent run is a log line, not an error
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qksweep.tracking"):
        assert write_sweep_artifacts(uri, "0" * 32, study=toy_study(1)) == []
    assert "could not log results.csv" in caplog.text
