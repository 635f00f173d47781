#!/usr/bin/env python
"""The qksweep benchmark suite: runs every benchmark, merges their JSON, prints ONE JSON object on
its last line and writes it to ``bench/results/<date>-<host>.json`` and ``bench/results/latest.json``.

    python bench/run.py --quick        # the CPU suite, about 30 minutes on 2 CPUs
    python bench/run.py                # longer runs, more repeats
    python bench/run.py --gpu          # GPU images/s (qkformer_10_384, vit_small; eager and compiled): needs CUDA
    python bench/run.py --only spectral_overhead,qkformer_step --quick

Each benchmark runs as a subprocess of this one, one at a time (the figures are side-by-side ratios
measured inside each benchmark; running two at once would disturb both). Progress goes to stderr;
each benchmark's full stdout (Ray's worker logs included) is kept in a temporary folder (``--logs``).

Headline keys (see each script's docstring for how it measures them):

| key | from | goal |
|---|---|---|
| train_overhead_ratio | overhead.py | >= 0.95 |
| sweep_overhead_ratio | overhead.py | >= 0.90 |
| report_latency_s | overhead.py | <= 0.10 s |
| trial_startup_s | overhead.py | <= 3 s |
| mlflow_log_s_per_epoch | overhead.py | (reported) |
| tiny_trial_cpu_s | trial_cpu.py | <= 8 CPU-s |
| loader_vs_timm_ratio | loader.py | >= 1.0 |
| asha_compute_ratio, asha_best_gap | sweep_efficiency.py | >= 3, <= 0.005 |
| spectral_overhead_vit, spectral_overhead_qkformer | spectral_overhead.py | <= 0.02 |
| qkformer_step_s, qkformer_compile_speedup | qkformer_step.py | < 2.5 s, >= 1.5 |
| peer_optuna_wall_ratio, peer_raytune_wall_ratio | peers.py | <= 1.2, <= 1.0 |
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import clean, emit, log, machine_info, versions  # noqa: E402

# name -> (script, args for --quick, args for the full run, timeout s quick, timeout s full)
SUITE = {
    "spectral_overhead": ("spectral_overhead.py", ["--quick"], [], 420, 1800),
    "qkformer_step": ("qkformer_step.py", ["--quick"], [], 600, 2700),
    "overhead": ("overhead.py", ["--quick"], [], 720, 2400),
    "trial_cpu": ("trial_cpu.py", ["--quick"], [], 420, 900),
    "loader": ("loader.py", ["--quick"], [], 300, 900),
    "sweep_efficiency": ("sweep_efficiency.py", ["--quick"], [], 900, 5400),
    "peers": ("peers.py", ["--quick"], [], 900, 5400),
}
SMOKE = {"spectral_overhead": ("spectral_overhead.py", ["--smoke"], [], 300, 300)}
GPU = {"gpu_throughput": ("gpu_throughput.py", [], [], 1800, 3600)}

HEADLINE = [
    "train_overhead_ratio", "sweep_overhead_ratio", "report_latency_s", "trial_startup_s", "mlflow_log_s_per_epoch",
    "asha_compute_ratio", "asha_best_gap", "spectral_overhead_vit", "spectral_overhead_qkformer", "spectral_overhead",
    "qkformer_step_s", "qkformer_compile_speedup", "peer_optuna_wall_ratio", "peer_raytune_wall_ratio",
    "tiny_trial_cpu_s", "loader_vs_timm_ratio",
    # secondary figures that explain the headline ones
    "train_overhead_ratio_epoch_wall", "train_overhead_ratio_vs_default_threads", "sweep_overhead_ratio_epoch_wall",
    "report_latency_no_checkpoint_s", "report_latency_default_ray_s",
    "asha_epoch_ratio", "asha_epoch_ratio_ideal", "asha_epoch_seconds_ratio", "trial_overhead_s", "asha_best", "random_best",
    "spectral_overhead_vit_loop", "spectral_overhead_qkformer_loop",
    "qkformer_step_s_by_threads", "qkformer_channels_last_speedup", "qkformer_compiled_step_s", "qkformer_compile_s",
    "qkformer_compile_error", "qkformer_compile_max_abs_diff",
    "qkformer_bf16_speedup", "qkformer_bf16_step_s", "qkformer_bf16_logit_max_abs_diff", "qkformer_step_gflop",
    "qkformer_step_gflops",
    "tiny_trial_cpu_s_processes", "tiny_trial_bare_cpu_s", "ray_start_cpu_s",
    "loader_qksweep_img_s_per_worker", "loader_timm_img_s_per_worker", "loader_workers",
]

GOALS = {  # key: (comparison, threshold)
    "train_overhead_ratio": (">=", 0.95),
    "sweep_overhead_ratio": (">=", 0.90),
    "report_latency_s": ("<=", 0.10),
    "trial_startup_s": ("<=", 3.0),
    "tiny_trial_cpu_s": ("<=", 8.0),
    "loader_vs_timm_ratio": (">=", 1.0),
    "asha_compute_ratio": (">=", 3.0),
    "asha_best_gap": ("<=", 0.005),
    "spectral_overhead_vit": ("<=", 0.02),
    "spectral_overhead_qkformer": ("<=", 0.02),
    "qkformer_step_s": ("<", 2.5),
    "qkformer_compile_speedup": (">=", 1.5),
}


def last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def run_one(name: str, script: str, extra: list[str], timeout: int, logs: Path | None) -> tuple[dict, float]:
    cmd = [sys.executable, str(HERE / script), *extra]
    log(f"== {name}: {' '.join(cmd[1:])} (timeout {timeout}s)")
    t = time.perf_counter()
    stdout = ""
    # stderr streams through (progress); stdout is captured for the JSON line and kept as a log. Its own
    # session: on a timeout the whole group goes, including the local Ray the benchmark started.
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=HERE.parent, start_new_session=True)
    try:
        stdout, _ = p.communicate(timeout=timeout)
        rc = p.returncode
        res = last_json(stdout)
        if res is None:
            res = {"error": f"{script} exited {rc} without a JSON line"}
        elif rc != 0:
            res.setdefault("error", f"{script} exited {rc}")
    except subprocess.TimeoutExpired:
        stop_group(p)
        stdout, _ = p.communicate()
        res = {"error": f"{script} ran past {timeout}s"}
    took = time.perf_counter() - t
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)
        (logs / f"{name}.log").write_text(stdout)
    log(f"== {name}: {took:.0f}s" + (f"  ERROR {res['error']}" if "error" in res else ""))
    return res, took


def stop_group(p: subprocess.Popen) -> None:
    """SIGTERM the benchmark's process group (Ray shuts down on it), then SIGKILL what is left."""
    import signal

    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=wait)
            if sig == signal.SIGTERM:
                time.sleep(2)  # give Ray's own processes a moment to follow
        except subprocess.TimeoutExpired:
            continue


