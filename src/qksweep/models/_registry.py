"""Model registry (timm ``_registry.py`` style) with cheap argument validation.

Two kinds of entries live here:

* static entries, added with :func:`register_model` (QKFormers, SpikingJelly zoo);
* dynamic *providers* (:func:`register_provider`), used for whole families whose
  names come from another library at run time (every ``timm`` ``vit_*`` model).

A factory is called as ``fn(num_classes=..., in_chans=..., img_size=..., **resolved)``
where ``resolved`` holds the model's default for every supported override key,
replaced by the caller's value where one was given.  Its optional ``check``
function gets the same resolved arguments (plus the set of keys the caller set)
and must raise :class:`ModelArgError` without building anything.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import numbers
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Optional, Protocol

import torch.nn as nn
from pydantic import ValidationError

from ..config import ModelConfig, NeuronConfig

__all__ = [
    "OVERRIDE_KEYS",
    "ModelArgError",
    "ModelInfo",
    "register_model",
    "register_provider",
    "create_model",
    "list_models",
    "model_info",
    "check_model_args",
]

#: Every override key the config's ``model.*`` section may use: the fields of the config schema's
#: ``ModelConfig`` (the one copy of their types and ranges), less the model's name and ``in_chans`` (``ModelConfig.NOT_OVERRIDES``).
OVERRIDE_KEYS: tuple[str, ...] = tuple(k for k in ModelConfig.model_fields if k not in ModelConfig.NOT_OVERRIDES)


class ModelArgError(ValueError):
    """A model name or model argument is invalid (one-line, key-naming message)."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str  # 'vit' | 'snn'
    is_spiking: bool
    supported_overrides: tuple[str, ...]
    #: the model's defaults for the supported keys (and ``img_size``); may be partial
    defaults: Mapping[str, Any] = field(default_factory=dict)
    #: spiking models: their own neurons' surrogate, its alpha and whether they have attention neurons
    #: (``neurons.model_neurons``); ``model.neuron`` is refused where this is None
    neurons: Optional[Mapping[str, Any]] = None


CheckFn = Callable[[str, dict, frozenset], None]


@dataclass(frozen=True)
class _Entry:
    info: ModelInfo
    build: Callable[..., nn.Module]
    check: Optional[CheckFn] = None
    #: False: ``build`` gets only the keys the caller set (the defaults in ``info`` are
    #: informational, e.g. read from timm source, and the library applies its own)
    pass_defaults: bool = True


class Provider(Protocol):
    """A lazily enumerated family of models (e.g. timm ViTs)."""

    def names(self) -> list[str]: ...

    def has(self, name: str) -> bool: ...

    def entry(self, name: str) -> _Entry: ...


_ENTRIES: dict[str, _Entry] = {}
_PROVIDERS: list[Provider] = []


