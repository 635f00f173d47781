"""The one training loop every launch path shares (``qksweep train``, sweep trials, ``continue``).

It runs on each Ray Train worker: build data and model, resume from ``ray.train.get_checkpoint()``,
then per epoch train, validate, average metrics over all workers and report them with a checkpoint
from rank 0. No ``.item()`` on the per-step path: sums stay on the device until the epoch ends.
"""

from __future__ import annotations

import math
import tempfile
import time
from contextlib import nullcontext
from typing import Any, Iterator

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, dispatch_clip_grad

from ..config import Config
from ..data import DataBundle, build_data
from ..distill.losses import distill_loss
from ..models import create_model
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state

# ---------------------------------------------------------------- pieces (small, pure where possible)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(cfg: Config, bundle: DataBundle) -> torch.nn.Module:
    return create_model(
        cfg.model.name,
        num_classes=bundle.num_classes,
        in_chans=bundle.in_chans,
        img_size=cfg.data.img_size,
        **cfg.model.overrides(),
    )


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    if not cfg.optim.amp:
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def build_criterion(cfg: Config, mixup_active: bool) -> torch.nn.Module:
    if mixup_active:
        return SoftTargetCrossEntropy()  # Mixup already applies label smoothing to the targets
    if cfg.optim.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.optim.smoothing)
    return torch.nn.CrossEntropyLoss()


def build_mixup(cfg: Config, num_classes: int) -> Mixup | None:
    o = cfg.optim
    if o.mixup <= 0 and o.cutmix <= 0:
        return None
    return Mixup(
        mixup_alpha=o.mixup,
        cutmix_alpha=o.cutmix,
        prob=o.mixup_prob,
        switch_prob=o.mixup_switch_prob,
        label_smoothing=o.smoothing,
        num_classes=num_classes,
    )


class TensorBatches:
    """Batches over in-memory tensors, sharded across workers like DistributedSampler (equal shard
    sizes, so DDP ranks run the same number of steps), reshuffled per epoch from a fixed seed."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, rank: int, world: int,
                 shuffle: bool, drop_last: bool, seed: int, device: torch.device):
        self.x, self.y = x.to(device), y.to(device)
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        n = len(x)
        self.per_rank = math.ceil(n / world) if shuffle else len(range(rank, n, world))
        self.epoch = 0

    def __len__(self) -> int:
        full, rest = divmod(self.per_rank, self.batch_size)
        return full if (self.drop_last and full > 0) else full + (rest > 0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.x)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=g)
            total = self.per_rank * self.world
            order = torch.cat([order, order[: total - n]])[self.rank :: self.world]
        else:
            order = torch.arange(self.rank, n, self.world)
        order = order.to(self.x.device)
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self.x[idx], self.y[idx]


class LoaderBatches:
    """A DataLoader prepared by Ray Train (DistributedSampler, device transfer)."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)

    def __iter__(self):
        return iter(self.loader)


def build_batches(cfg: Config, bundle: DataBundle, *, rank: int, world: int, device: torch.device):
    bs = cfg.data.batch_size
    ebs = cfg.data.eval_batch_size or bs * 2
    if bundle.in_memory:
        tx, ty = bundle.train.tensors
        vx, vy = bundle.val.tensors
        common = dict(rank=rank, world=world, seed=cfg.run.seed, device=device)
        return (TensorBatches(tx, ty, bs, shuffle=True, drop_last=True, **common),
                TensorBatches(vx, vy, ebs, shuffle=False, drop_last=False, **common))
    from torch.utils.data import DataLoader

    pin = device.type == "cuda"
    nw = cfg.data.num_workers
    train = DataLoader(bundle.train, batch_size=bs, shuffle=True, drop_last=True, num_workers=nw,
                       pin_memory=pin, persistent_workers=nw > 0)
    val = DataLoader(bundle.val, batch_size=ebs, shuffle=False, num_workers=nw, pin_memory=pin,
                     persistent_workers=nw > 0)
    prep = ray.train.torch.prepare_data_loader
    return LoaderBatches(prep(train)), LoaderBatches(prep(val, add_dist_sampler=world > 1))


