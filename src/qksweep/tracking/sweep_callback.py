"""A Tune callback (in the sweep driver) that closes trial runs Tune ended and keeps the parent
run's artifacts current. Trial runs are found by tags, never by an in-memory map, so a restored
sweep continues the same runs."""

from __future__ import annotations

import logging

from ray.tune import Callback

from . import runs

log = logging.getLogger("qksweep.tracking")


class SweepTracker(Callback):
    def __init__(self, tracking_uri: str, experiment: str, sweep: str, parent_run_id: str, *, epochs: int,
                 scheduler: str, optuna_storage: str | None, constraints: dict | None = None):
        self.uri, self.experiment, self.sweep = tracking_uri, experiment, sweep
        self.parent_run_id, self.epochs, self.scheduler = parent_run_id, epochs, scheduler
        self.optuna_storage = optuna_storage
        self.constraints = constraints or {}

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
            c, run_id, status = self._run_id(trial.trial_id)
            if run_id and status == "RUNNING":
                logged = runs.logged_steps(c, run_id, "epoch")
                epoch = max(logged) if logged else 0
                if epoch < self.epochs:
                    decided = int((trial.last_result or {}).get("epoch", epoch))
                    runs.finish_run(c, run_id, "KILLED", {"qksweep.stopped_by": self.scheduler,
                                                          "qksweep.stopped_at_epoch": str(decided)})
                else:
                    runs.finalize_run(self.uri, run_id, (trial.last_result or {}).get("checkpoint_path"))
            if run_id:
                self._mark_constraints(c, run_id, trial.last_result or {})
        except Exception as e:  # noqa: BLE001 - tracking trouble must not stop the sweep
            log.warning("could not close the MLflow run of trial %s: %s", trial.trial_id, runs.mask_secrets(str(e))[:200])
        self.refresh_parent()

    def _mark_constraints(self, c, run_id: str, result: dict) -> None:
        broken = [f"{k}={result[k]:.4g}" for k, b in self.constraints.items()
                  if isinstance(result.get(k), (int, float)) and b.violation(float(result[k])) > 0]
        if broken:
            runs.set_tags(c, run_id, {"qksweep.constraint_violated": ", ".join(broken)})

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        try:
            c, run_id, status = self._run_id(trial.trial_id)
            if run_id and status == "RUNNING":
                err = getattr(trial, "error_msg", None) or "trial errored"
                runs.finish_run(c, run_id, "FAILED", {"qksweep.error": str(err).strip().splitlines()[-1][:500]})
        except Exception as e:  # noqa: BLE001
            log.warning("could not close the MLflow run of trial %s: %s", trial.trial_id, runs.mask_secrets(str(e))[:200])
        self.refresh_parent()

    def refresh_parent(self) -> None:
        """results.csv and Optuna plots on the parent run, kept current as trials end."""
        try:
            from .sweep_plots import write_sweep_artifacts
        except ImportError:
            return
        try:
            study = None
            if self.optuna_storage:
                import optuna

                study = optuna.load_study(study_name="qksweep", storage=self.optuna_storage)
            write_sweep_artifacts(self.uri, self.parent_run_id, study=study)
        except Exception as e:  # noqa: BLE001 - plots are a convenience; never fail the sweep for them
            log.warning("could not refresh the sweep's plots: %s", runs.mask_secrets(str(e))[:200])
