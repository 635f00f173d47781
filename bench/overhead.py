#!/usr/bin/env python
"""What does the orchestration cost? ``qksweep train`` / a sweep trial against a bare PyTorch loop.

Everything runs on the main job's model, data and batch (``configs/digits_qkformer.yaml``: QKFormer
width 64, T 2, digits at 16x16, batch 64), side by side in one process tree, repeated with the order
alternating, and every figure is a median.

* ``train_overhead_ratio``: steady-state train samples/s of ``qksweep.api.train`` (Ray Train, 1 worker,
  MLflow on, spectra off) ÷ the same samples/s of a bare PyTorch loop (:class:`_common.BareLoop`: the
  same ``build_model``/``build_batches``/optimizer/scheduler, no Ray, MLflow, checkpoints or metric
  sums) run as a plain Python process with the thread count the Ray worker gets (Ray sets
  ``OMP_NUM_THREADS`` to the worker's ``run.cpus_per_worker``, 1 by default; the report probe below
  records what the worker really ran). Samples/s are measured the way ``train_loop`` reports
  ``samples_per_s``: epoch start to the last update, before validation; epoch 1 is left out.
* ``train_overhead_ratio_vs_default_threads``: the same against the bare loop at torch's default
  thread count (all cores: what ``python train.py`` gets). On a shared 2-CPU machine two threads
  are often slower than one for this small model, so this is a secondary figure (not in ``--quick``).
* ``train_overhead_ratio_epoch_wall``: epoch cadence instead of loop throughput: the bare loop's
  train+validation time per epoch ÷ the time between two consecutive ``ray.train.report`` calls of
  the qksweep worker (read from the checkpoint folder names Ray Train stamps at report time), so the
  checkpoint, report, SNN metering and everything else between epochs is included.
* ``sweep_overhead_ratio``: the steady-state samples/s inside a one-trial ``qksweep.api.sweep``
  (scheduler none, MLflow on, spectra at the config's settings) ÷ the same bare loop.
* ``trial_startup_s``: in the one-trial sweep above, at the default launcher (one worker: the trial
  trains in its own Tune process, ``run.launcher: auto`` → ``tune``; ``details.trial_launcher`` says
  which ran), from Tune setting the trial RUNNING (``start_time`` in Tune's experiment state)
  to the end of the trial's first optimizer step. The first step's time is derived: rank 0's first
  report time − epoch 1's ``epoch_time_s`` + one step (epoch 1's train time ÷ its updates). The report
  time is epoch 1's MLflow metric timestamp here (the sweep's end-of-run clean-up deletes all but each
  trial's best and last checkpoint folders, whose stamps ``qksweep train`` uses; see
  ``train_history``; from that clean-up (afb369d, 2026-12-04) until 2026-12-07 this read the last
  kept folder and gave a start-up that ended after the trial had). It over-states the true figure
  by the few milliseconds between the loop's last validation batch and ``report``.
  ``trial_startup_breakdown`` splits it at the trial's MLflow run creation (the trial's process is
  running and has imported qksweep) and adds the time from the ``api.sweep`` call.
* ``report_latency_s``: how long one ``ray.train.report`` blocks the loop, measured inside a tiny
  ``TorchTrainer`` function (1 worker, 1 CPU) that times its own report calls, with a checkpoint of
  the real checkpoint's size and without, for reports back to back and spaced by 0.5 s and 3 s of
  "work", at the health-check interval qksweep sets (0.2 s) and at Ray's default (2.0 s), each in
  its own Ray. The headline is the with-checkpoint figure at 0.2 s, spaced by 0.5 s. (A report puts
  its result into the worker's one-slot queue, which the controller empties once per interval: it
  blocks only while the previous report is still there. Back to back that is one interval; spaced
  by less than the interval, the rest of it; spaced by more, only the checkpoint copy.)
* ``mlflow_log_s_per_epoch``: time of ``MLflowEpochLogger.after_report`` for one epoch (one batch of
  epoch metrics plus one spectral measurement of the model's default targets, against a SQLite
  store), called directly; the first call (run look-ups) is reported apart. It runs in the Train
  controller, not in the worker: it delays the loop only when it takes longer than an epoch.

    python bench/overhead.py --quick        # 3 epochs x 2 repeats (~7 min on 2 CPUs)
    python bench/overhead.py                # 5 epochs x 3 repeats
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (BareLoop, checkpoint_times, trial_checkpoint_dir, emit, load_yaml, log, median, metric_history,  # noqa: E402
                     shutdown_ray, tune_trials, with_overrides)

CONFIG = "digits_qkformer.yaml"
SCRIPT = str(Path(__file__).resolve())


# ------------------------------------------------------------------------------ report latency (in Ray)


def report_probe(config: dict) -> None:
    """Ray Train worker function: times its own ``ray.train.report`` calls. Defined in ``__main__``
    so that cloudpickle ships it by value."""
    import json as _json
    import os as _os
    import tempfile as _tempfile
    import time as _time

    import ray.train
    import torch

    n, work, ckpt_bytes, out_path = config["n"], config["work_s"], config["ckpt_bytes"], config["out"]
    res: dict = {"torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": _os.environ.get("OMP_NUM_THREADS"),
                 "interval_env": _os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"), "latency": {}}
    blob = torch.zeros(max(1, ckpt_bytes // 4), dtype=torch.float32)
    k = 0
    for regime, wait, reps in (("back_to_back", 0.0, n), ("spaced", work, n), ("long", config["long_s"], max(2, n // 2))):
        for with_ckpt in (False, True):
            xs = []
            for _ in range(reps):
                if wait:
                    _time.sleep(wait)
                k += 1
                if with_ckpt:
                    with _tempfile.TemporaryDirectory() as d:
                        torch.save({"w": blob}, _os.path.join(d, "checkpoint.pt"))
                        t = _time.perf_counter()
                        ray.train.report({"i": k}, checkpoint=ray.train.Checkpoint.from_directory(d))
                        xs.append(_time.perf_counter() - t)
                else:
                    t = _time.perf_counter()
                    ray.train.report({"i": k})
                    xs.append(_time.perf_counter() - t)
            res["latency"][f"{regime}_{'checkpoint' if with_ckpt else 'no_checkpoint'}"] = xs
    with open(out_path, "w") as f:
        _json.dump(res, f)


def run_report_probe(interval: str, n: int, work_s: float, ckpt_bytes: int) -> dict:
    """In this process: its own Ray with ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=interval``."""
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = interval
    from qksweep.cluster.connect import RAY_ENV, ensure_ray

    RAY_ENV["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = interval  # the env the controller actor gets
    ensure_ray()  # also sets RAY_TRAIN_V2_ENABLED before ray.train is imported
    import ray.train
    from ray.train.torch import TorchTrainer

    tmp = Path(tempfile.mkdtemp(prefix="qksweep-bench-report-"))
    os.chdir(tmp)
    out = tmp / "latency.json"
    trainer = TorchTrainer(
        report_probe,
        train_loop_config={"n": n, "work_s": work_s, "long_s": 3.0, "ckpt_bytes": ckpt_bytes, "out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name="report-probe", storage_path=str(tmp / "storage"),
                                       logging_config=ray.train.LoggingConfig(log_level="WARNING")),
    )
    t = time.perf_counter()
    trainer.fit()
    res = json.loads(out.read_text())
    res["fit_s"] = time.perf_counter() - t
    res["interval"] = float(interval)
    shutdown_ray()
    shutil.rmtree(tmp, ignore_errors=True)
    return res


def report_latency(n: int, work_s: float, ckpt_bytes: int, timeout: int) -> dict:
    """Each interval in a subprocess of its own (the interval is read when the controller starts)."""
    out: dict = {}
    for interval in ("0.2", "2.0"):
        cmd = [sys.executable, SCRIPT, "--report-probe", interval, "--n", str(n), "--work-s", str(work_s),
               "--ckpt-bytes", str(ckpt_bytes)]
        env = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": interval}
        t = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
            res = last_json(p.stdout)
            if res is None:
                res = {"error": (p.stderr.strip().splitlines() or ["no output"])[-1][:300], "rc": p.returncode}
        except subprocess.TimeoutExpired:
            res = {"error": f"timed out after {timeout}s"}
        res["wall_s"] = time.perf_counter() - t
        out[interval] = res
        log(f"report latency at {interval}s: " + json.dumps({k: round(median(v), 3) for k, v in res.get("latency", {}).items()}))
    return out


def last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


# ------------------------------------------------------------------------------ MLflow logging cost


def mlflow_logging(cfg_dict: dict, tmp: Path, epochs: int) -> dict:
    import torch

    from qksweep.api import resolve
    from qksweep.tracking import runs
    from qksweep.tracking.callback import MLflowEpochLogger
    from qksweep.trainables.checkpoint import rng_state, save_checkpoint
    from qksweep.tracking.lifecycle import run_params
    from qksweep.trainables.extras.spectral import make_monitor

    spectral = {**cfg_dict.get("spectral", {}), "enabled": True}
    cfg = resolve(with_overrides(cfg_dict, spectral=spectral))
    loop = BareLoop(cfg.to_dict())
    monitor = make_monitor(loop.cfg, loop.model, None)
    it = iter(loop.train_batches)
    monitor.monitors[0].measure(0)
    loop.step(*next(it))
    spec = monitor.monitors[0].measure(1)  # a second measurement: the cosines are there too

    uri = f"sqlite:///{tmp / 'mlflow-log.db'}"
    c = runs.client(uri)
    exp = runs.experiment_id(c, "bench-mlflow")
    results = {}
    for variant in ("spectra", "no_spectra", "best_checkpoint"):
        run_id, _ = runs.get_or_create_run(c, exp, {runs.KIND: "train", runs.RUN_NAME: variant}, run_name=variant,
                                           params=run_params(cfg))
        logger = MLflowEpochLogger(uri, run_id, metric="val/top1", mode="max", epochs=epochs, echo=False)
        times = []
        ckpt_dir = None
        if variant == "best_checkpoint":
            ckpt_dir = tmp / "ckpt"
            ckpt_dir.mkdir(exist_ok=True)
            state = {"model": loop.model.state_dict(), "optimizer": loop.optimizer.state_dict(),
                     "scheduler": loop.scheduler.state_dict(), "epoch": 1, "updates": 22, "epochs_planned": epochs,
                     "rng": rng_state(), "metrics": {}}
            save_checkpoint(str(ckpt_dir), state, cfg.to_dict())
        for e in range(1, epochs + 1):
            m = {"epoch": e, "step": 22 * e, "train/loss": 2.0 / e, "train/top1": 0.5 + 0.04 * e, "val/loss": 1.9 / e,
                 "val/top1": 0.5 + 0.04 * e, "val/top5": 0.9, "lr": 1e-3, "samples_per_s": 190.0, "epoch_time_s": 8.0}
            if variant == "spectra":
                m["_spec"] = [(22 * e, spec)]
            ckpt = None
            if ckpt_dir is not None:
                import ray.train

                ckpt = ray.train.Checkpoint.from_directory(str(ckpt_dir))
            t = time.perf_counter()
            logger.after_report(None, [m], ckpt)
            times.append(time.perf_counter() - t)
        results[variant] = {"first_s": times[0], "per_epoch_s": median(times[1:]), "calls": times}
    ckpt_mb = sum(f.stat().st_size for f in (tmp / "ckpt").rglob("*") if f.is_file()) / 1e6
    return {"spectral_metrics_per_measurement": len(spec), "epochs": epochs, "checkpoint_mb": ckpt_mb,
            "measurements_per_epoch": 1, **results}


# ------------------------------------------------------------------------------ Ray runs


def train_history(uri: str, run_id: str, storage_dir: Path) -> dict:
    """Per-epoch samples/s, epoch time and report time. The report times are the checkpoint folders'
    stamps while every epoch's checkpoint is there (``qksweep train`` keeps them all here); a sweep
    keeps only each trial's best and last once it ends, and then they are the MLflow timestamps of
    the epochs' metrics, which a trial in its own process (the default launcher) logs as each report
    persists (within a millisecond of the folder's stamp; on Ray Train the controller logs them, up
    to a health-check interval later)."""
    sps = [v for _, v, _ in metric_history(uri, run_id, "samples_per_s")]
    ept_hist = metric_history(uri, run_id, "epoch_time_s")
    ept = [v for _, v, _ in ept_hist]
    times, source = checkpoint_times(storage_dir), "checkpoint_folders"
    if len(times) < len(ept):
        times, source = [ts / 1000 for _, _, ts in ept_hist], "mlflow_metric_timestamps"
    return {"samples_per_s": sps, "epoch_time_s": ept, "report_times": times, "report_times_source": source}


def steady(xs: list[float]) -> list[float]:
    return xs[1:] if len(xs) > 1 else xs


def periods(times: list[float]) -> list[float]:
    """Seconds between consecutive reports = full epoch periods of epochs 2.. (steady state)."""
    return [b - a for a, b in zip(times, times[1:])]


def first_step_time(h: dict, steps: int) -> float | None:
    if not h["report_times"] or not h["epoch_time_s"] or not h["samples_per_s"]:
        return None
    samples = steps * h["batch"]
    train_s = samples / h["samples_per_s"][0]
    return h["report_times"][0] - h["epoch_time_s"][0] + train_s / steps


def bare_run(cfg: dict, epochs: int) -> dict:
    """The bare loop, in this process (run by :func:`bare_subprocess`)."""
    import torch

    loop = BareLoop(cfg)
    sps, per = [], []
    for _ in range(epochs):
        r = loop.train_epoch()
        t = time.perf_counter()
        loop.validate()
        sps.append(r["samples_per_s"])
        per.append(r["train_s"] + time.perf_counter() - t)
    return {"threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "samples_per_s": sps, "epoch_period_s": per, "steps": len(loop.train_batches)}


def bare_subprocess(cfg: dict, epochs: int, threads: int | None, tmp: Path) -> dict:
    """The bare loop as ``python train.py`` runs it: a fresh process, with ``OMP_NUM_THREADS`` set
    before torch starts exactly as Ray sets it for a worker (``threads``), or unset (torch's default)."""
    cfg_file = tmp / f"bare-{time.time_ns()}.json"
    cfg_file.write_text(json.dumps(cfg))
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    p = subprocess.run([sys.executable, SCRIPT, "--bare-loop", str(cfg_file), "--epochs", str(epochs)],
                       capture_output=True, text=True, env=env, timeout=1200)
    res = last_json(p.stdout)
    if res is None:
        raise RuntimeError(f"bare loop failed: {(p.stderr.strip().splitlines() or ['no output'])[-1]}")
    return res


def task_timeline(since: float, until: float) -> list[dict]:
    """Ray tasks and actor creations that started between ``since`` and ``until`` (wall clock, s),
    from Ray's state API: where a trial's start-up goes (best effort; [] if the API is unavailable)."""
    try:
        from ray.util.state import list_tasks

        from qksweep.cluster.connect import state_api_address

        tasks = list_tasks(address=state_api_address(), detail=True, limit=10000, raise_on_missing_output=False)
    except Exception as e:  # noqa: BLE001
        return [{"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}]
    first: dict[str, dict] = {}
    for t in tasks:
        start = (t.start_time_ms or 0) / 1000
        if not start or start < since - 1 or start > until:
            continue
        name = t.func_or_class_name or t.name
        end = (t.end_time_ms or 0) / 1000 or None
        row = {"name": name, "type": str(t.type), "created_s": ((t.creation_time_ms or 0) / 1000 or start) - since,
               "start_s": start - since, "end_s": (end - since) if end else None}
        if name not in first or row["start_s"] < first[name]["start_s"]:
            first[name] = row
    return sorted(first.values(), key=lambda r: r["start_s"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 epochs x 2 repeats")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--skip-report-latency", action="store_true")
    ap.add_argument("--keep", help="keep storage and MLflow stores in this folder")
    # internal: one report-latency probe / one bare loop in this process
    ap.add_argument("--report-probe", metavar="INTERVAL", help=argparse.SUPPRESS)
    ap.add_argument("--bare-loop", metavar="CONFIG_JSON", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=5, help=argparse.SUPPRESS)
    ap.add_argument("--work-s", type=float, default=0.5, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt-bytes", type=int, default=3_000_000, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.report_probe:
        emit(run_report_probe(args.report_probe, args.n, args.work_s, args.ckpt_bytes))
        return 0
    if args.bare_loop:
        emit(bare_run(json.loads(Path(args.bare_loop).read_text()), args.epochs or 3))
        return 0

    epochs = args.epochs or (3 if args.quick else 5)
    repeats = args.repeats or (2 if args.quick else 3)
    # the default-thread bare loop is a secondary figure (and on a busy 2-vCPU machine a slow one)
    default_repeats = 0 if args.quick else repeats
    tmp = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="qksweep-bench-overhead-"))
    tmp.mkdir(parents=True, exist_ok=True)
    os.chdir(tmp)  # MLflow puts a SQLite store's artifacts under ./mlruns of the working directory
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    base = load_yaml(CONFIG)
    common = dict(optim={"epochs": epochs, "warmup_epochs": min(base["optim"].get("warmup_epochs", 0), epochs - 1)},
                  run={"storage": str(tmp / "results"), "keep_checkpoints": epochs + 1}, tracking={"uri": uri})
    train_cfg = with_overrides(base, spectral={"enabled": False}, **common)
    train_cfg.pop("sweep", None)
    batch = train_cfg["data"]["batch_size"]
    worker_cpus = train_cfg.get("run", {}).get("cpus_per_worker", 1)
    worker_threads = max(1, int(worker_cpus))  # what Ray sets OMP_NUM_THREADS to; the probe reports it

    # 1. MLflow logging cost (no Ray)
    log("mlflow logging ...")
    ml = mlflow_logging(with_overrides(base, **common), tmp, epochs=6 if args.quick else 12)
    ckpt_bytes = int(ml["checkpoint_mb"] * 1e6)

    # 2. qksweep train vs bare loops, alternating
    from mlflow.tracking import MlflowClient

    from qksweep import api
    from qksweep.cluster.connect import ensure_ray

    t = time.perf_counter()
    ensure_ray()
    ray_init_s = time.perf_counter() - t
    bare_same, bare_default, ray_runs = [], [], []
    for r in range(repeats):
        order = ["bare", "ray"] if r % 2 == 0 else ["ray", "bare"]
        for what in order:
            if what == "bare":
                log(f"repeat {r + 1}/{repeats}: bare loop, OMP_NUM_THREADS={worker_threads} (as the Ray worker)")
                bare_same.append(bare_subprocess(train_cfg, epochs, worker_threads, tmp))
                if r < default_repeats:
                    log(f"repeat {r + 1}/{repeats}: bare loop, torch's default threads")
                    bare_default.append(bare_subprocess(train_cfg, epochs, None, tmp))
            else:
                log(f"repeat {r + 1}/{repeats}: qksweep train")
                cfg = with_overrides(train_cfg, run={"name": f"bench-train-{r}"})
                t_call = time.time()
                res = api.train(cfg)
                h = train_history(uri, res.run_id, Path(res.storage_path))
                h["batch"] = batch
                h["call_time"] = t_call
                h["run_start"] = MlflowClient(uri).get_run(res.run_id).info.start_time / 1000
                ray_runs.append(h)
    steps = bare_same[0]["steps"]

    # 3. a one-trial sweep, spectra and MLflow at the config's settings
    log("one-trial sweep ...")
    sweep_cfg = with_overrides(base, **common)
    sweep_cfg["sweep"] = {**sweep_cfg["sweep"], "num_samples": 1, "scheduler": {"name": "none"},
                          "space": {"optim.lr": {"choice": [base["optim"]["lr"]]}}}
    launcher = api.resolve(sweep_cfg).trial_launcher()
    t_call = time.time()
    sres = api.sweep(sweep_cfg, name=f"bench-sweep-{time.strftime('%H%M%S')}")
    trial = tune_trials(Path(sres.storage_path))[0]
    trial_run_start = MlflowClient(uri).get_run(sres.best_run_id).info.start_time / 1000
    sh = train_history(uri, sres.best_run_id, trial_checkpoint_dir(sres.storage_path, sres.name, trial["trial_id"]))
    sh["batch"] = batch
    first = first_step_time(sh, steps)
    tstart = trial.get("start_time")
    timeline = task_timeline(tstart, first) if tstart and first else []
    shutdown_ray()

    # 4. report latency, each interval in its own Ray
    rl = None
    if not args.skip_report_latency:
        log("report latency ...")
        rl = report_latency(n=3 if args.quick else 8, work_s=0.5, ckpt_bytes=ckpt_bytes, timeout=300)
        got = (rl.get("0.2") or {}).get("torch_threads")
        if got and got != worker_threads:
            log(f"note: the Ray worker ran {got} torch threads, not {worker_threads}")

    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)

    # ---------------------------------------------------------------- figures
    bare_s = median(x for b in bare_same for x in steady(b["samples_per_s"]))
    bare_d = median(x for b in bare_default for x in steady(b["samples_per_s"]))
    bare_per_s = median(x for b in bare_same for x in steady(b["epoch_period_s"]))
    bare_per_d = median(x for b in bare_default for x in steady(b["epoch_period_s"]))
    ray_sps = median(x for h in ray_runs for x in steady(h["samples_per_s"]))
    ray_per = median(x for h in ray_runs for x in periods(h["report_times"]))
    ray_ept = median(x for h in ray_runs for x in steady(h["epoch_time_s"]))
    sweep_sps = median(steady(sh["samples_per_s"]))
    sweep_per = median(periods(sh["report_times"]))

    def lat(interval: str, key: str):
        return median(((rl or {}).get(interval) or {}).get("latency", {}).get(key, []))

    train_starts = [f - h["run_start"] for h in ray_runs if (f := first_step_time(h, steps))]
    out = {
        "benchmark": "overhead",
        "train_overhead_ratio": ray_sps / bare_s,
        "train_overhead_ratio_epoch_wall": bare_per_s / ray_per,
        "train_overhead_ratio_vs_default_threads": ray_sps / bare_d,
        "sweep_overhead_ratio": sweep_sps / bare_s,
        "sweep_overhead_ratio_epoch_wall": bare_per_s / sweep_per,
        "trial_startup_s": (first - tstart) if first and tstart else None,
        "report_latency_s": lat("0.2", "spaced_checkpoint"),
        "report_latency_no_checkpoint_s": lat("0.2", "spaced_no_checkpoint"),
        "report_latency_default_ray_s": lat("2.0", "spaced_checkpoint"),
        "mlflow_log_s_per_epoch": ml["spectra"]["per_epoch_s"],
        "details": {
            "config": CONFIG, "epochs": epochs, "repeats": repeats, "default_thread_repeats": default_repeats,
            "steady_epochs": "2..", "batch": batch, "updates_per_epoch": steps, "samples_per_epoch": steps * batch,
            "worker_threads": worker_threads,
            "default_threads": bare_default[0]["threads"] if bare_default else None,
            "bare_samples_per_s": {"same_threads": bare_s, "default_threads": bare_d},
            "bare_epoch_period_s": {"same_threads": bare_per_s, "default_threads": bare_per_d},
            "train_samples_per_s": ray_sps, "train_epoch_period_s": ray_per, "train_epoch_time_s": ray_ept,
            "train_between_epochs_s": ray_per - ray_ept,
            "sweep_samples_per_s": sweep_sps, "sweep_epoch_period_s": sweep_per,
            "train_startup_s": median(train_starts),
            "trial_launcher": launcher,
            "ray_init_s": ray_init_s,
            "trial_startup_breakdown": {
                "sweep_call_to_trial_running_s": (tstart - t_call) if tstart else None,
                "trial_running_to_mlflow_run_s": (trial_run_start - tstart) if tstart else None,
                "mlflow_run_to_first_step_s": (first - trial_run_start) if first else None,
                "sweep_call_to_first_step_s": (first - t_call) if first else None,
                "ray_tasks_from_trial_running": timeline,
            },
            "report_latency_s": {i: {k: median(v) for k, v in (rl or {}).get(i, {}).get("latency", {}).items()}
                                 for i in ("0.2", "2.0")},
            "report_probe": {i: {k: v for k, v in (rl or {}).get(i, {}).items() if k != "latency"}
                             for i in ("0.2", "2.0")},
            "mlflow": {"per_epoch_s": {k: ml[k]["per_epoch_s"] for k in ("spectra", "no_spectra", "best_checkpoint")},
                       "first_call_s": ml["spectra"]["first_s"],
                       "spectral_metrics_per_measurement": ml["spectral_metrics_per_measurement"],
                       "checkpoint_mb": ml["checkpoint_mb"]},
            "raw": {"bare_same_threads": bare_same, "bare_default_threads": bare_default,
                    "train": [{k: v for k, v in h.items() if k != "batch"} for h in ray_runs],
                    "sweep": {k: v for k, v in sh.items() if k != "batch"}, "trial_start_time": tstart},
        },
    }
    emit(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