def all_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def maybe_reset(model: torch.nn.Module, spiking: bool) -> None:
    if spiking:
        from spikingjelly.activation_based import functional

        functional.reset_net(model)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, *, world: int, spiking: bool, autocast, num_classes: int,
             meter=None, meter_batches: int = 0) -> dict[str, float]:
    """Loss, top-1 and top-5 summed over this worker's shard, then over all workers. With an
    SNN ``meter``, its first ``meter_batches`` batches are also counted (spikes, SOPs, energy)."""
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    k = min(5, num_classes)
    for i, (x, y) in enumerate(batches):
        with (meter.measuring(n_images=len(x)) if meter is not None and i < meter_batches else nullcontext()):
            with autocast():
                out = model(x)
        maybe_reset(model, spiking)
        out = out.float()
        topk = out.topk(k, dim=-1).indices
        hit = topk.eq(y.unsqueeze(-1))
        sums += torch.stack([
            F.cross_entropy(out, y, reduction="sum").double(),
            hit[:, 0].sum().double(),
            hit.any(-1).sum().double(),
            torch.tensor(float(len(y)), dtype=torch.float64, device=device),
        ])
    loss, top1, top5, n = all_sum(sums, world).tolist()
    n = max(n, 1.0)
    return {"loss": loss / n, "top1": top1 / n, "top5": top5 / n}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


# ---------------------------------------------------------------- the loop


