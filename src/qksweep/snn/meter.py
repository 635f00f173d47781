"""Firing rates, synaptic operations and energy per image for spiking networks.

Counting is SpikingJelly 2.0's ``spikingjelly.activation_based.op_counter``: a
:class:`~spikingjelly.activation_based.op_counter.DispatchCounterMode` runs a
:class:`~spikingjelly.activation_based.op_counter.SynOpCounter` (spike-driven ``mm`` /
``addmm`` / ``bmm`` / ``baddbmm`` / ``convolution``) and a
:class:`~spikingjelly.activation_based.op_counter.MACCounter` (the same ops on real-valued
operands) over the model's forward.  This module only adds glue:

* **Multi-spike operands.**  Spiking transformers add spike tensors on their residual
  paths (QKFormer's ``x + attn(x)``, SEW ``ADD``), so most Q/K/V and MLP convs get
  non-negative *integer* inputs (0, 1, 2, ...), which the stock rules treat as real
  (0 SynOps, all MACs).  Such a tensor is a sum of binary spike planes, so a value ``k``
  is counted as ``k`` spikes: SOPs = (sum of the input) x fan-out, op_counter's own
  formula for a binary operand (``nnz x n`` for matmuls, ones-kernel occupancy for convs,
  exact at borders) applied to the spike count.  Spike x spike products (attention) use
  op_counter's rule unchanged (coincidences, ``out.sum()``).  Each operand is classified
  once per op (binary / spike count / real) and shared by both counters.
* **First layer.**  The module that runs the first ``mm``/``conv`` of the forward is the
  encoding layer; its real-valued ops are MACs (``snn/flops_first_layer``).  When the model
  has ``time_steps`` = T and that layer's input is the same at every step (a static image
  repeated T times, as every qksweep SNN does), it is counted once per image, as in the
  papers (E_MAC x FL_conv1, no T); otherwise as executed.  A spike-valued (event) input
  makes it a spike-driven layer: SOPs, no MACs -- so feed normalised images (raw 0..255
  integer pixels would be taken for spike counts).
* **Other real-valued ops** (e.g. the classifier on time/token-averaged features) are
  reported as ``snn/macs_other`` and, following the papers, left out of the energy unless
  ``count_other_macs=True``.
* BatchNorm is assumed folded into the preceding conv/linear (MACCounter's BN rule is off);
  element-wise ops, neuron updates and memory traffic are not part of this estimate (see
  :data:`ENERGY_ASSUMPTIONS`; op_counter's ``SimpleEnergyProfiler`` covers memory).

Formulas (per image, N images measured)::

    fr(l)      = spikes out of neuron layer l / (neurons(l) x T x N)        (per time step)
    SOPs       = sum over spike-driven ops of  sum(input spikes) x fan-out / N
               = sum_l fr_in(l) x T x FLOPs(l)       (FLOPs = MACs of one step, one image)
    E [mJ]     = (0.9 pJ x SOPs + 4.6 pJ x FLOPs_first) x 1e-9
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, neuron
from spikingjelly.activation_based.op_counter import (
    DispatchCounterMode,
    MACCounter,
    SimpleEnergyCostConfig,
    SynOpCounter,
)
from spikingjelly.activation_based.op_counter import ac as _oc_ac
from spikingjelly.activation_based.op_counter import mac as _oc_mac

__all__ = [
    "E_AC_PJ",
    "E_MAC_PJ",
    "ENERGY_ASSUMPTIONS",
    "SNNMeter",
    "ann_energy_mj",
    "ann_macs",
    "is_neuron_layer",
]

aten = torch.ops.aten

_FP32 = SimpleEnergyCostConfig.fp32()
#: 45 nm, 32-bit float accumulate / multiply-accumulate energies (Horowitz, ISSCC 2014),
#: as shipped by ``op_counter.SimpleEnergyCostConfig.fp32()``.
E_AC_PJ: float = float(_FP32.e_ac_pj)  # 0.9
E_MAC_PJ: float = float(_FP32.e_mac_pj)  # 4.6
PJ_TO_MJ = 1e-9

#: Run tags describing the estimate (log them with every SNN / ViT trial).
ENERGY_ASSUMPTIONS: dict[str, str] = {
    "snn.energy.method": "QKFormer/Spikformer paper: E = E_AC*SOPs + E_MAC*FLOPs_first (SNN); E = E_MAC*MACs (ANN/ViT)",
    "snn.energy.process": "45nm CMOS, 32-bit float (Horowitz, ISSCC 2014)",
    "snn.energy.e_ac_pj": f"{E_AC_PJ:g}",
    "snn.energy.e_mac_pj": f"{E_MAC_PJ:g}",
    "snn.energy.sops": "SOPs(l) = fr(l-1) x T x FLOPs(l), FLOPs = MACs of one time step; spike-driven mm/bmm/conv "
    "(SpikingJelly op_counter SynOpCounter); integer residual sums count as that many spikes",
    "snn.energy.first_layer": "first mm/conv of the forward (real-valued encoding layer) as MACs, once per image "
    "for a static input repeated over T; a binary (event) input makes it SOPs",
    "snn.energy.excluded": "BatchNorm (folded), element-wise ops, neuron updates, memory access; "
    "real-valued MACs after the first layer (classifier on averaged features) reported as snn/macs_other",
    "snn.energy.unit": "mJ per image (1 pJ = 1e-9 mJ)",
    "snn.energy.counter": "spikingjelly.activation_based.op_counter (DispatchCounterMode + SynOpCounter/MACCounter)",
}

# ----------------------------------------------------------------------------- op rules

# positions of (activation, other operand) in each counted aten op's args
_OPERANDS = {
    aten.mm.default: (0, 1),
    aten.addmm.default: (1, 2),
    aten.bmm.default: (0, 1),
    aten.baddbmm.default: (1, 2),
    aten.convolution.default: (0, 1),
}
_CONV = aten.convolution.default


# Operand classification, memoised for the duration of one aten op (both counters look
# at the same operands; _ScopedSynOps.count, which runs first, clears it).  The tensor is
# kept referenced so that its id cannot be reused while the entry lives.
_CLASSIFIED: dict[int, tuple[torch.Tensor, Optional[float], bool]] = {}


def _classify(x: Any) -> tuple[Optional[float], bool]:
    """(spike count, binary?) of an operand.  The count is ``None`` unless ``x`` is a spike
    tensor: bool, or non-negative integer values (a sum of spike tensors counts as that
    many spikes); binary = values in {0, 1}."""
    if not torch.is_tensor(x):
        return None, False
    hit = _CLASSIFIED.get(id(x))
    if hit is not None and hit[0] is x:
        return hit[1], hit[2]
    if x.dtype == torch.bool:
        res: tuple[Optional[float], bool] = (float(x.count_nonzero().item()), True)
    elif x.is_complex() or not (x.is_floating_point() or x.dtype.is_signed or x.dtype == torch.uint8):
        res = (None, False)
    elif x.numel() == 0:
        res = (0.0, True)
    else:
        lo, hi = (float(v) for v in torch.stack(torch.aminmax(x)).tolist())
        if lo < 0 or (x.is_floating_point() and not bool(x.eq(x.trunc()).all().item())):
            res = (None, False)  # real-valued (cheap exit on negatives: BN outputs, images)
        else:
            res = (float(x.sum(dtype=torch.float64).item()), hi <= 1)
    _CLASSIFIED[id(x)] = (x, *res)
    return res


def _spike_count(x: Any) -> Optional[float]:
    return _classify(x)[0]


def _conv_spike_uses(x: torch.Tensor, w: torch.Tensor, args: Sequence[Any]) -> float:
    """Weight uses of a (multi-)spike conv input: sum over outputs of conv(x, ones),
    i.e. every spike times the outputs it reaches (borders and stride exact)."""
    stride, padding, dilation, transposed, output_padding, groups = args[3:9]
    with torch.no_grad(), torch._C._ExcludeDispatchKeyGuard(
        torch._C.DispatchKeySet(torch._C.DispatchKey.Python)
    ):
        if transposed:
            ones = torch.ones_like(w, dtype=torch.float32)
            occ = aten.convolution.default(
                x.float(), ones, None, stride, padding, dilation, True, output_padding, groups
            )
            return float(occ.sum(dtype=torch.float64).item())
        kernel = torch.ones((groups, w.shape[1], *w.shape[2:]), dtype=torch.float32, device=x.device)
        occ = aten.convolution.default(
            x.float(), kernel, None, stride, padding, dilation, False, tuple(0 for _ in stride), groups
        )
        return float(occ.sum(dtype=torch.float64).item()) * (int(w.shape[0]) // groups)


def _synop_rule(op: Any, stock: Any):
    """op_counter's SynOp rule for ``op``, extended to multi-spike (integer) operands.

    Spike x spike (both binary): op_counter's rule (coincidences = ``out.sum()``).  One
    spike operand: its spikes times the fan-out, the same formula op_counter uses for a
    binary operand (``nnz x n`` for matmuls, ones-kernel occupancy for convs), applied to
    the spike *count* so that integer-valued residual sums are covered.
    """
    i, j = _OPERANDS[op]
    conv = op is _CONV

    def rule(args, kwargs, out):
        x, y = args[i], args[j]
        cx, bx = _classify(x)
        cy, by = _classify(y)
        if bx and by:
            return stock(args, kwargs, out)
        if bx or (cx is not None and not by):  # every input spike accumulates its fan-out
            return int(round(_conv_spike_uses(x, y, args) if conv else cx * y.shape[-1]))
        if by and conv:  # binary weights on a real input: op_counter's weight-driven count
            return stock(args, kwargs, out)
        if cy is not None and not conv:  # real @ spikes: every spike accumulates a column
            return int(round(cy * x.shape[-2]))
        return 0

    return rule


def _mac_rule(op: Any, stock: Any):
    """op_counter's MAC rule for ``op``; zero when an operand is a (multi-)spike tensor."""
    i, j = _OPERANDS[op]

    def rule(args, kwargs, out):
        x, y = args[i], args[j]
        cy, by = _classify(y)
        if _spike_count(x) is not None or (by if op is _CONV else cy is not None):
            return 0
        return stock(args, kwargs, out)

    return rule


