"""Loading a frozen teacher for distillation: an MLflow run id, a qksweep checkpoint, or a timm name.

The teacher is wrapped in timm's ``DistillationTeacher`` (eval mode; for timm names it creates the
model and loads a weights file through ``pretrained_cfg_overlay=dict(file=...)``), and in
:class:`Teacher`, which feeds it the student's batch: renormalised when the teacher was trained with
another mean/std, resized with ``F.interpolate`` when it expects another image size, under
``torch.no_grad``; spiking teachers are reset after each batch.

Every failure is one line: :class:`~qksweep.config.ConfigError` naming the ``distill.*`` key.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ..config import ConfigError, DataConfig, DistillConfig

log = logging.getLogger("qksweep.distill")


class Teacher(torch.nn.Module):
    """A frozen teacher that takes the student's input batch and returns its logits."""

    def __init__(self, kd, *, img_size: int | None, spiking: bool, num_classes: int, label: str,
                 student_mean: Sequence[float] | None = None, student_std: Sequence[float] | None = None):
        super().__init__()
        self.kd = kd  # timm.task.distillation.DistillationTeacher
        self.img_size, self.spiking, self.num_classes, self.label = img_size, spiking, num_classes, label
        for p in self.kd.parameters():
            p.requires_grad_(False)
        self.renorm = False
        if student_mean is not None and student_std is not None:
            mean = torch.tensor(student_mean, dtype=torch.float32).view(1, -1, 1, 1)
            std = torch.tensor(student_std, dtype=torch.float32).view(1, -1, 1, 1)
            self.register_buffer("student_mean", mean, persistent=False)
            self.register_buffer("student_std", std, persistent=False)
            self.renorm = not (torch.allclose(mean, self.kd.mean_kd.float().cpu()) and
                               torch.allclose(std, self.kd.std_kd.float().cpu()))
        self.eval()

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)  # always in eval mode (dropout off, BatchNorm statistics frozen)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.renorm:
            x = self.kd.normalize_input(x, self.student_mean.to(x.dtype), self.student_std.to(x.dtype))
        if self.img_size and tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        out = self.kd(x)
        if self.spiking:
            from spikingjelly.activation_based import functional

            functional.reset_net(self.kd.model)
        return out


@contextmanager
def _quiet_downloads():
    """No MLflow download progress bars: a bad teacher must stay a one-line error."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def _is_path_or_run(text: str) -> bool:
    from ..tools.source import is_run_id

    return Path(text).expanduser().exists() or is_run_id(text)


def _from_qksweep(d: DistillConfig, tracking_uri: str, device, student_data: DataConfig | None,
                  student_mean, student_std) -> Teacher:
    from timm.task.distillation import DistillationTeacher

    from ..trainables.checkpoint import CheckpointError
    from ..tools.source import _data_meta, load_source

    if d.teacher_checkpoint:
        raise ConfigError(f"distill.teacher_checkpoint applies to a timm model name teacher; distill.teacher "
                          f"'{d.teacher}' already names a checkpoint or run: drop distill.teacher_checkpoint")
    try:
        with _quiet_downloads():
            loaded = load_source(d.teacher, tracking_uri=tracking_uri, which="best", device=device)
    except CheckpointError as e:
        raise ConfigError(f"distill.teacher: {e}") from None
    except ConfigError as e:
        raise ConfigError(f"distill.teacher: {e}") from None
    kd = DistillationTeacher(loaded.model, device=device)
    tcfg = loaded.cfg
    same_data = student_data is not None and (tcfg.data.name, tcfg.data.root) == (student_data.name, student_data.root)
    if same_data and student_mean is not None:
        mean, std = student_mean, student_std
    else:
        mean, std, _ = _data_meta(tcfg, loaded.num_classes)
    kd.mean_kd.copy_(torch.tensor(mean, dtype=kd.mean_kd.dtype).view(1, -1, 1, 1))
    kd.std_kd.copy_(torch.tensor(std, dtype=kd.std_kd.dtype).view(1, -1, 1, 1))
    return Teacher(kd, img_size=tcfg.data.img_size, spiking=loaded.spiking, num_classes=loaded.num_classes,
                   label=f"{tcfg.model.name} from {loaded.label}", student_mean=student_mean, student_std=student_std)


def _classifier_rows(name: str, path: str) -> int | None:
    """The number of classes the weights file's classifier holds (None when it cannot be told)."""
    from timm.models import get_pretrained_cfg, load_state_dict

    try:
        sd = load_state_dict(path, use_ema=False)
    except Exception as e:  # noqa: BLE001 - torch/safetensors raise many kinds for foreign files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ConfigError(f"distill.teacher_checkpoint '{path}' cannot be read ({first}): pass a state-dict file "
                          "(.pth/.pt/.bin/.safetensors)") from None
    pcfg = get_pretrained_cfg(name)
    heads = pcfg.classifier if pcfg is not None and pcfg.classifier else ("head", "fc", "classifier")
    for h in ([heads] if isinstance(heads, str) else list(heads)):
        w = sd.get(f"{h}.weight")
        if isinstance(w, torch.Tensor):
            return int(w.shape[0])
    return None


