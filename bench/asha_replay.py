#!/usr/bin/env python
"""ASHA replayed offline on recorded learning curves: what rung placement and the rung metric buy,
without TPE's influence and without training anything again.

Input: a result of ``bench/sweep_efficiency.py`` whose random arm (no early stopping, every trial to the
last epoch) kept its curves (``arms.random.per_trial[].curve``: per epoch ``val/top1``, ``val/loss`` and
``time_total_s``, the trial's own clock from its start, start-up included). The replay starts the
trials in the order the random arm started them, ``--concurrency`` at a time (2: the main job on 2 CPUs),
and feeds each epoch's report, in the order of the time it would arrive, to the scheduler qksweep builds
(:func:`qksweep.orchestrator.searcher.make_scheduler`, i.e. Ray's ``ASHAScheduler``) for the config with
the setting's ``sweep.scheduler`` keys. A trial the scheduler stops frees its slot at that report, and
the next trial starts there. So a trial at a rung continues if it is in the top 1/rf of what was
recorded at that rung so far, as in a real sweep.

For each setting: the trial-seconds it would spend (Σ over trials of ``time_total_s`` at the epoch where
it stopped, what the benchmark sums), ``compute_ratio`` = the random arm's trial-seconds ÷ that,
``best_gap`` = the random arm's best val/top1 − the best val/top1 seen in the epochs the replay trains,
the epochs trained, the rungs, and ``sync_compute_ratio``: synchronous successive halving on the same
curves (each rung keeps exactly the top ⌈n/rf⌉ of all trials). Per table also: ``signal``, how well
val/top1 and val/loss at epochs 1-6 rank the trials by their final best (Spearman), and
``oracle_compute_ratio``, the most any early stopping could save with its first rung at epoch 1, 2 or 3
(every trial but the best stopped there, the best trained to the end).

    python bench/asha_replay.py bench/results/2026-12-07-sweep_efficiency-random-curves.json
    python bench/asha_replay.py R.json --trials 8 12   # the first 8, then 12 trials (smaller num_samples)
    python bench/asha_replay.py R.json --more R2.json  # R2's trials after R's (the same sampler's next draws)

Prints a table on stderr and one JSON object on the last line of stdout. Needs no Ray cluster (it
imports Ray Tune's scheduler classes only).
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import math
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, load_yaml, log, with_overrides  # noqa: E402

TOP1, LOSS = "val/top1", "val/loss"


def load_curves(path: str | Path, arm: str = "random") -> list[dict[str, Any]]:
    """The arm's trials in start order, each ``{"trial_id", "config", "curve"}`` with a full curve."""
    import json

    text = Path(path).read_text().strip().splitlines()[-1]
    res = json.loads(text)
    rows = res["arms"][arm]["per_trial"]
    rows = sorted(rows, key=lambda r: r.get("start_time") or 0.0)
    out = [r for r in rows if r.get("curve")]
    if not out:
        raise SystemExit(f"{path}: the {arm} arm kept no curves (run bench/sweep_efficiency.py from this branch)")
    return out


def scheduler_for(base: dict, epochs: int, scheduler: dict):
    """The scheduler qksweep builds for ``base`` with ``sweep.scheduler`` replaced by ``scheduler``."""
    from qksweep.api import resolve
    from qksweep.orchestrator.searcher import make_scheduler, scheduler_settings

    d = with_overrides(base, optim={"epochs": epochs})
    d["sweep"] = {**d["sweep"], "scheduler": {"name": "asha", **scheduler}}
    cfg = resolve(d)
    return make_scheduler(cfg), scheduler_settings(cfg)


def replay(trials: list[dict[str, Any]], scheduler, *, concurrency: int = 2) -> dict[str, Any]:
    """Run ``trials`` (full curves, start order) through ``scheduler`` as Tune would: at most
    ``concurrency`` at a time, each report handed over when it would arrive. Returns the epoch at which
    each trial stopped and what that cost."""
    from ray.tune.schedulers import TrialScheduler

    n = len(trials)
    stop_at = [0] * n
    heap: list[tuple[float, int, int]] = []  # (time, trial index, epoch)
    pending = iter(range(n))
    started: dict[int, float] = {}
    objs = [SimpleNamespace(trial_id=t["trial_id"]) for t in trials]

    def start(i: int, now: float) -> None:
        started[i] = now
        scheduler.on_trial_add(None, objs[i])
        curve = trials[i]["curve"]
        heapq.heappush(heap, (now + curve[0]["time_total_s"], i, 0))

    for i in itertools.islice(pending, concurrency):
        start(i, 0.0)
    while heap:
        now, i, k = heapq.heappop(heap)
        curve = trials[i]["curve"]
        row = curve[k]
        result = {key: row[key] for key in (TOP1, LOSS) if row.get(key) is not None}
        result["epoch"] = row["epoch"]
        action = scheduler.on_trial_result(None, objs[i], result)
        last = k + 1 >= len(curve)
        if action == TrialScheduler.STOP or last:
            scheduler.on_trial_complete(None, objs[i], result)
            stop_at[i] = row["epoch"]
            nxt = next(pending, None)
            if nxt is not None:
                start(nxt, now)
        else:
            heapq.heappush(heap, (started[i] + curve[k + 1]["time_total_s"], i, k + 1))
    return summarize(trials, stop_at)


