"""SNN-aware measurements: firing rates, synaptic operations, energy, static checks.

Pure functions and classes (no Ray / MLflow)::

    SNNMeter(model, *, first_layer_pj=4.6, ac_pj=0.9)   # with meter.measuring(): model(x)
        .compute() -> {'snn/firing_rate', 'snn/firing_rate/<layer>', 'snn/sops',
                       'snn/energy_mj', 'snn/flops_first_layer', 'snn/macs_other'}
    ann_energy_mj(model, input_shape) -> float     # ViTs: 4.6 pJ x MACs per image, in mJ
    ENERGY_ASSUMPTIONS: dict[str, str]             # run tags describing the estimate
    FiringRateStopRule(low=1e-4, high=0.9, patience=2).check(metrics) -> str | None
    static_checks.param_count_m(model_or_cfg), static_checks.activation_memory_estimate_gb(...)

Counting is SpikingJelly 2.0's ``activation_based.op_counter`` (see :mod:`.meter`).
"""

from __future__ import annotations

from . import static_checks
from .meter import (
    E_AC_PJ,
    E_MAC_PJ,
    ENERGY_ASSUMPTIONS,
    SNNMeter,
    ann_energy_mj,
    ann_macs,
    is_neuron_layer,
)
from .static_checks import activation_memory_estimate_gb, param_count_m
from .stop_rule import FiringRateStopRule

__all__ = [
    "E_AC_PJ",
    "E_MAC_PJ",
    "ENERGY_ASSUMPTIONS",
    "FiringRateStopRule",
    "SNNMeter",
    "activation_memory_estimate_gb",
    "ann_energy_mj",
    "ann_macs",
    "is_neuron_layer",
    "param_count_m",
    "static_checks",
]
