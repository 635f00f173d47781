"""Names that several layers share (imports nothing, so any layer may import it)."""

from __future__ import annotations

# The folder of a reported checkpoint that holds what the run publishes at its end (spectral plots, the
# best pruned checkpoint): not part of the model, so checkpoint uploads leave it out.
PUBLISH_DIR = "_publish"

# Metric names. The loop and its extras report them, the sweep checks `sweep.metric` against them, the
# console line and the learning-curve plots show them.
EPOCH, STEP = "epoch", "step"
TRAIN_LOSS, TRAIN_TOP1 = "train/loss", "train/top1"
VAL_LOSS, VAL_TOP1, VAL_TOP5 = "val/loss", "val/top1", "val/top5"
LR, SAMPLES_PER_S, EPOCH_TIME_S = "lr", "samples_per_s", "epoch_time_s"
VAL_EMA_LOSS, VAL_EMA_TOP1, VAL_EMA_TOP5 = "val_ema/loss", "val_ema/top1", "val_ema/top5"
SNN_ENERGY_MJ, SNN_SOPS, SNN_FIRING_RATE = "snn/energy_mj", "snn/sops", "snn/firing_rate"

# in each Tune result of a sweep trial: its MLflow run, which the searcher records on the Optuna trial
MLFLOW_RUN_ID = "mlflow_run_id"

# every epoch's metrics a sweep may rank or stop on (per-layer and spectral families aside)
REPORTED_METRICS = (EPOCH, STEP, TRAIN_LOSS, TRAIN_TOP1, VAL_LOSS, VAL_TOP1, VAL_TOP5, LR, SAMPLES_PER_S, EPOCH_TIME_S,
                    VAL_EMA_LOSS, VAL_EMA_TOP1, VAL_EMA_TOP5, SNN_ENERGY_MJ, SNN_SOPS, SNN_FIRING_RATE)
# the direction in which each metric is better (a scheduler ranking on it needs no mode)
METRIC_MODES = {TRAIN_LOSS: "min", TRAIN_TOP1: "max", VAL_LOSS: "min", VAL_TOP1: "max", VAL_TOP5: "max",
                VAL_EMA_LOSS: "min", VAL_EMA_TOP1: "max", VAL_EMA_TOP5: "max", SAMPLES_PER_S: "max",
                EPOCH_TIME_S: "min", SNN_ENERGY_MJ: "min", SNN_SOPS: "min"}
# what the one-line console report of an epoch shows, in order
CONSOLE_METRICS = (TRAIN_LOSS, TRAIN_TOP1, VAL_LOSS, VAL_TOP1, VAL_TOP5, LR, SAMPLES_PER_S)
# the learning-curve plot's panels: (title, metrics)
CURVES = (("loss", (TRAIN_LOSS, VAL_LOSS)), ("top-1", (TRAIN_TOP1, VAL_TOP1, VAL_EMA_TOP1)), ("lr", (LR,)))
