"""Tests for qksweep.snn: firing rates, SOPs and energy (SpikingJelly op_counter), the
ANN energy of ViTs, static checks and the dead-network stop rule (CPU, a few seconds)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, layer, neuron
from timm.models.vision_transformer import VisionTransformer

from qksweep.models import create_model
from qksweep.snn import (
    ENERGY_ASSUMPTIONS,
    FiringRateStopRule,
    SNNMeter,
    activation_memory_estimate_gb,
    ann_energy_mj,
    ann_macs,
    param_count_m,
    static_checks,
)

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster and immune to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TINY_QKF = dict(num_classes=10, img_size=16, embed_dim=32, num_heads=2, depth=2, mlp_ratio=2)


def tiny_qkformer(time_steps: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("qkformer_cifar", time_steps=time_steps, **TINY_QKF).train()


def images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def neurons(model: nn.Module) -> list[neuron.BaseNode]:
    return [m for m in model.modules() if isinstance(m, neuron.BaseNode)]


# ----------------------------------------------------------------------------- hand-built SNN
def hand_net() -> nn.Sequential:
    """Linear(4,3) -> IF -> Linear(3,2) -> IF, multi-step, weights chosen so that the spike
    pattern below is exact in float arithmetic."""
    fc1 = layer.Linear(4, 3, bias=False, step_mode="m")
    fc2 = layer.Linear(3, 2, bias=False, step_mode="m")
    with torch.no_grad():
        fc1.weight.copy_(torch.tensor([[1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, -0.5], [0.25, 0.25, 0.25, 0.25]]))
        fc2.weight.copy_(torch.tensor([[1.5, -1.0, 0.5], [0.5, 0.5, 0.5]]))
    return nn.Sequential(fc1, neuron.IFNode(step_mode="m"), fc2, neuron.IFNode(step_mode="m"))


# x[t, n, :] for T=2, one image.  IF (v_th 1, hard reset to 0), H = V + W x:
#   layer 1, t0: W1 x = [1.2, 0.5, 0.55] -> spikes [1,0,0], V = [0, 0.5, 0.55]
#            t1: W1 x = [0.5, 0.6, 0.425] -> H = [0.5, 1.1, 0.975] -> spikes [0,1,0]
#   layer 2, t0: in [1,0,0] -> W2 s = [1.5, 0.5]  -> spikes [1,0], V = [0, 0.5]
#            t1: in [0,1,0] -> W2 s = [-1.0, 0.5] -> H = [-1.0, 1.0] -> spikes [0,1]
HAND_X = torch.tensor([[[1.0, 0.4, 0.6, 0.2]], [[0.5, 0.0, 0.8, 0.4]]])
HAND_FR = {"1": 2 / (3 * 2), "3": 2 / (2 * 2)}  # spikes / (neurons x T)
HAND_SOPS = 2 * 2  # layer 2: 2 input spikes x 2 outputs = fr1 (1/3) x T (2) x FLOPs (3x2)
HAND_FIRST = 2 * 4 * 3  # layer 1 runs on real input at both steps (T x 4 x 3 MACs)


def test_hand_built_snn_rates_and_sops_match_hand_count():
    net = hand_net()
    meter = SNNMeter(net, batch_dim=1)  # input is [T, N, features]
    with meter.measuring():
        out = net(HAND_X)
    functional.reset_net(net)
    assert out[:, 0].tolist() == [[1.0, 0.0], [0.0, 1.0]]

    m = meter.compute()
    assert meter.first_layer == "0"
    assert m["snn/firing_rate/1"] == pytest.approx(HAND_FR["1"])
    assert m["snn/firing_rate/3"] == pytest.approx(HAND_FR["3"])
    assert m["snn/firing_rate"] == pytest.approx((HAND_FR["1"] + HAND_FR["3"]) / 2)
    assert m["snn/sops"] == HAND_SOPS
    assert meter.layer_sops() == {"2": HAND_SOPS}
    assert m["snn/flops_first_layer"] == HAND_FIRST
    assert m["snn/macs_other"] == 0
    assert m["snn/energy_mj"] == pytest.approx((0.9 * HAND_SOPS + 4.6 * HAND_FIRST) * 1e-9)

    # per image: a batch of 3 copies gives the same numbers; update() resets the net
    meter.reset()
    meter.update(HAND_X.expand(2, 3, 4).contiguous())
    m3 = meter.compute()
    assert meter.n_images == 3
    for k in ("snn/firing_rate", "snn/sops", "snn/flops_first_layer", "snn/energy_mj"):
        assert m3[k] == pytest.approx(m[k])

    # custom energies
    meter2 = SNNMeter(net, batch_dim=1, first_layer_pj=1.0, ac_pj=2.0)
    meter2.update(HAND_X)
    assert meter2.compute()["snn/energy_mj"] == pytest.approx((2.0 * HAND_SOPS + 1.0 * HAND_FIRST) * 1e-9)


def test_measuring_leaves_nothing_attached():
    from torch.nn.modules import module as torch_module

    net = hand_net()
    glob = (len(torch_module._global_forward_pre_hooks), len(torch_module._global_forward_hooks))
    meter = SNNMeter(net, batch_dim=1)
    meter.update(HAND_X)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())
    assert (len(torch_module._global_forward_pre_hooks), len(torch_module._global_forward_hooks)) == glob
    assert torch._C._len_torch_dispatch_stack() == 0
    # outside measuring() nothing is counted
    net(HAND_X)
    functional.reset_net(net)
    assert meter.compute()["snn/sops"] == HAND_SOPS
    assert SNNMeter(net).compute() == {}


def test_multi_spike_inputs_count_each_spike():
    """A sum of spike tensors (residual paths) drives SOPs spike by spike."""
    fc = nn.Linear(3, 5, bias=False)
    conv = nn.Conv2d(2, 4, 1, bias=False)
    x = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    y = torch.zeros(1, 2, 3, 3)
    y[0, 0, 1, 1], y[0, 1, 0, 0] = 2.0, 1.0
    for mod, inp, expected in ((fc, x, 6 * 5), (conv, y, 3 * 4)):
        meter = SNNMeter(nn.Sequential(nn.Identity(), mod), static_input=False)
        meter.update(inp, n_images=1)
        m = meter.compute()
        assert m["snn/sops"] == expected
        assert m["snn/flops_first_layer"] == 0  # spike input: the first layer is spike-driven


# ----------------------------------------------------------------------------- QKFormer energy
def _measure(model: nn.Module, x: torch.Tensor) -> tuple[dict, SNNMeter]:
    meter = SNNMeter(model)
    meter.update(x)
    return meter.compute(), meter


def test_qkformer_energy_formula_and_T_scaling():
    x = images()
    # (a) memoryless neurons (tau=1: H = X) and a static input: every step repeats step 0,
    #     so the firing rates are equal and the SOP part of the energy is exactly x4.
    res = {}
    for T in (1, 4):
        model = tiny_qkformer(T)
        for n in neurons(model):
            n.tau = 1.0
        res[T], meter = _measure(model, x)
        assert meter.first_layer == "patch_embed1.conv1"
    r1, r4 = res[1], res[4]
    assert 0.01 < r1["snn/firing_rate"] < 0.9
    for k, v in r1.items():
        if k.startswith("snn/firing_rate"):
            assert r4[k] == pytest.approx(v, abs=1e-12), k
    assert r4["snn/sops"] == pytest.approx(4 * r1["snn/sops"])
    first = 3 * 9 * 4 * 16 * 16  # conv1: 3 -> embed_dim/8 channels, 3x3, 16x16, once per image
    assert r1["snn/flops_first_layer"] == r4["snn/flops_first_layer"] == first
    e_first = 4.6e-9 * first
    assert r4["snn/energy_mj"] - e_first == pytest.approx(4 * (r1["snn/energy_mj"] - e_first))
    for r in (r1, r4):
        assert r["snn/energy_mj"] == pytest.approx(0.9e-9 * r["snn/sops"] + 4.6e-9 * r["snn/flops_first_layer"])
    assert r1["snn/macs_other"] == 32 * 10  # classifier on averaged features (not in E)


def test_qkformer_sops_equal_rate_times_T_times_flops():
    """SOPs(l) = fr_in(l) x T x FLOPs(l) for every 1x1 conv, from independently measured
    input rates, at T = 1 and T = 4 (default LIF dynamics, rates differ across T)."""
    x = images()
    for T in (1, 4):
        model = tiny_qkformer(T)
        fr_in, flops = {}, {}

        def hook(name):
            def h(mod, inp, out):
                a = inp[0]  # [T, N, C, ...] or [T*N, C, ...]
                fr_in[name] = a.double().sum().item() / a.numel()  # spikes per input neuron and step
                tokens = out.numel() // (T * x.shape[0] * mod.out_channels)  # positions, one image, one step
                flops[name] = mod.in_channels * mod.out_channels * tokens // mod.groups
            return h

        names = {}
        for name, mod in model.named_modules():
            if isinstance(mod, (nn.Conv1d, nn.Conv2d)) and mod.kernel_size in ((1,), (1, 1)) and mod.stride in ((1,), (1, 1)):
                names[name] = mod
        handles = [mod.register_forward_hook(hook(n)) for n, mod in names.items()]
        r, meter = _measure(model, x)
        for h in handles:
            h.remove()
        layer_sops = meter.layer_sops()
        assert len(names) >= 6
        for name in names:
            expected = fr_in[name] * T * flops[name]
            assert layer_sops.get(name, 0.0) == pytest.approx(expected, rel=1e-9, abs=1e-6), name
        assert r["snn/sops"] == pytest.approx(sum(layer_sops.values()))
        assert r["snn/energy_mj"] == pytest.approx(0.9e-9 * r["snn/sops"] + 4.6e-9 * r["snn/flops_first_layer"])


# ----------------------------------------------------------------------------- ANN energy
def test_ann_energy_of_tiny_vit_is_4p6_pj_per_mac():
    torch.manual_seed(0)
    D, depth, r, P, classes = 16, 2, 2, 8, 10
    vit = VisionTransformer(img_size=16, patch_size=P, in_chans=3, num_classes=classes, embed_dim=D,
                            depth=depth, num_heads=2, mlp_ratio=r).train()
    patches = (16 // P) ** 2
    N = patches + 1  # + class token
    macs = patches * D * 3 * P * P  # patch embedding conv
    macs += depth * (N * (3 * D * D + D * D + 2 * r * D * D) + 2 * N * N * D)  # qkv, proj, mlp, q@k, attn@v
    macs += D * classes  # head on the class token
    assert ann_macs(vit, (3, 16, 16)) == macs
    assert ann_macs(vit, (2, 3, 16, 16)) == macs  # per image
    assert ann_energy_mj(vit, (3, 16, 16)) == pytest.approx(4.6e-9 * macs)
    assert vit.training  # mode restored


# ----------------------------------------------------------------------------- dead network
def test_silent_network_is_stopped_and_normal_one_is_not():
    x = images()
    silent = tiny_qkformer(2)
    for n in neurons(silent):
        n.v_threshold = 1e6
    normal = tiny_qkformer(2)
    stop_silent, stop_normal = FiringRateStopRule(), FiringRateStopRule()
    reasons = []
    for _epoch in range(3):
        ms, _ = _measure(silent, x)
        mn, _ = _measure(normal, x)
        assert ms["snn/firing_rate"] == 0.0
        assert all(v == 0.0 for k, v in ms.items() if k.startswith("snn/firing_rate/"))
        assert ms["snn/sops"] == 0.0
        assert ms["snn/energy_mj"] == pytest.approx(4.6e-9 * ms["snn/flops_first_layer"])
        assert 1e-4 < mn["snn/firing_rate"] < 0.9
        reasons.append(stop_silent.check(ms))
        assert stop_normal.check(mn) is None
    assert reasons[0] is None
    assert reasons[1] == "mean firing rate 0.00e+00 below 1e-04 for 2 validations"
    assert reasons[2] == "mean firing rate 0.00e+00 below 1e-04 for 3 validations"


def test_stop_rule_streaks_and_state():
    rule = FiringRateStopRule(low=1e-4, high=0.9, patience=3)
    assert rule.check({"snn/firing_rate": 0.95}) is None
    assert rule.check({"val/top1": 0.5}) is None  # no rate: neither counts nor resets
    assert rule.check({"snn/firing_rate": float("nan")}) is None
    assert rule.check({"snn/firing_rate": 0.97}) is None
    state = rule.state_dict()
    restored = FiringRateStopRule(low=1e-4, high=0.9, patience=3)
    restored.load_state_dict(state)
    assert restored.check({"snn/firing_rate": 0.99}) == "mean firing rate 9.90e-01 above 0.9 for 3 validations"
    assert rule.check({"snn/firing_rate": 0.1}) is None  # back in range: streak reset
    assert rule.streak == 0 and not rule.fired
    rule.check({"snn/firing_rate": 0.0})
    rule.check({"snn/firing_rate": 0.95})
    assert rule.check({"snn/firing_rate": 0.0}) == "mean firing rate 0.00e+00 outside [1e-04, 0.9] for 3 validations"
    with pytest.raises(ValueError):
        FiringRateStopRule(patience=0)


# ----------------------------------------------------------------------------- static checks
def test_activation_memory_is_linear_in_batch_and_T():
    kw = dict(overrides=dict(embed_dim=32, num_heads=2, depth=2, mlp_ratio=2), img_size=16)
    by_b = [activation_memory_estimate_gb("qkformer_cifar", batch_size=b, time_steps=2, **kw) for b in (2, 4, 6)]
    by_t = [activation_memory_estimate_gb("qkformer_cifar", batch_size=2, time_steps=t, **kw) for t in (1, 2, 3)]
    for seq in (by_b, by_t):
        assert 0 < seq[0] < seq[1] < seq[2]
        assert seq[2] - seq[1] == pytest.approx(seq[1] - seq[0], rel=1e-9)  # affine
    assert by_b[1] / by_b[0] == pytest.approx(2.0, rel=0.01)  # only BN statistics are per-batch constant
    assert 1.5 < by_t[1] / by_t[0] <= 2.0  # + one step of initial neuron state per image
    assert by_b[0] == pytest.approx(by_t[1])
    # AMP-sized saves are about half; ViTs ignore T
    half = activation_memory_estimate_gb("qkformer_cifar", batch_size=2, time_steps=2, dtype_bytes=2, **kw)
    assert 0.3 * by_b[0] < half < 0.75 * by_b[0]
    vit = dict(overrides=dict(embed_dim=16, depth=1, num_heads=2), img_size=32)
    assert activation_memory_estimate_gb("vit_tiny_patch16_224", batch_size=2, time_steps=4, **vit) == \
        activation_memory_estimate_gb("vit_tiny_patch16_224", batch_size=2, time_steps=1, **vit)


def test_param_count_m_from_model_and_config():
    from qksweep.config import build_config

    model = tiny_qkformer(2)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert param_count_m(model) == n
    assert param_count_m({"name": "qkformer_cifar", **TINY_QKF, "time_steps": 2}) == pytest.approx(n)
    cfg = build_config({"model": {"name": "qkformer_cifar", "embed_dim": 32, "num_heads": 2, "depth": 2,
                                  "mlp_ratio": 2, "time_steps": 2}, "data": {"name": "digits", "img_size": 16}})
    assert param_count_m(cfg) == pytest.approx(n)
    assert param_count_m(cfg.model) == pytest.approx(n)
    assert param_count_m("qkformer_cifar", num_classes=10) == pytest.approx(6.706234)
    # meta construction leaves nn.Module untouched afterwards
    assert nn.Linear(2, 2).weight.device.type == "cpu"
    assert static_checks.param_count_m is param_count_m


def test_energy_assumptions_are_tags():
    assert all(isinstance(k, str) and isinstance(v, str) and v for k, v in ENERGY_ASSUMPTIONS.items())
    text = " ".join(ENERGY_ASSUMPTIONS.values())
    for needle in ("45nm", "0.9", "4.6", "first", "T x FLOPs"):
        assert needle in text
    assert math.isclose(float(ENERGY_ASSUMPTIONS["snn.energy.e_ac_pj"]), 0.9)
