"""Where the offline tools get a model from: a checkpoint, an MLflow run, or a timm name.

    loaded = load_source("runs/abc/checkpoints/best")        # checkpoint dir (or its checkpoint.pt)
    loaded = load_source("0f3c...e1", tracking_uri=uri)        # MLflow run id (32 hex chars)
    loaded = load_source("vit_tiny_patch16_224", pretrained=True)  # locally cached timm weights
    loaded.model, loaded.cfg, loaded.state, loaded.run_id, loaded.name

A SOURCE is tried in this order: an existing path, a run id in the tracking store, a
model name (only with ``pretrained=True``).  Every failure is one line: :class:`ConfigError`
for a source that is none of these, :class:`CheckpointError` for a checkpoint that cannot
be read or does not fit the model its config describes.  Checkpoints are always read with
``torch.load(weights_only=True)``.

:func:`preprocessing` gives the validation transform of the checkpoint's dataset with
the checkpoint's normalisation and class names (``predict``, ``attention``, ``validate --data-dir``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..config import DEFAULT_TRACKING_URI, Config, ConfigError, build_config
from ..tracking.models import is_model_uri
from ..trainables.checkpoint import CKPT_FILE, CONFIG_FILE, CheckpointError, load_checkpoint

__all__ = [
    "DEFAULT_TRACKING_URI",
    "LoadedModel",
    "Preprocessing",
    "is_run_id",
    "load_source",
    "preprocessing",
    "resolve_uri",
    "pick_device",
]

RUN_ID_RE = re.compile(r"^[0-9a-f]{32}$")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CHECKPOINT_DIRS = {"best": ("checkpoints/best", "checkpoints/last"), "last": ("checkpoints/last", "checkpoints/best")}


@dataclass
class LoadedModel:
    model: torch.nn.Module  # eval mode, on ``device``
    cfg: Config  # the checkpoint's config (plus any -s overrides)
    state: dict[str, Any]  # the checkpoint (empty for a pretrained timm model)
    run_id: str | None  # the MLflow run it came from, if any
    name: str  # the model name (cfg.model.name)
    tracking_uri: str | None = None  # where run_id lives
    source: str = ""  # what the user passed
    checkpoint: str | None = None  # the checkpoint directory the weights came from
    num_classes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def spiking(self) -> bool:
        return bool(getattr(self.model, "is_spiking", False))

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def label(self) -> str:
        """Short human name of the source: the run id or the checkpoint folder."""
        if self.run_id:
            return self.run_id
        return self.checkpoint or self.source


def resolve_uri(tracking_uri: str | None) -> str:
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def is_run_id(text: str) -> bool:
    return bool(RUN_ID_RE.match(text))


def pick_device(device: str | None) -> torch.device:
    """``None``/``'auto'`` -> cuda when available, else cpu; otherwise ``torch.device(device)``."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device '{device}' is not a torch device: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                          f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return dev


# ---------------------------------------------------------------------------- reading checkpoints


def _read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """(state, config dict, checkpoint dir). A file of any name is read itself (not its folder's
    checkpoint.pt); its config comes from config.json beside it."""
    if path.is_file() and path.name != CKPT_FILE:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many kinds for corrupt/foreign files
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"checkpoint '{path}' cannot be read ({first[:160]}): it is corrupt or not a qksweep checkpoint"
            ) from None
        if not isinstance(state, dict) or "model" not in state:
            raise CheckpointError(f"checkpoint '{path}' is not a qksweep checkpoint (no 'model' entry)")
        cfg_file = path.parent / CONFIG_FILE
        if not cfg_file.is_file():
            raise CheckpointError(f"checkpoint '{path}' has no {CONFIG_FILE} beside it: cannot tell which model it holds")
        try:
            config = json.loads(cfg_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"checkpoint '{path}': {cfg_file} is not valid JSON") from None
        return state, config, path.parent
    state, config = load_checkpoint(path)
    return state, config, (path.parent if path.is_file() else path)


def _config_of(config: Any, where: str, overrides: Sequence[str] | None) -> Config:
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint '{where}': {CONFIG_FILE} does not hold a qksweep config")
    try:
        return build_config(config, list(overrides or []))
    except ConfigError as e:
        if overrides:
            raise
        raise CheckpointError(f"checkpoint '{where}': its {CONFIG_FILE} is not a valid qksweep config ({e})") from None


