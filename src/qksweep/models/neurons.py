"""``model.neuron``: the spiking neurons of every SNN in the registry, as config keys.

Each SNN is built as its own code builds it (SpikingJelly's LIF neurons, tau 2, threshold 1, 0.5 in
attention); when ``model.neuron`` asks for anything else, every neuron module of the built network is
replaced by one of SpikingJelly 2.0's multi-step neurons with the resolved settings. Attention neurons
are the modules named ``attn_lif`` (SpikingJelly's ``QKAttention`` / ``SpikingSelfAttention`` and
Spikformer's attention, and qksweep's ``qkformer_cifar`` built on them): they take
``attn_v_threshold``, every other neuron ``v_threshold``. Settings equal to the model's own leave the
network untouched, so the default config builds exactly today's model.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch.nn as nn
from spikingjelly.activation_based import neuron, surrogate

from ..config import NEURON_TYPES, SURROGATES, NeuronConfig

#: config name -> SpikingJelly class
NEURON_CLASSES: dict[str, type[neuron.BaseNode]] = {
    "lif": neuron.LIFNode,
    "if": neuron.IFNode,
    "plif": neuron.ParametricLIFNode,  # learnable tau, initialised at tau
    "klif": neuron.KLIFNode,
    "qif": neuron.QIFNode,
    "eif": neuron.EIFNode,
}
SURROGATE_CLASSES: dict[str, type] = {
    "atan": surrogate.ATan,
    "sigmoid": surrogate.Sigmoid,
    "erf": surrogate.Erf,
    "piecewise_quadratic": surrogate.PiecewiseQuadratic,
    "piecewise_exp": surrogate.PiecewiseExp,
    "soft_sign": surrogate.SoftSign,
    "super_spike": surrogate.SuperSpike,
    "rect": surrogate.Rect,
    "q_pseudo_spike": surrogate.QPseudoSpike,
    "nonzero_sign_log_abs": surrogate.NonzeroSignLogAbs,
    "s2nn": surrogate.S2NN,
}
assert tuple(NEURON_CLASSES) == NEURON_TYPES and tuple(SURROGATE_CLASSES) == SURROGATES

#: the types with a membrane time constant / with ``decay_input``
_TAU_TYPES = ("lif", "plif", "klif", "qif", "eif")
_DECAY_INPUT_TYPES = ("lif", "plif", "klif")
ATTENTION_NEURON = "attn_lif"



def model_neurons(surrogate_name: str, alpha: float, attention: bool) -> dict[str, Any]:
    """A model's own neuron settings (the registry's ``ModelInfo.neurons``)."""
    return dict(surrogate=surrogate_name, surrogate_alpha=float(alpha), attention=attention)


def resolve(settings: NeuronConfig | Mapping[str, Any] | None, model: Mapping[str, Any]) -> dict[str, Any]:
    """The settings every neuron of the model gets: ``settings`` (``model.neuron``) over the model's own
    (``model``: :func:`model_neurons`), only the keys the neuron type has."""
    s = settings if isinstance(settings, NeuronConfig) else NeuronConfig.model_validate(dict(settings or {}))
    out: dict[str, Any] = {"type": s.type}
    if s.type in _TAU_TYPES:
        out["tau"] = s.tau
    out["v_threshold"] = s.v_threshold
    if model["attention"]:
        out["attn_v_threshold"] = s.attn_v_threshold
    out["v_reset"] = s.v_reset
    out["detach_reset"] = s.detach_reset
    if s.type in _DECAY_INPUT_TYPES:
        out["decay_input"] = s.decay_input
    out["surrogate"] = s.surrogate or model["surrogate"]
    same = out["surrogate"] == model["surrogate"]
    alpha = s.surrogate_alpha
    if alpha is None:  # the surrogate's own sharpness (the model's, when it is the model's surrogate)
        alpha = model["surrogate_alpha"] if same else SURROGATE_CLASSES[out["surrogate"]]().alpha
    out["surrogate_alpha"] = float(alpha)
    return out


def make_neuron(resolved: Mapping[str, Any], *, attention: bool) -> neuron.BaseNode:
    """One multi-step SpikingJelly neuron with the resolved settings."""
    kind = resolved["type"]
    kw: dict[str, Any] = dict(
        v_threshold=resolved["attn_v_threshold"] if attention else resolved["v_threshold"],
        v_reset=resolved["v_reset"], detach_reset=resolved["detach_reset"],
        surrogate_function=SURROGATE_CLASSES[resolved["surrogate"]](alpha=resolved["surrogate_alpha"]),
        step_mode="m",
    )
    if kind in _TAU_TYPES:
        kw["init_tau" if kind == "plif" else "tau"] = resolved["tau"]
    if kind in _DECAY_INPUT_TYPES:
        kw["decay_input"] = resolved["decay_input"]
    return NEURON_CLASSES[kind](**kw)


def is_default(resolved: Mapping[str, Any], model: Mapping[str, Any]) -> bool:
    """True when ``resolved`` is what the model builds anyway (its network is left untouched)."""
    return resolved == resolve(None, model)


def replace_neurons(net: nn.Module, resolved: Mapping[str, Any]) -> int:
    """Put a neuron with ``resolved`` settings in place of every SpikingJelly neuron of ``net``; the number
    replaced."""
    count = 0
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, neuron.BaseNode):
                setattr(parent, name, make_neuron(resolved, attention=name == ATTENTION_NEURON))
                count += 1
    return count


def apply_neurons(net: nn.Module, settings: NeuronConfig | Mapping[str, Any] | None,
                  model: Mapping[str, Any]) -> nn.Module:
    """``net`` with the neurons ``settings`` asks for (untouched when they are the model's own)."""
    resolved = resolve(settings, model)
    if not is_default(resolved, model):
        replace_neurons(net, resolved)
    return net


def neuron_settings(node: neuron.BaseNode) -> dict[str, Any]:
    """What one built neuron module carries, in ``model.neuron`` terms (for tests and inspection)."""
    kind = {cls: name for name, cls in NEURON_CLASSES.items()}.get(type(node), type(node).__name__)
    out: dict[str, Any] = {"type": kind, "v_threshold": node.v_threshold, "v_reset": node.v_reset,
                           "detach_reset": node.detach_reset}
    if isinstance(node, neuron.ParametricLIFNode):
        out["tau"] = round(1.0 / node.w.sigmoid().item(), 6)
    elif hasattr(node, "tau"):
        out["tau"] = node.tau
    if hasattr(node, "decay_input"):
        out["decay_input"] = node.decay_input
    sg = node.surrogate_function
    out["surrogate"] = {cls: name for name, cls in SURROGATE_CLASSES.items()}.get(type(sg), type(sg).__name__)
    out["surrogate_alpha"] = getattr(sg, "alpha", None)
    return out


def run_neuron_params(settings: NeuronConfig | None, model: Mapping[str, Any] | None
                      ) -> tuple[dict[str, Any], dict[str, str]]:
    """A run's resolved neuron settings as MLflow params (``model.neuron.*``) and its neuron-type tag
    (``qksweep.neuron``); nothing for a model without spiking neurons (``model`` None: its
    ``ModelInfo.neurons``)."""
    if model is None:
        return {}, {}
    resolved = resolve(settings, model)
    return {f"model.neuron.{k}": v for k, v in resolved.items()}, {"qksweep.neuron": resolved["type"]}
