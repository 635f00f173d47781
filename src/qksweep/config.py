"""The config schema (DESIGN.md), YAML loading, dotted ``-s key=value`` overrides and validation.

Every error is a :class:`ConfigError` whose message is one line naming the key and the fix.
"""

from __future__ import annotations

import copy
import difflib
import re
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """Bad user input: the CLI prints ``str(err)`` as one line and exits 2."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)




#: the neuron types of ``model.neuron.type`` (SpikingJelly 2.0 ``activation_based.neuron`` classes that
#: train with surrogate gradients and drop into every SNN here: ``models/neurons.py`` maps them)
NEURON_TYPES = ("lif", "if", "plif", "klif", "qif", "eif")
#: SpikingJelly surrogate functions of ``model.neuron.surrogate`` (each takes one ``alpha``)
SURROGATES = ("atan", "sigmoid", "erf", "piecewise_quadratic", "piecewise_exp", "soft_sign", "super_spike",
              "rect", "q_pseudo_spike", "nonzero_sign_log_abs", "s2nn")


class NeuronConfig(_Section):
    """``model.neuron``: the spiking neurons of an SNN. Defaults are every SNN's own neurons (LIF, tau 2,
    threshold 1, attention neurons at 0.5, hard reset to 0, detached reset); ``surrogate`` and
    ``surrogate_alpha`` default to the model's (sigmoid/4 for the QKFormers, atan/2 for the zoo)."""

    type: str = "lif"
    tau: float = Field(default=2.0, gt=1)  # membrane time constant (plif: its initial value); decay 1/tau
    v_threshold: float = Field(default=1.0, gt=0)
    attn_v_threshold: float = Field(default=0.5, gt=0)  # the attention neurons (attn_lif) of the transformers
    v_reset: float | None = 0.0  # null: soft reset (the threshold is subtracted)
    detach_reset: bool = True
    decay_input: bool = True  # leaky types: the input is divided by tau too
    surrogate: str | None = None
    surrogate_alpha: float | None = Field(default=None, gt=0)

    @field_validator("type")
    @classmethod
    def _known_type(cls, v: str) -> str:
        if v not in NEURON_TYPES:
            raise ValueError(f"unknown neuron type {v!r}: choose one of {', '.join(NEURON_TYPES)}"
                             f"{suggest(v, list(NEURON_TYPES))}")
        return v

    @field_validator("surrogate")
    @classmethod
    def _known_surrogate(cls, v: str | None) -> str | None:
        if v is not None and v not in SURROGATES:
            raise ValueError(f"unknown surrogate {v!r}: choose one of {', '.join(SURROGATES)}"
                             f"{suggest(v, list(SURROGATES))}")
        return v


class ModelConfig(_Section):
    name: str = "qkformer_cifar"
    embed_dim: int | None = Field(default=None, gt=0)
    num_heads: int | None = Field(default=None, gt=0)
    depth: int | None = Field(default=None, gt=0)
    patch_size: int | None = Field(default=None, gt=0)
    mlp_ratio: float | None = Field(default=None, gt=0)
    time_steps: int | None = Field(default=None, gt=0)
    drop_path: float = Field(default=0.0, ge=0, lt=1)
    drop_rate: float = Field(default=0.0, ge=0, lt=1)
    qka_type: Literal["token", "channel"] | None = None
    pretrained: bool = False
    neuron: NeuronConfig | None = None  # spiking models only (models/neurons.py)
    in_chans: int | None = Field(default=None, gt=0)  # the data's channels; only checked against them

    #: keys of this section that are not model-factory arguments
    NOT_OVERRIDES: ClassVar[tuple[str, ...]] = ("name", "in_chans")

    def overrides(self) -> dict[str, Any]:
        """The keyword overrides passed to ``models.create_model`` (None values dropped)."""
        out = self.model_dump(exclude=set(self.NOT_OVERRIDES))
        if not out["pretrained"]:
            out.pop("pretrained")
        for key in ("drop_path", "drop_rate"):
            if out[key] == 0.0:
                out.pop(key)
        return {k: v for k, v in out.items() if v is not None}


