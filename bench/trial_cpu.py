#!/usr/bin/env python
"""What does one tiny sweep trial cost in CPU seconds, everything included?

Ray's processes (the raylet, the GCS, the trial processes it starts) are not children a timer such as
``/usr/bin/time`` waits for, so the figure is taken system-wide: the busy jiffies of ``/proc/stat``
(user + nice + system + irq + softirq, all CPUs) over the sweep, minus what the machine burns idle.

1. **Idle baseline**: busy CPU seconds per second over ``--baseline-s`` seconds before anything starts
   (no Ray; whatever else shares the machine is in it).
2. **Ray start**: ``ensure_ray()`` (a local Ray, as ``qksweep sweep`` starts it) and a few seconds to
   settle, reported apart (``ray_start_cpu_s``): it is paid once per sweep, not per trial.
3. **The sweep**: ``qksweep.api.sweep`` of ``--trials`` tiny trials (``tests/conftest.py``'s
   ``tiny_config``: QKFormer 32 wide, depth 2, T 1 on digits 8x8, batch 64, 2 epochs; MLflow in SQLite
   without model logging, spectra off), the default launcher (a one-worker trial trains in its own
   process) and trial-process reuse, Optuna TPE over ``optim.lr``, no early stopping (every trial trains
   both epochs, so each does the same work), as many at a time as Ray has CPUs.

``tiny_trial_cpu_s`` = (busy CPU seconds during the ``api.sweep`` call − idle rate × its wall time) ÷
trials. Goal <= 8. The idle rate is the median of 1-second slices of the baseline. The sweep's fixed
costs (Tune's controller in this process, the parent MLflow run, starting the trial processes,
Optuna) are spread over the trials; Ray's start is not.

Per process (``details.by_process``): this process and every process under it (Ray's daemons and
workers are its descendants when it starts Ray) are sampled with psutil every ``--sample-s`` seconds;
each one's CPU time (user + system) at its last sample, minus its time when the sweep started, is added
to its title (``ray::ImplicitFunc`` for a trial process, ``raylet``, ``gcs_server``, Ray's dashboard
scripts, ``driver`` for this process less the sampler thread). A process that ends between two samples
loses its last interval; ``unattributed_cpu_s`` is the system figure less the idle share and the
processes' sum (other work on the machine, short-lived processes, the sampler).
``tiny_trial_cpu_s_processes`` is that sum ÷ trials: on a shared machine, where other work changes
between the baseline and the sweep, it is the figure to read; ``machine_quiet`` is false when the
idle rate was above 5 % of the CPUs or the two differ by more than 15 %.

For scale, ``tiny_trial_bare_cpu_s`` is the CPU time of the same two epochs (data, model, train,
validate) in a plain warm Python loop (``_common.BareLoop``), and ``bare_process_cpu_s`` that of a
fresh process doing it, imports included.

    python bench/trial_cpu.py --quick        # 8 trials, 20 s baseline: about 2 min on 2 CPUs
    python bench/trial_cpu.py                # 16 trials, 30 s baseline
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, log, median, shutdown_ray, tune_trials  # noqa: E402

SCRIPT = str(Path(__file__).resolve())
TICK = os.sysconf("SC_CLK_TCK")


def tiny_config(tmp: Path, trials: int) -> dict:
    """``tests/conftest.py``'s ``tiny_config`` as a sweep of ``trials`` trials without early stopping."""
    return {
        "experiment": "bench-trial-cpu",
        "model": {"name": "qkformer_cifar", "embed_dim": 32, "num_heads": 2, "depth": 2, "mlp_ratio": 2,
                  "time_steps": 1},
        "data": {"name": "digits", "img_size": 8, "batch_size": 64},
        "optim": {"epochs": 2, "warmup_epochs": 0, "lr": 3e-3},
        "run": {"workers": 1, "seed": 1, "storage": str(tmp / "results"), "max_failures": 2},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "log_model": False},
        "spectral": {"enabled": False},
        "sweep": {"num_samples": trials, "scheduler": {"name": "none"},
                  "searcher": {"name": "optuna", "sampler": "tpe", "seed": 0},
                  "space": {"optim.lr": {"loguniform": [1e-3, 6e-3]}}},
    }


# ------------------------------------------------------------------------------ system CPU


def busy_s() -> float:
    """Busy CPU seconds of the whole machine since boot: user + nice + system + irq + softirq."""
    with open("/proc/stat") as f:
        parts = f.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in parts[1:8])
    return (user + nice + system + irq + softirq) / TICK


