"""``qkformer_cifar``: the official CIFAR QKFormer (zhouchenlin2096/QKFormer, cifar10/model.py).

Seed recipe ``--layer 4 --dim 384 --num_heads 8 --patch-size 4 --mlp-ratio 4 --time-step 4``
= ``depth=4, embed_dim=384, num_heads=8, mlp_ratio=4, time_steps=4``; 6,706,234 parameters
with 10 classes and 6,740,884 with 100 — reproduced exactly by this layout:

* stem (no downsampling): 3x3 conv in->D/8 +BN+LIF, 3x3 conv D/8->D/4 +BN+LIF, plus a
  residual 1x1 conv D/8->D/4 +BN+LIF from the first LIF's output; the two are summed.
* patch embed 2 / 3 (C -> 2C, H/2): 3x3 conv +BN+LIF, 3x3 conv +BN +3x3/2 max-pool +LIF,
  plus a residual 1x1 stride-2 conv +BN+LIF from the input; summed.  Stem / embed convs
  have no bias.
* stage 1 (D/4) and stage 2 (D/2): one Token Q-K attention block each; stage 3 (D):
  ``depth - 2`` spiking self-attention blocks (``depth`` is the official ``--layer``).
  Attention = SpikingJelly's ``QKAttention`` / ``SpikingSelfAttention`` (fused bias-free
  Q/K(/V) 1x1 conv + BN + LIF, attention LIF at threshold 0.5) whose output projection is
  rebuilt with a bias, as in the official code.  MLP: 1x1 conv (bias) +BN+LIF twice.
* mean over tokens and time, linear head (trunc-normal init, as the official code).

All LIFs: tau 2, ``detach_reset=True`` (SpikingJelly's default sigmoid surrogate, as the
official MultiStepLIFNode).  Deliberate differences from the official code: ``num_heads``
is honoured (official hard-codes 8); every LIF runs over T with T and batch kept separate
(the official SSA's last LIF runs over a merged T*B axis); ``drop_path`` is applied with
``timm.layers.DropPath`` on both residual branches of each block, linearly increasing from
0 over the ``depth`` blocks (the official code never applies it).  ``patch_size`` is fixed
at 4 by the architecture (two 2x downsamples): only 4 is accepted, and ``img_size`` must be
divisible by 4.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, layer, neuron
from spikingjelly.activation_based.layer.attention import QKAttention, SpikingSelfAttention
from timm.layers import DropPath

from ._registry import ModelArgError, fmt_arg, register_model
from .neurons import model_neurons
from .qkformer import check_qkformer_common

__all__ = ["QKFormerCIFAR", "qkformer_cifar"]


def _lif(**kwargs: Any) -> neuron.LIFNode:
    return neuron.LIFNode(tau=2.0, detach_reset=True, step_mode="m", **kwargs)


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1) -> list[nn.Module]:
    return [
        layer.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False, step_mode="m"),
        layer.BatchNorm2d(cout, step_mode="m"),
    ]


def _biased_proj(dim: int) -> nn.Module:
    return layer.SeqToANNContainer(nn.Conv1d(dim, dim, kernel_size=1, bias=True), nn.BatchNorm1d(dim))


class TimeDropPath(DropPath):
    """timm ``DropPath`` for ``[T, N, ...]`` tensors: one decision per sample, shared over T."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(0, 1)).transpose(0, 1)


class CifarQKAttention(QKAttention):
    """SpikingJelly Q-K attention with the official code's biased output projection."""

    def __init__(self, dim: int, num_heads: int, qka_type: str = "token") -> None:
        super().__init__(dim, num_heads, qka_type=qka_type)
        self.proj_conv_bn = _biased_proj(dim)


class CifarSelfAttention(SpikingSelfAttention):
    """SpikingJelly spiking self-attention (T, N kept apart) with a biased projection."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__(dim, num_heads)
        self.proj_conv_bn = _biased_proj(dim)


class SpikingMLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = layer.Conv1d(dim, hidden, kernel_size=1, step_mode="m")
        self.bn1 = layer.BatchNorm1d(hidden, step_mode="m")
        self.lif1 = _lif()
        self.fc2 = layer.Conv1d(hidden, dim, kernel_size=1, step_mode="m")
        self.bn2 = layer.BatchNorm1d(dim, step_mode="m")
        self.lif2 = _lif()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, N, C, L]
        x = self.lif1(self.bn1(self.fc1(x)))
        return self.lif2(self.bn2(self.fc2(x)))


class QKFormerBlock(nn.Module):
    """Residual attention + MLP block on ``[T, N, C, L]`` spike tensors."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, *, self_attention: bool,
        qka_type: str = "token", drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.attn = (
            CifarSelfAttention(dim, num_heads)
            if self_attention
            else CifarQKAttention(dim, num_heads, qka_type=qka_type)
        )
        self.mlp = SpikingMLP(dim, int(dim * mlp_ratio))
        self.drop_path = TimeDropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(x))
        return x + self.drop_path(self.mlp(x))


