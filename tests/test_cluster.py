"""Cluster: the pre-submit checks (pure, no connection), templates against Ray's own schema, and
(slow) a real local head started with `ray start --head`, token auth on, driven through the CLI.

The head binds the dashboard to 127.0.0.1 and is stopped at the end of the module whatever happens.
It is stopped by process id (every process it spawned carries a marker in its environment), not with
`ray stop`, which would also kill every other Ray instance on this machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from qksweep.cluster import checks, jobs, templates
from qksweep.config import ConfigError, load_config

from .conftest import run_cli, tiny_config

REMOTE = "http://10.0.0.5:8265"


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: the remote checks must be pure."""

    def refuse(*a, **k):
        raise AssertionError(f"a connection was attempted: {a[1:] if len(a) > 1 else a}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def cluster_config(tmp: Path, **sections) -> dict:
    cfg = tiny_config(tmp, experiment="clustertest", spectral={"enabled": False},
                      sweep={"num_samples": 2, "scheduler": {"name": "none"},
                             "space": {"optim.lr": {"loguniform": [1e-3, 3e-3]}}})
    cfg["optim"] = {"epochs": 2, "warmup_epochs": 0}
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    return cfg


def write_config(tmp: Path, name: str = "sweep.yaml", **sections) -> Path:
    p = tmp / name
    p.write_text(yaml.safe_dump(cluster_config(tmp, **sections), sort_keys=False))
    return p


# ---------------------------------------------------------------- addresses and security (pure)


def test_address_normalization():
    assert checks.normalize_address("127.0.0.1:8265") == "http://127.0.0.1:8265"
    assert checks.normalize_address("https://head.example:443/") == "https://head.example:443"
    for bad in (None, "", "auto", "ray://10.0.0.5:10001", "ftp://x:1", "http://:8265", "http://h:notaport"):
        with pytest.raises(ConfigError):
            checks.normalize_address(bad)
    assert checks.is_loopback("http://127.0.0.1:8265") and checks.is_loopback("localhost:8265")
    assert checks.is_loopback("http://[::1]:8265") and checks.is_loopback("http://127.3.2.1:1")
    assert not checks.is_loopback(REMOTE) and not checks.is_loopback("http://head.example:8265")


def test_clear_text_token_warning_only_for_remote_http(no_network):
    (w,) = checks.security_warnings(REMOTE)
    assert "clear text" in w and "ray dashboard" in w and "https://" in w
    assert checks.security_warnings("http://127.0.0.1:8265") == []
    assert checks.security_warnings("https://10.0.0.5:8265") == []


# ---------------------------------------------------------------- remote-cluster checks (pure)


def test_remote_cluster_refuses_sqlite_tracking(tmp_path, no_network):
    cfg = load_config(cluster_config(tmp_path))
    with pytest.raises(ConfigError) as e:
        checks.check_for_cluster(cfg, REMOTE)
    msg = str(e.value)
    assert "sqlite:///" in msg and "cannot reach it" in msg and "tracking.uri: http://HOST:5000" in msg
    assert "\n" not in msg
    # the relative default too
    with pytest.raises(ConfigError, match="lives on this machine"):
        checks.check_tracking("sqlite:///mlflow.db", remote=True)


def test_remote_cluster_refuses_local_storage_path(tmp_path, no_network):
    cfg = load_config(cluster_config(tmp_path, run={"storage": "./qksweep_results"},
                                     tracking={"uri": "http://mlflow.internal:5000"}))
    with pytest.raises(ConfigError) as e:
        checks.check_for_cluster(cfg, REMOTE)
    assert "run.storage './qksweep_results'" in str(e.value) and "s3://" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="path on this machine"):
        checks.check_storage("~/results", remote=True)
    with pytest.raises(ConfigError, match="scheme"):
        checks.check_storage("ftp://host/results", remote=True)


def test_remote_cluster_refuses_localhost_tracking_server(no_network):
    with pytest.raises(ConfigError, match="points at this machine"):
        checks.check_tracking("http://127.0.0.1:5000", remote=True)
    with pytest.raises(ConfigError) as e:
        checks.check_tracking("postgresql://user:hunter2@localhost:5432/mlflow", remote=True)
    assert "hunter2" not in str(e.value) and "user:***@" in str(e.value)