_SYNOP_RULES = {
    aten.mm.default: _synop_rule(aten.mm.default, _oc_ac._spike_mm),
    aten.addmm.default: _synop_rule(aten.addmm.default, _oc_ac._spike_addmm),
    aten.bmm.default: _synop_rule(aten.bmm.default, _oc_ac._spike_bmm),
    aten.baddbmm.default: _synop_rule(aten.baddbmm.default, _oc_ac._spike_baddbmm),
    aten.convolution.default: _synop_rule(aten.convolution.default, _oc_ac._spike_convolution),
}
_MAC_RULES = {
    aten.mm.default: _mac_rule(aten.mm.default, _oc_mac._mac_mm),
    aten.addmm.default: _mac_rule(aten.addmm.default, _oc_mac._mac_addmm),
    aten.bmm.default: _mac_rule(aten.bmm.default, _oc_mac._mac_bmm),
    aten.baddbmm.default: _mac_rule(aten.baddbmm.default, _oc_mac._mac_baddbmm),
    aten.convolution.default: _mac_rule(aten.convolution.default, _oc_mac._mac_convolution),
}


def _innermost(parent_names: Optional[set[str]]) -> str:
    """The innermost active module scope (op_counter names: ``Root.a.b``)."""
    names = [n for n in (parent_names or ()) if n != "Global"]
    return max(names, key=lambda n: n.count(".")) if names else "Global"