class StemEmbed(nn.Module):
    """Official ``PatchEmbedInit`` for CIFAR: in -> D/8 -> D/4, no downsampling."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        hidden = dim // 2
        self.conv1, self.bn1 = _conv_bn(in_chans, hidden, 3)
        self.lif1 = _lif()
        self.conv2, self.bn2 = _conv_bn(hidden, dim, 3)
        self.lif2 = _lif()
        self.shortcut = nn.Sequential(*_conv_bn(hidden, dim, 1), _lif())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, N, C, H, W]
        x = self.lif1(self.bn1(self.conv1(x)))
        return self.lif2(self.bn2(self.conv2(x))) + self.shortcut(x)


class DownEmbed(nn.Module):
    """Official ``PatchEmbeddingStage``: C -> 2C channels, H, W halved."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, cout, 3)
        self.lif1 = _lif()
        self.conv2, self.bn2 = _conv_bn(cout, cout, 3)
        self.pool = layer.MaxPool2d(3, stride=2, padding=1, step_mode="m")
        self.lif2 = _lif()
        self.shortcut = nn.Sequential(*_conv_bn(cin, cout, 1, stride=2), _lif())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lif1(self.bn1(self.conv1(x)))
        y = self.lif2(self.pool(self.bn2(self.conv2(y))))
        return y + self.shortcut(x)


class QKFormerCIFAR(nn.Module):
    is_spiking = True

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        embed_dim: int = 384,
        num_heads: int = 8,
        depth: int = 4,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        time_steps: int = 4,
        qka_type: str = "token",
    ) -> None:
        super().__init__()
        if embed_dim % 8 or depth < 2:
            raise ValueError("embed_dim must be divisible by 8 and depth >= 2")
        self.time_steps = int(time_steps)
        self.num_heads = num_heads
        dims = (embed_dim // 4, embed_dim // 2, embed_dim)
        dpr = torch.linspace(0, drop_path, depth).tolist() if depth > 1 else [drop_path]

        def block(i: int, dim: int, ssa: bool) -> QKFormerBlock:
            return QKFormerBlock(dim, num_heads, mlp_ratio, self_attention=ssa,
                                 qka_type=qka_type, drop_path=dpr[i])

        self.patch_embed1 = StemEmbed(in_chans, dims[0])
        self.stage1 = nn.ModuleList([block(0, dims[0], False)])
        self.patch_embed2 = DownEmbed(dims[0], dims[1])
        self.stage2 = nn.ModuleList([block(1, dims[1], False)])
        self.patch_embed3 = DownEmbed(dims[1], dims[2])
        self.stage3 = nn.ModuleList([block(2 + i, dims[2], True) for i in range(depth - 2)])
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        functional.set_step_mode(self, "m")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return forward_stages(x, self.time_steps, (
            (self.patch_embed1, self.stage1), (self.patch_embed2, self.stage2), (self.patch_embed3, self.stage3),
        ), self.head)


def forward_stages(x: torch.Tensor, time_steps: int, stages, head: nn.Module) -> torch.Tensor:
    """The QKFormers' forward: a static ``[N, C, H, W]`` image repeated over ``time_steps`` (``[T, N, C, H, W]``
    frames run as they are), each (embedding, blocks) stage on ``[T, N, C, H*W]`` tokens, then the head on
    the mean over tokens and time."""
    if x.ndim == 4:
        x = x.unsqueeze(0).repeat(time_steps, 1, 1, 1, 1)
    elif x.ndim != 5:
        raise ValueError(f"expected [N, C, H, W] or [T, N, C, H, W] input, got {tuple(x.shape)}")
    for embed, stage in stages:
        x = embed(x)
        t, n, c, h, w = x.shape
        x = x.flatten(3)
        for blk in stage:
            x = blk(x)
        x = x.reshape(t, n, c, h, w)
    return head(x.flatten(3).mean(3).mean(0))


def _check(name: str, args: dict, given: frozenset) -> None:
    if args["patch_size"] != 4:
        raise ModelArgError(
            f"{fmt_arg('patch_size', args, given)} is not supported by {name}: the patch size is "
            "fixed at 4 by the architecture (two 2x downsamples); use 4 or leave it unset"
        )
    check_qkformer_common(
        name, args, given, min_depth=2, img_multiple=4,
        depth_note="depth = official --layer: 1 + 1 Q-K blocks, depth-2 self-attention blocks",
    )


@register_model(family="snn", check=_check, neurons=model_neurons("sigmoid", 4.0, attention=True))
def qkformer_cifar(
    *,
    num_classes: int,
    in_chans: int = 3,
    img_size: Optional[int] = 32,
    embed_dim: int = 384,
    num_heads: int = 8,
    depth: int = 4,
    patch_size: int = 4,
    mlp_ratio: float = 4.0,
    drop_path: float = 0.0,
    time_steps: int = 4,
    qka_type: str = "token",
) -> QKFormerCIFAR:
    """Official CIFAR QKFormer (see module doc); img_size / patch_size are validated only."""
    return QKFormerCIFAR(
        num_classes=num_classes, in_chans=in_chans, embed_dim=embed_dim, num_heads=num_heads,
        depth=depth, mlp_ratio=mlp_ratio, drop_path=drop_path, time_steps=time_steps,
        qka_type=qka_type,
    )
