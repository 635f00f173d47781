"""The Train→Tune report bridge, in a module of its own that imports nothing heavy: Ray pickles the
callback into the Train run's context, so the controller and every worker import this module when
they start (importing :mod:`qksweep.trainables.trial` there would load the config schema, MLflow and
the search spaces in each of them)."""

from __future__ import annotations

from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback


def tune_result(static: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """What Tune sees of an epoch: the public metrics (no ``_``-keys: per-update spectra go to MLflow
    only), the trial's static figures, and ``stopped_by`` when a rule of the loop ended the trial (the
    searcher tells Optuna a dead network, ``firing_rate``, as infeasible)."""
    out = {**static, **{k: v for k, v in metrics.items() if not k.startswith("_")}}
    if metrics.get("_stopped_by"):
        out["stopped_by"] = str(metrics["_stopped_by"])
    return out


class PublicTuneReport(TuneReportCallback):
    """TuneReportCallback without the private ``_``-keys (per-update spectra go to MLflow only), plus
    the trial's static figures (``params_m``, ``act_mem_gb`` when constrained) in every result, so
    that the searcher can tell Optuna a launched trial's constraint values."""

    def __init__(self, static: dict[str, Any] | None = None):
        super().__init__()
        self.static = dict(static or {})

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        clean = [tune_result(self.static, m) for m in metrics]
        super().after_report(run_context, clean, checkpoint)


class LastReportGuard:
    """Keeps a trial on Ray Train from deadlocking on its last epoch (Ray 2.60, seen in a 6-trial sweep here).

    The Train controller's ``TuneReportCallback`` puts each epoch into the trial's one-slot inter-actor
    queue; the trial actor's main thread takes it from there and puts it into its own one-slot result
    queue, which only that main thread empties. When ``trainer.fit()`` returns, the trial function
    returns too, and Tune's wrapper reports ``RESULT_DUPLICATE`` into that result queue. If the last
    epoch still sat in the inter-actor queue then, the main thread later took it and blocked for good
    putting it behind ``RESULT_DUPLICATE`` (py-spy: ``_get_result_from_queues`` → ``report`` →
    ``Queue.put``), and the sweep waited forever for that trial.

    :meth:`drain`, called after ``fit()``, waits until the main thread has taken the last epoch and
    finished passing it on (its ``_get_result_from_queues`` call is over), so the function returns only
    then. After ``fit()`` no new epoch can arrive: the controller's callbacks ran before it returned."""

    def __init__(self):
        import threading

        from ray.train._internal.session import get_session

        self.session = get_session()
        self.busy = False
        self.calls = 0
        self.changed = threading.Condition()
        fetch = self.session._get_result_from_queues

        def guarded(block: bool):
            with self.changed:
                self.busy = True
            try:
                return fetch(block)
            finally:
                with self.changed:
                    self.busy = False
                    self.calls += 1
                    self.changed.notify_all()

        self.session._get_result_from_queues = guarded

    def drain(self, timeout_s: float = 120.0) -> None:
        import time

        deadline = time.monotonic() + timeout_s
        queue = self.session._inter_actor_queue
        while queue is not None and not queue.empty() and time.monotonic() < deadline:
            time.sleep(0.05)
        with self.changed:  # a call that took the last epoch is over once busy is clear or calls moved on
            seen = self.calls
            self.changed.wait_for(lambda: not self.busy or self.calls > seen,
                                  timeout=max(0.0, deadline - time.monotonic()))


def tune_keeps_train_checkpoints() -> None:
    """Population-based training on Ray Train: Tune must hold each trial's checkpoints to hand one to another
    trial, but ``TuneReportCallback`` passes only the metrics and the checkpoint's path. This gives each
    epoch's result, in the trial actor, the Train checkpoint at that path (not copied: it stays in the Train
    run's folder; under PBT neither Tune nor Train deletes checkpoints before the sweep ends)."""
    from ray.train import Checkpoint
    from ray.train._internal.session import get_session
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

    s = get_session()
    hand_over, fs = s._report_training_result, s.storage.storage_filesystem

    def with_checkpoint(result) -> None:
        path = result.metrics.get(CHECKPOINT_PATH_KEY)
        if path and result.checkpoint is None:
            result.checkpoint = Checkpoint(path, filesystem=fs)
        hand_over(result)

    s._report_training_result = with_checkpoint
