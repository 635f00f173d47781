"""YAML search spaces → an Optuna define-by-run space whose every sample is a valid config.

Syntax (DESIGN.md), one entry per dotted config key::

    model.embed_dim: {choice: [128, 192, 256]}
    model.time_steps: {randint: [1, 6]}          # high exclusive, like Ray Tune and numpy
    optim.lr: {loguniform: [1.0e-4, 3.0e-3]}
    optim.weight_decay: {uniform: [0.0, 0.1]}
    model.mlp_ratio: {quniform: [2, 4, 0.5]}     # low, high, step
    model.depth: {int: [2, 6], step: 2}          # inclusive integer range with a step
    include: qkformer                            # a preset from this folder, merged first

``model.head_dim`` is a derived key: the model width becomes ``num_heads × head_dim`` (ViTs) or
``4 × num_heads × head_dim`` (qkformer_*, whose three stages run at dim/4, dim/2, dim), so heads
always divide every stage. Before a sweep starts, :func:`qksweep.checks.check_space_validity` builds the config of
every combination of the shape-relevant discrete values and checks it with the model registry, so
no trial is ever launched only to fail on shape.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import KNOWN_KEYS, Config, ConfigError, build_config, suggest

PRESET_DIR = Path(__file__).parent
DISTRIBUTIONS = ("choice", "randint", "uniform", "loguniform", "quniform", "int")
DERIVED_KEYS = ("model.head_dim",)
SHAPE_KEYS = ("model.embed_dim", "model.num_heads", "model.head_dim", "model.depth", "model.patch_size",
              "data.img_size", "data.frames", "model.name")


@dataclass(frozen=True)
class ParamSpec:
    key: str
    dist: str
    args: tuple
    step: float | int | None = None

    def values(self) -> list | None:
        """All values of a discrete parameter (None for continuous ones)."""
        if self.dist == "choice":
            return list(self.args[0])
        if self.dist == "randint":
            return list(range(self.args[0], self.args[1]))
        if self.dist == "int":
            return list(range(self.args[0], self.args[1] + 1, int(self.step or 1)))
        return None

    def distribution(self):
        """The Optuna distribution :meth:`suggest` samples from (warm starts add trials in it)."""
        import optuna.distributions as od

        a = self.args
        if self.dist == "choice":
            return od.CategoricalDistribution(list(a[0]))
        if self.dist == "randint":
            return od.IntDistribution(a[0], a[1] - 1)
        if self.dist == "int":
            return od.IntDistribution(a[0], a[1], step=int(self.step or 1))
        if self.dist == "quniform":
            return od.FloatDistribution(a[0], a[1], step=a[2])
        return od.FloatDistribution(a[0], a[1], log=self.dist == "loguniform")

    def contains(self, v: Any) -> bool:
        """Whether ``v`` is a value this entry can sample (a choice, an in-range integer on the step,
        a number within the bounds and on a quniform step)."""
        if self.dist == "choice":
            return any(type(v) is type(c) and v == c for c in self.args[0]) or (
                isinstance(v, (int, float)) and not isinstance(v, bool)
                and any(isinstance(c, (int, float)) and not isinstance(c, bool) and v == c for c in self.args[0]))
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if self.dist in ("randint", "int"):
            return v == int(v) and int(v) in self.values()
        lo, hi = self.args[0], self.args[1]
        if not lo <= v <= hi:
            return False
        if self.dist == "quniform":
            k = (v - lo) / self.args[2]
            return abs(k - round(k)) < 1e-8
        return True

    def suggest(self, trial) -> Any:
        k, a = self.key, self.args
        if self.dist == "choice":
            return trial.suggest_categorical(k, list(a[0]))
        if self.dist == "randint":
            return trial.suggest_int(k, a[0], a[1] - 1)
        if self.dist == "int":
            return trial.suggest_int(k, a[0], a[1], step=int(self.step or 1))
        if self.dist == "uniform":
            return trial.suggest_float(k, a[0], a[1])
        if self.dist == "loguniform":
            return trial.suggest_float(k, a[0], a[1], log=True)
        if self.dist == "quniform":
            return trial.suggest_float(k, a[0], a[1], step=a[2])
        raise AssertionError(self.dist)


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict[str, Any]:
    p = PRESET_DIR / f"{name}.yaml"
    if not p.exists():
        raise ConfigError(f"sweep.space.include: no preset '{name}'{suggest(name, list_presets())}; presets: {', '.join(list_presets())}")
    return yaml.safe_load(p.read_text()) or {}


def expand_space(space: dict[str, Any] | str) -> dict[str, Any]:
    """Resolve ``include`` (a preset name, or a list of them) — entries written in the config win."""
    if isinstance(space, str):
        space = {"include": space}
    space = dict(space)
    includes = space.pop("include", None)
    names = [includes] if isinstance(includes, str) else includes if isinstance(includes, list) else None
    if includes is not None and (names is None or not all(isinstance(n, str) for n in names)):
        raise ConfigError(f"sweep.space.include must be a preset name or a list of them ({', '.join(list_presets())}), got {includes!r}")
    merged: dict[str, Any] = {}
    for name in names or []:
        merged.update(load_preset(name))
    merged.update(space)
    return merged


def _num(key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"sweep.space.{key}: bounds must be numbers, got {v!r}")
    return v


def parse_entry(key: str, entry: Any) -> ParamSpec:
    where = f"sweep.space.{key}"
    if key not in KNOWN_KEYS and key not in DERIVED_KEYS:
        raise ConfigError(f"{where}: '{key}' is not a config key{suggest(key, KNOWN_KEYS + list(DERIVED_KEYS))}")
    if key.split(".")[0] in ("sweep", "tracking", "run") and key not in ("run.seed",):
        raise ConfigError(f"{where}: '{key}' cannot be searched; search model.*, data.*, optim.* or spectral.* keys")
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: write a distribution such as {{choice: [a, b]}} or {{loguniform: [1e-4, 1e-2]}}")
    dists = [d for d in entry if d in DISTRIBUTIONS]
    unknown = [d for d in entry if d not in DISTRIBUTIONS and d != "step"]
    if unknown:
        raise ConfigError(f"{where}: unknown distribution '{unknown[0]}'{suggest(unknown[0], list(DISTRIBUTIONS))}; use one of {', '.join(DISTRIBUTIONS)}")
    if len(dists) != 1:
        raise ConfigError(f"{where}: give exactly one distribution ({', '.join(DISTRIBUTIONS)})")
    dist = dists[0]
    args = entry[dist]
    step = entry.get("step")
    if dist == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: choice needs a non-empty list, e.g. {{choice: [2, 4, 8]}}")
        if len({repr(a) for a in args}) != len(args):
            raise ConfigError(f"{where}: choice has repeated values {args}")
        for a in args:
            if not isinstance(a, (int, float, str, bool)) and a is not None:
                raise ConfigError(f"{where}: choice values must be numbers, strings or booleans, got {a!r}")
        return ParamSpec(key, dist, (tuple(args),))
    if not isinstance(args, list) or len(args) != (3 if dist == "quniform" else 2):
        n = 3 if dist == "quniform" else 2
        raise ConfigError(f"{where}: {dist} needs a list of {n} numbers, e.g. {{{dist}: {[1, 4, 1][:n]}}}")
    lo, hi = _num(key, args[0]), _num(key, args[1])
    if dist in ("randint", "int"):
        if int(lo) != lo or int(hi) != hi:
            raise ConfigError(f"{where}: {dist} bounds must be integers, got {args}")
        lo, hi = int(lo), int(hi)
    if dist == "randint" and hi <= lo:
        raise ConfigError(f"{where}: randint [{lo}, {hi}) is empty: high is exclusive and must exceed low")
    if dist != "randint" and hi < lo:
        raise ConfigError(f"{where}: low {lo} is above high {hi}")
    if dist in ("uniform", "loguniform", "quniform") and hi == lo:
        raise ConfigError(f"{where}: low and high are equal ({lo}); use {{choice: [{lo}]}} or drop the entry")
    if dist == "loguniform" and lo <= 0:
        raise ConfigError(f"{where}: loguniform needs low > 0 (got {lo}); use uniform for ranges that include 0")
    if dist == "quniform":
        q = _num(key, args[2])
        if q <= 0:
            raise ConfigError(f"{where}: quniform step must be > 0 (got {q})")
        return ParamSpec(key, dist, (lo, hi, q))
    if step is not None:
        if dist != "int" or not isinstance(step, int) or step <= 0:
            raise ConfigError(f"{where}: step applies to int ranges and must be a positive integer")
    return ParamSpec(key, dist, (lo, hi), step)


def parse_space(space: dict[str, Any] | str) -> list[ParamSpec]:
    if not isinstance(space, (dict, str)):
        raise ConfigError("sweep.space must be a mapping of config keys to distributions, or a preset name")
    specs = [parse_entry(str(k), v) for k, v in expand_space(space).items()]
    keys = {s.key for s in specs}
    if "model.head_dim" in keys and "model.embed_dim" in keys:
        raise ConfigError("sweep.space: model.head_dim sets the width itself; drop model.embed_dim from the space")
    if "model.head_dim" in keys and "model.num_heads" not in keys:
        raise ConfigError("sweep.space: model.head_dim needs model.num_heads in the space (width = heads × head_dim)")
    return specs


# ---------------------------------------------------------------- define-by-run and applying samples


def define_by_run(trial, specs: tuple[ParamSpec, ...]) -> None:
    """The Optuna define-by-run space (module level so the searcher pickles)."""
    for s in specs:
        s.suggest(trial)


def make_define_by_run(specs: list[ParamSpec]):
    return functools.partial(define_by_run, specs=tuple(specs))


def width_from_heads(model_name: str, num_heads: int, head_dim: int) -> int:
    factor = 4 if model_name.startswith("qkformer") else 1
    return factor * num_heads * head_dim


def sample_overrides(base: dict[str, Any], sample: dict[str, Any]) -> list[str]:
    """Turn a sampled point into ``key=value`` override strings (derived keys resolved)."""
    sample = dict(sample)
    head_dim = sample.pop("model.head_dim", None)
    out = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}" for k, v in sample.items()]
    if head_dim is not None:
        name = sample.get("model.name", base.get("model", {}).get("name", "qkformer_cifar"))
        heads = sample.get("model.num_heads", base.get("model", {}).get("num_heads"))
        out.append(f"model.embed_dim={width_from_heads(name, int(heads), int(head_dim))}")
    return out


def apply_sample(base: dict[str, Any], sample: dict[str, Any]) -> Config:
    return build_config(base, sample_overrides(base, sample))