def _strip_root(scope: str) -> str:
    """``Root.a.b`` -> ``a.b`` (the ``named_modules`` name); the root itself -> ``''``."""
    return scope.split(".", 1)[1] if "." in scope else ""


class _ScopedSynOps(SynOpCounter):
    """SynOpCounter that also keeps each op's count under its innermost module."""

    def __init__(self) -> None:
        super().__init__(extra_rules=_SYNOP_RULES)
        self.by_scope: dict[str, int] = defaultdict(int)

    def count(self, func, args, kwargs, out, active_modules=None, parent_names=None) -> int:
        _CLASSIFIED.clear()  # a new op: forget the previous op's operands
        v = super().count(func, args, kwargs, out, active_modules=active_modules, parent_names=parent_names)
        if v:
            self.by_scope[_innermost(parent_names)] += v
        return v

    def reset(self) -> None:
        super().reset()
        self.by_scope = defaultdict(int)


class _FirstLayerMACs(MACCounter):
    """MACCounter (BN folded away) that splits MACs into first layer / the rest."""

    def __init__(self) -> None:
        super().__init__(extra_rules=_MAC_RULES)
        self.rules.pop(aten.native_batch_norm.default, None)  # BN folded into conv/linear
        self.first_scope: Optional[str] = None
        self.time_steps: Optional[int] = None
        self.first = 0.0
        self.other = 0.0

    def count(self, func, args, kwargs, out, active_modules=None, parent_names=None) -> int:
        v = super().count(func, args, kwargs, out, active_modules=active_modules, parent_names=parent_names)
        scope = _innermost(parent_names)
        if self.first_scope is None:
            self.first_scope = scope
        if v:
            if scope == self.first_scope:
                self.first += v / self._repeats(func, args)
            else:
                self.other += v
        return v

    def _repeats(self, func, args) -> int:
        """T when the first layer's input is one tensor repeated over T steps, else 1."""
        t = self.time_steps
        x = args[_OPERANDS[func][0]]
        if not t or t <= 1 or x.shape[0] % t:
            return 1
        steps = x.reshape(t, -1)
        return t if bool(steps.eq(steps[:1]).all().item()) else 1

    def reset(self) -> None:
        super().reset()
        self.first = 0.0
        self.other = 0.0


