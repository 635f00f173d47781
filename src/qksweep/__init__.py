"""qksweep: sweeps of ViTs and QKFormers on Ray Tune, Optuna and MLflow."""