def idle_rates(seconds: float, slice_s: float = 1.0) -> list[float]:
    """Busy CPU-s per second in consecutive slices: their median is the idle rate, so that a burst
    (the Ray of the job before this one still exiting, say) does not set it."""
    rates = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        b0, t0 = busy_s(), time.perf_counter()
        time.sleep(slice_s)
        rates.append((busy_s() - b0) / (time.perf_counter() - t0))
    return rates


# ------------------------------------------------------------------------------ per process


def label(p) -> str:
    """A process's title: Ray's ``ray::Class`` (method dropped), a binary's name, a Python script's or
    module's name."""
    import psutil

    try:
        cmd = p.cmdline()
    except psutil.Error:
        return "?"
    if not cmd:
        return p.name() if p.is_running() else "?"
    first = cmd[0].split()[0] if cmd[0] else ""
    if first.startswith("ray::"):
        return first.split(".")[0]
    base = os.path.basename(first)
    if "python" in base:
        for i, a in enumerate(cmd[1:], 1):
            if a == "-m" and i + 1 < len(cmd):
                return cmd[i + 1]
            if a.endswith(".py"):
                return os.path.basename(a)
        return base
    return base


class Sampler(threading.Thread):
    """Samples this process and its descendants: per pid the latest title and CPU seconds."""

    def __init__(self, every: float):
        super().__init__(daemon=True)
        import psutil

        self.every = every
        self.me = psutil.Process()
        self.stop = threading.Event()
        self.start_cpu: dict[tuple[int, float], float] = {}  # (pid, create_time) -> CPU s at window start
        self.last: dict[tuple[int, float], tuple[str, float]] = {}
        self.thread_cpu = 0.0
        self.samples = 0
        self._sample(into_start=True)

    def _sample(self, into_start: bool = False) -> None:
        import psutil

        for p in [self.me, *self.me.children(recursive=True)]:
            try:
                with p.oneshot():
                    key = (p.pid, p.create_time())
                    t = p.cpu_times()
                    cpu = t.user + t.system
                    title = "driver" if p.pid == self.me.pid else label(p)
            except psutil.Error:
                continue
            if into_start:
                self.start_cpu[key] = cpu
            prev = self.last.get(key)
            if prev and title in ("ray::IDLE", "?") and prev[0] != "ray::IDLE":
                # a reused trial process between trials keeps its trial title, an exiting one (its
                # command line gone) the title it had
                title = prev[0]
            self.last[key] = (title, cpu)
        self.samples += 1

    def run(self) -> None:
        t0 = time.thread_time()
        while not self.stop.wait(self.every):
            self._sample()
        self._sample()
        self.thread_cpu = time.thread_time() - t0

    def by_title(self) -> dict[str, dict]:
        out: dict[str, dict] = defaultdict(lambda: {"cpu_s": 0.0, "processes": 0})
        titles = {t for t, _ in self.last.values()}
        # Ray's title can be cut to the length of the process's original argv ("ray::ImplicitFu")
        full = {t: max((u for u in titles if u.startswith(t)), key=len) for t in titles if t.startswith("ray::")}
        for key, (title, cpu) in self.last.items():
            title = full.get(title, title)
            d = cpu - self.start_cpu.get(key, 0.0)
            if title == "driver":
                d -= self.thread_cpu
            out[title]["cpu_s"] += d
            out[title]["processes"] += 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1]["cpu_s"]))


# ------------------------------------------------------------------------------ bare loop (a child)


def bare(cfg: dict) -> dict:
    """In a fresh process: CPU seconds of the imports and of the trial's two epochs, done plainly."""
    t_imp = time.process_time()
    import spikingjelly.activation_based  # noqa: F401
    import timm  # noqa: F401
    import torch

    import qksweep.trainables.core  # noqa: F401
    from _common import BareLoop

    built0 = time.process_time()
    loop = BareLoop(cfg)
    built = time.process_time()
    for _ in range(cfg["optim"]["epochs"]):
        loop.train_epoch()
        loop.validate()
    done = time.process_time()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"imports_cpu_s": built0 - t_imp, "build_cpu_s": built - built0, "epochs_cpu_s": done - built,
            "process_cpu_s": ru.ru_utime + ru.ru_stime, "torch_threads": torch.get_num_threads()}


