"""The sweep console (issue 17.1) event by event, off a terminal: the exact lines, and where the lines that
reach stdout while a sweep runs go. The real thing, on a pipe and on a pseudo-terminal, is in
test_concurrent.py."""

from __future__ import annotations

import io
from types import SimpleNamespace

from qksweep.orchestrator.console import Session


def make(tmp_path, *, show_all=False, tty=False):
    out = io.StringIO()
    s = Session("s1", num_samples=3, epochs=4, metric="val/top1", mode="max", searched=["optim.lr", "model.depth"],
                scheduler="asha", reduction_factor=3, log_path=tmp_path / "sweep.log", out=out, tty=tty,
                show_all=show_all)
    return s, out


def trial(tid, **kw):
    return SimpleNamespace(trial_id=tid, config={"optim.lr": 0.00123456, "model.depth": 2}, last_result={},
                           status="RUNNING", error_file=None, get_error=lambda: None, **kw)


def test_each_event_is_one_plain_line(tmp_path):
    s, out = make(tmp_path)
    a, b, c, d = trial("a1"), trial("b2"), trial("c3"), trial("d4")
    s.trial_started(a)
    s.trial_result(a, {"epoch": 1, "train/loss": 2.0, "val/top1": 0.25, "lr": 1e-3})
    s.trial_result(a, {"epoch": 2, "train/loss": 1.5, "val/top1": 0.5, "lr": 5e-4})
    a.last_result = {"epoch": 2, "val/top1": 0.5}
    s.trial_complete(a)  # short of the budget, no rule of its own: the scheduler stopped it
    s.trial_started(b)
    for e in range(1, 5):
        s.trial_result(b, {"epoch": e, "val/top1": 0.1 * e})
    b.last_result = {"epoch": 4}
    s.trial_complete(b)
    c.last_result = {"epoch": 1, "stopped_by": "firing_rate"}
    s.trial_result(c, {"epoch": 1, "val/top1": 0.1})
    s.trial_complete(c)
    d.get_error = lambda: ("Failure # 1 (occurred at 2026-12-06_10-00-00)\nray::ImplicitFunc.train() (pid=1)\n"
                           "Traceback (most recent call last):\n  ...\n"
                           "RuntimeError: the epoch 1 checkpoint could not be written\n\n")
    s.trial_error(d)
    assert out.getvalue().splitlines() == [
        "trial a1 started: optim.lr=0.00123  model.depth=2",
        "[a1] epoch 1/4  train/loss 2.0000  val/top1 0.2500  lr 0.001",
        "[a1] epoch 2/4  train/loss 1.5000  val/top1 0.5000  lr 0.0005",
        "trial a1 stopped by asha at epoch 2/4: not in the best 1/3 of its rung by val/top1 (val/top1 0.5000)",
        "trial b2 started: optim.lr=0.00123  model.depth=2",
        "[b2] epoch 1/4  val/top1 0.1000",
        "[b2] epoch 2/4  val/top1 0.2000",
        "[b2] epoch 3/4  val/top1 0.3000",
        "[b2] epoch 4/4  val/top1 0.4000",
        "trial b2 finished: 4 epochs, val/top1 0.4000, best 0.4000",
        "[c3] epoch 1/4  val/top1 0.1000",
        "trial c3 stopped by firing_rate at epoch 1/4 (val/top1 0.1000)",
        "trial d4 failed: RuntimeError: the epoch 1 checkpoint could not be written",
    ]
    assert s.counts() == {"RUNNING": 0, "FINISHED": 1, "STOPPED": 2, "FAILED": 1}
    assert s.best() == ("a1", 0.5)
    assert s.header().splitlines()[0] == "sweep s1: 4/3 trials  |  0 running, 1 finished, 2 stopped, 1 failed"
    s.stop()
    assert (tmp_path / "sweep.log").read_text().splitlines() == out.getvalue().splitlines()


def test_what_reaches_stdout_goes_to_the_log_and_only_qksweeps_lines_to_the_console(tmp_path):
    s, out = make(tmp_path)
    s.captured("\x1b[36m(TrainController pid=12)\x1b[0m [a1] epoch 1/4  val/top1 0.1", origin="trial")
    s.captured("[a1] epoch 1/4  val/top1 0.1000", origin="trial")  # the trial's own: the console has the driver's
    s.captured("[a1] MLflow at http://127.0.0.1:5000 is not answering (refused); epoch 2 kept", origin="trial")
    s.captured("qksweep: warning: disk almost full", origin="trial")
    s.captured("generated new fontManager", origin="trial")
    s.captured("View detailed results here: /tmp/x", origin="library")
    s.captured("sweep waiting: 1 trial has made no progress for 60 s", origin="qksweep")
    s.captured("   ", origin="qksweep")
    assert out.getvalue().splitlines() == [
        "[a1] MLflow at http://127.0.0.1:5000 is not answering (refused); epoch 2 kept",
        "qksweep: warning: disk almost full",
        "sweep waiting: 1 trial has made no progress for 60 s",
    ]
    s.stop()
    log = (tmp_path / "sweep.log").read_text()
    assert "(TrainController pid=12) [a1] epoch 1/4" in log and "\x1b[" not in log
    assert "generated new fontManager" in log and "View detailed results here" in log


