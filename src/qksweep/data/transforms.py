"""Image transforms: timm train/eval pipelines, the QKFormer CIFAR policy and the
preprocessing that turns one PIL image into what the in-memory datasets hold."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .base import DataOptions

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

# Up to this img_size CIFAR uses the official QKFormer/Spikformer CIFAR policy.
SMALL_IMAGE_MAX = 64


class ToRGB:
    """Convert a PIL image to RGB (grayscale/RGBA/palette inputs at predict time)."""

    def __call__(self, img):
        return img.convert("RGB") if getattr(img, "mode", "RGB") != "RGB" else img

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def resize_batch(x: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """Resize a float batch [N,C,H,W] to [N,C,size,size] (no-op when already that size)."""
    if x.shape[-2:] == (size, size):
        return x
    kwargs = {} if mode == "nearest" else {"align_corners": False, "antialias": size < min(x.shape[-2:])}
    return F.interpolate(x, size=(size, size), mode=mode, **kwargs)


def tensor_mode(interpolation: str) -> str:
    return interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bilinear"


class InMemoryEvalTransform:
    """PIL image -> normalized [3, img, img] tensor, exactly as the in-memory
    datasets (digits, synthetic) were preprocessed: pixels scaled to [0, 1],
    resized with `F.interpolate`, normalized, `gray` inputs replicated to 3 channels."""

    def __init__(self, img_size: int, mean: Sequence[float], std: Sequence[float], *, gray: bool, mode: str):
        self.img_size = int(img_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.gray = gray
        self.mode = mode

    def __call__(self, img) -> torch.Tensor:
        if hasattr(img, "convert"):
            arr = np.asarray(img.convert("L" if self.gray else "RGB"), dtype=np.float32) / 255.0
            x = torch.from_numpy(arr.copy())
            x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
        else:  # already a [C,H,W] / [H,W] float tensor in [0, 1]
            x = torch.as_tensor(img, dtype=torch.float32)
            x = x[None] if x.ndim == 2 else x
            if self.gray and x.shape[0] != 1:
                x = x.mean(0, keepdim=True)
        x = resize_batch(x[None], self.img_size, self.mode)[0]
        chans = 1 if self.gray else 3
        mean = torch.tensor(self.mean[:chans]).view(-1, 1, 1)
        std = torch.tensor(self.std[:chans]).view(-1, 1, 1)
        x = (x - mean) / std
        return x.expand(3, -1, -1).contiguous() if self.gray else x

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(img_size={self.img_size}, gray={self.gray}, mode={self.mode!r}, "
                f"mean={self.mean}, std={self.std})")


def timm_train_transform(
    opts: DataOptions,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    scale: tuple[float, float] | None = None,
    ratio: tuple[float, float] | None = None,
    uint8: bool = False,
):
    """timm's training pipeline (RandomResizedCrop, flip, auto-augment or color
    jitter, ToTensor, Normalize, RandomErasing) driven by the data options.

    ``uint8``: stop before ToTensor (timm's ``use_prefetcher`` pipeline): a sample is a uint8
    [C,H,W] tensor, and :class:`BatchNormalize` does the rest once per batch, after the loader."""
    from timm.data import create_transform

    tf = create_transform(
        input_size=opts.img_size,
        is_training=True,
        scale=scale,
        ratio=ratio,
        hflip=opts.hflip,
        color_jitter=opts.color_jitter,
        auto_augment=opts.aa,
        interpolation=opts.interpolation,
        mean=tuple(mean),
        std=tuple(std),
        re_prob=opts.reprob,
        re_mode=opts.remode,
        use_prefetcher=uint8,
    )
    return keep_posterize_working(tf)


class BatchNormalize:
    """The end of timm's training pipeline, run on a whole batch where it lands instead of on each
    image in a loader worker: uint8 [N,C,H,W] -> float32, normalised, then timm's RandomErasing per
    image (``re_prob``, ``re_mode``), what timm's ``PrefetchLoader`` does after ``create_loader``.

    The workers then decode, crop and augment only, and hand over a quarter of the bytes: with seed
    001's transforms at 224² a worker spent 2.5 ms of CPU per image before and 1.9 ms after, and
    the loader went from 0.72x to 1.04x timm's images/s (``bench/loader.py --quick``, 2-core VM,
    2026-12-07); on a GPU the normalising and erasing run there. Erasing draws from the consuming
    process's torch generator on the batch's device instead of the workers'."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], re_prob: float = 0.0, re_mode: str = "pixel",
                 re_count: int = 1):
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.re_prob, self.re_mode, self.re_count = float(re_prob), re_mode, int(re_count)
        self._by_device: dict[str, tuple] = {}

    def _for(self, device: torch.device) -> tuple:
        key = str(device)
        if key not in self._by_device:
            from timm.data.random_erasing import RandomErasing

            mean = torch.tensor([255 * m for m in self.mean], device=device).view(1, -1, 1, 1)
            std = torch.tensor([255 * s for s in self.std], device=device).view(1, -1, 1, 1)
            erase = (RandomErasing(self.re_prob, mode=self.re_mode, max_count=self.re_count, device=device)
                     if self.re_prob > 0 else None)
            self._by_device[key] = (mean, std, erase)
        return self._by_device[key]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:
            raise TypeError(f"BatchNormalize expects a uint8 batch from the loader, got {x.dtype}")
        mean, std, erase = self._for(x.device)
        x = x.to(torch.float32).sub_(mean).div_(std)
        return erase(x) if erase is not None else x

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(mean={self.mean}, std={self.std}, re_prob={self.re_prob}, "
                f"re_mode={self.re_mode!r}, re_count={self.re_count})")


