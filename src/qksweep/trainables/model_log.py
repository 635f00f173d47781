"""``tracking.log_model``: a run that trains to its last epoch logs its best checkpoint as an MLflow model
(``tools/mlflow_model.py``), so MLflow's UI and ``search_logged_models`` show it and ``qksweep best
--register`` registers it without logging it again.

It is logged by the epoch logger once the last epoch is in MLflow, in the process that logs epochs (the
trial's own, or the Train controller), before Tune hears of that epoch: ASHA stops a trial that reached
``max_t`` as soon as it does, so nothing after the trial's last report can be counted on to run. Trials
stopped early (ASHA, a stop rule, a budget) get theirs from the sweep driver once the sweep is over
(``orchestrator/sweep.py``'s ``_log_missing_models``)."""

from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass
class LogRunModel:
    """The epoch logger's ``on_last_epoch`` (picklable: it travels to the Train controller)."""

    uri: str
    run_id: str
    label: str = ""

    def __call__(self) -> None:
        from ..tools.mlflow_model import log_model, logged_model
        from ..tracking.runs import first_line, mask_secrets

        try:
            if logged_model(self.uri, self.run_id) is None:  # a restarted run may report its last epoch again
                log_model(self.uri, self.run_id)
        except Exception as e:  # noqa: BLE001 - the trained run matters more than its model entry
            print(f"{self.label}the MLflow model of run {self.run_id} was not logged ({mask_secrets(first_line(e))}); "
                  "`qksweep best SWEEP --register NAME` logs it when it registers it", file=sys.stderr, flush=True)


def on_last_epoch(cfg, run_id: str | None, label: str = ""):
    """What the epoch logger calls after the last epoch: the model logging, or None when it is off."""
    if not run_id or not cfg.tracking.enabled or not cfg.tracking.log_model:
        return None
    return LogRunModel(cfg.tracking.uri, run_id, label)