def _model_weights(state: dict[str, Any], use_ema: bool, where: str) -> dict[str, torch.Tensor]:
    if use_ema:
        if "ema" not in state:
            raise CheckpointError(f"checkpoint '{where}' has no EMA weights (it was trained with optim.ema=false)")
        sd = state["ema"]
        if isinstance(sd, dict) and sd and all(k.startswith("module.") for k in sd):
            sd = {k[len("module."):]: v for k, v in sd.items()}
    else:
        sd = state["model"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"checkpoint '{where}': the model entry is not a state dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):  # saved from a DDP-wrapped model
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _num_classes(sd: dict[str, torch.Tensor], cfg: Config) -> int:
    for key in ("head.weight", "head.fc.weight", "fc.weight", "classifier.weight"):
        w = sd.get(key)
        if isinstance(w, torch.Tensor) and w.ndim == 2:
            return int(w.shape[0])
    from ..config import known_num_classes

    n = known_num_classes(cfg.data)
    if n:
        return n
    from ..data import build_data

    return build_data(cfg.data).num_classes


def _load_into(model: torch.nn.Module, sd: dict[str, torch.Tensor], where: str, name: str) -> None:
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        text = " ".join(str(e).split())
        text = text.split("Error(s) in loading state_dict for", 1)[-1]
        text = text.split(":", 1)[-1].strip() if ":" in text else text
        raise CheckpointError(
            f"checkpoint '{where}' does not fit the {name} its config describes ({text[:200]})"
        ) from None


def build_from_checkpoint(
    state: dict[str, Any], config: dict[str, Any], where: str, *,
    overrides: Sequence[str] | None = None, use_ema: bool = False,
) -> tuple[torch.nn.Module, Config, int]:
    from ..data import data_shape
    from ..models import create_model, frames_batch_first

    cfg = _config_of(config, where, overrides)
    sd = _model_weights(state, use_ema, where)
    num_classes = _num_classes(sd, cfg)
    model_kw = cfg.model.overrides()
    model_kw.pop("pretrained", None)  # the checkpoint holds the weights
    in_chans, frames = data_shape(cfg.data)
    if frames is not None:
        model_kw["time_steps"] = frames  # event data: one time step per frame
    model = create_model(cfg.model.name, num_classes=num_classes, in_chans=in_chans, img_size=cfg.data.img_size,
                         **model_kw)
    if frames is not None:
        frames_batch_first(model)
    _load_into(model, sd, where, cfg.model.name)
    return model, cfg, num_classes


# ---------------------------------------------------------------------------- MLflow


def _download_checkpoint(run_id: str, uri: str, which: str, dst: Path) -> tuple[Path, str] | None:
    """Returns (local checkpoint dir, artifact path), or None when the run is not in the store."""
    from ..tracking.runs import client, mask_secrets

    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        return None  # never create an empty store just to look a run up
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    try:
        client(uri).get_run(run_id)
    except MlflowException:
        return None
    except Exception as e:  # noqa: BLE001 - unreachable server, bad URI
        raise ConfigError(f"cannot reach the MLflow store {mask_secrets(uri)} ({type(e).__name__}): pass --tracking-uri") from None
    for artifact in CHECKPOINT_DIRS[which]:
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=artifact, dst_path=str(dst), tracking_uri=uri
            )
        except (MlflowException, OSError):
            continue
        if (Path(local) / CKPT_FILE).is_file():
            return Path(local), artifact
    raise ConfigError(
        f"MLflow run {run_id} has no checkpoint artifact ({' or '.join(CHECKPOINT_DIRS[which])}): "
        "it did not finish an epoch, or it was not made by qksweep"
    )


# ---------------------------------------------------------------------------- entry point


def load_source(
    source: str | os.PathLike,
    *,
    tracking_uri: str | None = None,
    which: str = "best",
    overrides: Sequence[str] | None = None,
    pretrained: bool = False,
    use_ema: bool = False,
    device: str | torch.device | None = "cpu",
) -> LoadedModel:
    """Build the model SOURCE names and load its weights (strict); the model is in eval mode.

    ``which``: for a run id, ``'best'`` (fallback ``'last'``) or ``'last'`` (fallback ``'best'``).
    ``overrides``: ``-s key=value`` strings applied to the checkpoint's config (e.g.
    ``data.root=...`` when the data moved, ``data.eval_batch_size=256``).
    ``use_ema``: load the EMA weights of a run trained with ``optim.ema``.
    ``pretrained``: allow a timm model name with locally cached pretrained weights.
    """
    if which not in CHECKPOINT_DIRS:
        raise ConfigError(f"which must be 'best' or 'last', got {which!r}")
    text = os.fspath(source)
    dev = device if isinstance(device, torch.device) else pick_device(device)
    path = Path(text).expanduser()
    uri = resolve_uri(tracking_uri)
    run_id: str | None = None
    ckpt_dir: Path | None = None

    if path.exists():
        state, config, ckpt_dir = _read_checkpoint(path)
        where = text
    elif is_run_id(text) or is_model_uri(text):
        run_id, registered = text, None
        if is_model_uri(text):  # a registered model version: the checkpoint of the run it came from
            from ..tracking.models import source_run

            run_id, registered = source_run(text, uri)
            which = "last" if registered == "checkpoints/last" else "best"
        tmp = Path(tempfile.mkdtemp(prefix="qksweep-source-"))
        try:
            got = _download_checkpoint(run_id, uri, which, tmp)
            if got is None:
                raise ConfigError(_neither(text, uri))
            local, artifact = got
            state, config, _ = _read_checkpoint(local)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        where = f"run {run_id} {artifact}"
    elif pretrained:
        return _pretrained(text, overrides, dev)
    else:
        looks_like_path = os.sep in text or "/" in text or text.endswith((".pt", ".pth"))
        hint = " (no such file or directory)" if looks_like_path else _model_hint(text)
        raise ConfigError(_neither(text, uri, hint=hint))

    model, cfg, num_classes = build_from_checkpoint(state, config, where, overrides=overrides, use_ema=use_ema)
    model.to(dev).eval()
    return LoadedModel(
        model=model, cfg=cfg, state=state, run_id=run_id, name=cfg.model.name,
        tracking_uri=uri if run_id else None, source=text,
        checkpoint=str(ckpt_dir) if ckpt_dir is not None else where, num_classes=num_classes,
    )