def goal_table(figures: dict) -> dict:
    out = {}
    for k, (op, thr) in GOALS.items():
        v = figures.get(k)
        met = None
        if isinstance(v, (int, float)):
            met = {">=": v >= thr, "<=": v <= thr, "<": v < thr}[op]
        out[k] = {"value": v, "goal": f"{op} {thr}", "met": met}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the quick CPU suite (about 30 min on 2 CPUs)")
    ap.add_argument("--gpu", action="store_true", help="the GPU benchmarks instead of the CPU suite (needs CUDA)")
    ap.add_argument("--smoke", action="store_true", help="only spectral_overhead --smoke (seconds; for tests)")
    ap.add_argument("--only", help="comma list of benchmarks: " + ", ".join(SUITE))
    ap.add_argument("--logs", help="folder for each benchmark's full stdout (default: a new temporary folder)")
    ap.add_argument("--results-dir", help="where to write the JSON (default bench/results; --smoke writes only here)")
    args = ap.parse_args(argv)

    if args.gpu:
        try:
            import torch

            cuda = torch.cuda.is_available()
        except ImportError:
            cuda = False
        if not cuda:
            msg = ("bench/run.py --gpu: no CUDA device on this machine, so the GPU benchmarks cannot run. "
                   "Run it where `torch.cuda.is_available()` is true; the CPU suite is `python bench/run.py --quick`.")
            log(msg)
            emit({"error": msg, "gpu": False})
            return 2
        suite = GPU
    elif args.smoke:
        suite = SMOKE
    else:
        suite = SUITE
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in suite]
        if unknown:
            log(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(suite)}")
            return 2
        suite = {n: suite[n] for n in names}

    mode = "gpu" if args.gpu else "smoke" if args.smoke else "quick" if args.quick else "full"
    write_dir = Path(args.results_dir).resolve() if args.results_dir else (None if args.smoke else HERE / "results")
    stamp = time.strftime("%Y-%m-%d-%H%M%S")
    info = machine_info()
    host = info["host"]
    logs = Path(args.logs).resolve() if args.logs else Path(tempfile.mkdtemp(prefix=f"qksweep-bench-{stamp}-"))
    log(f"each benchmark's stdout (Ray worker logs included) goes to {logs}/<name>.log")

    t0 = time.perf_counter()
    benchmarks, runtimes = {}, {}
    for name, (script, quick_args, full_args, t_quick, t_full) in suite.items():
        extra = quick_args if (args.quick or args.smoke or args.gpu) else full_args
        if args.gpu and args.quick:
            extra = ["--quick"]
        res, took = run_one(name, script, extra, t_quick if (args.quick or args.smoke) else t_full, logs)
        benchmarks[name] = res
        runtimes[name] = round(took, 1)

    figures = {}
    for name, res in benchmarks.items():
        for k, v in res.items():
            if k in HEADLINE or k.startswith("gpu_"):
                figures[k] = v
    errors = {n: r["error"] for n, r in benchmarks.items() if "error" in r}
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "mode": mode,
        "machine": info,
        "versions": versions(),
        "total_runtime_s": round(time.perf_counter() - t0, 1),
        "runtime_s": runtimes,
        **figures,
        "goals": goal_table(figures) if not args.gpu else {},
        "errors": errors,
        "benchmarks": benchmarks,
    }
    if write_dir is not None:
        write_dir.mkdir(parents=True, exist_ok=True)
        suffix = "-gpu" if args.gpu else ""
        text = json.dumps(clean(result), indent=1) + "\n"
        (write_dir / f"{stamp}-{host}{suffix}.json").write_text(text)
        (write_dir / f"latest{suffix}.json").write_text(text)
        log(f"wrote {write_dir / f'{stamp}-{host}{suffix}.json'} and latest{suffix}.json")
    emit(result)
    return 1 if errors and len(errors) == len(benchmarks) else 0


if __name__ == "__main__":
    sys.exit(main())
