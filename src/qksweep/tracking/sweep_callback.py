"""A Tune callback (in the sweep driver) that closes trial runs Tune ended and keeps the parent
run's artifacts current. Trial runs are found by tags, never by an in-memory map, so a restored
sweep continues the same runs."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from ray.tune import Callback

from . import finalize, pending, runs

log = logging.getLogger("qksweep.tracking")


def error_line(trial) -> str:
    """The line that names what ended an errored Tune trial (the exception at the end of the traceback
    Tune stores with it), or ``trial errored`` when Tune kept none."""
    text = None
    try:  # Tune writes the error file in the trial's local folder first and syncs it to storage later
        local = getattr(trial, "error_file", None)
        text = Path(local).read_text() if local and Path(local).is_file() else trial.get_error()
    except Exception:  # noqa: BLE001 - the trial's folder may be remote or gone: say what is known
        pass
    lines = [ln.strip() for ln in str(text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else "trial errored"


class SweepTracker(Callback):
    # results.csv and the Optuna plots (PNG + HTML, fANOVA importances) cost the driver seconds of CPU
    # that the trials share: redraw them at most this often while the sweep runs (the end always does)
    REFRESH_EVERY_S = float(os.environ.get("QKSWEEP_SWEEP_PLOTS_EVERY_S", "60"))

    def __init__(self, tracking_uri: str, experiment: str, sweep: str, parent_run_id: str, *, epochs: int,
                 scheduler: str, optuna_storage: str | None, constraints: dict | None = None):
        self.uri, self.experiment, self.sweep = tracking_uri, experiment, sweep
        self.parent_run_id, self.epochs, self.scheduler = parent_run_id, epochs, scheduler
        self.optuna_storage = optuna_storage
        self.constraints = constraints or {}
        self._refreshed_at: float | None = None

    def _trial_dir(self, trial) -> str | None:
        # run.storage: each trial's Train run (and its MLflow pending file) is in there
        root = getattr(getattr(trial, "storage", None), "storage_path", None)
        if not root:
            return None
        from ..storage import join, trial_storage

        return join(trial_storage(str(root), self.sweep, trial.trial_id), f"{self.sweep}-{trial.trial_id}")

    def _flush_pending(self, trial) -> None:
        """Epochs a trial's controller could not send (its driver may have been stopped before it could)."""
        d = self._trial_dir(trial)
        if d:
            pending.flush_file(pending.pending_path(d), pending.epoch_wait_s())

    def _keep_close(self, trial, status: str, tags: dict[str, str], err: Exception) -> None:
        """MLflow is away: the run is closed later, by `qksweep flush` or `qksweep resume`."""
        d = self._trial_dir(trial)
        if not d:
            return
        lookup = {runs.KIND: "trial", runs.SWEEP: self.sweep, runs.TRIAL: trial.trial_id}
        rec = pending.close_record(self.uri, None, status, tags=tags, experiment=self.experiment, lookup=lookup,
                                   epochs=self.epochs, scheduler=self.scheduler, if_running=True,
                                   checkpoint=(trial.last_result or {}).get("checkpoint_path"))
        path = pending.keep(d, [rec])
        log.warning("MLflow did not answer (%s): closing trial %s's run is kept in %s; `qksweep flush %s` does it "
                    "when the server is back", runs.mask_secrets(str(err).splitlines()[0][:160]), trial.trial_id,
                    path, path)

    def _run_id(self, trial_id: str) -> tuple[object, str | None, str | None]:
        c = runs.client(self.uri)
        exp = runs.experiment_id(c, self.experiment)
        run = runs.find_run(c, exp, {runs.KIND: "trial", runs.SWEEP: self.sweep, runs.TRIAL: trial_id})
        return c, (run.info.run_id if run else None), (run.info.status if run else None)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        """A trial that Tune ended. The scheduler also stops trials that reached max_t, before their
        driver wraps up, so a run still RUNNING is finished here: KILLED when it stopped short of the
        budget, otherwise FINISHED with its last checkpoint and plots, as the driver would have."""
        try:
            self._flush_pending(trial)
            c, run_id, status = self._run_id(trial.trial_id)
            if run_id and status == "RUNNING":
                logged = runs.logged_steps(c, run_id, "epoch")
                epoch = max(logged) if logged else 0
                if epoch < self.epochs:
                    decided = int((trial.last_result or {}).get("epoch", epoch))
                    runs.finish_run(c, run_id, "KILLED", {"qksweep.stopped_by": self.scheduler,
                                                          "qksweep.stopped_at_epoch": str(decided)})
                else:
                    finalize.finalize_run(self.uri, run_id, (trial.last_result or {}).get("checkpoint_path"))
            if run_id:
                self._mark_constraints(c, run_id, trial.last_result or {})
        except Exception as e:  # noqa: BLE001 - tracking trouble must not stop the sweep
            decided = str(int((trial.last_result or {}).get("epoch", 0)))
            self._keep_close(trial, "auto", {"qksweep.stopped_at_epoch": decided}, e)
        self.refresh_parent()

    def _mark_constraints(self, c, run_id: str, result: dict) -> None:
        broken = [f"{k}={result[k]:.4g}" for k, b in self.constraints.items()
                  if isinstance(result.get(k), (int, float)) and b.violation(float(result[k])) > 0]
        if broken:
            runs.set_tags(c, run_id, {"qksweep.constraint_violated": ", ".join(broken)})

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        tags = {"qksweep.error": error_line(trial)[:500]}
        try:
            self._flush_pending(trial)
            c, run_id, status = self._run_id(trial.trial_id)
            if run_id and status == "RUNNING":
                runs.finish_run(c, run_id, "FAILED", tags)
        except Exception as e:  # noqa: BLE001 - tracking trouble must not stop the sweep
            self._keep_close(trial, "FAILED", tags, e)
        self.refresh_parent()

    def refresh_parent(self) -> None:
        """results.csv and Optuna plots on the parent run, kept current as trials end (at most every
        ``REFRESH_EVERY_S``; :func:`close_parent_run` draws the final ones)."""
        now = time.monotonic()
        if self._refreshed_at is not None and now - self._refreshed_at < self.REFRESH_EVERY_S:
            return
        self._refreshed_at = now
        try:
            from .sweep_plots import write_sweep_artifacts
        except ImportError:
            return
        try:
            study = None
            if self.optuna_storage:
                import optuna

                study = optuna.load_study(study_name=None, storage=self.optuna_storage)
            write_sweep_artifacts(self.uri, self.parent_run_id, study=study)
        except Exception as e:  # noqa: BLE001 - plots are a convenience; never fail the sweep for them
            log.warning("could not refresh the sweep's plots: %s", runs.mask_secrets(str(e))[:200])


def close_parent_run(uri: str, parent_run_id: str, sweep_dir: str, *, name: str, study, ok: bool,
                     best_metrics: dict[str, float], tags: dict[str, str]) -> bool:
    """The end of a sweep: plots and results on the parent run, its ``best/*`` metrics, then FINISHED
    (FAILED when no trial finished). If MLflow is away, the metrics and the closing wait in the sweep
    folder's pending file (named on stderr) and the sweep still ends normally."""
    try:
        from .sweep_plots import write_sweep_artifacts

        write_sweep_artifacts(uri, parent_run_id, study=study)
    except ImportError:
        pass
    except Exception as e:  # noqa: BLE001 - plots are a convenience; `qksweep flush` does not redo them
        log.warning("could not write the sweep's plots to MLflow: %s", runs.mask_secrets(str(e).splitlines()[0][:200]))
    from .lifecycle import TrackedRun, close_run

    best = [pending.metrics_record(uri, parent_run_id, {f"best/{k}": v for k, v in best_metrics.items()}, 0)] if best_metrics else []
    return close_run(TrackedRun(uri, parent_run_id, sweep_dir, False), "FINISHED" if ok else "FAILED", records=best,
                     tags=tags, finalize=False, resume_hint=f"qksweep resume {name}")