def test_remote_cluster_accepts_shared_storage_and_server(tmp_path, no_network):
    for storage in ("s3://bucket/qksweep", "gs://bucket/qksweep"):
        cfg = load_config(cluster_config(tmp_path, run={"storage": storage}, tracking={"uri": "http://mlflow.internal:5000"}))
        out = checks.check_for_cluster(cfg, REMOTE)
        assert out.remote and out.config.run.storage == storage and out.warnings == []
    cfg = load_config(cluster_config(tmp_path, run={"storage": "/mnt/shared/results"},
                                     tracking={"uri": "postgresql://u:pw@db.internal/mlflow"}))
    out = checks.check_for_cluster(cfg, REMOTE)
    assert out.config.run.storage == "/mnt/shared/results"
    assert len(out.warnings) == 1 and "every node" in out.warnings[0]


def test_local_head_accepts_local_files_and_makes_them_absolute(tmp_path, monkeypatch, no_network):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(cluster_config(tmp_path, run={"storage": "./res"}, tracking={"uri": "sqlite:///mlflow.db"}))
    out = checks.check_for_cluster(cfg, "http://127.0.0.1:8265")
    assert not out.remote and out.warnings == []
    assert out.config.run.storage == str(tmp_path / "res")
    assert out.config.tracking.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_build_submission_for_remote_cluster_opens_no_connection(tmp_path, no_network):
    from qksweep.cli import build_parser
    from qksweep.cluster.connect import RAY_ENV

    project = tmp_path / "project"
    for d in ("qksweep_results/s1", ".venv/bin", ".git", "data/cifar", "src/mypkg"):
        (project / d).mkdir(parents=True)
    (project / "mlflow.db").write_text("x")
    (project / "src/mypkg/__init__.py").write_text("")
    cfg = write_config(tmp_path, run={"storage": "s3://bucket/qksweep"},
                       tracking={"uri": "postgresql://u:s3cret@db.internal/mlflow"})
    sub = jobs.build_submission(cfg, ["optim.lr=2e-3"], REMOTE, name="s-remote", working_dir=project)
    try:
        argv = shlex.split(sub.entrypoint)
        assert argv[:2] == ["qksweep", "sweep"]
        args = build_parser().parse_args(argv[1:])
        assert args.command == "sweep" and args.name == "s-remote" and args.config == jobs.CONFIG_NAME
        wd = Path(sub.runtime_env["working_dir"])
        shipped = sorted(str(p.relative_to(wd)) for p in wd.rglob("*"))
        assert shipped == [jobs.CONFIG_NAME, "src", "src/mypkg", "src/mypkg/__init__.py"]
        sent = load_config(wd / jobs.CONFIG_NAME)
        assert sent.optim.lr == 2e-3 and sent.run.storage == "s3://bucket/qksweep"
        assert "s3cret" not in (wd / jobs.CONFIG_NAME).read_text().splitlines()[0]  # the header comment
        assert {"qksweep_results/", "mlflow.db", "data/", ".venv/", ".git/"} <= set(sub.runtime_env["excludes"])
        env = sub.runtime_env["env_vars"]
        assert all(env[k] == v for k, v in RAY_ENV.items()) and env["RAY_OVERRIDE_JOB_RUNTIME_ENV"] == "1"
        assert "MLFLOW_TRACKING_URI" not in env  # a URI with a password stays in the shipped config only
        assert "s3cret" not in sub.entrypoint and "s3cret" not in json.dumps(sub.metadata)
        assert any("clear text" in w for w in sub.warnings)
    finally:
        sub.cleanup()
    assert not wd.exists()


def test_build_submission_resume_entrypoint(tmp_path, no_network):
    from qksweep.cli import build_parser

    cfg = write_config(tmp_path)
    sub = jobs.build_submission(cfg, [], "http://127.0.0.1:8265", resume="old-sweep")
    try:
        argv = shlex.split(sub.entrypoint)
        args = build_parser().parse_args(argv[1:])
        assert args.command == "resume" and args.sweep == "old-sweep" and args.storage == str(tmp_path / "results")
        assert sub.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    finally:
        sub.cleanup()