def summarize(trials: list[dict[str, Any]], stop_at: list[int]) -> dict[str, Any]:
    def cost(t, e):
        return next(r["time_total_s"] for r in t["curve"] if r["epoch"] == e)

    def best(t, e):
        vals = [r[TOP1] for r in t["curve"] if r["epoch"] <= e and r.get(TOP1) is not None]
        return max(vals) if vals else None

    full = [t["curve"][-1]["epoch"] for t in trials]
    full_s = sum(cost(t, e) for t, e in zip(trials, full))
    spent_s = sum(cost(t, e) for t, e in zip(trials, stop_at))
    best_full = max(best(t, e) for t, e in zip(trials, full))
    best_here = max(b for b in (best(t, e) for t, e in zip(trials, stop_at)) if b is not None)
    top = max(range(len(trials)), key=lambda i: best(trials[i], full[i]))
    return {
        "compute_ratio": full_s / spent_s,
        "best_gap": best_full - best_here,
        "best": best_here,
        "trial_seconds": spent_s,
        "full_trial_seconds": full_s,
        "epochs": sum(stop_at),
        "full_epochs": sum(full),
        "stopped_at": stop_at,
        "best_trial_kept": stop_at[top] == full[top],
    }


def sync_halving(trials: list[dict[str, Any]], rungs: list[int], rf: float, metric: str, mode: str) -> dict[str, Any]:
    """Synchronous successive halving on the same curves: at each rung the top ⌈n/rf⌉ of the trials
    still in go on (every trial waits for the rung to fill: no asynchrony)."""
    sign = 1.0 if mode == "max" else -1.0
    alive = list(range(len(trials)))
    stop_at = [t["curve"][-1]["epoch"] for t in trials]
    for m in (math.ceil(r) for r in rungs):  # Ray's rung at a fractional epoch decides at the next whole one
        if m >= min(stop_at[i] for i in alive):
            break
        scored = sorted(alive, key=lambda i: -sign * next(r[metric] for r in trials[i]["curve"] if r["epoch"] == m))
        keep = max(1, math.ceil(len(alive) / rf))
        for i in scored[keep:]:
            stop_at[i] = m
        alive = scored[:keep]
    return summarize(trials, stop_at)


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (ties take their mean rank)."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx and sy else None


def signal(trials: list[dict[str, Any]], epochs: tuple[int, ...] = (1, 2, 3, 4, 6)) -> dict[str, Any]:
    """How well each early epoch ranks the trials by their final best val/top1: Spearman of val/top1 and
    of −val/loss at that epoch (1 = the same order), and how many distinct values each takes."""
    final = [max(r[TOP1] for r in t["curve"]) for t in trials]
    out = {}
    for e in epochs:
        top1 = [t["curve"][e - 1][TOP1] for t in trials]
        loss = [t["curve"][e - 1][LOSS] for t in trials]
        out[str(e)] = {"spearman_top1": spearman(top1, final), "spearman_loss": spearman([-x for x in loss], final),
                       "distinct_top1": len({round(x, 4) for x in top1}), "loss_min": min(loss), "loss_max": max(loss)}
    return out


def oracle(trials: list[dict[str, Any]], first_rungs: tuple[int, ...] = (1, 2, 3)) -> dict[str, float]:
    """The most any early stopping can save with its first rung at epoch m: every trial but the best
    stopped at m, the best trained to the end (no promotion of anything else, perfect ranking)."""
    def cost(t, e):
        return t["curve"][e - 1]["time_total_s"]

    full = sum(cost(t, len(t["curve"])) for t in trials)
    best = max(range(len(trials)), key=lambda i: max(r[TOP1] for r in trials[i]["curve"]))
    out = {"best_trial_share": cost(trials[best], len(trials[best]["curve"])) / full}
    for m in first_rungs:
        spent = sum(cost(t, m) for i, t in enumerate(trials) if i != best) + cost(trials[best], len(trials[best]["curve"]))
        out[f"first_rung_{m}"] = full / spent
    return out


