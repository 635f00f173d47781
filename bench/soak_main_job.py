#!/usr/bin/env python
"""Soak the main job: run the README's main job (``qksweep sweep configs/digits_qkformer.yaml``) N times
back to back, as a user would, and count hangs, failures and the spread of wall time.

Each run is the shipped config with only ``run.storage`` and ``tracking.uri`` pointed into a fresh
temporary folder, started as its own ``qksweep sweep`` process (which starts its own local Ray), and
bounded in time (``--timeout``, default 1200 s: about three times an idle 2-CPU run). A run still going at
its limit counts as a hang: its process group is SIGKILLed and the last lines of its output are kept.
Also counted per run: placement groups the sweep's watch released while the sweep ran (``released
placement group`` lines: Train runs that died while reserving workers, issue 22) and "sweep waiting" lines.

    python bench/soak_main_job.py --runs 10          # ~1 h on an idle 2-CPU machine
    python bench/soak_main_job.py --runs 2 --quick   # 4 trials of 4 epochs each, a few minutes

Prints one JSON object on its last line and writes it to ``bench/results/<date>-soak_main_job.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CONFIGS, ROOT, emit, log, machine_info, versions  # noqa: E402


def one_run(i: int, timeout: float, quick: bool) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"qksweep-soak-{i}-"))
    cmd = [sys.executable, "-m", "qksweep.cli", "sweep", str(CONFIGS / "digits_qkformer.yaml"), "--name", f"soak{i}",
           "-s", f"run.storage={tmp / 'results'}", "-s", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}"]
    if quick:
        cmd += ["-s", "sweep.num_samples=4", "-s", "optim.epochs=4"]
    out = tmp / "out.log"
    t0 = time.monotonic()
    with open(out, "w") as f:
        proc = subprocess.Popen(cmd, cwd=tmp, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
        try:
            rc = proc.wait(timeout=timeout)
            hung = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
            rc, hung = None, True
    wall = time.monotonic() - t0
    text = out.read_text(errors="replace")
    best = re.findall(r"best trial \S+: val/top1 ([0-9.]+)", text)
    row = {"run": i, "wall_s": round(wall, 1), "rc": rc, "hung": hung,
           "released_groups": text.count("released placement group"), "waiting_lines": text.count("sweep waiting:"),
           "best_val_top1": float(best[-1]) if best else None}
    if hung or rc != 0:
        row["tail"] = text[-2000:]
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True, timeout=120)
    shutil.rmtree(tmp, ignore_errors=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds one run may take before it counts as a hang")
    ap.add_argument("--quick", action="store_true", help="4 trials of 4 epochs instead of the main job's 12 x 12")
    a = ap.parse_args()
    if a.runs < 1 or a.timeout <= 0:
        print("soak_main_job: --runs must be >= 1 and --timeout > 0", file=sys.stderr)
        return 2
    rows = []
    for i in range(a.runs):
        rows.append(one_run(i, a.timeout, a.quick))
        log(json.dumps({k: v for k, v in rows[-1].items() if k != "tail"}))
    walls = sorted(r["wall_s"] for r in rows if not r["hung"])
    result = {
        "benchmark": "soak_main_job", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine_info(), "versions": versions(),
        "quick": a.quick, "runs": a.runs, "timeout_s": a.timeout,
        "hangs": sum(r["hung"] for r in rows), "failures": sum((not r["hung"]) and r["rc"] != 0 for r in rows),
        "wall_s_min": walls[0] if walls else None, "wall_s_median": walls[len(walls) // 2] if walls else None,
        "wall_s_max": walls[-1] if walls else None,
        "released_groups_total": sum(r["released_groups"] for r in rows),
        "runs_with_released_groups": sum(r["released_groups"] > 0 for r in rows),
        "rows": rows,
    }
    dest = ROOT / "bench" / "results" / f"{time.strftime('%Y-%m-%d')}-soak_main_job{'-quick' if a.quick else ''}.json"
    dest.write_text(json.dumps(result, indent=1) + "\n")
    emit({k: v for k, v in result.items() if k != "rows"})
    return 0 if not result["hangs"] and not result["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