def _neither(text: str, uri: str, hint: str = "") -> str:
    from ..tracking.runs import mask_secrets

    shown = text if len(text) <= 120 else text[:117] + "..."
    return (f"'{shown}' is neither a checkpoint path nor an MLflow run id in {mask_secrets(uri)}"
            f"{hint or ' (pass --tracking-uri for another store; `qksweep runs` lists run ids)'}")


def _model_hint(text: str) -> str:
    from ..models import ModelArgError, model_info

    try:
        model_info(text)
    except ModelArgError:
        return ""
    return " (it is a model name: add --pretrained to use its locally cached timm weights)"


def _pretrained(name: str, overrides: Sequence[str] | None, dev: torch.device) -> LoadedModel:
    from ..models import ModelArgError, create_model, model_info

    info = model_info(name)  # ModelArgError (exit 2) for unknown names
    if info.family != "vit":
        raise ModelArgError(f"--pretrained: no pretrained weights exist for {name} (only timm ViTs have them)")
    img = info.defaults.get("img_size") or 224
    cfg = build_config({"model": {"name": name, "pretrained": True},
                        "data": {"name": "imagefolder", "img_size": int(img)}}, list(overrides or []))
    model = create_model(name, num_classes=1000, pretrained=True)
    model.to(dev).eval()
    return LoadedModel(model=model, cfg=cfg, state={}, run_id=None, name=name, source=name,
                       checkpoint=None, num_classes=1000, extra={"pretrained": True})


# ---------------------------------------------------------------------------- preprocessing


@dataclass
class Preprocessing:
    transform: Callable[[Any], torch.Tensor]  # one PIL image -> [3, H, W] normalised tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str]

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """[3, H, W] model input -> [3, H, W] in [0, 1] (what the model saw, for display)."""
        mean = torch.tensor(self.mean, dtype=x.dtype).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(-1, 1, 1)
        return (x.cpu() * std + mean).clamp(0, 1)


def _data_meta(cfg: Config, num_classes: int) -> tuple[tuple[float, ...], tuple[float, ...], list[str] | None]:
    """(mean, std, class names) of the checkpoint's dataset, without reading a large dataset."""
    from ..data import DataError, build_data, get_spec, options

    opts = options(cfg.data)
    spec = get_spec(opts.name)
    if spec.name == "imagefolder":
        from ..data.imagefolder import IMAGENET_MEAN, IMAGENET_STD, class_dirs

        names = None
        if opts.root and (Path(opts.root).expanduser() / "train").is_dir():
            names = class_dirs(Path(opts.root).expanduser() / "train") or None
        return IMAGENET_MEAN, IMAGENET_STD, names
    try:
        b = build_data(cfg.data)
        return tuple(b.mean), tuple(b.std), list(b.class_names)
    except DataError:
        if spec.name in ("cifar10", "cifar100"):
            from ..data.cifar import CIFAR

            info = CIFAR[spec.name]
            return info.mean, info.std, (list(CIFAR10_CLASSES) if spec.name == "cifar10" else None)
        raise


def preprocessing(loaded: LoadedModel) -> Preprocessing:
    """The validation preprocessing of one PIL image for this model (``data.eval_transform``
    with the dataset's normalisation) and the class names in output order."""
    from ..data import eval_transform

    if loaded.extra.get("pretrained"):  # a timm model with its own pretrained config
        from timm.data import create_transform, resolve_data_config

        from ..data.transforms import ToRGB
        from torchvision import transforms

        dc = resolve_data_config({}, model=loaded.model)
        tf = create_transform(**dc, is_training=False)
        names = [str(i) for i in range(loaded.num_classes)]
        return Preprocessing(transforms.Compose([ToRGB(), *tf.transforms]), tuple(dc["mean"]), tuple(dc["std"]), names)
    mean, std, names = _data_meta(loaded.cfg, loaded.num_classes)
    if not names or len(names) != loaded.num_classes:
        names = [str(i) for i in range(loaded.num_classes)]
    return Preprocessing(eval_transform(loaded.cfg.data, mean, std), tuple(mean), tuple(std), list(names))