def bare_subprocess(cfg: dict, tmp: Path) -> dict:
    f = tmp / "bare.json"
    f.write_text(json.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # what Ray gives a 1-CPU trial process
    p = subprocess.run([sys.executable, SCRIPT, "--bare", str(f)], capture_output=True, text=True, env=env,
                       timeout=600)
    for line in reversed(p.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": (p.stderr.strip().splitlines() or ["no output"])[-1][:300]}


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 trials, 20 s idle baseline")
    ap.add_argument("--trials", type=int)
    ap.add_argument("--baseline-s", type=float)
    ap.add_argument("--sample-s", type=float, default=0.5, help="psutil sampling period (s)")
    ap.add_argument("--keep", help="keep storage and MLflow store in this folder")
    ap.add_argument("--bare", metavar="CONFIG_JSON", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.bare:
        emit(bare(json.loads(Path(args.bare).read_text())))
        return 0

    trials = args.trials or (8 if args.quick else 16)
    base_s = args.baseline_s or (20.0 if args.quick else 30.0)
    tmp = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="qksweep-bench-trialcpu-"))
    tmp.mkdir(parents=True, exist_ok=True)
    os.chdir(tmp)
    cfg = tiny_config(tmp, trials)

    log("bare loop in a fresh process ...")
    bare_cfg = {k: v for k, v in cfg.items() if k != "sweep"}
    bare_res = bare_subprocess(bare_cfg, tmp)
    log(f"bare: {json.dumps({k: round(v, 2) for k, v in bare_res.items() if isinstance(v, float)})}")

    log(f"idle baseline, {base_s:.0f}s ...")
    from qksweep import api  # imported before the baseline: the import is not the trials' cost
    from qksweep.cluster.connect import ensure_ray

    slices = idle_rates(base_s)
    rate0 = median(slices)
    log(f"idle: {rate0:.3f} busy CPU-s per s (median of {len(slices)} 1-s slices; "
        f"mean {sum(slices) / len(slices):.3f})")

    b0, t0 = busy_s(), time.perf_counter()
    ensure_ray()
    time.sleep(5.0)  # Ray's dashboard and agents finish starting
    ray_wall = time.perf_counter() - t0
    ray_cpu = busy_s() - b0 - rate0 * ray_wall
    log(f"Ray start: {ray_cpu:.1f} CPU-s over {ray_wall:.1f}s")

    sampler = Sampler(args.sample_s)
    sampler.start()
    b0, t0 = busy_s(), time.perf_counter()
    res = api.sweep(cfg, name=f"bench-trial-cpu-{time.strftime('%H%M%S')}")
    wall = time.perf_counter() - t0
    busy = busy_s() - b0
    sampler.stop.set()
    sampler.join()
    trials_state = tune_trials(Path(res.storage_path))
    shutdown_ray()

    sweep_cpu = busy - rate0 * wall
    procs = sampler.by_title()
    attributed = sum(v["cpu_s"] for v in procs.values())
    done = [t for t in trials_state if t["status"] == "TERMINATED"]
    trial_s = [t["last_result"].get("time_total_s") for t in done if t["last_result"].get("time_total_s")]
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    # on a shared machine other work can change between the baseline and the sweep: then the system
    # figure and the processes' sum part (a system figure below the sum is impossible on an idle machine)
    quiet = rate0 <= 0.05 * (os.cpu_count() or 1) and abs(sweep_cpu - attributed) <= 0.15 * max(attributed, 1e-9)
    if not quiet:
        log(f"note: the machine was not idle (idle rate {rate0:.2f}/s; system {sweep_cpu:.1f} CPU-s, "
            f"processes {attributed:.1f}): read tiny_trial_cpu_s_processes")
    out = {
        "benchmark": "trial_cpu",
        "tiny_trial_cpu_s": sweep_cpu / trials,
        "tiny_trial_cpu_s_processes": attributed / trials,
        "tiny_trial_bare_cpu_s": bare_res.get("epochs_cpu_s"),
        "ray_start_cpu_s": ray_cpu,
        "machine_quiet": quiet,
        "details": {
            "trials": trials, "terminated": len(done), "errors": res.num_errors if hasattr(res, "num_errors") else None,
            "sweep_wall_s": wall, "sweep_busy_cpu_s": busy, "sweep_cpu_s": sweep_cpu,
            "idle_busy_cpu_per_s": rate0, "idle_baseline_s": base_s, "idle_slices": slices, "clk_tck": TICK,
            "cpus": os.cpu_count(), "ray_start_wall_s": ray_wall,
            "trial_time_total_s": trial_s, "trial_seconds_sum": sum(trial_s),
            "by_process": procs, "by_process_per_trial": {k: v["cpu_s"] / trials for k, v in procs.items()},
            "attributed_cpu_s": attributed, "unattributed_cpu_s": sweep_cpu - attributed,
            "sampler": {"every_s": args.sample_s, "samples": sampler.samples, "thread_cpu_s": sampler.thread_cpu},
            "bare": bare_res,
            "best_val_top1": (res.best_metrics or {}).get("val/top1"),
        },
    }
    emit(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
