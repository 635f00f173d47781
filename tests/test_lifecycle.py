"""One run lifecycle (tracking/lifecycle.py) for `train`, every trial and the sweep parent: a run is
found again by its tags, so opening it twice never makes a second one; it is closed with a status and
a reason through its folder's pending file, which a closing left by an earlier attempt does not
survive a reopen. Real MLflow (SQLite); no Ray."""

from __future__ import annotations

import json

from qksweep.tracking import pending, runs
from qksweep.tracking.lifecycle import close_run, mask_config, open_run


def test_open_twice_is_one_run_with_its_files_once_then_closed_with_its_reason(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    folder = str(tmp_path / "run")
    lookup = {runs.KIND: "trial", runs.SWEEP: "s", runs.TRIAL: "t1"}
    first = open_run(uri, "exp", lookup, run_name="s-t1", params={"optim.lr": 0.01}, folder=folder,
                     tags={"qksweep.metric": "val/loss"}, files={"config.yaml": "a: 1\n"})
    assert first.created
    pending.keep(folder, [pending.close_record(uri, first.run_id, "FAILED", tags={"qksweep.error": "stale"})])
    again = open_run(uri, "exp", lookup, run_name="s-t1", params={"optim.lr": 0.01}, folder=folder,
                     files={"config.yaml": "a: 2\n"})
    assert again.run_id == first.run_id and not again.created
    assert not [r for r in pending.read_records(pending.pending_path(folder)) if r["type"] == "close"]
    c = runs.client(uri)
    exp = c.get_experiment_by_name("exp").experiment_id
    assert len(c.search_runs([exp])) == 1
    assert [a.path for a in c.list_artifacts(first.run_id)] == ["config.yaml"]
    assert c.download_artifacts(first.run_id, "config.yaml", str(tmp_path)) and (tmp_path / "config.yaml").read_text() == "a: 1\n"

    assert close_run(again, "KILLED", tags={"qksweep.stopped_by": "user"},
                     records=[pending.metrics_record(uri, again.run_id, {"params_m": 1.5}, 0)], wait_s=5)
    run = c.get_run(first.run_id)
    assert run.info.status == "KILLED" and run.data.tags["qksweep.stopped_by"] == "user"
    assert run.data.tags["qksweep.metric"] == "val/loss" and run.data.metrics["params_m"] == 1.5
    assert pending.read_records(pending.pending_path(folder)) == []


def test_close_with_mlflow_away_keeps_the_closing_in_the_pending_file(tmp_path, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    folder = str(tmp_path / "run")
    run = open_run(uri, "exp", {runs.KIND: "train", runs.RUN_NAME: "r"}, run_name="r", params={}, folder=folder)
    away = run.__class__("http://127.0.0.1:9", run.run_id, folder, False)  # nothing listens on port 9
    monkeypatch.setenv("QKSWEEP_MLFLOW_RETRIES", "1")
    assert not close_run(away, "FAILED", tags={"qksweep.error": "boom"}, wait_s=1)
    left = pending.read_records(pending.pending_path(folder))
    assert [r["type"] for r in left] == ["close"] and left[0]["status"] == "FAILED"
    assert "qksweep flush" in capsys.readouterr().err


def test_params_and_config_never_hold_a_password_or_bucket_key():
    d = mask_config({"tracking": {"uri": "postgresql://me:secret@db/mlflow"},
                     "run": {"storage": "s3://KEY:SECRET@bucket/x"}})
    assert "secret" not in json.dumps(d).lower()