def quiet_ray_train_logs() -> None:
    """Ray Train logs every report in full at INFO (with per-update spectra that is pages per epoch).
    That logger is named after its file (``getLogger(__file__)``), not ``ray.train``."""
    import logging

    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def train_loop(loop_config: dict[str, Any]) -> None:
    quiet_ray_train_logs()
    cfg = Config.model_validate(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    seed_everything(cfg.run.seed)

    bundle = build_data(cfg.data, seed=cfg.run.seed)
    model = build_model(cfg, bundle).to(device)
    spiking = bool(getattr(model, "is_spiking", False))
    optimizer = create_optimizer_v2(model, opt=cfg.optim.name, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                    momentum=cfg.optim.momentum, layer_decay=cfg.optim.layer_decay)
    train_batches, val_batches = build_batches(cfg, bundle, rank=rank, world=world, device=device)
    accum = cfg.optim.grad_accum
    updates_per_epoch = max(1, math.ceil(len(train_batches) / accum))
    scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.optim.sched, num_epochs=cfg.optim.epochs,
                                       warmup_epochs=cfg.optim.warmup_epochs, warmup_lr=cfg.optim.warmup_lr,
                                       min_lr=cfg.optim.min_lr, step_on_epochs=False,
                                       updates_per_epoch=updates_per_epoch)
    dtype = amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext
    ema = ModelEmaV3(model, decay=cfg.optim.ema_decay) if cfg.optim.ema else None
    mixup = build_mixup(cfg, bundle.num_classes)
    criterion = build_criterion(cfg, mixup is not None)
    monitor = make_monitor(cfg, model, ema) if rank == 0 else None
    stop_rule = make_stop_rule(cfg) if monitor is not None else None
    meter, static_snn, run_tags = make_snn_measures(cfg, model, spiking) if rank == 0 else (None, {}, {})
    fr_rule = make_firing_rate_rule(cfg) if (rank == 0 and spiking) else None
    teacher = make_teacher(cfg, bundle, device, loop_config)  # None unless distill.teacher is set

    start_epoch, num_updates = 0, 0
    replay: dict[str, Any] | None = None
    restored_masks = False
    ckpt = ray.train.get_checkpoint()
    own = ckpt is not None  # this run's own checkpoint (a restart), not another run's (`continue`)
    if ckpt is None and loop_config.get("resume_from"):
        ckpt = ray.train.Checkpoint(loop_config["resume_from"])  # `qksweep continue`
    if ckpt:
        state = load_resumable(ckpt, device)
        model.load_state_dict(state["model"])
        if "prune_masks" in state:  # the checkpoint holds permanent weights; fine-tuning keeps their masks
            from ..prune import apply_masks

            apply_masks(model, state["prune_masks"])
            restored_masks = True
        optimizer.load_state_dict(state["optimizer"])
        if int(state.get("epochs_planned", cfg.optim.epochs)) == cfg.optim.epochs:
            scheduler.load_state_dict(state["scheduler"])
        # else: `continue` with more epochs — the fresh schedule spans the new budget
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        if ema is not None and "ema" in state:
            ema.load_state_dict(state["ema"])
        if monitor is not None and "spectral" in state:
            monitor.load_state_dict(state["spectral"])
        if stop_rule is not None and "stop_rule" in state:
            stop_rule.load_state_dict(state["stop_rule"])
        if fr_rule is not None and "fr_rule" in state:
            fr_rule.load_state_dict(state["fr_rule"])
        set_rng_state(state["rng"])
        start_epoch, num_updates = int(state["epoch"]), int(state["updates"])
        # The resumed epoch's metrics ride along with the first report: if the process died after
        # the checkpoint was persisted but before the epoch reached MLflow, the logger fills the gap.
        replay = state.get("metrics") if own else None
        scheduler.step_update(num_updates=num_updates)

    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model
    pruned = restored_masks or (cfg.prune.enabled and prune_now(cfg, model, start_epoch))
    teacher_metrics = teacher_val_metrics(teacher, val_batches, world, autocast, bundle.num_classes)
    best_pruned = make_best_pruned(cfg) if rank == 0 else None

    for epoch in range(start_epoch, cfg.optim.epochs):
        if cfg.prune.enabled and not pruned:
            pruned = prune_now(cfg, model, epoch)
        t0 = time.perf_counter()
        ddp_model.train()
        train_batches.set_epoch(epoch)
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss*n, correct, n
        first_bad = torch.tensor(-1, device=device)
        kd_sum = torch.zeros((), dtype=torch.float64, device=device) if teacher is not None else None
        spec_buffer: list[tuple[int, dict[str, float]]] = []
        stop_reason = torch.zeros(1, device=device)  # rank 0 decides; every rank must leave together
        reason_text: str | None = None
        n_batches = len(train_batches)
        optimizer.zero_grad(set_to_none=True)
        for i, (x, y) in enumerate(train_batches):
            y_hard = y
            if mixup is not None:
                x, y = mixup(x, y)
            step_now = (i + 1) % accum == 0 or i + 1 == n_batches
            sync = nullcontext() if (step_now or world == 1) else ddp_model.no_sync()
            with sync:
                with autocast():
                    out = ddp_model(x)
                    loss = criterion(out, y)
                    if teacher is not None:  # the same (mixed, augmented) batch the student saw
                        loss, kd = distill_loss(loss, out, teacher(x), kind=cfg.distill.kind,
                                                alpha=cfg.distill.alpha, tau=cfg.distill.tau)
                        kd_sum += kd.detach().double() * len(y_hard)
                (scaler.scale(loss / accum) if scaler else loss / accum).backward()
            maybe_reset(model, spiking)
            ld = loss.detach().double()
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(ld), num_updates + 1, first_bad)
            sums += torch.stack([ld * len(y_hard), out.detach().argmax(-1).eq(y_hard).sum().double(),
                                 torch.tensor(float(len(y_hard)), dtype=torch.float64, device=device)])
            if not step_now:
                continue
            if cfg.optim.clip_grad:
                if scaler:
                    scaler.unscale_(optimizer)
                dispatch_clip_grad(model.parameters(), cfg.optim.clip_grad)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            num_updates += 1
            scheduler.step_update(num_updates=num_updates)
            if ema is not None:
                ema.update(model, step=num_updates)
            if monitor is not None:
                measured = monitor.maybe_measure(num_updates)
                if measured:
                    spec_buffer.append((num_updates, measured))
                    if stop_rule is not None and reason_text is None:
                        reason_text = stop_rule.check(measured)
                        if reason_text:
                            stop_reason.fill_(1.0)
            if stop_check_due(cfg, num_updates):  # only on measuring steps, which every rank knows
                stop_reason = all_max(stop_reason, world)
                if stop_reason.item() > 0:
                    break
        scheduler.step(epoch + 1)
        train_time = time.perf_counter() - t0

        bad_step = int(all_max(first_bad, world))
        loss_sum, correct, n = all_sum(sums, world).tolist()
        if bad_step >= 0 or not math.isfinite(loss_sum):
            raise FloatingPointError(f"non-finite loss at epoch {epoch + 1}, step {max(bad_step, num_updates)}")
        val = evaluate(ddp_model, val_batches, world=world, spiking=spiking, autocast=autocast,
                       num_classes=bundle.num_classes, meter=meter, meter_batches=cfg.snn.val_batches)
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": num_updates,
            "train/loss": loss_sum / max(n, 1),
            "train/top1": correct / max(n, 1),
            "val/loss": val["loss"],
            "val/top1": val["top1"],
            "val/top5": val["top5"],
            "lr": optimizer.param_groups[-1]["lr"],
            "samples_per_s": n / max(train_time, 1e-9),
        }
        if kd_sum is not None:
            metrics["train/kd_loss"] = all_sum(kd_sum, world).item() / max(n, 1)
        if teacher_metrics:
            metrics.update(teacher_metrics)
            teacher_metrics = None
        if pruned:
            from ..prune import sparsity

            metrics["prune/sparsity"] = sparsity(model)
        if ema is not None:
            ev = evaluate(ema.module, val_batches, world=world, spiking=spiking, autocast=autocast,
                          num_classes=bundle.num_classes)
            metrics.update({"val_ema/loss": ev["loss"], "val_ema/top1": ev["top1"], "val_ema/top5": ev["top5"]})
        metrics.update(static_snn)
        if meter is not None:
            metrics.update(meter.compute())
            meter.reset()
        if fr_rule is not None and reason_text is None:
            reason_text = fr_rule.check(metrics)
            if reason_text:
                stop_reason.fill_(2.0)
        if cfg.sweep.stop_on.firing_rate is not None and spiking:  # every rank learns rank 0's decision
            stop_reason = all_max(stop_reason, world)
        if run_tags:
            metrics["_tags"], run_tags = run_tags, {}
        metrics["epoch_time_s"] = time.perf_counter() - t0
        if spec_buffer:
            metrics["_spec"] = spec_buffer
        if replay:
            metrics["_replay"], replay = replay, None
        stopping = bool(stop_reason.item() > 0)
        if stopping and rank == 0:
            metrics["_stopped_by"] = "firing_rate" if stop_reason.item() == 2.0 else "spectral"
            metrics["_stop_reason"] = reason_text

        if rank == 0:
            state = {"model": model_state(model, pruned), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "updates": num_updates,
                     "epochs_planned": cfg.optim.epochs,
                     "rng": rng_state(), "metrics": {k: v for k, v in metrics.items() if k != "_replay"}}
            if pruned:
                from ..prune import masks

                state["prune_masks"] = masks(model)
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            if ema is not None:
                state["ema"] = ema.state_dict()
            if monitor is not None:
                state["spectral"] = monitor.state_dict()
            if stop_rule is not None:
                state["stop_rule"] = stop_rule.state_dict()
            if fr_rule is not None:
                state["fr_rule"] = fr_rule.state_dict()
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(tmp, state, cfg.to_dict())
                if pruned and best_pruned is not None:
                    best_pruned.offer(tmp, metrics)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)
        if stopping:
            break

    if monitor is not None and loop_config.get("run_id") and loop_config.get("tracking_uri"):
        finish_monitor(monitor, loop_config["tracking_uri"], loop_config["run_id"])
    if best_pruned is not None:
        if loop_config.get("run_id") and loop_config.get("tracking_uri"):
            best_pruned.upload(loop_config["tracking_uri"], loop_config["run_id"])
        best_pruned.close()