def posterize_zero_bits_black(img, bits_to_keep, **_):
    """timm's posterize, where keeping 0 bits gives a black image (what Pillow used to return).

    timm 1.0.31's increasing posterize (the ``inc1`` in ``rand-m9-mstd0.5-inc1``, QKFormer's CIFAR
    policy) maps the top magnitude to 0 bits; magnitude noise (``mstd``) reaches it now and then
    (about 1 image in 5,000 here). Pillow 13 refuses ``ImageOps.posterize(img, 0)`` with
    "bits must be between or equal to 1 and 8", which ended the epoch of a CIFAR run."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point([0] * (256 * len(img.getbands())))
    return ImageOps.posterize(img, bits_to_keep)


def keep_posterize_working(tf):
    """Give every posterize op of timm's auto-augment (RandAugment, AutoAugment, AugMix) in the
    Compose ``tf`` the 0-bit-safe posterize above; the rest of the pipeline is left as timm built it."""
    from timm.data.auto_augment import AugMixAugment, AutoAugment, RandAugment

    for t in getattr(tf, "transforms", ()):
        if isinstance(t, (RandAugment, AugMixAugment)):
            ops = list(t.ops)
        elif isinstance(t, AutoAugment):
            ops = [op for sub in t.policy for op in sub]
        else:
            continue
        for op in ops:
            if op.name.startswith("Posterize"):
                op.aug_fn = posterize_zero_bits_black
    return tf


def timm_eval_transform(
    opts: DataOptions, mean: Sequence[float], std: Sequence[float], *, crop_pct: float | None = None
):
    """timm's eval pipeline (Resize, CenterCrop, ToTensor, Normalize), preceded by
    a conversion to RGB so single images of any mode work at predict time."""
    from timm.data import create_transform
    from torchvision import transforms

    tf = create_transform(
        input_size=opts.img_size,
        is_training=False,
        interpolation=opts.interpolation,
        mean=tuple(mean),
        std=tuple(std),
        crop_pct=crop_pct,
    )
    return transforms.Compose([ToRGB(), *tf.transforms])


def cifar_train_transform(opts: DataOptions, mean: Sequence[float], std: Sequence[float]):
    """Training transform for CIFAR.

    For ``img_size <= 64`` this is the official QKFormer/Spikformer CIFAR policy
    (their cifar10.yml: timm transforms with ``scale=[1.0, 1.0], ratio=[1.0, 1.0]``,
    i.e. no random crop, only a resize to img_size) + horizontal flip +
    RandAugment/auto-augment when `aa` is set (else color jitter when set) +
    ToTensor + Normalize + timm RandomErasing when `reprob > 0`.  With the
    optional `crop_padding > 0` a RandomCrop(img_size, padding=crop_padding)
    follows the resize (the classic ResNet CIFAR crop; not in the QKFormer recipe).

    Larger sizes (ViTs fed upsampled CIFAR at 224) use timm's standard
    RandomResizedCrop pipeline.
    """
    if opts.img_size > SMALL_IMAGE_MAX:
        return timm_train_transform(opts, mean, std)
    tf = timm_train_transform(opts, mean, std, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    if opts.crop_padding > 0:
        from torchvision import transforms

        tf.transforms.insert(1, transforms.RandomCrop(opts.img_size, padding=opts.crop_padding))
    return tf
