"""A real ``mlflow server`` on 127.0.0.1 (SQLite backend, proxied artifacts in tmp): the sweep layout
logged over HTTP, read back through the REST API, through qksweep's browsing functions, and in the
web UI with headless Chromium (skipped when Chromium is absent; on Debian: ``apt-get install -y chromium``).

All traffic stays on 127.0.0.1: proxies are bypassed, MLflow telemetry is off, and Chromium resolves
no other host.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from qksweep.orchestrator.export import best_trial, export_best
from qksweep.tracking.browse import format_trials, list_sweeps, list_trials
from qksweep.tracking.sweep_plots import write_sweep_artifacts
from qksweep.tracking.ui import UIError, free_port, start_ui, stop_ui, wait_until_up

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

_spec = importlib.util.spec_from_file_location("_qk_browse_fixtures", Path(__file__).with_name("test_browse.py"))
fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixtures)
SWEEP, EXPERIMENT = fixtures.SWEEP, fixtures.EXPERIMENT

LOCAL_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
             "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(url, tmp folder) of an ``mlflow server`` that is stopped at teardown whatever happens."""
    saved = {k: os.environ.get(k) for k in LOCAL_ENV}
    os.environ.update(LOCAL_ENV)
    root = tmp_path_factory.mktemp("server")
    proc = None
    try:
        port = free_port()
        proc = start_ui(f"sqlite:///{root / 'mlflow.db'}", host="127.0.0.1", port=port,
                        artifacts_destination=str(root / "artifacts"), log_file=root / "server.log")
        assert proc.url == f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        try:
            wait_until_up(proc.url, timeout=60, proc=proc)
        except UIError:
            print((root / "server.log").read_text()[-4000:], file=sys.stderr)
            raise
        print(f"mlflow server up in {time.monotonic() - t0:.1f}s at {proc.url}")
        yield proc.url, root
    finally:
        stop_ui(proc)
        if proc is not None:
            assert proc.poll() is not None, "mlflow server still running after stop_ui"
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def remote(server):
    url, root = server
    ids = fixtures.build_sweep(url)  # experiment created through the server: artifacts proxied (mlflow-artifacts:/)
    return url, ids, root


def rest(url: str, endpoint: str, body: dict | None = None, **query) -> dict:
    assert url.startswith("http://127.0.0.1:")
    full = f"{url}/api/2.0/mlflow/{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(full, data=data, method="POST" if data else "GET",
                                 headers={"Content-Type": "application/json"})
    with _NO_PROXY.open(req, timeout=30) as r:
        return json.loads(r.read())