def test_the_jobs_table_shows_the_command_as_typed_not_the_heads_python(tmp_path, no_network):
    cfg = write_config(tmp_path)
    sub = jobs.build_submission(cfg, [], "http://127.0.0.1:8265", resume="old sweep")
    try:
        typed = sub.entrypoint
        ran = jobs.with_python(sub, jobs.HeadPython("/opt/my env/bin/python3", "0")).entrypoint
        assert shlex.split(ran)[:3] == ["/opt/my env/bin/python3", "-m", "qksweep"]
        assert jobs.as_typed(ran) == typed and typed.startswith("qksweep resume ")
        assert jobs.as_typed("echo 'unbalanced") == "echo 'unbalanced"
    finally:
        sub.cleanup()


def test_submit_refuses_bad_sweep_before_connecting(tmp_path, no_network):
    cfg = write_config(tmp_path)
    with pytest.raises(ConfigError, match="sweep.metric"):
        jobs.build_submission(cfg, ["sweep.metric=val/acc"], "http://127.0.0.1:8265")


class FakeJobClient:
    """Just enough of JobSubmissionClient for follow(): logs arrive in chunks, then the job ends."""

    def __init__(self, chunks, *, ws_breaks=False):
        self.chunks, self.ws_breaks, self.polls = chunks, ws_breaks, 0

    async def tail_job_logs(self, job_id):
        if self.ws_breaks:
            raise RuntimeError("WebSocket connection closed unexpectedly")
        for c in self.chunks:
            yield c

    def get_job_status(self, job_id):
        self.polls += 1
        return "RUNNING" if self.ws_breaks and self.polls < 3 else "FAILED"

    def get_job_logs(self, job_id):
        return "".join(self.chunks)


@pytest.mark.parametrize("ws_breaks", [False, True])
def test_follow_masks_secrets_across_chunks_and_survives_a_broken_websocket(ws_breaks):
    import io

    chunks = ["uri postgresql://u:hun", "ter2@db/mlflow\nepoch 1\n", "done (no newline)"]
    out = io.StringIO()
    assert jobs.follow(FakeJobClient(chunks, ws_breaks=ws_breaks), "j", out, poll=0.01) == "FAILED"
    assert out.getvalue() == "uri postgresql://u:***@db/mlflow\nepoch 1\ndone (no newline)"


# ---------------------------------------------------------------- templates