def make_teacher(cfg: Config, bundle: DataBundle, device: torch.device, loop_config: dict[str, Any]):
    """The frozen distillation teacher, loaded once per worker (None with distillation off)."""
    if not cfg.distill.enabled:
        return None
    from ..distill import load_teacher

    uri = loop_config.get("tracking_uri") or cfg.tracking.uri
    return load_teacher(cfg.distill, num_classes=bundle.num_classes, tracking_uri=uri, device=device,
                        student_data=cfg.data, student_mean=bundle.mean, student_std=bundle.std).to(device)


def teacher_val_metrics(teacher, val_batches, world: int, autocast, num_classes: int) -> dict[str, float] | None:
    """The teacher's own validation accuracy, reported once with the first epoch of each worker start."""
    if teacher is None:
        return None
    ev = evaluate(teacher, val_batches, world=world, spiking=False, autocast=autocast, num_classes=num_classes)
    return {"distill/teacher_top1": ev["top1"], "distill/teacher_loss": ev["loss"]}


def prune_now(cfg: Config, model: torch.nn.Module, epoch: int) -> bool:
    """Prune ``model`` when ``epoch`` (0-based, about to start) has reached ``prune.at_epoch``; True
    once the model is pruned."""
    if epoch < cfg.prune.at_epoch:
        return False
    from ..prune import apply_pruning

    p = cfg.prune
    apply_pruning(model, p.method, p.amount, p.scope)
    return True


def make_best_pruned(cfg: Config):
    if not cfg.prune.enabled:
        return None
    from ..prune.best import BestPrunedCheckpoint

    return BestPrunedCheckpoint(cfg.sweep.metrics[0], cfg.sweep.modes[0])


def model_state(model: torch.nn.Module, pruned: bool) -> dict[str, torch.Tensor]:
    if not pruned:
        return model.state_dict()
    from ..prune import plain_state_dict

    return plain_state_dict(model)