def _from_timm(d: DistillConfig, num_classes: int, device, student_mean, student_std) -> Teacher:
    import timm
    from timm.task.distillation import DistillationTeacher

    name = d.teacher
    if d.teacher_weights == "checkpoint":
        if not d.teacher_checkpoint:
            raise ConfigError(f"distill.teacher '{name}' is a timm model name without weights: set "
                              "distill.teacher_checkpoint to its weights file, or distill.teacher_weights=timm for "
                              "timm's pretrained weights (cached or downloadable), or distill.teacher_weights=none "
                              "for a random teacher")
        path = str(Path(d.teacher_checkpoint).expanduser())
        if not Path(path).is_file():
            raise ConfigError(f"distill.teacher_checkpoint '{d.teacher_checkpoint}' is not a file: pass the teacher's "
                              "weights file")
        rows = _classifier_rows(name, path)
        if rows is not None and rows != num_classes:
            raise ConfigError(f"distill.teacher_checkpoint '{d.teacher_checkpoint}' has {rows} classes but the data "
                              f"has {num_classes}: the teacher must be trained on the student's classes")
        try:
            kd = DistillationTeacher(name, num_classes=num_classes, in_chans=3, pretrained_path=path, device=device)
        except (RuntimeError, KeyError, ValueError) as e:
            text = " ".join(str(e).split())[:200]
            raise ConfigError(f"distill.teacher_checkpoint '{d.teacher_checkpoint}' does not fit {name} ({text})") from None
    elif d.teacher_weights == "timm":
        if d.teacher_checkpoint:
            raise ConfigError("distill.teacher_checkpoint is set but distill.teacher_weights=timm: drop one of them")
        try:
            model = timm.create_model(name, pretrained=True)
        except Exception as e:  # noqa: BLE001 - hub/network errors come in many kinds
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise ConfigError(f"distill.teacher '{name}': timm's pretrained weights are not available here ({first}); "
                              "set distill.teacher_checkpoint to a weights file") from None
        rows = model.num_classes
        if rows != num_classes:
            raise ConfigError(f"distill.teacher '{name}' (timm pretrained) has {rows} classes but the data has "
                              f"{num_classes}: fine-tune it on this data and pass that run or checkpoint")
        kd = DistillationTeacher(model.to(device), device=device)
    else:
        if d.teacher_checkpoint:
            raise ConfigError("distill.teacher_checkpoint is set but distill.teacher_weights=none: drop one of them")
        log.warning("distill.teacher '%s' has random weights (distill.teacher_weights=none)", name)
        kd = DistillationTeacher(timm.create_model(name, num_classes=num_classes).to(device), device=device)
    size = kd.model.pretrained_cfg.get("input_size", (3, 224, 224))[-1] if hasattr(kd.model, "pretrained_cfg") else None
    return Teacher(kd, img_size=size, spiking=False, num_classes=num_classes, label=f"timm {name}",
                   student_mean=student_mean, student_std=student_std)


def load_teacher(d: DistillConfig, *, num_classes: int | None, tracking_uri: str, device="cpu",
                 student_data: DataConfig | None = None, student_mean=None, student_std=None) -> Teacher:
    """Build the teacher ``distill.teacher`` names, on ``device``, in eval mode. ``num_classes``: the
    student's (None when unknown: the check is skipped)."""
    import timm

    if not d.teacher:
        raise ConfigError("distill.teacher is missing: give an MLflow run id, a checkpoint path or a timm model name")
    text = os.fspath(d.teacher)
    if _is_path_or_run(text):
        teacher = _from_qksweep(d, tracking_uri, device, student_data, student_mean, student_std)
    elif timm.is_model(text):
        if num_classes is None:
            from ..data import build_data

            num_classes = build_data(student_data).num_classes if student_data is not None else 1000
        teacher = _from_timm(d, num_classes, device, student_mean, student_std)
    else:
        from ..tracking.runs import mask_secrets

        looks_like_path = "/" in text or text.endswith((".pt", ".pth"))
        why = "no such file or directory" if looks_like_path else (
            f"not a checkpoint path, an MLflow run id in {mask_secrets(tracking_uri)}, nor a timm model name")
        raise ConfigError(f"distill.teacher '{text[:120]}': {why}")
    if num_classes is not None and teacher.num_classes != num_classes:
        raise ConfigError(f"distill.teacher '{text[:120]}' predicts {teacher.num_classes} classes but the data has "
                          f"{num_classes}: the teacher must be trained on the student's classes")
    return teacher


_CHECKED: set[tuple] = set()


def check_distill(d: DistillConfig, data: DataConfig, tracking_uri: str) -> None:
    """Before Ray starts: the teacher exists, loads and predicts the data's classes (checked once per
    teacher and data, since sweeps check every shape combination)."""
    from ..config import known_num_classes

    if not d.enabled:
        return
    key = (d.teacher, d.teacher_checkpoint, d.teacher_weights, data.name, data.root, tracking_uri)
    if key in _CHECKED:
        return
    load_teacher(d, num_classes=known_num_classes(data), tracking_uri=tracking_uri, device="cpu", student_data=data)
    _CHECKED.add(key)
