"""The MLflow server goes away mid-run, for real: an ``mlflow server`` on 127.0.0.1 (SQLite backend in
tmp) is stopped after the first epochs are logged, and either started again on the same port and store
a few seconds later, or never. Training must go on, every epoch must end up in MLflow exactly once, and
what could not be sent must be named and kept in the run's pending file until ``qksweep flush``."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from qksweep import api
from qksweep.tracking import pending
from qksweep.tracking.ui import UIError, free_port, start_ui, stop_ui, wait_until_up

from .conftest import ROOT, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

LOCAL_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
             "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
KEYS = ("train/loss", "train/top1", "val/loss", "val/top1", "lr", "epoch")


class Server:
    """An ``mlflow server`` that can be stopped and started again on the same port and store."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> float:
        t0 = time.monotonic()
        self.proc = start_ui(f"sqlite:///{self.root / 'mlflow.db'}", host="127.0.0.1", port=self.port,
                             artifacts_destination=str(self.root / "artifacts"), log_file=self.root / "server.log")
        try:
            wait_until_up(self.url, timeout=90, proc=self.proc)
        except UIError:
            print((self.root / "server.log").read_text()[-3000:], file=sys.stderr)
            raise
        return time.monotonic() - t0

    def stop(self) -> None:
        stop_ui(self.proc)
        assert self.proc.poll() is not None


@pytest.fixture
def server(tmp_path, monkeypatch):
    for k, v in LOCAL_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # this test's own look-ups: fail fast
    root = tmp_path / "server"
    root.mkdir()
    s = Server(root)
    s.start()
    yield s
    stop_ui(s.proc)


def _epochs_logged(url: str, experiment: str) -> int:
    c = MlflowClient(url)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return 0
    found = c.search_runs([exp.experiment_id])
    return len(c.get_metric_history(found[0].info.run_id, "epoch")) if found else 0


def _stop_after(server: Server, experiment: str, epochs: int, events: dict, restart_after: float | None) -> threading.Thread:
    """Stop the server once ``epochs`` epochs are in MLflow; start it again ``restart_after`` s later."""

    def watch():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                n = _epochs_logged(server.url, experiment)
            except Exception:  # noqa: BLE001 - the store may be busy; poll again
                n = 0
            if n >= epochs:
                events["logged_at_stop"] = n
                server.stop()
                events["stopped"] = time.time()
                if restart_after is not None:
                    time.sleep(restart_after)
                    events["restart_s"] = server.start()
                    events["back"] = time.time()
                return
            time.sleep(0.2)
        events["timeout"] = True

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def _check_every_epoch_once(url: str, run_id: str, epochs: int) -> None:
    c = MlflowClient(url)
    for key in KEYS:
        steps = sorted(m.step for m in c.get_metric_history(run_id, key))
        assert steps == list(range(1, epochs + 1)), (key, steps)
    assert c.get_run(run_id).info.status == "FINISHED"
    assert {Path(f.path).name for f in c.list_artifacts(run_id, "checkpoints/best")} >= {"checkpoint.pt"}
    assert {Path(f.path).name for f in c.list_artifacts(run_id, "checkpoints/last")} >= {"checkpoint.pt"}


def test_server_away_mid_run_then_back_every_epoch_once(server, ray_session, tmp_path, capfd):
    """Stopped after epoch 1 and started again at once (its start-up, 5-30 s here, is the outage)."""
    epochs = 24
    cfg = tiny_config(tmp_path, optim={"epochs": epochs}, run={"name": "outage-back"})
    cfg.update(experiment="outage-back", tracking={"uri": server.url})
    events: dict = {}
    watcher = _stop_after(server, "outage-back", 1, events, restart_after=0)
    t0 = time.time()
    res = api.train(cfg)
    ended = time.time()
    watcher.join(120)
    out = capfd.readouterr()
    last_epoch = max(p.stat().st_mtime for p in Path(res.storage_path).glob("checkpoint_*"))
    print(f"train {ended - t0:.1f}s; server stopped at +{events.get('stopped', 0) - t0:.1f}s after "
          f"{events.get('logged_at_stop')} epochs, back at +{events.get('back', 0) - t0:.1f}s "
          f"(restart {events.get('restart_s', 0):.1f}s); last epoch at +{last_epoch - t0:.1f}s")
    assert "stopped" in events and "back" in events, events
    assert events["stopped"] < last_epoch, "the server must go away while the run trains"
    _check_every_epoch_once(server.url, res.run_id, epochs)
    assert "is not answering" in out.err
    assert not Path(pending.pending_path(res.storage_path)).exists()
    if events["back"] < last_epoch - 2:  # back while epochs were still reported: sent by a later epoch
        assert "MLflow is back" in out.err
    else:  # back only after the last epoch: sent at the end of the run
        assert "did not answer" not in out.err


