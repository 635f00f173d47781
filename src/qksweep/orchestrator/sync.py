"""Keeping a sweep's own files (state file, Optuna study) in step with a bucket ``run.storage``."""

from __future__ import annotations

import logging

from ray.tune import Callback

from ..storage import SweepFiles, _first_line

log = logging.getLogger("qksweep")


class SyncSweepFiles(Callback):
    """Uploads the sweep's working files as trials report (at most every ``min_interval_s``) and at
    once when a trial starts or ends and when the experiment ends. Tune calls the searcher, which writes the
    Optuna study, before its callbacks, so an upload holds the result that triggered it. Pickled with
    Tune's state: a resumed sweep keeps uploading (to the same URI, from this machine's cache)."""

    def __init__(self, files: SweepFiles, min_interval_s: float = 10.0):
        self.files = files
        self.min_interval_s = min_interval_s

    def on_trial_start(self, iteration, trials, trial, **info):
        self._upload(0.0)  # the searcher has just asked Optuna for this trial: keep the bucket's study in step

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._upload(self.min_interval_s)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._upload(0.0)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._upload(0.0)

    def on_experiment_end(self, trials, **info):
        self._upload(0.0)

    def _upload(self, interval: float) -> None:
        try:
            self.files.upload(min_interval_s=interval)
        except Exception as e:  # noqa: BLE001 - a failed upload must not stop the sweep; the next one retries
            log.warning("uploading the sweep state to %s failed: %s", self.files.location, _first_line(e))