def test_verbose_shows_the_libraries_too_but_never_a_trials_epoch_line_twice(tmp_path):
    s, out = make(tmp_path, show_all=True)
    s.captured("generated new fontManager", origin="trial")
    s.captured("[a1] epoch 1/4  val/top1 0.1000", origin="trial")
    s.captured("View detailed results here: /tmp/x", origin="library")
    assert out.getvalue().splitlines() == ["generated new fontManager", "View detailed results here: /tmp/x"]
    s.stop()


def test_time_left_is_an_upper_bound_from_the_epochs_still_to_train(tmp_path):
    s, _ = make(tmp_path)
    a, b = trial("a1"), trial("b2")
    s.trial_started(a)
    s.trial_started(b)
    s.trial_result(a, {"epoch": 2, "val/top1": 0.3})
    s.started -= 10  # 2 epochs in 10 s
    left = s.left_s()
    # a: 2 epochs left, b: 4, one trial not started: 4 -> 10 epochs at 5 s each
    assert 49 < left < 51
    s.stop()


def test_train_console_shows_epochs_a_bar_on_a_terminal_and_logs_the_rest(tmp_path):
    from qksweep.console import TrainConsole

    progress = 'qksweep-progress {"run": "r", "epoch": 1, "epochs": 2, "done": 5, "total": 10, "samples_per_s": 640.0}'
    for tty in (False, True):
        out = io.StringIO()
        c = TrainConsole(tmp_path / f"train{tty}.log", out, tty=tty, show_all=False)
        c.start()
        c.on_line(progress, origin="trial")
        c.on_line("epoch 1/2  train/loss 2.0000  val/top1 0.2500", origin="trial")
        c.on_line("\x1b[36m(RayTrainWorker pid=3)\x1b[0m generated new fontManager", origin="trial")
        c.on_line("train r: MLflow sqlite:///m.db, experiment test", origin="qksweep")
        c.stop()
        text = out.getvalue()
        assert "epoch 1/2  train/loss 2.0000  val/top1 0.2500" in text and "train r: MLflow" in text
        assert "fontManager" not in text and "qksweep-progress" not in text
        assert ("640 samples/s" in text and "5/10" in text) == tty, text  # the bar, on a terminal only
        log = (tmp_path / f"train{tty}.log").read_text()
        assert "(RayTrainWorker pid=3) generated new fontManager" in log and "qksweep-progress" not in log


def test_a_line_is_told_by_who_wrote_it_even_after_a_librarys_partial_write():
    """A library's partial write (a progress bar's carriage return) left in the buffer must not make the
    qksweep line printed after it a library line (the sweep's "sweep waiting:" line went to the log only)."""
    from qksweep.console import Capture

    got = []
    cap = Capture(lambda line, origin, err: got.append((line, origin)), io.StringIO())
    exec("def emit(text):\n    cap.write(text)\n", scope := {"__name__": "qksweep.cluster.placement", "cap": cap})
    exec("def emit(text):\n    cap.write(text)\n", lib := {"__name__": "tqdm.std", "cap": cap})
    lib["emit"]("\r 40%|####")
    scope["emit"]("sweep waiting: no trial has made progress for 11 s")
    scope["emit"]("\n")
    lib["emit"]("done\n")
    # Ray's driver replaces print with tqdm_ray's safe_print: the line is qksweep's, who called it
    exec("def safe_print(text):\n    cap.write(text)\n", ray := {"__name__": "ray.experimental.tqdm_ray", "cap": cap})
    exec("def emit(text):\n    safe_print(text)\n", viaray := {"__name__": "qksweep.cluster.placement",
                                                                  "safe_print": ray["safe_print"]})
    viaray["emit"]("released placement group 1234abcd\n")
    assert got == [("\r 40%|####", "library"), ("sweep waiting: no trial has made progress for 11 s", "qksweep"),
                   ("done", "library"), ("released placement group 1234abcd", "qksweep")]


def test_a_stop_on_the_rung_metric_names_it_and_its_value(tmp_path):
    out = io.StringIO()
    s = Session("s1", num_samples=2, epochs=12, metric="val/top1", mode="max", searched=["optim.lr"],
                scheduler="asha", reduction_factor=3, log_path=tmp_path / "sweep.log", out=out, tty=False,
                show_all=False, rung_metric="val/loss")
    a = trial("a1")
    s.trial_result(a, {"epoch": 2, "val/loss": 2.2903, "val/top1": 0.1142})
    a.last_result = {"epoch": 2, "val/loss": 2.2903, "val/top1": 0.1142}
    s.trial_complete(a)
    s.stop()
    assert out.getvalue().splitlines()[-1] == ("trial a1 stopped by asha at epoch 2/12: not in the best 1/3 of its rung "
                                               "by val/loss (val/loss 2.2903, val/top1 0.1142)")


def test_a_trial_tune_listed_as_pending_first_still_gets_its_started_line(tmp_path):
    """Tune's step-end hands over every trial, pending ones too, before their start event: the row exists
    early, the "started" line must still come (CI once lost it this way)."""
    s, out = make(tmp_path)
    a = trial("a1")
    a.status = "PENDING"
    s.sync([a])
    a.status = "RUNNING"
    s.trial_started(a)
    s.trial_started(a)  # going on with the same values (a retry, PBT's turn): no second line
    a.config = {"optim.lr": 0.01, "model.depth": 2}
    s.trial_started(a)
    assert out.getvalue().splitlines() == ["trial a1 started: optim.lr=0.00123  model.depth=2",
                                           "trial a1 goes on from epoch 0 with optim.lr=0.01  model.depth=2"]