def test_server_never_back_run_finishes_pending_file_then_flush(server, ray_session, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("QKSWEEP_MLFLOW_END_WAIT_S", "4")  # the end of the run waits this long for the server
    epochs = 6
    cfg = tiny_config(tmp_path, optim={"epochs": epochs}, run={"name": "outage-gone"})
    cfg.update(experiment="outage-gone", tracking={"uri": server.url})
    events: dict = {}
    watcher = _stop_after(server, "outage-gone", 2, events, restart_after=None)
    t0 = time.monotonic()
    res = api.train(cfg)  # returns normally: the job did its work
    print(f"train {time.monotonic() - t0:.1f}s; events {events}")
    watcher.join(60)
    out = capfd.readouterr()
    assert "stopped" in events, events
    # What reached the store: the watcher stops the server once it has seen 2 epochs, but an epoch
    # sent while the server was shutting down can land too, so read the server's SQLite store itself.
    store = MlflowClient(f"sqlite:///{server.root / 'mlflow.db'}")
    stored = sorted(int(m.step) for m in store.get_metric_history(res.run_id, "epoch"))
    assert stored == list(range(1, len(stored) + 1)) and events["logged_at_stop"] <= len(stored) < epochs, stored
    path = Path(pending.pending_path(res.storage_path))
    assert path.is_file()
    records = pending.read_records(str(path))
    missing = [r["epoch"] for r in records if r["type"] == "epoch"]
    # every epoch the store lacks, in order; the last stored one may be kept as well when the server
    # took it but died before answering (sending it again adds nothing, see the test below)
    assert missing in (list(range(len(stored) + 1, epochs + 1)), list(range(len(stored), epochs + 1))), (stored, events)
    assert records[-1]["type"] == "close" and records[-1]["status"] == "FINISHED"
    kept = {k for r in records if r["type"] == "epoch" for k, *_ in r["metrics"]}
    assert set(KEYS) <= kept
    # the message names the run, what is missing and where it is kept
    span = f"epoch {missing[0]}" if len(missing) == 1 else f"epochs {missing[0]}-{missing[-1]}"
    assert f"run {res.run_id} is missing {span}" in out.err and str(path) in out.err and "train/loss" in out.err

    # nothing lost: with the server back, `qksweep flush` sends it all and closes the run
    server.start()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, "-m", "qksweep.cli", "flush", str(path)], capture_output=True, text=True,
                       timeout=180, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "file removed" in r.stdout and not path.exists()
    _check_every_epoch_once(server.url, res.run_id, epochs)