DEFAULT_GRID = [dict(grace_period=g, reduction_factor=rf, metric=m)
                for m in (TOP1, LOSS) for g in (1, 2, 3) for rf in (3, 4, 6, 12)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("result", help="a bench/sweep_efficiency.py result whose random arm kept its curves")
    ap.add_argument("--config", default="digits_qkformer.yaml", help="the config under configs/ (default: the main job)")
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--more", nargs="*", default=[], help="further results whose random arms' trials come after "
                    "the first's, in order (e.g. the same sampler's next draws, recorded with sweep.enqueue)")
    ap.add_argument("--time-scale", type=float, nargs="*", default=[], help="one factor per result (the first, then "
                    "each --more) multiplying its times: recordings made under different load on one clock")
    ap.add_argument("--trials", type=int, nargs="*", default=[], help="replay the first N trials only (several: one table each)")
    ap.add_argument("--max-t", type=int, nargs="*", default=[], help="also replay these max_t values")
    args = ap.parse_args(argv)

    everything = []
    for i, path in enumerate([args.result, *args.more]):
        scale = args.time_scale[i] if i < len(args.time_scale) else 1.0
        for t in load_curves(path):
            t["curve"] = [{**r, "time_total_s": r["time_total_s"] * scale} for r in t["curve"]]
            everything.append(t)
    epochs = everything[0]["curve"][-1]["epoch"]
    base = load_yaml(args.config)

    grid = [dict(s) for s in DEFAULT_GRID]
    grid += [dict(s, max_t=t) for t in args.max_t for s in DEFAULT_GRID]
    grid.append(dict(base["sweep"].get("scheduler") or {}, config=True))  # the config's own, as qksweep derives it
    tables = []
    for n in args.trials or [len(everything)]:
        trials = everything[:n]
        rows = []
        for setting in grid:
            setting = dict(setting)
            own = setting.pop("config", False)
            setting = {k: v for k, v in setting.items() if k != "name"}
            sched, eff = scheduler_for(base, epochs, setting)
            out = replay(trials, sched, concurrency=args.concurrency)
            sync = sync_halving(trials, eff["rungs"], eff["reduction_factor"], eff["metric"], eff["mode"])
            rows.append({"setting": "config" if own else "grid", **{k: eff[k] for k in ("metric", "grace_period",
                         "reduction_factor", "max_t", "rungs")}, **out,
                         "sync_compute_ratio": sync["compute_ratio"], "sync_best_gap": sync["best_gap"]})
        log(f"{len(trials)} trials x {epochs} epochs, {args.concurrency} at a time; random arm: "
            f"{rows[0]['full_trial_seconds']:.0f} trial-s, best {max(r['best'] + r['best_gap'] for r in rows):.4f}")
        log(f"{'metric':9} {'grace':>5} {'rf':>3} {'max_t':>5} {'rungs':12} {'ratio':>6} {'gap':>7} {'epochs':>6} "
            f"{'sync':>6} {'sgap':>7}  stopped at")
        for r in rows:
            log(f"{r['metric']:9} {r['grace_period']:5d} {r['reduction_factor']:3g} {r['max_t']:5d} "
                f"{','.join(map(str, r['rungs'])):12} {r['compute_ratio']:6.2f} {r['best_gap']:7.4f} {r['epochs']:6d} "
                f"{r['sync_compute_ratio']:6.2f} {r['sync_best_gap']:7.4f}  {''.join(str(e) if e < 10 else '+' for e in r['stopped_at'])}"
                + ("  <- config" if r["setting"] == "config" else ""))
        sig, orc = signal(trials), oracle(trials)
        log("rank signal (Spearman vs final best): " + "; ".join(
            f"epoch {e}: top1 {v['spearman_top1']:.2f}, loss {v['spearman_loss']:.2f}" for e, v in sig.items()))
        log(f"oracle ratios (perfect stopping, first rung at 1/2/3): {orc['first_rung_1']:.2f} / {orc['first_rung_2']:.2f} / "
            f"{orc['first_rung_3']:.2f}; the best trial is {orc['best_trial_share']:.0%} of the random arm")
        tables.append({"trials": len(trials), "signal": sig, "oracle_compute_ratio": orc, "rows": rows})
    emit({"benchmark": "asha_replay", "result": str(args.result), "more": args.more, "time_scale": args.time_scale,
          "epochs": epochs,
          "concurrency": args.concurrency, "tables": tables})
    return 0


if __name__ == "__main__":
    sys.exit(main())