class DataConfig(_Section):
    name: str = "digits"
    root: str | None = None
    img_size: int = Field(default=32, gt=0)
    batch_size: int = Field(default=64, gt=0)
    eval_batch_size: int | None = Field(default=None, gt=0)
    num_workers: int | Literal["auto"] = "auto"
    download: bool = False
    aa: str | None = None
    reprob: float = Field(default=0.0, ge=0, le=1)
    remode: Literal["pixel", "const", "rand"] = "pixel"
    hflip: float = Field(default=0.5, ge=0, le=1)
    color_jitter: float | None = Field(default=None, ge=0)
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    val_fraction: float = Field(default=0.2, gt=0, lt=1)
    num_classes: int | None = Field(default=None, gt=1)
    train_size: int | None = Field(default=None, gt=0)
    val_size: int | None = Field(default=None, gt=0)
    # event-camera data (cifar10_dvs, dvs128_gesture, n_mnist): frames per sample (the model's time steps),
    # how SpikingJelly bins the stream, the official training policy and a random roll (pixels)
    frames: int | None = Field(default=None, gt=0)
    split_by: Literal["number", "time"] = "number"
    event_aug: Literal["snn_wide", "none"] = "snn_wide"
    roll: int = Field(default=0, ge=0)

    @field_validator("num_workers", mode="before")
    @classmethod
    def _auto_or_count(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            return v
        raise ValueError(f"must be 'auto' or a whole number >= 0 (got {v!r})")


class OptimConfig(_Section):
    name: str = "adamw"
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.05, ge=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    epochs: int = Field(default=20, gt=0)
    warmup_epochs: int = Field(default=1, ge=0)
    warmup_lr: float = Field(default=1e-6, ge=0)
    sched: str = "cosine"
    min_lr: float = Field(default=1e-5, ge=0)
    smoothing: float = Field(default=0.1, ge=0, lt=1)
    mixup: float = Field(default=0.0, ge=0)
    cutmix: float = Field(default=0.0, ge=0)
    mixup_prob: float = Field(default=1.0, ge=0, le=1)
    mixup_switch_prob: float = Field(default=0.5, ge=0, le=1)
    amp: bool = False
    grad_accum: int = Field(default=1, gt=0)
    clip_grad: float | None = Field(default=None, gt=0)
    ema: bool = False
    ema_decay: float = Field(default=0.9998, gt=0, lt=1)
    layer_decay: float | None = Field(default=None, gt=0, le=1)

    @model_validator(mode="after")
    def _warmup_fits(self) -> "OptimConfig":
        if self.warmup_epochs >= self.epochs and self.warmup_epochs > 0:
            raise ValueError(
                f"optim.warmup_epochs={self.warmup_epochs} must be smaller than optim.epochs={self.epochs}"
            )
        return self


# The defaults every command shares (the CLI, the API and the tools import them from here).
DEFAULT_STORAGE = "./qksweep_results"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class RunConfig(_Section):
    workers: int = Field(default=1, gt=0)
    gpus_per_worker: float = Field(default=0, ge=0)
    cpus_per_worker: float = Field(default=1, gt=0)
    seed: int = 42
    max_failures: int = Field(default=2, ge=-1)
    storage: str = DEFAULT_STORAGE
    name: str | None = None
    keep_checkpoints: int = Field(default=2, gt=0)
    compile: bool | Literal[COMPILE_MODES] = False
    # how a sweep trial trains: tune = in the trial's own process (Ray Tune's function API, one worker);
    # train = a Ray Train run (TorchTrainer); auto = tune for one worker, train for several
    launcher: Literal["auto", "tune", "train"] = "auto"

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_mode(cls, v: Any) -> Any:
        if isinstance(v, bool) or v in COMPILE_MODES:
            return v
        raise ValueError(f"must be false, true or a torch.compile mode ({', '.join(COMPILE_MODES)}); "
                         f"got {v!r}")


def default_tracking_uri() -> str:
    """``tracking.uri`` when neither ``-s tracking.uri=...`` nor the config file sets it: the MLflow
    convention ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``. Read once, when the config is
    built in the driver; workers get the resolved value with the config."""
    import os

    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


class TrackingConfig(_Section):
    # precedence: -s tracking.uri / the config file, then $MLFLOW_TRACKING_URI, then sqlite:///mlflow.db
    uri: str = Field(default_factory=default_tracking_uri)
    enabled: bool = True
    system_metrics: bool = False  # MLflow's system metrics (CPU, memory, GPU) in each run, from the process that trains
    system_metrics_interval_s: float = Field(default=10.0, gt=0)
    log_model: bool = True  # a run that trains to its end logs its best checkpoint as an MLflow model


class SpectralConfig(_Section):
    enabled: bool = True
    every: int = Field(default=100, gt=0)
    topk: int = Field(default=8, gt=0)
    interval: int = Field(default=2, gt=0)
    targets: list[str] | None = None
    on_cpu: bool = False
    split_qkv: bool = False


class SNNConfig(_Section):
    """SNN metrics measured on validation batches each epoch (``snn/*``); ViTs log the ANN energy."""

    enabled: bool = True
    val_batches: int = Field(default=2, gt=0)


class FiringRateStop(_Section):
    low: float = Field(default=1e-4, ge=0)
    high: float = Field(default=0.9, le=1)
    patience: int = Field(default=2, gt=0)


class Bound(_Section):
    min: float | None = None
    max: float | None = None

    def violation(self, value: float) -> float:
        """> 0 when ``value`` is outside the bound (Optuna's constraint convention)."""
        over = value - self.max if self.max is not None else float("-inf")
        under = self.min - value if self.min is not None else float("-inf")
        return max(over, under)


STATIC_CONSTRAINTS = ("params_m", "act_mem_gb")


def _changed(section: BaseModel, exclude: tuple[str, ...] = ()) -> list[str]:
    """Fields of ``section`` that differ from their defaults (survives a dump/validate round trip)."""
    return [k for k, f in type(section).model_fields.items()
            if k not in exclude and getattr(section, k) != f.get_default(call_default_factory=True)]


class DistillConfig(_Section):
    """Knowledge distillation from a frozen teacher (off while ``teacher`` is null).

    ``teacher``: an MLflow run id, a qksweep checkpoint path, or a timm model name. A timm name needs
    its weights: ``teacher_checkpoint`` (a state-dict file, loaded through timm's
    ``pretrained_cfg_overlay=dict(file=...)``), or ``teacher_weights: timm`` (timm's own pretrained
    weights, from the local Hugging Face cache or a download), or ``teacher_weights: none`` (a random
    teacher, said explicitly: only for trying the plumbing).
    Loss: ``(1 - alpha) · CE + alpha · KD``; ``soft``: KD = KL(student/tau ‖ teacher/tau) · tau²;
    ``hard``: KD = CE against the teacher's argmax (DeiT), tau unused.
    """

    teacher: str | None = None
    teacher_checkpoint: str | None = None
    teacher_weights: Literal["checkpoint", "timm", "none"] = "checkpoint"
    kind: Literal["soft", "hard"] = "soft"
    alpha: float = Field(default=0.5, ge=0, le=1)
    tau: float = Field(default=1.0, gt=0)

    @property
    def enabled(self) -> bool:
        return self.teacher is not None


class PruneConfig(_Section):
    """Magnitude pruning with ``torch.nn.utils.prune`` (off while ``method`` is null).

    After ``at_epoch`` dense epochs the Linear/Conv weights (the classifier head excepted) are pruned
    by ``amount``, then trained ``finetune_epochs`` more with the masks applied; the run trains
    ``optim.epochs`` epochs in all, so ``at_epoch + finetune_epochs = optim.epochs`` (finetune_epochs
    defaults to the rest). ``scope: global`` ranks all weights together (l1_unstructured only);
    ``layer`` prunes each layer by ``amount``. ``ln_structured`` removes whole output channels
    (L2 norm, dim 0).
    """

    method: Literal["l1_unstructured", "ln_structured"] | None = None
    amount: float = Field(default=0.5, gt=0, lt=1)
    at_epoch: int | None = Field(default=None, ge=0)
    finetune_epochs: int | None = Field(default=None, gt=0)
    scope: Literal["layer", "global"] = "layer"

    @property
    def enabled(self) -> bool:
        return self.method is not None


class SearcherConfig(_Section):
    name: Literal["optuna", "random"] = "optuna"
    sampler: Literal["tpe", "random", "cmaes", "gp", "nsga2", "qmc", "grid"] = "tpe"
    seed: int = 0
    # tpe / gp: random trials before the model guides sampling (null: Optuna's default, 10)
    n_startup_trials: int | None = Field(default=None, gt=0)
    # the Optuna sampler's own keyword arguments (checked against its signature), e.g. {multivariate: false}
    options: dict[str, Any] = Field(default_factory=dict)


class SchedulerConfig(_Section):
    # moasha: several metrics; pbt / pb2: population-based training (orchestrator/pbt.py)
    name: Literal["asha", "none", "hyperband", "median", "moasha", "pbt", "pb2"] = "asha"
    # ASHA's rungs are grace_period · reduction_factor^k epochs below max_t (null: optim.epochs); a
    # grace_period or reduction_factor left null is derived from max_t (orchestrator/searcher.py,
    # scheduler_settings)
    grace_period: int | None = Field(default=None, gt=0)
    reduction_factor: float | None = Field(default=None, gt=1)
    max_t: int | None = Field(default=None, gt=0)
    # what trials are ranked on at a rung (asha, hyperband, median): null is sweep.metric; e.g. val/loss,
    # which tells trials apart while their top-1 is still at chance. mode null: sweep.mode for
    # sweep.metric, else the metric's own direction (min for a loss, max for a top-1)
    metric: str | None = None
    mode: Literal["max", "min"] | None = None
    # pbt / pb2 only: every perturbation_interval epochs a trial in the bottom quantile_fraction copies the
    # checkpoint of one in the top and goes on with perturbed values (pbt: resampled from the space with
    # resample_probability, else x0.8 / x1.2 or a neighbouring choice; pb2: a GP bandit within the space's
    # bounds); synch: every trial waits for the others at each interval (qksweep's default: a trial copies
    # another only at the same epoch, which asynchronous PBT rarely finds; see orchestrator/pbt.py)
    perturbation_interval: int = Field(default=2, gt=0)
    quantile_fraction: float = Field(default=0.25, gt=0, le=0.5)
    resample_probability: float = Field(default=0.25, ge=0, le=1)
    synch: bool = True

    @property
    def population_based(self) -> bool:
        return self.name in ("pbt", "pb2")

    @model_validator(mode="after")
    def _pbt_keys_for_pbt(self) -> "SchedulerConfig":
        pbt_only = ("perturbation_interval", "quantile_fraction", "resample_probability", "synch")
        given = [k for k in pbt_only if getattr(self, k) != type(self).model_fields[k].default]  # a dump has them all
        if given and not self.population_based:
            raise ValueError(f"sweep.scheduler.{given[0]} is a key of population-based training: it needs "
                             f"sweep.scheduler.name pbt or pb2, not {self.name}")
        return self


class StopOnConfig(_Section):
    """Rules that stop a run (a sweep trial or a plain train run) early, recorded as
    ``qksweep.stopped_by`` on its MLflow run."""

    spec_sigma_max_growth: float | None = Field(default=None, gt=1)
    firing_rate: FiringRateStop | None = None


class SweepConfig(_Section):
    metric: Union[str, list[str]] = "val/top1"
    mode: Union[Literal["max", "min"], list[Literal["max", "min"]]] = "max"
    num_samples: int = Field(default=12, gt=0)
    max_concurrent: int | None = Field(default=None, gt=0)
    searcher: SearcherConfig = Field(default_factory=SearcherConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    space: dict[str, Any] = Field(default_factory=dict)
    stop_on: StopOnConfig = Field(default_factory=StopOnConfig)
    constraints: dict[str, Bound] = Field(default_factory=dict)
    # Tune's reuse_actors: a trial process that finished trains the next trial of the same resources
    # instead of a fresh process importing Ray, torch and MLflow again. auto: on for trials that train
    # in their own process (run.launcher tune), off for trials on Ray Train (nothing to reuse there)
    reuse_actors: Union[Literal["auto"], bool] = "auto"
    # configurations the searcher evaluates first (Optuna's enqueue_trial), e.g. a paper's recipe; keys
    # of sweep.space, values inside it; keys left out are sampled
    enqueue: list[dict[str, Any]] = Field(default_factory=list)
    # an earlier sweep (name under run.storage, folder or bucket URI) whose finished and pruned trials
    # seed this sweep's study, so the sampler starts informed (`qksweep sweep --warm-start`)
    warm_start: str | None = None
    # budgets: the sweep ends before num_samples when one is spent (orchestrator/budget.py)
    time_budget_s: float | None = Field(default=None, gt=0)
    stop_at: dict[str, float] = Field(default_factory=dict)  # {val/top1: 0.99}: a sweep.metric reached ends it
    patience: int | None = Field(default=None, gt=0)  # N finished trials in a row without a better best end it
    # each sampled configuration trains with seeds run.seed + i, i < repeats, side by side in one trial: the
    # searcher and the scheduler see the mean (trainables/repeats.py); each seed is a nested MLflow run
    repeats: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _objectives_match(self) -> "SweepConfig":
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        modes = self.mode if isinstance(self.mode, list) else [self.mode]
        if len(metrics) != len(modes):
            raise ValueError(
                f"sweep.metric has {len(metrics)} entries but sweep.mode has {len(modes)}: give one mode per metric"
            )
        if not metrics:
            raise ValueError("sweep.metric is empty: name at least one metric, e.g. val/top1")
        return self

    @property
    def metrics(self) -> list[str]:
        return self.metric if isinstance(self.metric, list) else [self.metric]

    @property
    def modes(self) -> list[str]:
        return self.mode if isinstance(self.mode, list) else [self.mode]


class Config(_Section):
    experiment: str = "qksweep"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    spectral: SpectralConfig = Field(default_factory=SpectralConfig)
    snn: SNNConfig = Field(default_factory=SNNConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    prune: PruneConfig = Field(default_factory=PruneConfig)

    @model_validator(mode="after")
    def _distill_and_prune_fit(self) -> "Config":
        d = self.distill
        if not d.enabled and _changed(d, exclude=("teacher",)):
            raise ValueError(f"distill.teacher is missing but distill.{_changed(d, exclude=('teacher',))[0]} is set: "
                             "give the teacher (an MLflow run id, a checkpoint path or a timm model name)")
        p, epochs = self.prune, self.optim.epochs
        if not p.enabled:
            if _changed(p, exclude=("method",)):
                raise ValueError(f"prune.method is missing but prune.{_changed(p, exclude=('method',))[0]} is set: "
                                 "give prune.method (l1_unstructured or ln_structured)")
            return self
        if p.at_epoch is None:
            raise ValueError("prune.at_epoch is missing: give the number of dense epochs before pruning, e.g. prune.at_epoch=6")
        if p.at_epoch >= epochs:
            raise ValueError(f"prune.at_epoch={p.at_epoch} must be smaller than optim.epochs={epochs}: "
                             "at least one fine-tuning epoch follows the pruning")
        if p.finetune_epochs is not None and p.at_epoch + p.finetune_epochs != epochs:
            raise ValueError(f"prune.at_epoch={p.at_epoch} + prune.finetune_epochs={p.finetune_epochs} must equal "
                             f"optim.epochs={epochs} (the run trains optim.epochs in all); drop finetune_epochs to "
                             "fine-tune for the rest")
        if p.scope == "global" and p.method != "l1_unstructured":
            raise ValueError(f"prune.scope=global works with prune.method=l1_unstructured only, not {p.method}; "
                             "use prune.scope=layer")
        if self.optim.ema:
            raise ValueError("prune does not support optim.ema (the EMA copy would stay dense): set optim.ema=false")
        return self

    @field_validator("experiment")
    @classmethod
    def _experiment_name(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("experiment must be a non-empty name")
        return v

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def trial_launcher(self) -> str:
        """``tune`` or ``train``: how a sweep trial of this config trains (``run.launcher``)."""
        if self.run.launcher != "auto":
            return self.run.launcher
        return "tune" if self.run.workers == 1 else "train"

    def checkpoints_kept(self) -> int | None:
        """How many checkpoints a run keeps while it trains: ``run.keep_checkpoints``, or all of them under
        population-based training, where another trial may copy any recent one (the sweep's end still
        keeps each trial's best and last only)."""
        return None if self.sweep.scheduler.population_based else self.run.keep_checkpoints

    def reuse_trial_actors(self) -> bool:
        """Whether Tune hands a finished trial's process to the next trial (``sweep.reuse_actors``)."""
        if self.sweep.reuse_actors == "auto":
            return self.trial_launcher() == "tune"
        return self.sweep.reuse_actors

    def loader_workers(self, in_memory: bool) -> int:
        """``data.num_workers`` as a count. ``auto``: one loader process per CPU the worker holds beyond
        the one that trains (``run.cpus_per_worker - 1``), and none for in-memory data (nothing to decode)."""
        if self.data.num_workers != "auto":
            return self.data.num_workers
        return 0 if in_memory else max(0, int(self.run.cpus_per_worker) - 1)


# ---------------------------------------------------------------- keys and close matches


def _known_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        full = f"{prefix}{name}"
        keys.append(full)
        for ann in typing.get_args(field.annotation) or (field.annotation,):  # X | None: its section X
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                keys.extend(_known_keys(ann, full + "."))
    return keys


KNOWN_KEYS = _known_keys()


def suggest(word: str, choices: list[str]) -> str:
    """' (did you mean X?)' for the closest choice, or ''."""
    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else ""


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"config: unknown key '{loc}'{suggest(loc, KNOWN_KEYS)}"
    msg = first["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
        return f"config: {msg}" if not loc else f"config: {loc}: {msg}"
    value = first.get("input")
    shown = repr(value) if not isinstance(value, dict) else "a mapping"
    return f"config: {loc}: {msg} (got {shown})"


# ---------------------------------------------------------------- overrides

_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_/]+)*$")


def parse_override(text: str) -> tuple[str, Any]:
    """``'optim.lr=3e-4'`` → ``('optim.lr', 0.0003)``. Values are read as YAML (lists, bools, null)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' has no '=': write it as -s key=value, e.g. -s optim.lr=3e-4")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or not _KEY_RE.match(key):
        raise ConfigError(f"override '{text}': '{key}' is not a dotted config key such as optim.lr")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0]
        raise ConfigError(f"override '{text}': value is not valid YAML ({first})") from None
    # YAML reads 1e-3 as a string (it wants 1.0e-3); numbers are what people mean here.
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value):
        value = float(value)  # the pattern only matches what float() reads
    return key, value


def apply_override(data: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key in a nested dict. Inside ``sweep.space`` the rest of the key is one name."""
    parts = key.split(".")
    if parts[:2] == ["sweep", "space"] and len(parts) > 2:
        parts = parts[:2] + [".".join(parts[2:])]
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"override '{key}': '{where}' is a value, not a section")
        node = child
    node[parts[-1]] = value


# ---------------------------------------------------------------- loading


def _yaml_numbers(obj: Any) -> Any:
    """YAML 1.1 reads '1e-3' as a string; convert such scientific-notation strings to floats."""
    if isinstance(obj, dict):
        return {k: _yaml_numbers(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_yaml_numbers(v) for v in obj]
    if isinstance(obj, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", obj):
        return float(obj)
    return obj


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file '{path}' does not exist: pass a YAML file such as configs/digits_qkformer.yaml")
    if p.is_dir():
        raise ConfigError(f"config file '{path}' is a directory: pass a YAML file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file '{path}' cannot be read: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file '{path}' is not valid YAML{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections (model:, data:, ...), not {type(data).__name__}")
    return _yaml_numbers(data)


def build_config(data: dict[str, Any], overrides: list[str] | None = None) -> Config:
    """Validate a raw dict plus ``-s`` overrides into a :class:`Config`, or raise one-line ConfigError."""
    data = copy.deepcopy(data)
    for text in overrides or []:
        key, value = parse_override(text)
        apply_override(data, key, value)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None
    return cfg


def load_config(source: "str | Path | dict[str, Any] | Config", overrides: list[str] | None = None, **kw: Any) -> Config:
    """A YAML path, a dict or a Config, plus ``-s`` strings and keyword overrides (``optim__lr=1e-3``
    or ``{'optim.lr': 1e-3}`` style via ``overrides``)."""
    if isinstance(source, Config):
        data = source.to_dict()
    elif isinstance(source, dict):
        data = source
    elif isinstance(source, (str, Path)):
        data = read_yaml(source)
    else:
        raise ConfigError(f"config must be a YAML path, a dict or a Config, not {type(source).__name__}")
    texts = list(overrides or [])
    for k, v in kw.items():
        texts.append(f"{k.replace('__', '.')}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}")
    return build_config(data, texts)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{'model': {'embed_dim': 64}}`` → ``{'model.embed_dim': 64}`` (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and not (prefix == "sweep." and k == "space"):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def known_num_classes(data: DataConfig) -> int | None:
    """Class count where it is known without loading the data (enough for shape checks)."""
    fixed = {"digits": 10, "cifar10": 10, "cifar100": 100, "cifar10_dvs": 10, "dvs128_gesture": 11, "n_mnist": 10}
    if data.name in fixed:
        return fixed[data.name]
    if data.name == "synthetic":
        return data.num_classes or 10
    if data.root and (Path(data.root) / "train").is_dir():
        return sum(1 for p in (Path(data.root) / "train").iterdir() if p.is_dir()) or None
    return None


SCHEDULERS = ("cosine", "tanh", "step", "multistep", "plateau", "poly", "none")