# ----------------------------------------------------------------------------- neurons


def is_neuron_layer(module: nn.Module) -> bool:
    """Spiking neuron layers: SpikingJelly ``BaseNode`` subclasses and the other neuron
    classes of ``spikingjelly.activation_based.neuron`` (``NonSpiking*`` ones excluded)."""
    if isinstance(module, neuron.BaseNode):
        return True
    cls = type(module)
    return cls.__module__.startswith("spikingjelly.activation_based.neuron") and "NonSpiking" not in cls.__name__


def _neuron_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Outermost neuron layers by qualified name (a neuron inside a neuron is not listed)."""
    found: list[tuple[str, nn.Module]] = []
    for name, mod in model.named_modules():
        if is_neuron_layer(mod) and not any(name.startswith(p + ".") for p, _ in found):
            found.append((name, mod))
    return found


def _first_tensor(obj: Any) -> Optional[torch.Tensor]:
    if torch.is_tensor(obj):
        return obj
    if isinstance(obj, (tuple, list)):
        for o in obj:
            t = _first_tensor(o)
            if t is not None:
                return t
    if isinstance(obj, dict):
        return _first_tensor(list(obj.values()))
    return None


# ----------------------------------------------------------------------------- meter


class SNNMeter:
    """Firing rates, SOPs and energy per image of a SpikingJelly (multi-step) model.

    Usage, per validation batch (or ``meter.update(x)``, which does both)::

        with meter.measuring():
            out = model(x)
        functional.reset_net(model)
        ...
        metrics = meter.compute()   # {'snn/firing_rate': ..., 'snn/sops': ..., ...}
        meter.reset()

    Outside :meth:`measuring` nothing is attached to the model (no hooks, no dispatch
    mode), so training runs at full speed.  Inside, every aten op goes through op_counter's
    dispatch mode (several times slower): measure validation batches only, or a few.

    ``batch_dim``: where the image count is read from the model's first input when
    ``measuring(n_images=...)`` is not given; default: dim 1 of a 5-D ``[T, N, C, H, W]``
    input, else dim 0.  ``static_input``: count the first layer once per image when its
    input is repeated over ``model.time_steps`` (None/True: detect it, False: as executed).
    ``count_other_macs``: add ``snn/macs_other`` to the energy at ``first_layer_pj``.

    Pass the bare model (not a DDP wrapper, whose ``module.`` prefix would end up in the
    layer names).  One meter measures at a time per process (op_counter's module tracker
    and the operand cache are process-global).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        first_layer_pj: float = E_MAC_PJ,
        ac_pj: float = E_AC_PJ,
        batch_dim: Optional[int] = None,
        static_input: Optional[bool] = None,
        count_other_macs: bool = False,
    ) -> None:
        for name, val in (("first_layer_pj", first_layer_pj), ("ac_pj", ac_pj)):
            if not math.isfinite(val) or val < 0:
                raise ValueError(f"{name}={val!r} must be a finite non-negative number")
        self.model = model
        self.first_layer_pj = float(first_layer_pj)
        self.ac_pj = float(ac_pj)
        self.batch_dim = batch_dim
        self.static_input = static_input
        self.count_other_macs = bool(count_other_macs)
        self._synops = _ScopedSynOps()
        self._macs = _FirstLayerMACs()
        self._active = False
        self.reset()

    # -- state
    def reset(self) -> None:
        """Forget everything measured (the first-layer choice is kept)."""
        self._synops.reset()
        self._macs.reset()
        self.n_images = 0
        self._spikes: dict[str, torch.Tensor] = {}
        self._neurons: dict[str, int] = {}

    @property
    def first_layer(self) -> Optional[str]:
        """Qualified name of the layer counted as the (MAC) first layer, once seen."""
        s = self._macs.first_scope
        return None if s is None else _strip_root(s)

    # -- measuring
    def _time_steps(self) -> Optional[int]:
        if self.static_input is False:
            return None
        t = getattr(self.model, "time_steps", None)
        return int(t) if isinstance(t, int) and t > 1 else None

    def _infer_images(self, x: Optional[torch.Tensor]) -> int:
        if x is None or x.ndim == 0:
            raise ValueError("SNNMeter: cannot infer the batch size; pass measuring(n_images=...)")
        dim = self.batch_dim if self.batch_dim is not None else (1 if x.ndim == 5 else 0)
        return int(x.shape[dim])

    @contextlib.contextmanager
    def measuring(self, n_images: Optional[int] = None) -> Iterator["SNNMeter"]:
        """Count spikes and operations of the model calls made inside the block.

        ``n_images``: images in the block (default: read from each model call's input).
        """
        if self._active:
            raise RuntimeError("SNNMeter.measuring() is already active")
        handles = []
        layers = _neuron_layers(self.model)

        def count_images(_mod, args, kwargs):
            self.n_images += self._infer_images(_first_tensor((args, kwargs)))

        def spike_hook(name: str):
            def hook(_mod, _inp, out):
                s = _first_tensor(out)
                if s is None:
                    return
                s = s.detach()
                total = (s.abs() if s.dtype != torch.bool else s).sum(dtype=torch.float64)
                prev = self._spikes.get(name)
                self._spikes[name] = total if prev is None else prev + total
                self._neurons[name] = self._neurons.get(name, 0) + s.numel()

            return hook

        self._macs.time_steps = self._time_steps()
        mode = DispatchCounterMode([self._synops, self._macs], strict=False)
        self._active = True
        try:
            if n_images is None:
                handles.append(self.model.register_forward_pre_hook(count_images, with_kwargs=True))
            else:
                if n_images < 0:
                    raise ValueError(f"n_images={n_images!r} must be >= 0")
                self.n_images += int(n_images)
            for name, mod in layers:
                handles.append(mod.register_forward_hook(spike_hook(name)))
            with mode:
                yield self
        finally:
            for h in handles:
                h.remove()
            _CLASSIFIED.clear()
            self._active = False

    def update(self, x: Any, *, n_images: Optional[int] = None, reset_net: bool = True) -> Any:
        """Measure one batch: ``model(x)`` under :meth:`measuring` and ``no_grad``, then
        ``functional.reset_net(model)``; returns the model output."""
        try:
            with torch.no_grad(), self.measuring(n_images):
                return self.model(x)
        finally:
            if reset_net:
                functional.reset_net(self.model)

    # -- results
    def firing_rates(self) -> dict[str, float]:
        """Per neuron layer: mean spikes per neuron per time step."""
        return {
            name: float(self._spikes[name].item()) / n
            for name, n in self._neurons.items()
            if n > 0
        }

    def layer_sops(self) -> dict[str, float]:
        """SOPs per image by the innermost module that ran the op (``''`` = the root)."""
        n = max(self.n_images, 1)
        return {_strip_root(s): v / n for s, v in self._synops.by_scope.items()}

    def compute(self) -> dict[str, float]:
        """``snn/*`` metrics per image; ``{}`` before anything was measured."""
        if self.n_images <= 0:
            return {}
        n = self.n_images
        out: dict[str, float] = {}
        rates = self.firing_rates()
        if rates:
            out["snn/firing_rate"] = sum(rates.values()) / len(rates)
            for name, r in rates.items():
                out[f"snn/firing_rate/{name}"] = r
        sops = self._synops.get_total() / n
        first = self._macs.first / n
        other = self._macs.other / n
        energy_pj = self.ac_pj * sops + self.first_layer_pj * first
        if self.count_other_macs:
            energy_pj += self.first_layer_pj * other
        out["snn/sops"] = float(sops)
        out["snn/flops_first_layer"] = float(first)
        out["snn/macs_other"] = float(other)
        out["snn/energy_mj"] = float(energy_pj * PJ_TO_MJ)
        return out


