"""Every timm ``vit_*`` model, registered lazily through a provider.

Names come from ``timm.list_models('vit_*')`` at first use.  Building always goes through
``timm.create_model`` with only the keys the caller set, so parameter counts equal
``timm.create_model(name, **same_args)`` exactly.  For cheap validation the defaults
(patch_size, embed_dim, depth, num_heads, mlp_ratio, img_size) are read from the source of
the timm entrypoint (its ``model_args = dict(...)`` literal) and from its pretrained cfg —
nothing is built.

``pretrained=True`` never reaches the network: the weights must already be in the local
Hugging Face hub cache (``$HF_HUB_CACHE`` / ``$HF_HOME/hub`` / ``~/.cache/huggingface/hub``)
or the torch hub cache (``$TORCH_HOME/hub/checkpoints``); otherwise :class:`ModelArgError`.
"""

from __future__ import annotations

import ast
import inspect
import os
import textwrap
from types import MappingProxyType
from functools import lru_cache
from typing import Any, Optional
from urllib.parse import urlparse

import torch.nn as nn

from ._registry import ModelArgError, ModelInfo, _Entry, fmt_arg, register_provider

VIT_SPECTRAL_TARGETS: list[str] = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]

_VIT_KEYS = (
    "patch_size",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "drop_path",
    "drop_rate",
    "pretrained",
)
# in hybrid (CNN-stem) ViTs the patch grid is set by the CNN backbone's stride
_HYBRID_MODULE = "vision_transformer_hybrid"
# what timm's VisionTransformer / Eva / VisionTransformerRelPos use when model_args omit a key
_CLASS_DEFAULTS = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0)
_ARCH_KEYS = ("embed_dim", "depth", "num_heads", "mlp_ratio")


def _timm():
    import timm

    return timm


@lru_cache(maxsize=1)
def _vit_names() -> tuple[str, ...]:
    return tuple(_timm().list_models("vit_*"))


def _module_of(name: str) -> str:
    from timm.models._registry import _model_to_module

    return _model_to_module.get(name, "")


@lru_cache(maxsize=None)
def _literal_model_args(name: str) -> dict[str, Any]:
    """Literal keyword values of ``model_args = <call>(...)`` in timm's entrypoint."""
    try:
        fn = _timm().models.model_entrypoint(name)
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError, RuntimeError):
        return {}
    out: dict[str, Any] = {}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "model_args" for t in node.targets)
            and isinstance(node.value, ast.Call)
        ):
            for kw in node.value.keywords:
                if kw.arg is None:
                    continue
                try:
                    out[kw.arg] = ast.literal_eval(kw.value)
                except (ValueError, SyntaxError, TypeError):
                    pass
    return out


def _first(v: Any) -> Any:
    return v[0] if isinstance(v, (tuple, list)) and v else v


@lru_cache(maxsize=None)
def vit_defaults(name: str) -> dict[str, Any]:
    lit = _literal_model_args(name)
    hybrid = _module_of(name) == _HYBRID_MODULE
    d = {k: lit.get(k, v) for k, v in _CLASS_DEFAULTS.items()}
    if hybrid:
        d["patch_size"] = lit.get("patch_size", 1)
    d["patch_size"] = _first(d["patch_size"])
    img = lit.get("img_size")
    if img is None:
        cfg = _timm().models.get_pretrained_cfg(name)
        if cfg is not None and cfg.fixed_input_size and cfg.input_size:
            img = cfg.input_size[-1]
        else:
            img = 224
    d["img_size"] = _first(img)
    d.update(drop_path=0.0, drop_rate=0.0, pretrained=False)
    return d


# --------------------------------------------------------------------------- pretrained
def _hf_cache_dir() -> str:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface"
    )
    return os.path.join(home, "hub")


def _torch_hub_dir() -> str:
    home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch"
    )
    return os.path.join(home, "hub")


def cached_weights(name: str) -> Optional[str]:
    """Path of locally cached pretrained weights for ``name`` (default tag), or None."""
    cfg = _timm().models.get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.file and os.path.isfile(cfg.file):
        return cfg.file
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            repo, _, rev = cfg.hf_hub_id.partition("@")
            files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else []
            files += ["model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]
            for fname in files:
                path = try_to_load_from_cache(
                    repo, fname, cache_dir=_hf_cache_dir(), revision=rev or None
                )
                if isinstance(path, str) and os.path.isfile(path):
                    return path
    if cfg.url:
        path = os.path.join(_torch_hub_dir(), "checkpoints", os.path.basename(urlparse(cfg.url).path))
        if os.path.isfile(path):
            return path
    return None


# --------------------------------------------------------------------------- check / build
def _check_vit(name: str, args: dict, given: frozenset) -> None:
    dim, heads = args.get("embed_dim"), args.get("num_heads")
    if dim is not None and heads is not None and dim % heads:
        raise ModelArgError(
            f"{fmt_arg('embed_dim', args, given)} must be divisible by "
            f"{fmt_arg('num_heads', args, given)} for {name}"
        )
    img, patch = args.get("img_size"), args.get("patch_size")
    if img is not None and patch is not None and img % patch:
        raise ModelArgError(
            f"{fmt_arg('img_size', args, given)} must be divisible by "
            f"{fmt_arg('patch_size', args, given)} for {name}"
        )
    if args.get("pretrained"):
        changed = [k for k in _ARCH_KEYS if k in given]
        if changed:
            raise ModelArgError(
                f"model.pretrained=True cannot be combined with {fmt_arg(changed[0], args, given)} "
                f"for {name}: pretrained weights only fit the default architecture"
            )
        if cached_weights(name) is None:
            raise ModelArgError(
                f"model.pretrained=True: no locally cached weights for {name} "
                f"(looked in {_hf_cache_dir()} and {_torch_hub_dir()}/checkpoints); "
                "qksweep never downloads — pre-fetch them or set model.pretrained=false"
            )


def _build_vit(name: str, **args: Any) -> nn.Module:
    timm = _timm()
    kwargs: dict[str, Any] = {}
    for key in ("num_classes", "in_chans", "img_size", "patch_size", "embed_dim", "depth",
                "num_heads", "mlp_ratio", "drop_rate"):
        if key in args:
            kwargs[key] = args[key]
    if "drop_path" in args:
        kwargs["drop_path_rate"] = args["drop_path"]
    if args.get("pretrained"):
        path = cached_weights(name)
        if path is None:  # cache emptied between check and build
            raise ModelArgError(f"model.pretrained=True: no locally cached weights for {name}")
        # load straight from the local file: timm then never touches the network
        overlay = dict(file=path, source="", custom_load=path.endswith(".npz"))
        kwargs.update(pretrained=True, pretrained_cfg_overlay=overlay)
    model = timm.create_model(name, **kwargs)
    model.is_spiking = False
    return model


class _TimmViTProvider:
    def names(self) -> list[str]:
        return list(_vit_names())

    def has(self, name: str) -> bool:
        return name in _vit_names()

    @lru_cache(maxsize=None)
    def entry(self, name: str) -> _Entry:
        keys = tuple(k for k in _VIT_KEYS if not (k == "patch_size" and _module_of(name) == _HYBRID_MODULE))
        defaults = {k: v for k, v in vit_defaults(name).items() if k in keys or k == "img_size"}
        info = ModelInfo(name=name, family="vit", is_spiking=False,
                         supported_overrides=keys, defaults=MappingProxyType(defaults))

        def build(**args: Any) -> nn.Module:
            return _build_vit(name, **args)

        return _Entry(info=info, build=build, check=_check_vit, pass_defaults=False)


register_provider(_TimmViTProvider())
