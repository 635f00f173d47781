"""One tracking address, one rule (issue 17.3): ``-s tracking.uri``, then the config file, then
``$MLFLOW_TRACKING_URI``, then ``sqlite:///mlflow.db``; train and sweep print the URI they log to."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from qksweep import api

from .conftest import ROOT, run_cli, tiny_config


def _config(workdir: Path, uri: str | None) -> str:
    cfg = tiny_config(workdir, optim={"epochs": 1})
    del cfg["tracking"]
    if uri:
        cfg["tracking"] = {"uri": uri}
    path = workdir / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.parametrize("cli,file,env,winner", [
    ("sqlite:///cli.db", "sqlite:///file.db", "sqlite:///env.db", "cli"),
    (None, "sqlite:///file.db", "sqlite:///env.db", "file"),
    (None, None, "sqlite:///env.db", "env"),
    (None, None, None, "mlflow"),
])
def test_precedence(workdir, monkeypatch, cli, file, env, winner):
    if env:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env)
    else:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = api.resolve(_config(workdir, file), [f"tracking.uri={cli}"] if cli else None)
    assert cfg.tracking.uri == f"sqlite:///{workdir / (winner + '.db')}"


def test_shipped_configs_do_not_pin_the_uri():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        assert "uri" not in (yaml.safe_load(path.read_text()).get("tracking") or {}), path.name


@pytest.mark.slow
def test_train_logs_where_the_environment_points_and_says_so(workdir):
    env_db = workdir / "elsewhere" / "env.db"
    env_db.parent.mkdir()
    out = run_cli("train", _config(workdir, None), cwd=workdir, timeout=300,
                  env={"MLFLOW_TRACKING_URI": f"sqlite:///{env_db}"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"MLflow sqlite:///{env_db}, experiment test" in out.stdout.splitlines()[0], out.stdout[:500]
    assert not (workdir / "mlflow.db").exists()
    (run,) = MlflowClient(f"sqlite:///{env_db}").search_runs(
        [MlflowClient(f"sqlite:///{env_db}").get_experiment_by_name("test").experiment_id])
    assert run.info.status == "FINISHED"
    # the console off a terminal: the URI line, one line per epoch, the result; no progress records, no
    # Ray or library lines (those are in the run's train.log), no colour codes
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    assert [ln.split("  ")[0] for ln in lines[1:-1]] == ["epoch 1/1"] and lines[-1].startswith("finished: val/top1 "), lines
    assert "\x1b[" not in out.stdout and "qksweep-progress" not in out.stdout + out.stderr
    assert (workdir / "results" / run.info.run_name / "train.log").is_file()
    # tracking.log_model (on by default): the run's best checkpoint is an MLflow model of that run
    from qksweep.tools.mlflow_model import logged_model

    assert logged_model(f"sqlite:///{env_db}", run.info.run_id) is not None
    # and the browsing commands, which honoured the variable already, find it there
    runs = run_cli("runs", "--format", "json", cwd=workdir, timeout=120, env={"MLFLOW_TRACKING_URI": f"sqlite:///{env_db}"})
    assert runs.returncode == 0 and run.info.run_id in runs.stdout, runs.stderr