def test_pending_records_sent_once_whatever_the_retries(tmp_path):
    """The pending file's contract without a server restart: records kept while the store cannot be
    reached are all sent later, in order, and sending them again (a request that timed out after the
    server took it) adds nothing."""
    from qksweep.tracking import runs

    store = f"sqlite:///{tmp_path / 'm.db'}"
    c = runs.client(store)
    run_id, _ = runs.get_or_create_run(c, runs.experiment_id(c, "pend"), {runs.KIND: "train", runs.RUN_NAME: "p"},
                                       run_name="p")
    away = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    recs = [pending.epoch_record(away, run_id, {"epoch": e, "train/loss": 1.0 / e, "val/top1": 0.1 * e,
                                                "_spec": [(e * 10, {"spec/fc/sigma_max": 2.0 + e})]})
            for e in (1, 2, 3)]
    path = pending.keep(str(tmp_path / "run"), recs)
    res = pending.flush_file(path, 2)
    assert res.sent == 0 and len(res.left) == 3 and res.error is not None
    assert "epochs 1-3 (12 values: train/loss, val/top1, spec/fc/sigma_max, epoch)" in pending.summarize(res.left)
    # the server is back (here: the records point at a store that answers)
    pending.write_records(path, [{**r, "uri": store} for r in res.left])
    assert pending.flush_file(path, 10).sent == 3 and not Path(path).exists()
    left, err = pending.Sender().send([{**r, "uri": store} for r in recs], 10)  # the same records again
    assert left == [] and err is None
    for key, steps in (("train/loss", [1, 2, 3]), ("epoch", [1, 2, 3]), ("spec/fc/sigma_max", [10, 20, 30])):
        assert sorted(m.step for m in c.get_metric_history(run_id, key)) == steps, key
    # a closing left by the sweep callback (no run id: found by tags) finishes the run
    close = pending.close_record(store, None, "FAILED", tags={"qksweep.error": "x"}, finalize=False,
                                 experiment="pend", lookup={runs.KIND: "train", runs.RUN_NAME: "p"}, if_running=True)
    assert pending.Sender().send([close], 10) == ([], None)
    assert c.get_run(run_id).info.status == "FAILED"


def test_a_server_that_hangs_holds_an_epoch_only_seconds(tmp_path):
    """A server that takes connections and never answers (hung, not gone): the epoch's wait is bounded
    by the sender's budget, HTTP timeouts included, and the records are kept."""
    import socket

    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)  # the kernel completes connections; nobody ever reads or answers
        uri = f"http://127.0.0.1:{hung.getsockname()[1]}"
        recs = [pending.epoch_record(uri, "r1", {"epoch": 1, "train/loss": 0.5})]
        t0 = time.monotonic()
        left, err = pending.Sender(live=True).send(recs, 2)
        took = time.monotonic() - t0
    print(f"hung server: gave up after {took:.1f}s ({err})")
    assert left == recs and err is not None
    assert took < 10  # 2 s budget; MLflow's own default would wait 120 s a request, 7 times


def test_published_artifacts_wait_in_the_pending_file_and_leave_the_checkpoint_uploads_clean(tmp_path):
    """What rank 0 publishes inside its last checkpoint (``_publish/``) is an ``artifacts`` record: kept
    while MLflow is away, uploaded when it is back; the checkpoint itself is uploaded without it."""
    from qksweep.names import PUBLISH_DIR
    from qksweep.tracking import runs

    store = f"sqlite:///{tmp_path / 'm.db'}"
    c = runs.client(store)
    run_id, _ = runs.get_or_create_run(c, runs.experiment_id(c, "pub"), {runs.KIND: "train", runs.RUN_NAME: "p"},
                                       run_name="p")
    ckpt = tmp_path / "checkpoint_000001"
    (ckpt / PUBLISH_DIR / "spectral").mkdir(parents=True)
    (ckpt / "checkpoint.pt").write_bytes(b"weights")
    (ckpt / PUBLISH_DIR / "spectral" / "sigma_max.png").write_bytes(b"png")
    away = f"http://127.0.0.1:{free_port()}"
    rec = {"type": "artifacts", "uri": away, "run_id": run_id, "checkpoint": str(ckpt),
           "folder": f"{PUBLISH_DIR}/spectral", "artifact_path": "spectral"}
    path = pending.keep(str(tmp_path / "run"), [rec])
    res = pending.flush_file(path, 2)
    assert res.sent == 0 and len(res.left) == 1 and "artifacts spectral/" in pending.summarize(res.left)
    pending.write_records(path, [{**r, "uri": store} for r in res.left])
    assert pending.flush_file(path, 10).sent == 1 and not Path(path).exists()
    assert [a.path for a in c.list_artifacts(run_id, "spectral")] == ["spectral/sigma_max.png"]
    runs.log_checkpoint_dir(c, run_id, ckpt, "checkpoints/last")
    assert [a.path for a in c.list_artifacts(run_id, "checkpoints/last")] == ["checkpoints/last/checkpoint.pt"]