def load_resumable(ckpt, device) -> dict[str, Any]:
    """Load the checkpoint to resume from; if it is corrupt, fall back to the newest earlier checkpoint
    of the same run (kept alongside it in the run's storage) with a warning."""
    import logging
    from pathlib import Path

    from .checkpoint import CheckpointError

    try:
        with ckpt.as_directory() as d:
            return load_checkpoint(d, map_location=device)[0]
    except CheckpointError as err:
        here = Path(ckpt.path)
        if "://" in ckpt.path or not here.parent.is_dir():
            raise
        for older in sorted((p for p in here.parent.glob("checkpoint_*") if p.is_dir() and p.name < here.name), reverse=True):
            try:
                state = load_checkpoint(older, map_location=device)[0]
            except CheckpointError:
                continue
            logging.getLogger("qksweep").warning("%s; resuming from the previous checkpoint %s (epoch %s)",
                                                 err, older.name, state.get("epoch"))
            return state
        raise


def all_max(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def make_snn_measures(cfg: Config, model: torch.nn.Module, spiking: bool):
    """(meter for SNNs, constant metrics, run tags). ViTs get the ANN-equivalent energy once, so both
    families sit on one energy axis."""
    if not cfg.snn.enabled:
        return None, {}, {}
    from ..snn import ENERGY_ASSUMPTIONS, SNNMeter, ann_energy_mj

    tags = {f"qksweep.{k}": v for k, v in ENERGY_ASSUMPTIONS.items()}
    if spiking:
        return SNNMeter(model), {}, tags
    size = cfg.data.img_size
    model.eval()  # a counting forward must not move BatchNorm statistics
    energy = ann_energy_mj(model, (1, 3, size, size))
    model.train()
    return None, {"snn/energy_mj": energy}, tags


def make_firing_rate_rule(cfg: Config):
    rule = cfg.sweep.stop_on.firing_rate
    if rule is None or not cfg.snn.enabled:
        return None
    from ..snn import FiringRateStopRule

    return FiringRateStopRule(low=rule.low, high=rule.high, patience=rule.patience)


def stop_check_due(cfg: Config, num_updates: int) -> bool:
    return bool(cfg.sweep.stop_on.spec_sigma_max_growth and cfg.spectral.enabled
                and num_updates % cfg.spectral.every == 0)


def make_stop_rule(cfg: Config):
    growth = cfg.sweep.stop_on.spec_sigma_max_growth
    if not growth:
        return None
    from ..spectral import SpectralStopRule

    return SpectralStopRule(growth)


def make_monitor(cfg: Config, model: torch.nn.Module, ema: ModelEmaV3 | None):
    if not cfg.spectral.enabled:
        return None
    from ..spectral import SpectralMonitor

    return build_spectral_monitors(cfg, model, ema, SpectralMonitor)


def build_spectral_monitors(cfg: Config, model, ema, monitor_cls):
    from ..models import default_spectral_targets

    s = cfg.spectral
    targets = s.targets or default_spectral_targets(cfg.model.name)
    kw = dict(targets=targets, topk=s.topk, interval=s.interval, every=s.every, on_cpu=s.on_cpu, split_qkv=s.split_qkv)
    monitors = [monitor_cls(model, prefix="spec", **kw)]
    if ema is not None:
        monitors.append(monitor_cls(ema.module, prefix="spec_ema", **kw))
    return MonitorGroup(monitors)


class MonitorGroup:
    """The base model's monitor and, with EMA on, the EMA model's (``spec_ema/``), as one."""

    def __init__(self, monitors):
        self.monitors = monitors

    def maybe_measure(self, step: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for m in self.monitors:
            out.update(m.maybe_measure(step))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {str(i): m.state_dict() for i, m in enumerate(self.monitors)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for i, m in enumerate(self.monitors):
            if str(i) in state:
                m.load_state_dict(state[str(i)])

    def save_artifacts(self, out_dir) -> list:
        from pathlib import Path

        files = []
        for m in self.monitors:
            sub = Path(out_dir) / m.prefix if len(self.monitors) > 1 else Path(out_dir)
            files += m.save_artifacts(sub)
        return files


def finish_monitor(monitor: MonitorGroup, tracking_uri: str, run_id: str) -> None:
    """Spectral plots and the last spectra as artifacts of the run (rank 0, end of training)."""
    from ..tracking.runs import log_artifact_dir

    with tempfile.TemporaryDirectory() as tmp:
        if monitor.save_artifacts(tmp):
            log_artifact_dir(tracking_uri, run_id, tmp, "spectral")