# ----------------------------------------------------------------------------- ANN side


def _as_batch_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise ValueError(f"input_shape={input_shape!r}: expected (C, H, W) or (N, C, H, W)")
    return shape


def _sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def ann_macs(model: nn.Module, input_shape: Sequence[int]) -> float:
    """Multiply-accumulates per image of one forward (matmul, conv and attention, counted
    by ``torch.utils.flop_counter.FlopCounterMode``: MACs = FLOPs / 2; CPU's fused
    attention kernel is given torch's own SDPA formula, which it lacks).  ``input_shape``
    is ``(C, H, W)`` or ``(N, C, H, W)``; runs one no-grad, eval-mode forward on random
    input (the model's train/eval mode is restored)."""
    from torch.utils.flop_counter import FlopCounterMode

    shape = _as_batch_shape(input_shape)
    p = next(iter(model.parameters()), None)
    x = torch.randn(shape, device=p.device if p is not None else "cpu")
    extra = {
        packet: _sdpa_flop
        for packet in (getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None),)
        if packet is not None
    }
    counter = FlopCounterMode(display=False, custom_mapping=extra)
    was_training = model.training
    model.eval()  # the counting forward must not move BatchNorm statistics
    try:
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
        if getattr(model, "is_spiking", False):
            functional.reset_net(model)
    return counter.get_total_flops() / 2 / shape[0]


def ann_energy_mj(model: nn.Module, input_shape: Sequence[int], *, mac_pj: float = E_MAC_PJ) -> float:
    """ANN energy per image in mJ: ``4.6 pJ x MACs`` (see :func:`ann_macs`), the axis
    SNN trials' ``snn/energy_mj`` is compared on."""
    return mac_pj * ann_macs(model, input_shape) * PJ_TO_MJ
