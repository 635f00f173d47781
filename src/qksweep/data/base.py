"""Shared pieces of the data package: the bundle, the error type, the options
read from a config object (the config schema's ``DataConfig``), the dataset
registry and small index helpers.

Nothing in here touches the disk or imports torchvision/timm, so it is cheap to
import from the CLI and from `check_data`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import ConfigDict, Field, ValidationError, field_validator

from ..config import DataConfig

# Splits and subsets never depend on the trial seed: every trial of a sweep must
# see exactly the same train/val data, or the sweep compares noise.  Override
# with an optional `split_seed` attribute on the data config.
DEFAULT_SPLIT_SEED = 0



class DataError(ValueError):
    """A data configuration or on-disk layout problem, with a one-line fix."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


@dataclass
class DataBundle:
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    num_classes: int
    in_chans: int
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # True when train/val are TensorDatasets that are already resized and
    # normalized (digits, synthetic): no per-sample augmentation happens.
    in_memory: bool
    # event-camera data: frames per sample (the model runs one time step per frame); None for images
    frames: int | None = None
    # file-backed data whose train samples are uint8 [C,H,W] (ImageFolder): what turns a batch of them
    # into the model's input where the batch lands (transforms.BatchNormalize); None when train
    # samples are ready as they are
    train_batch_transform: Callable[[torch.Tensor], torch.Tensor] | None = None


class DataOptions(DataConfig):
    """The config schema's ``DataConfig`` (the one copy of the data keys' types and ranges), read the
    way this package needs it: names lower-cased, ``aa: none`` and ``color_jitter: 0`` as off, and two
    extras that are not config keys (``split_seed``, ``crop_padding``).

    Built by :func:`options` from a ``DataConfig``, any object with its attributes, or a mapping;
    missing attributes take the schema's defaults."""

    model_config = ConfigDict(extra="ignore", frozen=True, validate_assignment=False)

    split_seed: int = Field(default=DEFAULT_SPLIT_SEED, ge=0)  # seed of digits split / synthetic data / subsets
    crop_padding: int = Field(default=0, ge=0)  # CIFAR small-image policy: RandomCrop(img_size, padding) when > 0

    @field_validator("name", "remode", "interpolation", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return str(v).strip().lower() if v is not None else v

    @field_validator("aa", mode="before")
    @classmethod
    def _aa_off(cls, v: Any) -> Any:
        return None if v is None or str(v).strip().lower() in ("", "none", "null", "false") else str(v).strip()

    @field_validator("root", mode="before")
    @classmethod
    def _root(cls, v: Any) -> Any:
        return None if v in (None, "") else str(v)

    @field_validator("color_jitter")
    @classmethod
    def _jitter_off(cls, v: float | None) -> float | None:
        return v or None


_NULLABLE = {k for k, f in DataOptions.model_fields.items() if f.default is None}


def options(cfg: Any) -> DataOptions:
    """Read and validate the data options of `cfg` (pure, no disk access). A None where the schema
    has a default takes the default."""
    if isinstance(cfg, DataOptions):
        return cfg
    if isinstance(cfg, Mapping):
        raw = {k: cfg[k] for k in DataOptions.model_fields if k in cfg}
    else:
        raw = {k: getattr(cfg, k) for k in DataOptions.model_fields if hasattr(cfg, k)}
    raw = {k: v for k, v in raw.items() if v is not None or k in _NULLABLE}
    try:
        return DataOptions.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        got = f"={first['input']!r}" if key in raw else ""
        raise DataError(f"data.{key}{got}: {first['msg'].lower()}") from None


# --------------------------------------------------------------------------- registry

Builder = Callable[[DataOptions, int], DataBundle]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    build: Builder
    check: Callable[[DataOptions], None] | None = None
    eval_transform: Callable[[DataOptions, Sequence[float], Sequence[float]], Callable] | None = None
    prepare: Callable[[DataOptions], None] | None = None
    aliases: tuple[str, ...] = ()
    description: str = ""
    in_memory: bool = False  # preprocessed TensorDatasets, no augmentation
    in_chans: int = 3
    events: bool = False  # [T, C, H, W] event frames per sample (data.frames), for spiking models only


_REGISTRY: dict[str, DatasetSpec] = {}
_ALIASES: dict[str, str] = {}


def register_dataset(
    name: str,
    *,
    check: Callable[[DataOptions], None] | None = None,
    eval_transform: Callable | None = None,
    prepare: Callable[[DataOptions], None] | None = None,
    aliases: Sequence[str] = (),
    description: str = "",
    in_memory: bool = False,
    in_chans: int = 3,
    events: bool = False,
) -> Callable[[Builder], Builder]:
    """Decorator registering `build(opts, seed) -> DataBundle` under `name`.

    `check(opts)` does cheap validation (raise DataError), `eval_transform(opts,
    mean, std)` returns the validation preprocessing for one PIL image, and
    `prepare(opts)` does one-off work in the driver (downloads).
    """
    key = name.lower()

    def deco(fn: Builder) -> Builder:
        if key in _REGISTRY or key in _ALIASES:
            raise ValueError(f"dataset {name!r} is already registered")
        _REGISTRY[key] = DatasetSpec(
            key, fn, check, eval_transform, prepare, tuple(a.lower() for a in aliases), description, in_memory,
            in_chans, events,
        )
        for alias in aliases:
            _ALIASES[alias.lower()] = key
        return fn

    return deco


def list_datasets() -> list[str]:
    """Canonical names of the registered datasets (aliases are accepted too)."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> DatasetSpec:
    key = _ALIASES.get(name.lower(), name.lower())
    try:
        return _REGISTRY[key]
    except KeyError:
        raise DataError(
            f"data.name: unknown dataset {name!r}; choose one of {', '.join(list_datasets())}"
        ) from None


# --------------------------------------------------------------------------- index helpers


def balanced_indices(targets: Sequence[int] | np.ndarray, n: int, seed: int) -> np.ndarray:
    """`n` indices spread as evenly as possible over the classes of `targets`.

    Each class's indices are shuffled with `seed`, then taken round-robin until
    `n` are chosen (classes that run out are skipped).  Deterministic; the
    result is sorted.  Returns all indices when `n >= len(targets)`.
    """
    t = np.asarray(targets)
    if n >= len(t):
        return np.arange(len(t))
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(t == c)) for c in np.unique(t)]
    # rank of each index inside its class, then take the n smallest ranks
    idx = np.concatenate(per_class)
    rank = np.concatenate([np.arange(len(p)) for p in per_class])
    cls_order = np.concatenate([np.full(len(p), i) for i, p in enumerate(per_class)])
    order = np.lexsort((cls_order, rank))
    return np.sort(idx[order[:n]])


def check_num_classes(opts: DataOptions, actual: int, where: str) -> None:
    if opts.num_classes is not None and opts.num_classes != actual:
        raise DataError(
            f"data.num_classes={opts.num_classes} but {where} has {actual} classes; "
            f"remove data.num_classes or set it to {actual}"
        )
