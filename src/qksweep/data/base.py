"""Shared pieces of the data package: the bundle, the error type, the options
read from a config object, the dataset registry and small index helpers.

Nothing in here touches the disk or imports torchvision/timm, so it is cheap to
import from the CLI and from `check_data`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# Splits and subsets never depend on the trial seed: every trial of a sweep must
# see exactly the same train/val data, or the sweep compares noise.  Override
# with an optional `split_seed` attribute on the data config.
DEFAULT_SPLIT_SEED = 0

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
REMODES = ("pixel", "const", "rand")


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


@dataclass(frozen=True)
class DataOptions:
    """The data config attributes this package reads, with defaults filled in.

    Built by :func:`options` from any object (or mapping) with the project's
    `DataConfig` attributes; missing attributes take the defaults below.
    """

    name: str = "digits"
    root: str | None = None
    img_size: int = 32
    download: bool = False
    aa: str | None = None
    reprob: float = 0.0
    remode: str = "pixel"
    hflip: float = 0.5
    color_jitter: float | None = None
    val_fraction: float = 0.2
    num_classes: int | None = None
    train_size: int | None = None
    val_size: int | None = None
    interpolation: str = "bilinear"
    # Optional extras (not required on DataConfig):
    split_seed: int = DEFAULT_SPLIT_SEED  # seed of digits split / synthetic data / subsets
    crop_padding: int = 0  # CIFAR small-image policy: RandomCrop(img_size, padding) when > 0


_FIELDS = tuple(DataOptions.__dataclass_fields__)


def _get(cfg: Any, key: str, default: Any) -> Any:
    if isinstance(cfg, Mapping):
        value = cfg.get(key, default)
    else:
        value = getattr(cfg, key, default)
    return default if value is None and default is not None and key not in _NULLABLE else value


_NULLABLE = {"root", "aa", "color_jitter", "num_classes", "train_size", "val_size"}


def _as_int(key: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise DataError(f"data.{key} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise DataError(f"data.{key} must be >= {minimum}, got {value}")
    return int(value)


def _as_float(key: str, value: Any, lo: float, hi: float) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise DataError(f"data.{key} must be a number in [{lo}, {hi}], got {value!r}") from None
    if not lo <= out <= hi:
        raise DataError(f"data.{key} must be in [{lo}, {hi}], got {out}")
    return out


def options(cfg: Any) -> DataOptions:
    """Read and validate the generic data options of `cfg` (pure, no disk access)."""
    if isinstance(cfg, DataOptions):
        return cfg
    d = DataOptions()
    raw = {k: _get(cfg, k, getattr(d, k)) for k in _FIELDS}

    name = str(raw["name"]).strip().lower()
    aa = raw["aa"]
    aa = None if aa is None or str(aa).strip().lower() in ("", "none", "null", "false") else str(aa).strip()
    cj = raw["color_jitter"]
    cj = None if cj is None else (_as_float("color_jitter", cj, 0.0, 10.0) or None)
    remode = str(raw["remode"]).strip().lower()
    if remode not in REMODES:
        raise DataError(f"data.remode must be one of {', '.join(REMODES)}, got {raw['remode']!r}")
    interp = str(raw["interpolation"]).strip().lower()
    if interp not in INTERPOLATIONS:
        raise DataError(f"data.interpolation must be one of {', '.join(INTERPOLATIONS)}, got {raw['interpolation']!r}")
    val_fraction = _as_float("val_fraction", raw["val_fraction"], 0.0, 1.0)
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"data.val_fraction must be strictly between 0 and 1, got {val_fraction}")

    def opt_int(key: str, minimum: int) -> int | None:
        return None if raw[key] is None else _as_int(key, raw[key], minimum=minimum)

    return DataOptions(
        name=name,
        root=None if raw["root"] in (None, "") else str(raw["root"]),
        img_size=_as_int("img_size", raw["img_size"], minimum=1),
        download=bool(raw["download"]),
        aa=aa,
        reprob=_as_float("reprob", raw["reprob"], 0.0, 1.0),
        remode=remode,
        hflip=_as_float("hflip", raw["hflip"], 0.0, 1.0),
        color_jitter=cj,
        val_fraction=val_fraction,
        num_classes=opt_int("num_classes", 2),
        train_size=opt_int("train_size", 1),
        val_size=opt_int("val_size", 1),
        interpolation=interp,
        split_seed=_as_int("split_seed", raw["split_seed"], minimum=0),
        crop_padding=_as_int("crop_padding", raw["crop_padding"], minimum=0),
    )


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
            key, fn, check, eval_transform, prepare, tuple(a.lower() for a in aliases), description, in_memory
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
