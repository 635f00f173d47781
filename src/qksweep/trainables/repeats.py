"""``sweep.repeats: k``: one sampled configuration trained with the seeds ``run.seed + i`` (``i < k``) side
by side in one trial, so that the searcher and the scheduler judge a configuration by its mean, not by
one lucky or unlucky seed.

The k runs of the shared loop (:func:`.loop.epochs`) advance one epoch each in turn, each with its own
random state (saved and put back around its epoch, so seed ``i`` trains exactly as a lone run with that
seed would). After every epoch the trial reports, once, the mean of the seeds' metrics plus
``<metric>_std`` (the seeds' sample standard deviation) for the reported metrics, and one checkpoint:
seed 0's files at its root, so everything that reads a checkpoint (``continue``, ``validate``, MLflow
models) sees a plain one, and seed ``i``'s under ``seeds/<i>/``, from where a restarted trial resumes each
seed. Each seed's own metrics ride along as ``_seeds`` for the epoch logger, which logs them to one nested
MLflow run per seed. A stop rule that fires for any seed stops the trial.
"""

from __future__ import annotations

import copy
import math
import shutil
import statistics
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ..names import EPOCH, LR, REPORTED_METRICS, STEP
from .checkpoint import rng_state, set_rng_state
from .session import Session

SEEDS_DIR = "seeds"
NO_STD = (EPOCH, STEP, LR)  # the same for every seed


def seed_loop_config(loop_config: dict[str, Any], i: int) -> dict[str, Any]:
    """Seed ``i``'s loop config: ``run.seed + i``, trained alone."""
    conf = copy.deepcopy(loop_config["config"])
    conf["run"]["seed"] = int(conf["run"].get("seed", 0)) + i
    return {**loop_config, "config": conf, "repeats": 1}


@dataclass
class SeedSession:
    """What one seed's loop sees: the trial's rank, world and device; its own part of the trial's checkpoint;
    reports kept here (the checkpoint copied into ``target``) until every seed has done the epoch."""

    trial: Session
    index: int
    target: Path | None = None
    metrics: dict[str, Any] | None = None
    checkpointed: bool = False

    def session(self) -> Session:
        t = self.trial
        return Session(rank=t.rank, world=t.world, device=t.device, get_checkpoint=self.get_checkpoint,
                       report=self.report, ray_train=t.ray_train)

    def get_checkpoint(self):
        ckpt = self.trial.get_checkpoint()
        if ckpt is None or self.index == 0:
            return ckpt
        import ray.train

        return ray.train.Checkpoint(f"{ckpt.path.rstrip('/')}/{SEEDS_DIR}/{self.index}", filesystem=ckpt.filesystem)

    def report(self, metrics: dict[str, Any], checkpoint) -> None:
        self.metrics = metrics
        if checkpoint is not None:
            shutil.copytree(checkpoint.path, self.target, dirs_exist_ok=True)
            self.checkpointed = True


@contextmanager
def own_random_state(states: list, i: int) -> Iterator[None]:
    """Seed ``i``'s random state around its epoch (its first epoch seeds itself)."""
    if states[i] is not None:
        set_rng_state(states[i])
    try:
        yield
    finally:
        states[i] = rng_state()


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def combine(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from the seeds' reports of the same epoch: public numbers averaged (``<key>_std`` beside
    the reported metrics), seed 0's private records (spectra, published files, datasets), the first stop
    any seed asked for, the resumed epoch's replay combined the same way, and every seed's own numbers."""
    first = per_seed[0]
    out: dict[str, Any] = {k: v for k, v in first.items()
                           if k.startswith("_") and k not in ("_stopped_by", "_stop_reason", "_replay")}
    for k, v in first.items():
        if k.startswith("_"):
            continue
        values = [m.get(k) for m in per_seed]
        if not all(_number(x) for x in values):
            out[k] = v
            continue
        out[k] = statistics.fmean(values)
        if k in REPORTED_METRICS and k not in NO_STD:
            out[f"{k}_std"] = statistics.stdev(values) if all(math.isfinite(x) for x in values) else math.nan
    stopped = [(i, m) for i, m in enumerate(per_seed) if m.get("_stopped_by")]
    if stopped:
        i, m = stopped[0]
        out["_stopped_by"], out["_stop_reason"] = m["_stopped_by"], f"seed {i}: {m.get('_stop_reason') or ''}".strip()
    replays = [m.get("_replay") for m in per_seed]
    if all(replays):
        out["_replay"] = combine(replays)
    out["_seeds"] = [{k: v for k, v in m.items() if not k.startswith("_") and _number(v)} for m in per_seed]
    return out


@dataclass
class Repeats:
    """``epochs(loop_config, session)`` is the loop (:func:`.loop.epochs`), ``persist(session, metrics,
    folder, epoch=)`` how it reports an epoch with a checkpoint (:func:`.loop.persist`)."""

    loop_config: dict[str, Any]
    trial: Session
    k: int
    epochs: Callable[[dict[str, Any], Session], Iterator[tuple[dict[str, Any], bool]]]
    persist: Callable[..., None]
    seeds: list[SeedSession] = field(init=False)

    def __post_init__(self) -> None:
        self.seeds = [SeedSession(self.trial, i) for i in range(self.k)]

    def run(self) -> None:
        epochs, persist = self.epochs, self.persist
        runs = [epochs(seed_loop_config(self.loop_config, i), s.session()) for i, s in enumerate(self.seeds)]
        states: list = [None] * self.k
        try:
            while True:
                stopped = False
                with tempfile.TemporaryDirectory() as tmp:
                    for i, (run, seed) in enumerate(zip(runs, self.seeds)):
                        seed.target = Path(tmp) if i == 0 else Path(tmp) / SEEDS_DIR / str(i)
                        seed.metrics, seed.checkpointed = None, False
                        with own_random_state(states, i):
                            step = next(run, None)
                        if step is None:  # every seed ends at the same epoch (a stop rule ends them all)
                            return
                        stopped = stopped or step[1]
                    metrics = combine([s.metrics for s in self.seeds])
                    if self.seeds[0].checkpointed:
                        persist(self.trial, metrics, Path(tmp), epoch=int(metrics.get(EPOCH, 0)))
                    else:  # ranks other than 0 report no checkpoint
                        self.trial.report(metrics, None)
                if stopped:  # known on every rank (rank 0 alone carries the reason)
                    return
        finally:
            for run in runs:
                run.close()