def test_runs_through_rest_api(remote):
    url, ids, _ = remote
    exp = rest(url, "experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
    assert exp["experiment_id"] == ids["exp_id"] and exp["artifact_location"].startswith("mlflow-artifacts:")
    # runs/search is a POST endpoint in MLflow's REST API
    found = rest(url, "runs/search", {"experiment_ids": [ids["exp_id"]], "max_results": 100,
                                      "filter": f"tags.`qksweep.sweep` = '{SWEEP}'"})["runs"]
    by_id = {r["info"]["run_id"]: r for r in found}
    assert set(by_id) == {ids["parent"], ids["t0"], ids["t1"], ids["t2"]}
    tags = {rid: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for rid, r in by_id.items()}
    assert tags[ids["parent"]]["qksweep.kind"] == "sweep"
    assert {rid: by_id[rid]["info"]["status"] for rid in ("t0", "t1", "t2") for rid in [ids[rid]]} == {
        ids["t0"]: "FINISHED", ids["t1"]: "KILLED", ids["t2"]: "FAILED"}
    assert tags[ids["t1"]]["qksweep.stopped_by"] == "asha" and tags[ids["t2"]]["qksweep.error"].startswith("RuntimeError")
    assert all(tags[ids[t]]["mlflow.parentRunId"] == ids["parent"] for t in ("t0", "t1", "t2"))
    run = rest(url, "runs/get", run_id=ids["t0"])["run"]
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["model.embed_dim"] == "128" and json.loads(tags[ids["t0"]]["qksweep.searched"]) == fixtures.SEARCHED
    history = rest(url, "metrics/get-history", run_id=ids["t0"], metric_key="val/top1")["metrics"]
    assert [(m["step"], m["value"]) for m in history] == [(1, 0.5), (2, 0.8), (3, 0.7)]
    files = rest(url, "artifacts/list", run_id=ids["t0"], path="checkpoints/best")["files"]
    assert {Path(f["path"]).name for f in files} == {"checkpoint.pt", "config.json"}


def test_browse_and_export_over_http(remote, tmp_path):
    url, ids, _ = remote
    df = list_trials(url, sweep=SWEEP, sort="best val/top1")
    assert list(df["run_id"]) == [ids["t0"], ids["t1"], ids["t2"]]
    assert list(df["status"]) == ["finished", "stopped (asha)", "failed"]
    assert df["best val/top1"].tolist() == pytest.approx([0.8, 0.76, 0.3])
    assert list(df["model.embed_dim"]) == [128, 256, 384]
    assert json.loads(format_trials(df, "json"))[0]["run_id"] == ids["t0"]
    assert len(list_trials(url)) == 4  # trials + the plain train run
    assert list_sweeps(url)["sweep"].tolist() == [SWEEP]
    assert best_trial(url, SWEEP)["run_id"] == ids["t0"]

    written = export_best(url, SWEEP, tmp_path / "best")
    assert torch.load(tmp_path / "best" / "checkpoint" / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert yaml.safe_load((tmp_path / "best" / "config.yaml").read_text()) == fixtures.trial_config(128, 1e-3)
    assert len(written) == 4

    logged = {str(p) for p in write_sweep_artifacts(url, ids["parent"], study=fixtures.toy_study(4))}
    assert {"results.csv", "plots/optuna_optimization_history.png"} <= logged
    listed = {f["path"] for f in rest(url, "artifacts/list", run_id=ids["parent"], path="plots")["files"]}
    assert "plots/optuna_optimization_history.png" in listed
    csv = MlflowClient(tracking_uri=url).download_artifacts(ids["parent"], "results.csv", str(tmp_path))
    assert len(pd.read_csv(csv)) == 3


def test_ui_helpers(capsys):
    assert start_ui("http://127.0.0.1:1") is None
    assert "already at http://127.0.0.1:1" in capsys.readouterr().out
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(UIError, match="did not answer within 1s"):
        wait_until_up(f"http://127.0.0.1:{port}", timeout=1, interval=0.1)
    assert time.monotonic() - t0 < 10


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _dom_text(browser: str, url: str, profile: Path) -> str:
    """The page's visible text after the React app rendered (virtual time lets its requests finish)."""
    assert url.startswith("http://127.0.0.1:")
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-extensions",
           "--no-default-browser-check", "--no-proxy-server", "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
           f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom", url]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-2000:]
    text = re.sub(r"<script.*?</script>|<style.*?</style>", " ", r.stdout, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text))


def test_ui_in_headless_chromium(remote, tmp_path):
    browser = _chromium()
    if browser is None:
        reason = "chromium not installed (Debian: apt-get install -y chromium): browser test skipped"
        print(reason)
        pytest.skip(reason)
    url, ids, _ = remote
    exp = ids["exp_id"]
    # the experiment page (MLflow 3 opens it on its Overview tab): the experiment's name
    assert EXPERIMENT in _dom_text(browser, f"{url}/#/experiments/{exp}", tmp_path / "p1")
    # the runs table: the sweep's parent run (its trials nest under it) and the plain train run
    runs_page = _dom_text(browser, f"{url}/#/experiments/{exp}/runs", tmp_path / "p2")
    assert EXPERIMENT in runs_page and re.search(rf"\b{SWEEP}\b", runs_page) and "plain" in runs_page
    # a trial's page: its name, parent, searched param and metric
    trial_page = _dom_text(browser, f"{url}/#/experiments/{exp}/runs/{ids['t0']}", tmp_path / "p3")
    for text in (f"{SWEEP}-t0", "model.embed_dim", "val/top1", "qksweep.trial_id"):
        assert text in trial_page, text


@pytest.mark.slow
def test_real_sweep_logs_to_the_server_over_http(server, ray_session, tmp_path):
    """A real sweep with tracking.uri = the server, 4 trials at once (half a CPU per worker):
    parent and trial runs arrive over HTTP and no concurrent trial loses a metric."""
    from qksweep import api

    from .conftest import tiny_config

    url, _ = server
    cfg = tiny_config(tmp_path, optim={"epochs": 2}, run={"cpus_per_worker": 0.5})
    cfg["experiment"] = "over-http"
    cfg["tracking"] = {"uri": url}
    cfg["sweep"] = {"num_samples": 4, "max_concurrent": 4, "scheduler": {"name": "none"},
                    "space": {"optim.lr": {"loguniform": [1e-3, 3e-3]}}}
    res = api.sweep(cfg, name="http-sweep")
    assert res.num_errors == 0
    exp = rest(url, "experiments/get-by-name", experiment_name="over-http")["experiment"]
    found = rest(url, "runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 50,
                                      "filter": "tags.`qksweep.sweep` = 'http-sweep'"})["runs"]
    kinds = sorted({t["key"]: t["value"] for t in r["data"]["tags"]}["qksweep.kind"] for r in found)
    assert kinds == ["sweep", "trial", "trial", "trial", "trial"]
    trials = [r for r in found if {t["key"]: t["value"] for t in r["data"]["tags"]}["qksweep.kind"] == "trial"]
    assert res.best_run_id in {r["info"]["run_id"] for r in trials}
    for trial in trials:
        assert trial["info"]["status"] == "FINISHED"
        for key in ("train/loss", "train/top1", "val/loss", "val/top1", "val/top5", "lr", "samples_per_s", "epoch"):
            hist = rest(url, "metrics/get-history", run_id=trial["info"]["run_id"], metric_key=key)["metrics"]
            assert sorted(int(m["step"]) for m in hist) == [1, 2], (key, hist)