@pytest.mark.parametrize("kind,gpus", [("aws", 8), ("aws", 1), ("gcp", 8), ("gcp", 4)])
def test_launcher_templates_validate_against_rays_schema(kind, gpus):
    import jsonschema

    text = templates.render(kind, gpus_per_node=gpus, max_workers=8)
    cfg = yaml.safe_load(text)
    templates.validate_launcher_config(cfg)
    worker = next(v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"])
    assert worker["resources"]["GPU"] == gpus and worker["max_workers"] == 8
    assert cfg["available_node_types"][cfg["head_node_type"]]["resources"] == {"CPU": 0}
    assert any("qksweep" in c for c in cfg["setup_commands"])
    assert "ray[default,tune,train]==" in cfg["setup_commands"][0]
    # the schema really is checking: a typo'd key is refused
    bad = dict(cfg, max_workerz=3)
    with pytest.raises(jsonschema.ValidationError):
        templates.validate_launcher_config(bad)


def test_template_refuses_unknown_gpu_count():
    with pytest.raises(ConfigError, match="knows nodes with"):
        templates.render("aws", gpus_per_node=3)


def test_kuberay_manifest_parses_and_runs_a_valid_sweep(no_network):
    from qksweep.cli import build_parser

    docs = list(yaml.safe_load_all(templates.render("kuberay", gpus_per_node=8, max_workers=8, name="qk-test")))
    by_kind = {d["kind"]: d for d in docs}
    assert set(by_kind) == {"PersistentVolumeClaim", "ConfigMap", "RayJob"}
    job = by_kind["RayJob"]
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"] == "qk-test"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "qksweep"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "sweep" and args.config == "/home/ray/qksweep/sweep.yaml"
    job_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert job_env["RAY_TRAIN_V2_ENABLED"] == "1" and job_env["RAY_OVERRIDE_JOB_RUNTIME_ENV"] == "1"
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["maxReplicas"] == 8
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    # the shipped sweep config is valid and passes the remote-cluster checks
    cfg = load_config(yaml.safe_load(by_kind["ConfigMap"]["data"]["sweep.yaml"]))
    assert cfg.sweep.max_concurrent == 64
    checks.check_for_cluster(cfg, "http://qk-test-head-svc:8265")


def test_cli_template_writes_file(tmp_path):
    out = tmp_path / "cluster.yaml"
    r = run_cli("cluster", "template", "gcp", "--gpus-per-node", "4", "--max-workers", "2", "--out", str(out),
                cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(out.read_text())
    templates.validate_launcher_config(cfg)
    assert cfg["max_workers"] == 2
    r = run_cli("cluster", "template", "gcp", "--out", str(out), cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "exists" in r.stderr


# ---------------------------------------------------------------- unreachable address


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize("cmd", [["jobs", "list"], ["submit", "CONFIG", "--follow"]])
def test_unreachable_loopback_address_is_one_line_exit_2(tmp_path, cmd):
    cfg = write_config(tmp_path)
    addr = f"http://127.0.0.1:{_closed_port()}"
    argv = [str(cfg) if c == "CONFIG" else c for c in cmd]
    t0 = time.monotonic()
    r = run_cli(*argv, "--address", addr, cwd=tmp_path, timeout=60)
    elapsed = time.monotonic() - t0
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach" in lines[0] and addr in lines[0], r.stderr
    assert elapsed < 10, elapsed


# ---------------------------------------------------------------- a real local head (slow)


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _pids_with_marker(marker: str) -> list[int]:
    """Processes whose environment carries ``marker``: exactly what our head started."""
    needle = f"QKSWEEP_TEST_HEAD={marker}".encode()
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    out.append(int(d))
        except OSError:
            continue
    return out


def _stop_head(proc: subprocess.Popen, marker: str) -> None:
    """SIGTERM the `ray start --block` process (it stops its children), then SIGKILL anything left."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline and (proc.poll() is None or _pids_with_marker(marker)):
        time.sleep(0.5)
    for pid in _pids_with_marker(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _pids_with_marker(marker):
        time.sleep(0.2)


class Head:
    def __init__(self, address: str, env: dict, workdir: Path, log: Path):
        self.address, self.env, self.workdir, self.log = address, env, workdir, log

    def cli(self, *args: str, timeout: float = 120, env: dict | None = None):
        return run_cli(*args, cwd=self.workdir, timeout=timeout, env={**self.env, **(env or {})})


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    ray_tmp = Path(tempfile.mkdtemp(prefix="qkh", dir="/tmp"))  # short: Ray's unix socket paths
    workdir = tmp_path_factory.mktemp("cluster")
    token = ray_tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    marker = uuid.uuid4().hex
    gcs, dash, client_port, agent = _free_ports(4)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    # Ray 2.60's default: `ray start --head` turns token auth on when a token exists (here: this file)
    # workers at normal priority, as in qksweep's own local instance (cluster/connect.py): at Ray's nice 15
    # they starve behind any busy process on a 2-CPU box
    env.update({"RAY_AUTH_TOKEN_PATH": str(token), "QKSWEEP_TEST_HEAD": marker, "RAY_DEDUP_LOGS": "0",
                "RAY_worker_niceness": "0",
                # a head started as `.venv/bin/ray start` without the venv activated: no qksweep on its PATH
                # (the job must be run by the head's own Python, which `qksweep submit` asks the head for)
                "PATH": os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                                        if p and Path(p).resolve() != Path(sys.executable).parent.resolve())})
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={gcs}",
           "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--ray-client-server-port={client_port}", f"--dashboard-agent-listen-port={agent}",
           "--num-cpus=2", "--include-dashboard=true", f"--temp-dir={ray_tmp}", "--disable-usage-stats"]
    log = ray_tmp / "head.log"
    address = f"http://127.0.0.1:{dash}"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=workdir,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        mode = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{address}/api/authentication_mode", timeout=3) as r:
                    mode = json.loads(r.read())["authentication_mode"]
                # the Jobs API answers only once the job agent is up
                with urllib.request.urlopen(urllib.request.Request(
                        f"{address}/api/jobs/", headers={"Authorization": f"Bearer {token.read_text()}"}), timeout=3):
                    break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail(f"the head did not come up in 150 s:\n{log.read_text()[-3000:]}")
        assert mode == "token", "Ray did not enable token authentication for the head"
        yield Head(address, {"RAY_AUTH_TOKEN_PATH": str(token), "RAY_DEDUP_LOGS": "0",
                             "PATH": env["PATH"]}, workdir, log)
    finally:
        _stop_head(proc, marker)
        leftover = _pids_with_marker(marker)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        assert not leftover, f"head processes left running: {leftover}"


@pytest.fixture(scope="module")
def finished_sweep(head):
    cfg = write_config(head.workdir)
    t0 = time.monotonic()
    r = head.cli("submit", str(cfg), "--address", head.address, "--name", "cl-sweep", "--follow", timeout=420)
    return r, cfg, time.monotonic() - t0


def _job_id(stdout: str) -> str:
    line = next(line for line in stdout.splitlines() if line.startswith("submitted "))
    return line.split()[1].rstrip(":")


@pytest.mark.slow
def test_submit_follow_succeeds_and_mlflow_has_the_trials(head, finished_sweep):
    from mlflow.tracking import MlflowClient

    r, cfg, elapsed = finished_sweep
    assert r.returncode == 0, f"{r.stdout[-4000:]}\n{r.stderr[-3000:]}"
    job_id = _job_id(r.stdout)
    assert f"job {job_id} SUCCEEDED" in r.stdout
    assert "sweep cl-sweep: 2 trials" in r.stdout  # the job's own output, streamed
    token = Path(head.env["RAY_AUTH_TOKEN_PATH"]).read_text()
    assert token not in r.stdout + r.stderr
    uri = f"sqlite:///{head.workdir / 'mlflow.db'}"
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("clustertest")
    runs = c.search_runs([exp.experiment_id], "tags.`qksweep.sweep` = 'cl-sweep'")
    trials = [x for x in runs if "qksweep.trial_id" in x.data.tags]
    assert len(trials) == 2 and all(x.info.status == "FINISHED" for x in trials)
    assert all("mlflow.parentRunId" in x.data.tags for x in trials)
    assert (head.workdir / "results" / "cl-sweep").is_dir()


@pytest.mark.slow
def test_jobs_list_status_and_logs(head, finished_sweep):
    job_id = _job_id(finished_sweep[0].stdout)
    r = head.cli("jobs", "list", "--address", head.address)
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if line.startswith(job_id))
    assert "SUCCEEDED" in row and "cl-sweep" in row and "qksweep sweep" in row
    assert r.stdout.splitlines()[0].split()[:3] == ["ID", "STATUS", "SWEEP"]
    r = head.cli("jobs", "status", job_id, "--address", head.address, "--format", "json")
    assert r.returncode == 0 and json.loads(r.stdout)["status"] == "SUCCEEDED"
    r = head.cli("jobs", "logs", job_id, "--address", head.address)
    assert r.returncode == 0 and "sweep cl-sweep: 2 trials" in r.stdout and "best trial" in r.stdout
    r = head.cli("jobs", "logs", job_id, "--follow", "--address", head.address)
    assert r.returncode == 0 and "best trial" in r.stdout and f"job {job_id} SUCCEEDED" in r.stdout
    r = head.cli("jobs", "status", "no-such-job", "--address", head.address)
    assert r.returncode == 2 and "no job 'no-such-job'" in r.stderr


@pytest.mark.slow
def test_submit_resume_runs_qksweep_resume_on_the_cluster(head, finished_sweep):
    """After a head restart the sweep is continued from run.storage; here the sweep is complete, so
    the resumed job finds nothing left to run and succeeds."""
    r = head.cli("submit", str(finished_sweep[1]), "--address", head.address, "--resume", "cl-sweep", "--follow",
                 timeout=300)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-2000:]}"
    assert "qksweep resume cl-sweep --storage" in r.stdout and "resuming sweep cl-sweep" in r.stdout


@pytest.mark.slow
def test_long_job_is_stopped(head):
    cfg = write_config(head.workdir, "long.yaml", optim={"epochs": 50},
                       sweep={"num_samples": 1}, run={"storage": str(head.workdir / "results_long")})
    r = head.cli("submit", str(cfg), "--address", head.address, "--name", "cl-long")
    assert r.returncode == 0, r.stderr
    job_id = _job_id(r.stdout)
    deadline = time.monotonic() + 120
    status = None
    while time.monotonic() < deadline:
        status = json.loads(head.cli("jobs", "status", job_id, "--address", head.address, "--format", "json").stdout)["status"]
        if status != "PENDING":
            break
        time.sleep(1)
    assert status == "RUNNING", status
    r = head.cli("jobs", "stop", job_id, "--address", head.address, "--wait", "90", timeout=150)
    assert r.returncode == 0 and f"job {job_id} STOPPED" in r.stdout, (r.stdout, r.stderr)
    r = head.cli("jobs", "status", job_id, "--address", head.address, "--format", "json")
    assert json.loads(r.stdout)["status"] == "STOPPED"


@pytest.mark.slow
def test_token_auth_wrong_or_missing_token(head, tmp_path):
    wrong = "not-the-token-" + secrets.token_hex(8)
    r = head.cli("jobs", "list", "--address", head.address, env={"RAY_AUTH_TOKEN": wrong})
    assert r.returncode == 2 and "refused this machine's Ray auth token" in r.stderr
    assert wrong not in r.stdout + r.stderr and len(r.stderr.strip().splitlines()) == 1
    # no token anywhere: no env, no token path, an empty home
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")}
    env["HOME"] = str(tmp_path)
    r = subprocess.run([sys.executable, "-m", "qksweep.cli", "jobs", "list", "--address", head.address],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "no token was found" in r.stderr, r.stderr


_PROBE_HEAD = """
import json, sys
from qksweep.cluster import jobs
from qksweep.config import ConfigError
address, other, broken = sys.argv[1:4]
client = jobs.connect(address, quiet=True)
out = {}
got = jobs.head_python(client, address)
out["python"], out["version"] = got.python, got.version
sub = jobs.Submission(address=address, name="x", entrypoint="qksweep sweep c.yaml --name x", runtime_env={},
                      submission_id="x", metadata={}, config=None)
out["entrypoint"] = jobs.with_python(sub, got).entrypoint
for key, folder in (("other", other), ("broken", broken)):
    try:
        jobs.head_python(client, address, {"PYTHONPATH": folder})
        out[key] = None
    except ConfigError as e:
        out[key] = str(e)
out["listed"] = [r["id"] for r in jobs.job_rows(client)]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_submit_asks_the_head_for_its_python_and_its_qksweep(head, tmp_path):
    # the head's PATH lacks the venv (the fixture): the probe finds the Python the head's Ray runs on. In a
    # process of its own, with the head's token (this one may hold another Ray's)
    import qksweep

    # a different qksweep first on the head's path, and one that cannot be imported: one line each
    for folder, body in (("other", "__version__ = '9.9.9'\n"), ("broken", "raise ImportError('half installed')\n")):
        (tmp_path / folder / "qksweep").mkdir(parents=True)
        (tmp_path / folder / "qksweep" / "__init__.py").write_text(body)
    r = subprocess.run([sys.executable, "-c", _PROBE_HEAD, head.address, str(tmp_path / "other"), str(tmp_path / "broken")],
                       capture_output=True, text=True, timeout=300, env={**os.environ, **head.env})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert Path(out["python"]).resolve() == Path(sys.executable).resolve() and out["version"] == qksweep.__version__
    assert out["entrypoint"].split()[:3] == [out["python"], "-m", "qksweep"]
    v = qksweep.__version__
    assert "qksweep 9.9.9" in out["other"] and v in out["other"] and f"pip install qksweep=={v}" in out["other"]
    assert "cannot import qksweep (ImportError: half installed)" in out["broken"]
    assert not any(x.startswith("qksweep-probe-") for x in out["listed"])  # the probes are not the user's jobs
