"""``run.storage`` as a bucket URI, against a real S3-compatible server (moto) on 127.0.0.1.

Every request goes to 127.0.0.1: the URIs carry ``endpoint_override`` and ``region`` (so pyarrow never
asks AWS for a bucket's region) and credentials (so no process falls back to the EC2 metadata
service), and the environment points any other S3 client at the same server. ``gs://`` is checked
statically only: building a GcsFileSystem opens no connection, probing a bucket would.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from qksweep import api
from qksweep.checks import check_config
from qksweep.config import ConfigError, load_config
from qksweep.storage import STATE_FILE, SweepFiles, check_uri, checkpoint_uri, filesystem, join, probe

from .conftest import run_cli, tiny_config

FAKE_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
            "AWS_EC2_METADATA_DISABLED": "true", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3():
    """A moto S3 server in its own process; yields a function making bucket URIs on it."""
    port = _free_port()
    endpoint = f"127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in [*FAKE_AWS, "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"]}
    os.environ.update(FAKE_AWS, AWS_ENDPOINT_URL_S3=f"http://{endpoint}", AWS_ENDPOINT_URL=f"http://{endpoint}")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, "moto server did not start"
                time.sleep(0.2)

        def uri(bucket: str, prefix: str = "qk", *, create: bool = True, creds: bool = True) -> str:
            if create:
                import boto3

                boto3.client("s3", endpoint_url=f"http://{endpoint}", region_name="us-east-1").create_bucket(Bucket=bucket)
            who = "testing:testing@" if creds else ""
            return f"s3://{who}{bucket}/{prefix}?endpoint_override={endpoint}&scheme=http&region=us-east-1"

        uri.endpoint = endpoint
        yield uri
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def objects(s3, bucket: str) -> list[str]:
    import boto3

    c = boto3.client("s3", endpoint_url=f"http://{s3.endpoint}", region_name="us-east-1")
    return sorted(o["Key"] for o in c.list_objects_v2(Bucket=bucket).get("Contents", []))


# ---------------------------------------------------------------- validation (no Ray, no MLflow)


@pytest.mark.parametrize("bad, words", [
    ("ftp://host/results", "scheme ftp:// is not supported"),
    ("s3:///results", "names no bucket"),
    ("gs:///results", "names no bucket"),
    ("s3://my bucket/results", "white space"),
    ("s3://bucket:99999/results", "not a valid URI"),
    ("s3://bucket/results#x", "fragment"),
])
def test_malformed_or_unsupported_uri_is_one_config_line(tmp_path, bad, words):
    cfg = load_config(tiny_config(tmp_path, run={"storage": bad}))
    with pytest.raises(ConfigError) as e:
        check_config(cfg)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_gs_uri_is_accepted_and_builds_a_gcs_filesystem_offline():
    check_uri("gs://bucket/qksweep")
    fs, path = filesystem("gs://bucket/qksweep/sweep-1")  # pyarrow's GcsFileSystem connects lazily
    assert fs.type_name == "gcs" and path == "bucket/qksweep/sweep-1"
    assert join("gs://bucket/qk", "s1") == "gs://bucket/qk/s1"


def test_join_and_checkpoint_uri_keep_the_query():
    base = "s3://k:s@bkt/qk?endpoint_override=127.0.0.1:9&scheme=http"
    assert join(base, "sw", "optuna.db") == "s3://k:s@bkt/qk/sw/optuna.db?endpoint_override=127.0.0.1:9&scheme=http"

    class Ckpt:
        path = "bkt/qk/sw-1/checkpoint_0001"
        filesystem = type("FS", (), {"type_name": "s3"})()

    assert checkpoint_uri(base, Ckpt()) == "s3://k:s@bkt/qk/sw-1/checkpoint_0001?endpoint_override=127.0.0.1:9&scheme=http"
    assert checkpoint_uri(base, None) is None


def test_missing_bucket_unreachable_endpoint_and_bad_option_refused_before_anything(s3, tmp_path):
    good = s3("qk-empty")
    cases = {
        s3("no-such-bucket", create=False): "bucket 'no-such-bucket' does not exist",
        good.replace(s3.endpoint, f"127.0.0.1:{_free_port()}"): "cannot be reached",
        good + "&bogus=1": "Unexpected query parameter",
    }
    for storage, words in cases.items():
        cfg = tiny_config(tmp_path, run={"storage": storage})
        cfg["sweep"] = {"metric": "val/loss", "mode": "min", "num_samples": 1, "space": {"optim.lr": {"choice": [1e-3]}}}
        t0 = time.time()
        with pytest.raises(ConfigError) as e:
            api.sweep(cfg, name="never")
        assert words in str(e.value) and "\n" not in str(e.value) and time.time() - t0 < 15
        assert "testing:testing" not in str(e.value)  # credentials masked
    assert not (tmp_path / "mlflow.db").exists(), "no MLflow store touched"
    assert objects(s3, "qk-empty") == [], "nothing written to storage"

    # the command: one line, exit 2
    cfg = tiny_config(tmp_path, run={"storage": s3("no-such-bucket", create=False)})
    cfg["sweep"] = {"metric": "val/loss", "mode": "min", "num_samples": 1, "space": {"optim.lr": {"choice": [1e-3]}}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(cfg))
    out = run_cli("sweep", "s.yaml", "--name", "never", cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and "does not exist" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_sweep_files_round_trip_through_the_bucket(s3, tmp_path, monkeypatch):
    """The Optuna study goes up as a consistent SQLite snapshot and comes down on another machine
    (another cache folder); a searcher pickled there opens this machine's copy."""
    import optuna

    from qksweep.orchestrator.searcher import SweepStudyStorage, relocate_study

    uri = s3("qk-files")
    monkeypatch.setenv("QKSWEEP_CACHE_DIR", str(tmp_path / "machine-a"))
    a = SweepFiles(uri, "sw")
    assert not a.exists() and "testing:***@" in a.location
    a.prepare_new()
    (a.local / STATE_FILE).write_text(json.dumps({"name": "sw"}))
    store = SweepStudyStorage(a.optuna_url, sweep="sw")
    study = optuna.create_study(study_name="qksweep", storage=store)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    assert a.upload()
    assert {"qk/sw/optuna.db", "qk/sw/qksweep_sweep.json"} <= set(objects(s3, "qk-files"))
    assert not a.upload(min_interval_s=60), "throttled"
    pickled = pickle.dumps(store)
    local_a = a.local

    monkeypatch.setenv("QKSWEEP_CACHE_DIR", str(tmp_path / "machine-b"))
    b = SweepFiles(uri, "sw")
    assert b.exists() and b.has_state() and b.local != local_a
    b.download()
    relocate_study("sw", b.optuna_url)
    moved = pickle.loads(pickled)
    assert moved.url == b.optuna_url
    assert [t.params["x"] for t in optuna.load_study(study_name="qksweep", storage=moved).trials] == \
        [t.params["x"] for t in study.trials]
    assert b.known_sweeps() == ["sw"]

    # `qksweep resume s3://BUCKET/PREFIX/NAME?...` finds the same sweep by its own URI
    from qksweep.orchestrator.sweep import find_sweep

    monkeypatch.setenv("QKSWEEP_CACHE_DIR", str(tmp_path / "machine-c"))
    found = find_sweep(join(uri, "sw"))
    assert found.remote == join(uri, "sw") and json.loads((found.local / STATE_FILE).read_text()) == {"name": "sw"}
    with pytest.raises(ConfigError, match="names a bucket"):
        find_sweep(uri.replace("/qk?", "?"))
    with pytest.raises(ConfigError, match="known sweeps: sw|did you mean 'sw'"):
        find_sweep("sx", storage=uri)