# --------------------------------------------------------------------------- registration
def register_model(
    fn: Optional[Callable[..., nn.Module]] = None,
    *,
    name: Optional[str] = None,
    family: str = "snn",
    is_spiking: Optional[bool] = None,
    overrides: Optional[Iterable[str]] = None,
    defaults: Optional[Mapping[str, Any]] = None,
    check: Optional[CheckFn] = None,
    neurons: Optional[Mapping[str, Any]] = None,
):
    """Register a model factory, usable bare (``@register_model``) or with options.

    ``overrides`` / ``defaults`` default to the factory's keyword parameters that are
    in :data:`OVERRIDE_KEYS` and their default values (``img_size``'s default is
    recorded too).  ``is_spiking`` defaults to ``family == 'snn'``.
    """

    def deco(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        model_name = name or f.__name__
        params = inspect.signature(f).parameters
        keys = tuple(overrides) if overrides is not None else tuple(
            k for k in params if k in OVERRIDE_KEYS
        )
        bad = [k for k in keys if k not in OVERRIDE_KEYS]
        if bad:
            raise ValueError(f"{model_name}: unknown override keys {bad}")
        if defaults is not None:
            dflt = dict(defaults)
        else:
            dflt = {
                k: p.default
                for k, p in params.items()
                if (k in keys or k == "img_size") and p.default is not inspect.Parameter.empty
            }
        if model_name in _ENTRIES:
            raise ValueError(f"model {model_name!r} is already registered")
        info = ModelInfo(
            name=model_name,
            family=family,
            is_spiking=(family == "snn") if is_spiking is None else is_spiking,
            supported_overrides=keys,
            defaults=MappingProxyType(dflt),
            neurons=MappingProxyType(dict(neurons)) if neurons is not None else None,
        )
        _ENTRIES[model_name] = _Entry(info=info, build=f, check=check)
        return f

    return deco(fn) if fn is not None else deco


def register_provider(provider: Provider) -> Provider:
    _PROVIDERS.append(provider)
    return provider


# --------------------------------------------------------------------------- lookup
def list_models(pattern: Optional[str] = None) -> list[str]:
    """All registered names (static + providers), sorted; ``pattern`` is an fnmatch glob."""
    names = set(_ENTRIES)
    for p in _PROVIDERS:
        names.update(p.names())
    out = sorted(names)
    if pattern:
        out = [n for n in out if fnmatch.fnmatchcase(n, pattern)]
    return out


def _entry(name: Any) -> _Entry:
    if not isinstance(name, str) or not name:
        raise ModelArgError(f"model name must be a non-empty string, got {name!r}")
    if name in _ENTRIES:
        return _ENTRIES[name]
    for p in _PROVIDERS:
        if p.has(name):
            return p.entry(name)
    close = difflib.get_close_matches(name, list_models(), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else " (see qksweep.models.list_models())"
    raise ModelArgError(f"unknown model {name!r}{hint}")


def model_info(name: str) -> ModelInfo:
    return _entry(name).info


# --------------------------------------------------------------------------- validation
def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_type(name: str, key: str, value: Any) -> Any:
    """One override read by the config schema's ``ModelConfig`` (so a direct ``create_model`` call and a
    config file are held to the same types and ranges); returns the value as the schema reads it."""
    try:
        return getattr(ModelConfig.model_validate({key: value}), key)
    except ValidationError as e:
        raise ModelArgError(f"model.{key}={value!r}: {e.errors()[0]['msg'].lower()} (model {name})") from None


def _resolve(
    name: str, num_classes: Any, in_chans: Any, img_size: Any, overrides: Mapping[str, Any]
) -> tuple[_Entry, dict, frozenset]:
    entry = _entry(name)
    info = entry.info
    if not _is_int(num_classes) or num_classes < 1:
        raise ModelArgError(f"num_classes={num_classes!r} must be a positive integer (model {name})")
    if not _is_int(in_chans) or in_chans < 1:
        raise ModelArgError(f"in_chans={in_chans!r} must be a positive integer (model {name})")
    if img_size is not None and (not _is_int(img_size) or img_size < 1):
        raise ModelArgError(f"img_size={img_size!r} must be a positive integer (model {name})")

    given: dict[str, Any] = {}
    supported = info.supported_overrides
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in OVERRIDE_KEYS:
            close = difflib.get_close_matches(key, OVERRIDE_KEYS, n=1)
            hint = f"; did you mean 'model.{close[0]}'?" if close else ""
            raise ModelArgError(
                f"unknown override 'model.{key}' for {name}{hint} (known: {', '.join(OVERRIDE_KEYS)})"
            )
        value = _check_type(name, key, value)
        if key == "neuron":
            given[key] = _check_neuron(name, info, value)
            continue
        if key not in supported:
            if key == "pretrained" and value is False:
                continue  # 'no pretrained weights' is what every model does anyway
            extra = " (pretrained weights exist only for timm ViTs)" if key == "pretrained" else ""
            raise ModelArgError(
                f"model.{key}={value!r} is not supported by {name}{extra}; "
                f"supported overrides: {', '.join(supported) or 'none'}"
            )
        given[key] = value

    args = {k: v for k, v in info.defaults.items() if k in supported}
    args.update(given)
    args["num_classes"] = int(num_classes)
    args["in_chans"] = int(in_chans)
    args["img_size"] = info.defaults.get("img_size") if img_size is None else int(img_size)
    marks = set(given)
    if img_size is not None:
        marks.add("img_size")
    return entry, args, frozenset(marks)


def _check_neuron(name: str, info: ModelInfo, value: Any) -> Any:
    if info.neurons is None:
        raise ModelArgError(f"model.neuron is for spiking models; {name} has no spiking neurons: remove model.neuron")
    if not info.neurons["attention"] and value.attn_v_threshold != NeuronConfig().attn_v_threshold:
        raise ModelArgError(f"model.neuron.attn_v_threshold={value.attn_v_threshold!r}: {name} has no attention "
                            f"neurons; remove it (model.neuron.v_threshold sets every neuron of {name})")
    thresholds = {"v_threshold": value.v_threshold}
    if info.neurons["attention"]:
        thresholds["attn_v_threshold"] = value.attn_v_threshold
    if value.v_reset is not None and value.v_reset >= min(thresholds.values()):
        shown = ", ".join(f"{k} {v}" for k, v in thresholds.items())
        raise ModelArgError(f"model.neuron.v_reset={value.v_reset} must be below the firing threshold ({shown}) "
                            f"of {name}, or null for a soft reset")
    return value


def check_model_args(
    name: str,
    *,
    num_classes: int,
    in_chans: int = 3,
    img_size: Optional[int] = None,
    **overrides: Any,
) -> None:
    """Validate a model request without building the model; raise :class:`ModelArgError`."""
    entry, args, given = _resolve(name, num_classes, in_chans, img_size, overrides)
    if entry.check is not None:
        entry.check(name, args, given)


def create_model(
    name: str,
    *,
    num_classes: int,
    in_chans: int = 3,
    img_size: Optional[int] = None,
    **overrides: Any,
) -> nn.Module:
    """Validate (see :func:`check_model_args`) and build a model.

    The result has ``is_spiking`` (bool); spiking models also have ``time_steps`` (int),
    take ``[N, C, H, W]`` input and return ``[N, num_classes]`` logits averaged over time.
    """
    entry, args, given = _resolve(name, num_classes, in_chans, img_size, overrides)
    if entry.check is not None:
        entry.check(name, args, given)
    if not entry.pass_defaults:
        keep = set(given) | {"num_classes", "in_chans"}
        args = {k: v for k, v in args.items() if k in keep}
    settings = args.pop("neuron", None)
    model = entry.build(**args)
    if not hasattr(model, "is_spiking"):
        model.is_spiking = entry.info.is_spiking
    if entry.info.neurons is not None:
        from .neurons import apply_neurons

        apply_neurons(model, settings, entry.info.neurons)
    return model


def fmt_arg(key: str, args: Mapping[str, Any], given: frozenset) -> str:
    """``model.key=value`` for error messages, marking values the caller did not set."""
    prefix = "" if key in ("img_size", "num_classes", "in_chans") else "model."
    note = "" if key in given else " (default)"
    return f"{prefix}{key}={args[key]!r}{note}"
