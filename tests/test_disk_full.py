"""A disk that fills during a sweep (issue 20.3): ``run.storage`` on a small tmpfs, where the tiny trials'
checkpoints fit and a wide trial's second checkpoint does not. That trial fails with one line naming the
folder, its half-written copy is removed (so the disk gets the space back), what it logged before stays in
MLflow, and the sweep goes on to train the next trial. Skipped, with the reason, where this process
cannot mount a tmpfs (not root, no CAP_SYS_ADMIN)."""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from qksweep import api
from qksweep.trainables.checkpoint import is_write_failure, load_checkpoint, remove_partial, write_error

from .conftest import tiny_config

# qkformer_cifar at depth 2 on 8x8 digits: embed_dim 32 writes a ~0.3 MB checkpoint (weights and AdamW
# state), 256 a ~16 MB one; 24 MB holds the sweep's own files, the small trials and one wide checkpoint
SIZE_MB = 24


@pytest.fixture
def small_disk(workdir):
    mount = workdir / "results"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE_MB}m", "qksweep-test", str(mount)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a {SIZE_MB} MB tmpfs here ({(r.stderr or r.stdout).strip()[:120]}): "
                    "needs root or CAP_SYS_ADMIN")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.slow
def test_a_full_disk_fails_that_trial_in_one_line_and_the_sweep_goes_on(ray_session, workdir, small_disk, capsys):
    cfg = tiny_config(workdir, run={"max_failures": 0, "keep_checkpoints": 2}, optim={"epochs": 2})
    cfg["sweep"] = {"num_samples": 3, "max_concurrent": 1, "metric": "val/loss", "mode": "min",
                    "searcher": {"sampler": "random", "seed": 10}, "scheduler": {"name": "none"},
                    # seed 10 draws 32, 256, 32: the wide trial runs second, a small one after it
                    "space": {"model.embed_dim": {"choice": [32, 256]}}}
    res = api.sweep(cfg, name="full")
    assert res.num_errors == 1 and res.best_trial_id

    c = MlflowClient(cfg["tracking"]["uri"])
    exp = c.get_experiment_by_name("test")
    trials = sorted((r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("qksweep.kind") == "trial"),
                    key=lambda r: r.info.start_time)
    dims = [r.data.params["model.embed_dim"] for r in trials]
    assert dims == ["32", "256", "32"], dims  # the order the test relies on
    small = [trials[0], trials[2]]
    wide = trials[1]
    assert wide.info.status == "FAILED" and all(r.info.status == "FINISHED" for r in small)
    line = wide.data.tags["qksweep.error"]
    assert "the epoch 2 checkpoint could not be written to" in line, line
    assert str(small_disk) in line and "no space left on device" in line and "run.storage" in line, line
    failed = [ln for ln in capsys.readouterr().out.splitlines() if " failed: " in ln]  # the console's event line
    assert len(failed) == 1 and "the epoch 2 checkpoint could not be written to" in failed[0], failed
    for r in trials:  # nothing already logged is lost
        steps = sorted(m.step for m in c.get_metric_history(r.info.run_id, "epoch"))
        assert steps == ([1] if r is wide else [1, 2]), (r.data.params["model.embed_dim"], steps)
    # the half-written copy is gone; the wide trial's first checkpoint is whole
    wide_dir = next(p for p in (small_disk / "full").iterdir() if p.is_dir() and wide.data.tags["qksweep.trial_id"] in p.name)
    ckpts = sorted(p for p in wide_dir.glob("checkpoint_*") if p.is_dir())
    assert len(ckpts) == 1, ckpts
    state, _ = load_checkpoint(ckpts[0])
    assert state["epoch"] == 1
    assert Path(small_disk).stat().st_dev != Path(workdir).stat().st_dev  # the sweep really ran on the tmpfs


def test_write_failures_are_told_apart_and_named_in_one_line(tmp_path):
    full = OSError("[Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device")  # pyarrow's
    ro = OSError(errno.EROFS, "Read-only file system")
    for e, reason in ((full, "no space left on device"), (ro, "read-only file system")):
        assert is_write_failure(e)
        line = str(write_error(e, epoch=3, where=tmp_path))
        assert line == (f"the epoch 3 checkpoint could not be written to {tmp_path} ({reason}): "
                        "free space there or point run.storage at a writable place"), line
    assert not is_write_failure(OSError(errno.ECONNREFUSED, "Connection refused"))  # not the storage: raised as is
    (tmp_path / "checkpoint_000000").mkdir()
    before = {str(tmp_path / "checkpoint_000000")}
    (tmp_path / "checkpoint_000001").mkdir()
    (tmp_path / "checkpoint_000001" / "checkpoint.pt").write_bytes(b"half")
    assert remove_partial(tmp_path, before) == [str(tmp_path / "checkpoint_000001")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_000000"]