# ---------------------------------------------------------------- a sweep in the bucket (slow)


@pytest.mark.slow
def test_sweep_in_s3_resume_elsewhere_export_and_continue(s3, ray_session, workdir, monkeypatch):
    from mlflow.tracking import MlflowClient
    from ray.train import Checkpoint

    from qksweep.trainables.checkpoint import load_checkpoint

    storage = s3("qk-sweep")
    monkeypatch.setenv("QKSWEEP_CACHE_DIR", str(workdir / "cache-a"))
    cfg = tiny_config(workdir, optim={"epochs": 2, "warmup_epochs": 0}, run={"storage": storage})
    cfg["sweep"] = {"metric": "val/loss", "mode": "min", "num_samples": 2, "max_concurrent": 2,
                    "searcher": {"sampler": "tpe", "seed": 0}, "scheduler": {"name": "none"},
                    "space": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}}
    uri = cfg["tracking"]["uri"]
    res = api.sweep(cfg, name="s3sw")
    assert res.best_trial_id and res.storage_path == join(storage, "s3sw")

    keys = objects(s3, "qk-sweep")
    sweep_keys = {k.split("/", 2)[2] for k in keys if k.startswith("qk/s3sw/")}
    assert {STATE_FILE, "optuna.db", "tuner.pkl"} <= sweep_keys
    assert any(k.startswith("experiment_state-") for k in sweep_keys)
    # in each Tune trial's folder (one-worker trials train in their own process) or a Train run's beside it
    ckpts = [k for k in keys if k.startswith(("qk/s3sw/", "qk/s3sw-")) and k.endswith("/checkpoint.pt")]
    assert len({k.rsplit("/", 3)[1] for k in ckpts}) == 2, "each trial's checkpoints are in the bucket"
    assert not (workdir / "results").exists()

    # the Optuna study in the bucket holds both trials
    import optuna

    down = workdir / "optuna-from-bucket.db"
    fs, path = filesystem(join(storage, "s3sw", "optuna.db"))
    with fs.open_input_stream(path) as f:
        down.write_bytes(f.read())
    assert len(optuna.load_study(study_name="s3sw", storage=f"sqlite:///{down}").trials) == 2

    # a trial's checkpoint loads straight from the bucket
    state, config = load_checkpoint(Checkpoint(join(storage, ckpts[0].split("/", 1)[1].rsplit("/", 1)[0])).to_directory())
    assert "model" in state and config["run"]["storage"] == storage

    # credentials in the URI never reach MLflow
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("test").experiment_id
    rs = c.search_runs([exp], filter_string="tags.`qksweep.sweep` = 's3sw'")
    assert len(rs) == 3 and all("testing:testing" not in r.data.params.get("run.storage", "") for r in rs)
    trials = [r for r in rs if r.data.tags.get("qksweep.kind") == "trial"]
    epochs_before = {r.info.run_id: len(c.get_metric_history(r.info.run_id, "epoch")) for r in trials}

    # resume "on another machine": an empty cache; the sweep is finished, so nothing runs again
    monkeypatch.setenv("QKSWEEP_CACHE_DIR", str(workdir / "cache-b"))
    again = api.resume("s3sw", storage=storage)
    assert again.best_trial_id == res.best_trial_id
    assert (workdir / "cache-b" / "sweeps" / "s3" / "qk-sweep" / "qk" / "s3sw" / "optuna.db").exists()
    rs = c.search_runs([exp], filter_string="tags.`qksweep.sweep` = 's3sw'")
    assert len(rs) == 3
    assert {r.info.run_id: len(c.get_metric_history(r.info.run_id, "epoch")) for r in rs
            if r.data.tags.get("qksweep.kind") == "trial"} == epochs_before
    with pytest.raises(ConfigError, match="did you mean 's3sw'"):
        api.resume("s3sx", storage=storage)

    # best --export: the best checkpoint (read from the bucket into MLflow) loads
    out = run_cli("best", "s3sw", "--tracking-uri", uri, "--export", str(workdir / "exported"), cwd=workdir, timeout=180)
    assert out.returncode == 0, out.stderr
    state, _ = load_checkpoint(workdir / "exported" / "checkpoint")
    assert "model" in state

    # continue a trial one more epoch; its new Train run writes to the bucket too (the config artifact
    # holds the masked URI, so the real one is passed again)
    cont = api.continue_trial(res.best_run_id, epochs=3, tracking_uri=uri, overrides=[f"run.storage={storage}"])
    assert c.get_run(cont.run_id).info.status == "FINISHED"
    assert cont.checkpoint_path.startswith("s3://testing:testing@qk-sweep/qk/") and "endpoint_override" in cont.checkpoint_path
    assert any(k.startswith(f"qk/{cont.run_name}/") for k in objects(s3, "qk-sweep"))
