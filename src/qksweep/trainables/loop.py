"""The one training loop every launch path shares (``qksweep train``, sweep trials, ``continue``).

It runs on each Ray Train worker, or in a one-worker trial's own process (:mod:`.session`): build the
core (data, model, optimiser, schedule: :mod:`.core`) and the extras (the optional features:
:mod:`.extras`), resume from the session's checkpoint, then per epoch train, validate, gather the
metrics and report them with a checkpoint from rank 0. No ``.item()`` on the per-step path: sums stay
on the device until the epoch ends.
"""

from __future__ import annotations

import math
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator

import ray.train
import ray.train.torch
import torch
from timm.utils import dispatch_clip_grad

from ..names import (EPOCH, EPOCH_TIME_S, LR, SAMPLES_PER_S, STEP, TRAIN_LOSS, TRAIN_TOP1, VAL_LOSS, VAL_TOP1,
                     VAL_TOP5)
from ..config import Config
from .checkpoint import (checkpoint_dirs, is_write_failure, load_resumable, remove_partial, restore_training_state,
                         save_checkpoint, training_state, write_error)
from .core import Core, all_max, all_sum, build_core, compile_model, maybe_reset, seed_everything
from .extras import Extra, agree_stop, around_all, build_extras, publish_all
from .session import Session, train_session


def quiet_ray_train_logs() -> None:
    """Ray Train logs every report in full at INFO (with per-update spectra that is pages per epoch).
    That logger is named after its file (``getLogger(__file__)``), not ``ray.train``."""
    import logging

    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def train_loop(loop_config: dict[str, Any], session: Session | None = None) -> None:
    quiet_ray_train_logs()
    s = session or train_session()
    repeats = int(loop_config.get("repeats") or 1)
    if repeats > 1:  # sweep.repeats: the same configuration with several seeds, side by side (repeats.py)
        from .repeats import Repeats

        Repeats(loop_config, s, repeats, epochs=epochs, persist=persist).run()
        return
    for _ in epochs(loop_config, s):
        pass


def epochs(loop_config: dict[str, Any], s: Session) -> Iterator[tuple[dict[str, Any], bool]]:
    """The loop itself. It yields each epoch once reported: (its metrics, whether a stop rule ended the run,
    the same on every rank)."""
    cfg = Config.model_validate(loop_config["config"])
    seed_everything(cfg.run.seed)
    core = build_core(cfg, rank=s.rank, world=s.world, device=s.device, ray_train=s.ray_train)
    extras = build_extras(core, loop_config)
    try:
        start_epoch, updates, replay = resume(core, extras, loop_config, s)
        model = ray.train.torch.prepare_model(core.model, move_to_device=False) if core.world > 1 else core.model
        model = compile_model(model, cfg.run.compile, core.spiking)
        for epoch in range(start_epoch, cfg.optim.epochs):
            for e in extras:
                e.before_epoch(epoch)
            t0 = time.perf_counter()
            train, updates = train_epoch(core, model, extras, epoch, updates)
            metrics = epoch_metrics(core, model, extras, train, epoch=epoch, updates=updates, t0=t0)
            stop = agree_stop(extras, core)
            if replay:  # the resumed epoch's metrics, in case they never reached MLflow
                metrics["_replay"], replay = replay, None
            if stop is not None and core.rank == 0:
                metrics["_stopped_by"], metrics["_stop_reason"] = stop.stopped_by, stop.stop_request()
            report(core, extras, s, metrics, epoch=epoch, updates=updates,
                   last=stop is not None or epoch + 1 == cfg.optim.epochs)
            yield metrics, stop is not None
            if stop is not None:
                break
    finally:
        for e in extras:
            e.close()


def resume(core: Core, extras: list[Extra], loop_config: dict[str, Any], s: Session) -> tuple[int, int, dict | None]:
    """(epochs done, updates done, the resumed epoch's metrics to replay) from this run's own checkpoint
    (a restarted worker or trial) or from ``loop_config['resume_from']`` (``qksweep continue``: nothing replayed)."""
    ckpt = s.get_checkpoint()
    own = ckpt is not None
    if ckpt is None and loop_config.get("resume_from"):
        ckpt = ray.train.Checkpoint(loop_config["resume_from"])
    if not ckpt:
        return 0, 0, None
    state = load_resumable(ckpt, core.device)
    epoch, updates = restore_training_state(state, core, extras)
    return epoch, updates, (state.get("metrics") if own else None)


