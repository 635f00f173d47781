"""MOASHA: asynchronous successive halving for sweeps with several metrics.

Ray Tune's ASHA (and Optuna's pruners) rank trials on one number, so an accuracy-vs-energy sweep
could not stop any trial early. This scheduler keeps ASHA's rungs (``grace_period · rf^k`` epochs below
``max_t``) and its asynchronous rule (a trial is judged once, on reaching a rung, against the trials
recorded there before it), but orders the trials at a rung as Syne Tune's MOASHA does: by
non-dominated sorting (Pareto fronts, best first), ties inside a front broken by crowding distance
(NSGA-II's: points at the front's ends and in sparse regions first). A trial goes on when it is among
the first ``ceil(n / rf)`` of the ``n`` trials at the rung, itself included; otherwise it stops.

Ray Tune saves no scheduler's rungs with the experiment state, not even ASHA's. Tune does save
callback state with every experiment checkpoint and hands it back on ``Tuner.restore``, so
:class:`RungRecords`, a ``Callback`` holding the scheduler (both pickled together in the Tuner's
state, so they stay one object), carries MOASHA's and ASHA's rung records through ``qksweep resume``.
"""

from __future__ import annotations

import math
from typing import Sequence

from ray.tune import Callback
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler


def nondominated_ranks(points: Sequence[Sequence[float]]) -> list[int]:
    """Pareto front index of each point (0 = not dominated by any), all objectives minimised."""
    n = len(points)
    dominated_by = [0] * n
    dominates: list[list[int]] = [[] for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            if _dominates(points[i], points[j]):
                dominates[i].append(j)
                dominated_by[j] += 1
            elif _dominates(points[j], points[i]):
                dominates[j].append(i)
                dominated_by[i] += 1
    ranks = [0] * n
    front = [i for i in range(n) if dominated_by[i] == 0]
    r = 0
    while front:
        nxt = []
        for i in front:
            ranks[i] = r
            for j in dominates[i]:
                dominated_by[j] -= 1
                if dominated_by[j] == 0:
                    nxt.append(j)
        front, r = nxt, r + 1
    return ranks


def _dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def crowding_distances(points: Sequence[Sequence[float]]) -> list[float]:
    """NSGA-II crowding distance of each point within its set (the ends of each objective: inf)."""
    n = len(points)
    if n <= 2:
        return [math.inf] * n
    dist = [0.0] * n
    for k in range(len(points[0])):
        order = sorted(range(n), key=lambda i: points[i][k])
        lo, hi = points[order[0]][k], points[order[-1]][k]
        dist[order[0]] = dist[order[-1]] = math.inf
        if hi == lo:
            continue
        for a, i, b in zip(order, order[1:], order[2:]):
            dist[i] += (points[b][k] - points[a][k]) / (hi - lo)
    return dist


def promotion_order(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices best first: by Pareto front, then by crowding distance within the front (larger first);
    equal keys keep their order."""
    ranks = nondominated_ranks(points)
    crowd = [0.0] * len(points)
    for r in set(ranks):
        members = [i for i in range(len(points)) if ranks[i] == r]
        for i, d in zip(members, crowding_distances([points[i] for i in members])):
            crowd[i] = d
    return sorted(range(len(points)), key=lambda i: (ranks[i], -crowd[i]))


def rung_milestones(grace_period: int, reduction_factor: float, max_t: int) -> list[int]:
    """ASHA's rungs: ``grace_period · rf^k`` below ``max_t``, highest first (as Ray's ASHA)."""
    out, k = [], 0
    while True:
        m = int(grace_period * reduction_factor**k)
        if m >= max_t:
            return sorted(set(out), reverse=True)
        out.append(m)
        k += 1


class MOASHAScheduler(FIFOScheduler):
    """Multi-objective ASHA as a Ray Tune ``TrialScheduler`` (see the module docstring)."""

    def __init__(self, *, metrics: Sequence[str], modes: Sequence[str], max_t: int, grace_period: int = 1,
                 reduction_factor: float = 3, time_attr: str = "epoch"):
        FIFOScheduler.__init__(self)
        if len(metrics) != len(modes) or len(metrics) < 2:
            raise ValueError("MOASHA needs two or more metrics, each with a mode")
        self._metrics, self._signs = list(metrics), [1.0 if m == "min" else -1.0 for m in modes]
        self._time_attr, self._max_t, self._rf = time_attr, int(max_t), float(reduction_factor)
        self._milestones = rung_milestones(grace_period, reduction_factor, max_t)
        # milestone -> trial id -> the objective vector at that rung (minimised), in recording order
        self.rungs: dict[int, dict[str, list[float]]] = {m: {} for m in self._milestones}
        self.stopped: dict[str, int] = {}  # trial id -> the rung that stopped it

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # the metrics are the scheduler's own: Tune's single metric/mode do not apply

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        t = result.get(self._time_attr)
        if t is None:
            return TrialScheduler.CONTINUE
        if t >= self._max_t:
            return TrialScheduler.STOP
        point = self._point(result)
        if point is None:
            return TrialScheduler.CONTINUE
        return self.judge(trial.trial_id, int(t), point)

    def judge(self, trial_id: str, t: int, point: list[float]) -> str:
        """ASHA's rule at the highest rung ``t`` has reached and ``trial_id`` was not yet recorded at."""
        for milestone in self._milestones:
            recorded = self.rungs[milestone]
            if t < milestone or trial_id in recorded:
                continue
            others = list(recorded.items())
            # the new trial first among equals: a tie with a recorded trial keeps it going, as in ASHA
            points = [point] + [p for _, p in others]
            keep = max(1, math.ceil(len(points) / self._rf))
            recorded[trial_id] = point
            if 0 in promotion_order(points)[:keep]:
                return TrialScheduler.CONTINUE
            self.stopped[trial_id] = milestone
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def _point(self, result: dict) -> list[float] | None:
        out = []
        for m, sign in zip(self._metrics, self._signs):
            v = result.get(m)
            if not isinstance(v, (int, float)) or not math.isfinite(float(v)):
                return None
            out.append(sign * float(v))
        return out

    def debug_string(self) -> str:
        sizes = ", ".join(f"{m}: {len(r)}" for m, r in sorted(self.rungs.items()))
        return f"MOASHA rungs (epoch: trials) {sizes or '-'}; stopped {len(self.stopped)}"

    def state(self) -> dict:
        return {"rungs": {str(m): dict(r) for m, r in self.rungs.items()}, "stopped": dict(self.stopped)}

    def load_state(self, state: dict) -> None:
        for m, records in state.get("rungs", {}).items():
            self.rungs.setdefault(int(m), {}).update(records)
        self.stopped.update(state.get("stopped", {}))


class RungRecords(Callback):
    """Saves a scheduler's rung records with Tune's experiment checkpoints and puts them back on
    ``Tuner.restore`` (Tune's controller saves no scheduler state): :class:`MOASHAScheduler`'s, and
    Ray's ``AsyncHyperBandScheduler`` (ASHA)'s, whose brackets' rungs are ``(milestone, {trial id:
    score})`` lists. A trial ASHA recorded before the driver stopped is then still counted at its
    rungs, so a resumed sweep is judged against the same trials as before."""

    def __init__(self, scheduler: TrialScheduler):
        self.scheduler = scheduler

    def get_state(self) -> dict | None:
        s = self.scheduler
        if isinstance(s, MOASHAScheduler):
            return {"moasha": s.state()}
        if isinstance(s, AsyncHyperBandScheduler):
            return {"asha": [[(m, dict(rec)) for m, rec in b._rungs] for b in s._brackets]}
        return None

    def set_state(self, state: dict) -> None:
        s = self.scheduler
        if "moasha" in state and isinstance(s, MOASHAScheduler):
            s.load_state(state["moasha"])
        for bracket, saved in zip(s._brackets if isinstance(s, AsyncHyperBandScheduler) else [], state.get("asha", [])):
            records = dict(bracket._rungs)  # milestone -> the bracket's own dict, filled in place
            for m, rec in saved:
                if m in records:
                    records[m].update(rec)


def keeps_rungs(scheduler: TrialScheduler) -> bool:
    """Whether :class:`RungRecords` carries this scheduler's rungs through a resume."""
    return isinstance(scheduler, (MOASHAScheduler, AsyncHyperBandScheduler))
