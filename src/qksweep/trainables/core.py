"""The core pieces of the training loop: data batches, model, optimiser, schedule, mixed precision and
evaluation, built once per worker as one :class:`Core`. Small and pure where possible; the loop
(:mod:`.loop`) and its extras (:mod:`.extras`) use them."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from ..config import Config
from ..data import DataBundle, build_data
from ..models import create_model, frames_batch_first


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(cfg: Config, bundle: DataBundle) -> torch.nn.Module:
    """The model for this data: event frames set its time steps (one per frame) and it takes them batch
    first, ``[N, T, C, H, W]``, as the loader gives them."""
    over = cfg.model.overrides()
    if bundle.frames is not None:
        over["time_steps"] = bundle.frames
    model = create_model(cfg.model.name, num_classes=bundle.num_classes, in_chans=bundle.in_chans,
                         img_size=cfg.data.img_size, **over)
    return frames_batch_first(model) if bundle.frames is not None else model


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
    """A DataLoader prepared by Ray Train (DistributedSampler, device transfer), or, outside Ray Train
    (a one-worker trial in its own process), one whose batches this moves to ``device``. ``transform``
    (the bundle's ``train_batch_transform``) then runs on each batch's inputs on that device."""

    def __init__(self, loader, device: torch.device | None = None,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.loader, self.device, self.transform = loader, device, transform

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)

    def __iter__(self):
        if self.device is None:
            batches = iter(self.loader)
        else:
            nb = self.device.type == "cuda"
            batches = ((x.to(self.device, non_blocking=nb), y.to(self.device, non_blocking=nb))
                       for x, y in self.loader)
        if self.transform is None:
            return batches
        return ((self.transform(x), y) for x, y in batches)


def build_batches(cfg: Config, bundle: DataBundle, *, rank: int, world: int, device: torch.device,
                  ray_train: bool = True):
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
    nw = cfg.loader_workers(in_memory=False)
    train = DataLoader(bundle.train, batch_size=bs, shuffle=True, drop_last=True, num_workers=nw,
                       pin_memory=pin, persistent_workers=nw > 0)
    val = DataLoader(bundle.val, batch_size=ebs, shuffle=False, num_workers=nw, pin_memory=pin,
                     persistent_workers=nw > 0)
    tf = bundle.train_batch_transform
    if not ray_train:
        return LoaderBatches(train, device, tf), LoaderBatches(val, device)
    prep = ray.train.torch.prepare_data_loader
    return LoaderBatches(prep(train), transform=tf), LoaderBatches(prep(val, add_dist_sampler=world > 1))


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
             around: Callable[[int, int], ContextManager] | None = None) -> dict[str, float]:
    """Loss, top-1 and top-5 summed over this worker's shard, then over all workers. ``around(i, n)``
    wraps the forward of batch ``i`` (``n`` images): the SNN meter counts spikes there."""
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    k = min(5, num_classes)
    for i, (x, y) in enumerate(batches):
        with (around(i, len(x)) if around is not None else nullcontext()):
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


class CompiledOrEager(torch.nn.Module):
    """The model through ``torch.compile`` (``run.compile``). The first forward in each mode (train, eval)
    is where the compiler runs; should it fail there, one warning line and the eager model from then on.
    The parameters are the eager model's own: checkpoints, EMA and spectra see the same tensors."""

    def __init__(self, model: torch.nn.Module, mode: bool | str, spiking: bool):
        super().__init__()
        self.eager, self.spiking = model, spiking
        # a reused trial process (sweep.reuse_actors) compiles one model per trial: start each from an
        # empty cache so that Dynamo's recompile limit counts this model only, not the trials before it
        torch.compiler.reset()
        self.compiled = torch.compile(model, mode=None if mode is True else mode)
        self.works: dict[bool, bool] = {}  # training flag -> whether the compiled forward ran
        self.train(model.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        works = self.works.get(self.training)
        if works is not None:
            return self.compiled(x) if works else self.eager(x)
        try:
            out = self.compiled(x)
        except Exception as e:  # noqa: BLE001 - any compiler failure: train eagerly, as without run.compile
            import logging

            name = type(unwrap(self.eager)).__name__
            logging.getLogger("qksweep").warning("run.compile: %s did not compile (%s); running it eagerly", name,
                                                 (str(e).strip().splitlines() or [type(e).__name__])[0][:200])
            self.works = {True: False, False: False}
            maybe_reset(self.eager, self.spiking)  # the failed call may have left neuron state behind
            return self.eager(x)
        self.works[self.training] = True
        return out

    def no_sync(self):
        return self.eager.no_sync()


def compile_model(model: torch.nn.Module, mode: bool | str, spiking: bool) -> torch.nn.Module:
    return CompiledOrEager(model, mode, spiking) if mode else model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model



def all_max(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


@dataclass
class Core:
    """What every run trains with, built once per worker by :func:`build_core`."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    bundle: DataBundle
    model: torch.nn.Module
    spiking: bool
    optimizer: torch.optim.Optimizer
    scheduler: Any  # a timm scheduler (stepped per update and per epoch)
    scaler: torch.amp.GradScaler  # disabled unless float16 autocast
    autocast: Callable[[], ContextManager]
    mixup: Mixup | None
    criterion: torch.nn.Module
    train_batches: Any
    val_batches: Any

    def evaluate(self, model: torch.nn.Module, around=None) -> dict[str, float]:
        return evaluate(model, self.val_batches, world=self.world, spiking=self.spiking, autocast=self.autocast,
                        num_classes=self.bundle.num_classes, around=around)


def build_core(cfg: Config, *, rank: int, world: int, device: torch.device, ray_train: bool = True) -> Core:
    bundle = build_data(cfg.data, seed=cfg.run.seed)
    model = build_model(cfg, bundle).to(device)
    o = cfg.optim
    optimizer = create_optimizer_v2(model, opt=o.name, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum,
                                    layer_decay=o.layer_decay)
    train_batches, val_batches = build_batches(cfg, bundle, rank=rank, world=world, device=device, ray_train=ray_train)
    updates_per_epoch = max(1, math.ceil(len(train_batches) / o.grad_accum))
    scheduler, _ = create_scheduler_v2(optimizer, sched=o.sched, num_epochs=o.epochs, warmup_epochs=o.warmup_epochs,
                                       warmup_lr=o.warmup_lr, min_lr=o.min_lr, step_on_epochs=False,
                                       updates_per_epoch=updates_per_epoch)
    dtype = amp_dtype(cfg, device)
    mixup = build_mixup(cfg, bundle.num_classes)
    return Core(cfg=cfg, rank=rank, world=world, device=device, bundle=bundle, model=model,
                spiking=bool(getattr(model, "is_spiking", False)), optimizer=optimizer, scheduler=scheduler,
                scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
                autocast=(lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext,
                mixup=mixup, criterion=build_criterion(cfg, mixup is not None),
                train_batches=train_batches, val_batches=val_batches)