def train_epoch(core: Core, model: torch.nn.Module, extras: list[Extra], epoch: int, updates: int):
    """One pass over this worker's training shard. Returns ((loss·n, correct, n) summed over all workers,
    seconds spent), and the update count after it."""
    c, accum, device = core, core.cfg.optim.grad_accum, core.device
    t0 = time.perf_counter()
    model.train()
    c.train_batches.set_epoch(epoch)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss*n, correct, n
    first_bad = torch.tensor(-1, device=device)
    n_batches = len(c.train_batches)
    c.optimizer.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(c.train_batches):
        y_hard = y
        if c.mixup is not None:
            x, y = c.mixup(x, y)
        step_now = (i + 1) % accum == 0 or i + 1 == n_batches
        with nullcontext() if (step_now or c.world == 1) else model.no_sync():
            with c.autocast():
                out = model(x)
                loss = c.criterion(out, y)
                for e in extras:
                    loss = e.loss(loss, out, x, len(y_hard))
            c.scaler.scale(loss / accum).backward()
        maybe_reset(c.model, c.spiking)
        ld = loss.detach().double()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(ld), updates + 1, first_bad)
        sums += torch.stack([ld * len(y_hard), out.detach().argmax(-1).eq(y_hard).sum().double(),
                             torch.tensor(float(len(y_hard)), dtype=torch.float64, device=device)])
        if not step_now:
            continue
        optimizer_step(c)
        updates += 1
        c.scheduler.step_update(num_updates=updates)
        for e in extras:
            e.after_update(updates)
        if any(e.stop_sync_due(updates) for e in extras) and agree_stop(extras, c) is not None:
            break
    c.scheduler.step(epoch + 1)
    seconds = time.perf_counter() - t0
    bad_step = int(all_max(first_bad, c.world))
    loss_sum, correct, n = all_sum(sums, c.world).tolist()
    if bad_step >= 0 or not math.isfinite(loss_sum):
        raise FloatingPointError(f"non-finite loss at epoch {epoch + 1}, step {max(bad_step, updates)}")
    return (loss_sum, correct, n, seconds), updates


def optimizer_step(c: Core) -> None:
    if c.cfg.optim.clip_grad:
        c.scaler.unscale_(c.optimizer)
        dispatch_clip_grad(c.model.parameters(), c.cfg.optim.clip_grad)
    c.scaler.step(c.optimizer)
    c.scaler.update()
    c.optimizer.zero_grad(set_to_none=True)


def epoch_metrics(core: Core, model, extras: list[Extra], train, *, epoch: int, updates: int, t0: float) -> dict:
    """The epoch's metrics: the core's (training sums, validation), then each extra's in order."""
    loss_sum, correct, n, seconds = train
    val = core.evaluate(model, around=lambda i, k: around_all(extras, i, k))
    metrics: dict[str, Any] = {
        EPOCH: epoch + 1, STEP: updates,
        TRAIN_LOSS: loss_sum / max(n, 1), TRAIN_TOP1: correct / max(n, 1),
        VAL_LOSS: val["loss"], VAL_TOP1: val["top1"], VAL_TOP5: val["top5"],
        LR: core.optimizer.param_groups[-1]["lr"], SAMPLES_PER_S: n / max(seconds, 1e-9),
    }
    for e in extras:
        metrics.update(e.epoch_metrics(metrics))
    metrics[EPOCH_TIME_S] = time.perf_counter() - t0
    return metrics


def report(core: Core, extras: list[Extra], s: Session, metrics: dict, *, epoch: int, updates: int,
           last: bool) -> None:
    """Report the epoch; rank 0 with its checkpoint (and, on the last epoch, what the extras publish)."""
    if core.rank != 0:
        s.report(metrics, None)
        return
    state = training_state(core, extras, epoch=epoch + 1, updates=updates,
                           metrics={k: v for k, v in metrics.items() if k != "_replay"})
    with tempfile.TemporaryDirectory() as tmp:
        try:
            save_checkpoint(tmp, state, core.cfg.to_dict())
        except (OSError, RuntimeError) as e:  # torch.save on a full disk raises RuntimeError ("file write failed")
            err = e if isinstance(e, OSError) else OSError(str(e))
            if not (is_write_failure(err) or "write failed" in str(e)):
                raise
            raise write_error(err, epoch=epoch + 1, where=tmp) from None
        for e in extras:
            e.after_checkpoint(Path(tmp), metrics)
        if last and (published := publish_all(extras, Path(tmp))):
            metrics["_publish"] = published
        persist(s, metrics, Path(tmp), epoch=epoch + 1)


def persist(s: Session, metrics: dict, folder: Path, *, epoch: int) -> None:
    """Report ``metrics`` with the checkpoint in ``folder``, which the report copies into the run's storage;
    a storage that refuses it (a full disk, a read-only folder) fails the run in one line naming it."""
    root = s.checkpoint_root()
    before = checkpoint_dirs(root)
    try:
        s.report(metrics, ray.train.Checkpoint.from_directory(str(folder)))
    except OSError as e:  # persisting into run.storage
        if not is_write_failure(e):  # anything else (the report's own plumbing) is not a lost checkpoint
            raise
        remove_partial(root, before)
        raise write_error(e, epoch=epoch, where=root) from None  # the line names the reason
