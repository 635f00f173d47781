#!/usr/bin/env python
"""Soak the one-run-per-trial guarantee: SIGKILL a sweep at a random moment, resume it, check, repeat.

Each cycle runs ``qksweep sweep configs/digits_qkformer.yaml --num-samples N`` (run.storage and the
SQLite store in a fresh temporary folder) as its own process group with its own local Ray, SIGKILLs the
whole group at a seeded random moment between ``--kill-min`` and ``--kill-max`` seconds after the start,
then runs ``qksweep resume`` to the end and checks the invariants:

* exactly N trial runs (``qksweep.kind=trial``) in MLflow, none RUNNING, no run of the sweep RUNNING;
* every trial run holds each of its epochs once (the ``epoch`` history has no repeated step);
* the Optuna study holds no RUNNING trial, and N trials COMPLETE or PRUNED;
* runs closed as orphans (``qksweep.kind=orphan``) are counted, not failures.

    python bench/soak_kill_resume.py --cycles 20            # the main job's space, 6 trials, 4 epochs
    python bench/soak_kill_resume.py --cycles 2 --quick     # 3 trials of 2 epochs at 8x8 px

Prints one JSON object on its last line and writes it to ``bench/results/<date>-soak_kill_resume.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CONFIGS, ROOT, emit, log, machine_info, versions  # noqa: E402


def check(tmp: Path, name: str, num_samples: int) -> dict:
    import optuna
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    exps = [e.experiment_id for e in c.search_experiments()]
    rs = c.search_runs(exps, filter_string=f"tags.`qksweep.sweep` = '{name}'")
    if not (tmp / "results" / name / "qksweep_sweep.json").exists():
        # killed before the sweep wrote its state: nothing to resume (resume must refuse in one line,
        # exit 2) and nothing of it may be left in MLflow
        return {"ok": not rs, "before_state": True, "trial_runs": 0, "orphan_runs": 0, "repeated_epochs": [],
                "running_runs": sum(r.info.status == "RUNNING" for r in rs), "study_states": []}
    trials = [r for r in rs if r.data.tags.get("qksweep.kind") == "trial"]
    orphans = [r for r in rs if r.data.tags.get("qksweep.kind") == "orphan"]
    repeated = [r.data.tags.get("qksweep.trial_id") for r in trials
                if len({m.step for m in c.get_metric_history(r.info.run_id, "epoch")})
                != len(c.get_metric_history(r.info.run_id, "epoch"))]
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{tmp / 'results' / name / 'optuna.db'}")
    states = [t.state.name for t in study.trials]
    ok = (len(trials) == num_samples and not repeated and not [r for r in rs if r.info.status == "RUNNING"]
          and "RUNNING" not in states and states.count("COMPLETE") + states.count("PRUNED") == num_samples)
    return {"ok": ok, "trial_runs": len(trials), "orphan_runs": len(orphans), "repeated_epochs": repeated,
            "running_runs": sum(r.info.status == "RUNNING" for r in rs), "study_states": states}


def stacks() -> str:
    """py-spy dumps of every Ray and qksweep Python on this machine (the soak's Ray is the only one)."""
    ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout.splitlines()
    spy = Path(sys.executable).with_name("py-spy")
    out = []
    for line in ps:
        pid, _, args = line.strip().partition(" ")
        if int(pid) != os.getpid() and ("ray::" in args or "qksweep" in args or "ray/_private" in args):
            d = subprocess.run([str(spy), "dump", "--pid", pid], capture_output=True, text=True, timeout=60)
            out.append(f"=== {pid} {args[:200]}\n{d.stdout or d.stderr}")
    return "\n".join(out)


def cycle(i: int, rng: random.Random, a) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"qksweep-killsoak-{i}-"))
    name = f"ks{i}"
    over = ["-s", f"run.storage={tmp / 'results'}", "-s", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
            "-s", f"optim.epochs={a.epochs}"] + (["-s", "data.img_size=8"] if a.quick else [])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    kill_at = rng.uniform(a.kill_min, a.kill_max)
    with open(tmp / "sweep.log", "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "qksweep.cli", "sweep", str(CONFIGS / "digits_qkformer.yaml"),
                                 "--name", name, "--num-samples", str(a.num_samples), *over],
                                cwd=tmp, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        try:
            proc.wait(timeout=kill_at)
            killed = False  # the sweep finished before its kill time
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
            killed = True
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True, timeout=120)
    resumed = None
    if killed:
        with open(tmp / "resume.out", "w") as fo, open(tmp / "resume.err", "w") as fe:
            r = subprocess.Popen([sys.executable, "-m", "qksweep.cli", "resume", name, "--storage", str(tmp / "results")],
                                 cwd=tmp, stdout=fo, stderr=fe, text=True, env=env, start_new_session=True)
            try:
                resumed = r.wait(timeout=a.timeout)
            except subprocess.TimeoutExpired:  # a hung resume is a failed cycle, not the end of the soak
                (tmp / "stacks.txt").write_text(stacks())  # where every Python of the resume waits
                os.killpg(r.pid, signal.SIGKILL)
                r.wait(timeout=60)
                resumed = "timeout"
        out, err = (tmp / "resume.out").read_text(), (tmp / "resume.err").read_text()
        if resumed == "timeout":
            err += f"\nresume timed out after {a.timeout:.0f} s (stacks in stacks.txt)"
        (tmp / "resume.log").write_text(out + "\n--- stderr ---\n" + err)
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True, timeout=120)
    try:
        row = {"cycle": i, "kill_at_s": round(kill_at, 1), "killed": killed, "resume_rc": resumed,
               **check(tmp, name, a.num_samples)}
    except Exception as e:  # noqa: BLE001 - a sweep killed before it wrote its study: nothing to check, say so
        row = {"cycle": i, "kill_at_s": round(kill_at, 1), "killed": killed, "resume_rc": resumed, "ok": False,
               "error": str(e).splitlines()[0] if str(e) else type(e).__name__}
    row["ok"] = row["ok"] and resumed in ((2,) if row.get("before_state") else (None, 0))
    if row["ok"]:
        shutil.rmtree(tmp, ignore_errors=True)
    else:  # the evidence stays: the sweep's and the resume's output, the stores
        row["kept"] = str(tmp)
        if resumed:
            row["resume_error"] = [ln for ln in err.splitlines() if ln.strip()][-3:]
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-samples", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--kill-min", type=float, default=15.0, help="earliest kill, seconds after the sweep starts")
    ap.add_argument("--kill-max", type=float, default=120.0)
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds a resume may take before its stacks are dumped and it is killed (1800; 400 with --quick)")
    ap.add_argument("--quick", action="store_true", help="3 trials of 2 epochs at 8x8 px, kills within 10-60 s")
    a = ap.parse_args()
    if a.quick:
        a.num_samples, a.epochs, a.kill_min, a.kill_max = 3, 2, 10.0, 60.0
    a.timeout = a.timeout or (400.0 if a.quick else 1800.0)
    if a.cycles < 1 or a.num_samples < 1 or a.epochs < 1 or not 0 <= a.kill_min <= a.kill_max:
        print("soak_kill_resume: need --cycles, --num-samples, --epochs >= 1 and 0 <= --kill-min <= --kill-max",
              file=sys.stderr)
        return 2
    rng = random.Random(a.seed)
    rows = []
    for i in range(a.cycles):
        rows.append(cycle(i, rng, a))
        log(json.dumps(rows[-1]))
    result = {"benchmark": "soak_kill_resume", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "machine": machine_info(), "versions": versions(), "seed": a.seed, "cycles": a.cycles,
              "num_samples": a.num_samples, "epochs": a.epochs, "kill_window_s": [a.kill_min, a.kill_max],
              "cycles_killed": sum(r["killed"] for r in rows), "cycles_ok": sum(r["ok"] for r in rows),
              "orphan_runs_closed": sum(r.get("orphan_runs", 0) for r in rows), "rows": rows}
    dest = ROOT / "bench" / "results" / f"{time.strftime('%Y-%m-%d')}-soak_kill_resume{'-quick' if a.quick else ''}.json"
    dest.write_text(json.dumps(result, indent=1) + "\n")
    emit({k: v for k, v in result.items() if k != "rows"})
    return 0 if result["cycles_ok"] == a.cycles else 1


if __name__ == "__main__":
    sys.exit(main())
