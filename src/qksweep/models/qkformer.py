"""QKFormer-10-{384,512,768}: SpikingJelly 2.0's ``model.qkformer.QKFormer``, not re-implemented.

Architecture of the paper's ImageNet models: 3 stages at widths (D/4, D/2, D), depths
(1, 2, 7) — stages 1-2 Q-K attention, stage 3 spiking self-attention — heads 6 / 8 / 12
for D = 384 / 512 / 768 (SpikingJelly's ``qkformer_10_384`` uses (6, 6, 6) heads and
depths (1, 2, 7)).  At 1000 classes this gives 16.47M / 29.08M / 64.96M parameters.

Neurons: SpikingJelly's port builds the stem / patch-embed / MLP LIFs with plain
``LIFNode`` defaults (``detach_reset=False``); the official code uses
``MultiStepLIFNode(tau=2.0, detach_reset=True)`` everywhere, so ``detach_reset=True`` is
passed through the constructor's neuron kwargs (``_make_multi_step_neuron`` merges them
over each position's defaults, so the attention LIFs keep ``v_threshold=0.5``).

Overrides: ``time_steps`` (-> ``T``), ``embed_dim``, ``num_heads`` (one int for all three
stages), ``mlp_ratio``, ``qka_type``, ``depth`` = total blocks, mapped to stage depths
``(1, 2, depth - 3)`` (depth >= 3; 10 -> the paper's (1, 2, 7); depth 3 leaves stage 3
without blocks).  ``img_size`` has no effect on the parameters (convolutional patch
embedding, no position table); it must be divisible by 16 (four 2x max-pools).
"""

from __future__ import annotations

from typing import Any, Sequence

from spikingjelly.activation_based.model.qkformer import QKFormer

from ._registry import ModelArgError, fmt_arg, register_model
from .neurons import model_neurons

#: module-name substrings selecting the 1x1 convs of Q-K / self attention and MLPs in
#: every QKFormer here (``qkformer_10_*`` and ``qkformer_cifar``).  Q/K (resp. Q/K/V)
#: are one fused conv in SpikingJelly's attention layers.  Weights are ``[out, in, 1]``
#: (Conv1d): matrices once the kernel axis is squeezed.  Match with ``in`` on
#: ``named_modules()`` names; ``.0`` is the conv inside SpikingJelly's
#: ``SeqToANNContainer(conv, bn)``.
QKFORMER_SPECTRAL_TARGETS: list[str] = [
    "attn.qk_conv_bn.0",
    "attn.qkv_conv_bn.0",
    "attn.proj_conv_bn.0",
    "mlp.fc1",
    "mlp.fc2",
]


def check_qkformer_common(
    name: str,
    args: dict,
    given: frozenset,
    *,
    min_depth: int,
    img_multiple: int,
    depth_note: str,
) -> None:
    """Checks shared by both QKFormer flavours (widths D/4, D/2, D; stem width D/8)."""
    dim = args["embed_dim"]
    if dim % 8:
        raise ModelArgError(
            f"{fmt_arg('embed_dim', args, given)} must be divisible by 8 for {name} "
            f"(stage widths D/4, D/2, D and stem width D/8)"
        )
    widths = (dim // 4, dim // 2, dim)
    heads = args["num_heads"]
    if any(w % heads for w in widths):
        raise ModelArgError(
            f"{fmt_arg('num_heads', args, given)} must divide every stage width of {name} "
            f"(embed_dim {dim} -> stage widths {', '.join(map(str, widths))})"
        )
    if args["depth"] < min_depth:
        raise ModelArgError(
            f"{fmt_arg('depth', args, given)} must be >= {min_depth} for {name} ({depth_note})"
        )
    img = args.get("img_size")
    if img is not None and img % img_multiple:
        raise ModelArgError(
            f"{fmt_arg('img_size', args, given)} must be divisible by {img_multiple} for {name} "
            f"(the network downsamples {img_multiple}x)"
        )


def stage_depths_10(depth: int) -> tuple[int, int, int]:
    """Total block count -> QKFormer-10-style stage depths (1, 2, depth - 3)."""
    return (1, 2, depth - 3)


class SJQKFormer(QKFormer):
    """SpikingJelly's QKFormer plus the attributes the training loop expects."""

    is_spiking = True

    @property
    def time_steps(self) -> int:
        return int(self.T)

    @time_steps.setter
    def time_steps(self, value: int) -> None:
        self.T = int(value)


def _check_qkformer10(name: str, args: dict, given: frozenset) -> None:
    check_qkformer_common(
        name, args, given, min_depth=3, img_multiple=16,
        depth_note="depth = total blocks, stage depths (1, 2, depth-3)",
    )


def _build_qkformer10(
    *,
    num_classes: int,
    in_chans: int = 3,
    img_size: int | None = 224,
    time_steps: int = 4,
    embed_dim: int = 384,
    num_heads: int | Sequence[int] = 6,
    depth: int = 10,
    mlp_ratio: float = 4.0,
    qka_type: str = "token",
    **_: Any,
) -> SJQKFormer:
    heads = tuple(num_heads) if isinstance(num_heads, (tuple, list)) else (num_heads,) * 3
    return SJQKFormer(
        T=time_steps,
        in_channels=in_chans,
        num_classes=num_classes,
        embed_dims=embed_dim,
        num_heads=heads,
        depths=stage_depths_10(depth),
        mlp_ratio=mlp_ratio,
        qka_type=qka_type,
        detach_reset=True,  # official code: every LIF has detach_reset=True
    )


_QKF10_KEYS = ("time_steps", "embed_dim", "num_heads", "depth", "mlp_ratio", "qka_type")

for _dim, _heads in ((384, 6), (512, 8), (768, 12)):
    register_model(
        _build_qkformer10,
        name=f"qkformer_10_{_dim}",
        family="snn",
        overrides=_QKF10_KEYS,
        defaults=dict(time_steps=4, embed_dim=_dim, num_heads=_heads, depth=10,
                      mlp_ratio=4.0, qka_type="token", img_size=224),
        check=_check_qkformer10,
        neurons=model_neurons("sigmoid", 4.0, attention=True),  # LIFNode's own Sigmoid(alpha=4)
    )
