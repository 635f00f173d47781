"""``qkformer_dvs``: the official event-camera QKFormer (zhouchenlin2096/QKFormer, ``cifar10-dvs/model.py``
and ``dvs128-gesture/model.py``, which differ only in ``mlp_ratios`` and the class count).

Official defaults ``embed_dims=256, num_heads=16, T=16``, 2-channel 128x128 event frames: 1,999,371
parameters for DVS128 Gesture (``mlp_ratio 4``, 11 classes) and 1,504,138 for CIFAR10-DVS (``mlp_ratio 1``,
10 classes) -- reproduced exactly by this layout (``embed_dim`` = D):

* stem (official ``PatchEmbedInit`` at width D/2, H/8): 3x3 conv in->D/16 +BN+LIF at full resolution;
  3x3 conv D/16->D/8 +BN +3x3/2 max-pool +LIF; 3x3 conv D/8->D/4 +BN +pool +LIF; 3x3 conv D/4->D/2 +BN
  +pool +LIF; plus a residual 1x1 stride-4 conv D/8->D/2 +BN+LIF from the second LIF's output; summed.
  No conv bias.
* stage 1 (D/2): one Token Q-K attention block; patch embed 2 (D/2 -> D, H/16: the official
  ``PatchEmbeddingStage``, qkformer_cifar's :class:`DownEmbed`); stage 2 (D): ``depth - 1`` spiking
  self-attention blocks (official: ``depth`` 2, i.e. one of each; its ``depths=4`` argument is unused).
* mean over tokens and time, linear head (trunc-normal init).

The blocks are qkformer_cifar's (SpikingJelly's ``QKAttention`` / ``SpikingSelfAttention`` with the
official biased output projection, the spiking MLP), so the same deliberate differences hold: ``num_heads``
is honoured (official hard-codes 16), every LIF runs over T with T and batch apart (the SSA fix), and
``drop_path`` is applied (the official passes 0.1 but never uses it). Input: ``[T, N, 2, H, W]`` event
frames run one step per frame (``time_steps`` is the frame count: ``data.frames``); a static
``[N, C, H, W]`` image is repeated over ``time_steps``. ``img_size`` must be divisible by 16.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, layer

from ._registry import ModelArgError, fmt_arg, register_model
from .neurons import model_neurons
from .qkformer_cifar import DownEmbed, QKFormerBlock, _conv_bn, _lif, forward_stages

__all__ = ["QKFormerDVS", "qkformer_dvs"]


class DVSStemEmbed(nn.Module):
    """Official ``PatchEmbedInit`` of the DVS QKFormer: in -> dim (= D/2), H/8, with a stride-4 shortcut."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        w = (dim // 8, dim // 4, dim // 2, dim)
        self.conv0, self.bn0 = _conv_bn(in_chans, w[0], 3)
        self.lif0 = _lif()
        self.conv1, self.bn1 = _conv_bn(w[0], w[1], 3)
        self.pool1 = layer.MaxPool2d(3, stride=2, padding=1, step_mode="m")
        self.lif1 = _lif()
        self.conv2, self.bn2 = _conv_bn(w[1], w[2], 3)
        self.pool2 = layer.MaxPool2d(3, stride=2, padding=1, step_mode="m")
        self.lif2 = _lif()
        self.conv3, self.bn3 = _conv_bn(w[2], w[3], 3)
        self.pool3 = layer.MaxPool2d(3, stride=2, padding=1, step_mode="m")
        self.lif3 = _lif()
        self.shortcut = nn.Sequential(*_conv_bn(w[1], w[3], 1, stride=4), _lif())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, N, C, H, W]
        x = self.lif0(self.bn0(self.conv0(x)))
        feat = self.lif1(self.pool1(self.bn1(self.conv1(x))))
        x = self.lif2(self.pool2(self.bn2(self.conv2(feat))))
        x = self.lif3(self.pool3(self.bn3(self.conv3(x))))
        return x + self.shortcut(feat)


class QKFormerDVS(nn.Module):
    is_spiking = True

    def __init__(
        self,
        num_classes: int = 11,
        in_chans: int = 2,
        embed_dim: int = 256,
        num_heads: int = 16,
        depth: int = 2,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        time_steps: int = 16,
        qka_type: str = "token",
    ) -> None:
        super().__init__()
        if embed_dim % 16 or depth < 2:
            raise ValueError("embed_dim must be divisible by 16 and depth >= 2")
        self.time_steps = int(time_steps)
        self.num_heads = num_heads
        dims = (embed_dim // 2, embed_dim)
        dpr = torch.linspace(0, drop_path, depth).tolist()
        self.patch_embed1 = DVSStemEmbed(in_chans, dims[0])
        self.stage1 = nn.ModuleList([QKFormerBlock(dims[0], num_heads, mlp_ratio, self_attention=False,
                                                   qka_type=qka_type, drop_path=dpr[0])])
        self.patch_embed2 = DownEmbed(dims[0], dims[1])
        self.stage2 = nn.ModuleList([QKFormerBlock(dims[1], num_heads, mlp_ratio, self_attention=True,
                                                   drop_path=dpr[1 + i]) for i in range(depth - 1)])
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        functional.set_step_mode(self, "m")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return forward_stages(x, self.time_steps, ((self.patch_embed1, self.stage1), (self.patch_embed2, self.stage2)),
                              self.head)


def _check(name: str, args: dict, given: frozenset) -> None:
    if args["patch_size"] != 16:
        raise ModelArgError(
            f"{fmt_arg('patch_size', args, given)} is not supported by {name}: the patch size is fixed at 16 "
            "by the architecture (four 2x downsamples); use 16 or leave it unset"
        )
    dim, heads = args["embed_dim"], args["num_heads"]
    if dim % 16:
        raise ModelArgError(f"{fmt_arg('embed_dim', args, given)} must be divisible by 16 for {name} "
                            "(stem widths D/16 .. D/2)")
    if (dim // 2) % heads or dim % heads:
        raise ModelArgError(f"{fmt_arg('num_heads', args, given)} must divide both stage widths of {name} "
                            f"(embed_dim {dim} -> stage widths {dim // 2}, {dim})")
    if args["depth"] < 2:
        raise ModelArgError(f"{fmt_arg('depth', args, given)} must be >= 2 for {name} (1 Q-K block + depth-1 "
                            "self-attention blocks; the official layout is 2)")
    img = args.get("img_size")
    if img is not None and img % 16:
        raise ModelArgError(f"{fmt_arg('img_size', args, given)} must be divisible by 16 for {name} "
                            "(the network downsamples 16x)")


@register_model(family="snn", check=_check, neurons=model_neurons("sigmoid", 4.0, attention=True))
def qkformer_dvs(
    *,
    num_classes: int,
    in_chans: int = 2,
    img_size: Optional[int] = 128,
    embed_dim: int = 256,
    num_heads: int = 16,
    depth: int = 2,
    patch_size: int = 16,
    mlp_ratio: float = 4.0,
    drop_path: float = 0.0,
    time_steps: int = 16,
    qka_type: str = "token",
) -> QKFormerDVS:
    """Official event-camera QKFormer (see module doc); img_size / patch_size are validated only.
    ``mlp_ratio`` 4 is the DVS128 Gesture layout; CIFAR10-DVS's official recipe uses 1."""
    return QKFormerDVS(
        num_classes=num_classes, in_chans=in_chans, embed_dim=embed_dim, num_heads=num_heads,
        depth=depth, mlp_ratio=mlp_ratio, drop_path=drop_path, time_steps=time_steps, qka_type=qka_type,
    )
