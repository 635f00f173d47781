"""Tests of qksweep.spectral: monitor, offline analysis, stopping rule (fast, CPU only)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from qksweep.spectral import (
    SpectralMonitor,
    SpectralStopRule,
    analyze_model,
    layer_type,
    load_vectors,
    principal_cosines,
    sigma_growth,
    summarize,
    write_report,
)

TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]


@pytest.fixture(scope="module")
def vit_factory():
    timm = pytest.importorskip("timm")

    def make(seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return timm.create_model(
            "vit_tiny_patch16_224",
            img_size=32,
            patch_size=8,
            depth=2,
            embed_dim=32,
            num_heads=2,
            num_classes=10,
        )

    return make


def _perturb(model: nn.Module, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _keys_of(metrics: dict[str, float], module: str, prefix: str = "spec") -> set[str]:
    pre = f"{prefix}/{module}/"
    return {k[len(pre) :] for k in metrics if k.startswith(pre)}


# --------------------------------------------------------------- linear algebra
def test_singular_values_match_numpy():
    torch.manual_seed(0)
    lin = nn.Linear(20, 13, bias=False)  # weight [13, 20], rank 13
    W = lin.weight.detach().double().numpy()
    s_np = np.linalg.svd(W, compute_uv=False)
    r = s_np.size

    mon = SpectralMonitor(nn.Sequential(lin), targets=["0"], topk=8, interval=2, every=1)
    m = mon.maybe_measure(0)
    assert m["spec/0/sigma_max"] == pytest.approx(s_np[0], rel=1e-5)
    for i in (1, 3, 5, 7):
        assert m[f"spec/0/sv{i}"] == pytest.approx(s_np[i - 1], rel=1e-5)
        assert m[f"spec/0/sv_last{i}"] == pytest.approx(s_np[r - i], rel=1e-5)
    assert "spec/0/sv2" not in m and "spec/0/sv9" not in m and "spec/0/sv_last2" not in m
    assert all(isinstance(v, float) for v in m.values())

    rep = analyze_model(nn.Sequential(lin), topk=4, full=True, dtype=torch.float64)
    info = rep["layers"]["0"]
    np.testing.assert_allclose(info["sv_topk"], s_np[:4], rtol=1e-10)
    np.testing.assert_allclose(info["sv_lastk"], s_np[-4:], rtol=1e-10)
    np.testing.assert_allclose(info["spectrum"], s_np, rtol=1e-10)
    assert info["sigma_min"] == pytest.approx(s_np[-1])
    assert info["stable_rank"] == pytest.approx((s_np**2).sum() / s_np[0] ** 2)
    p = s_np / s_np.sum()
    assert info["rank_eff"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))


def test_principal_cosines_known_subspaces():
    eye = torch.eye(5, dtype=torch.float64)
    A = eye[:, :2]
    # identical subspace, different basis (rotated inside the plane) -> all ones
    R = torch.tensor([[0.6, -0.8], [0.8, 0.6]], dtype=torch.float64)
    torch.testing.assert_close(principal_cosines(A, A @ R), torch.ones(2, dtype=torch.float64))
    # orthogonal subspaces -> zeros
    torch.testing.assert_close(principal_cosines(A, eye[:, 2:4]), torch.zeros(2, dtype=torch.float64))
    # e2 rotated by theta towards e3: cosines [1, cos(theta)], descending
    theta = 0.7
    B = torch.stack([eye[:, 0], math.cos(theta) * eye[:, 1] + math.sin(theta) * eye[:, 2]], dim=1)
    c = principal_cosines(A, B)
    np.testing.assert_allclose(c.numpy(), [1.0, math.cos(theta)], atol=1e-12)
    # batched + random orthonormal bases agree with numpy's canonical correlations
    g = torch.Generator().manual_seed(0)
    Qa = torch.linalg.qr(torch.randn(3, 10, 4, generator=g, dtype=torch.float64)).Q
    Qb = torch.linalg.qr(torch.randn(3, 10, 4, generator=g, dtype=torch.float64)).Q
    c = principal_cosines(Qa, Qb)
    assert c.shape == (3, 4)
    for b in range(3):
        ref = np.linalg.svd(Qa[b].numpy().T @ Qb[b].numpy(), compute_uv=False)
        np.testing.assert_allclose(c[b].numpy(), ref, atol=1e-12)
    assert torch.all(c[:, :-1] >= c[:, 1:]) and torch.all((c >= 0) & (c <= 1))


def test_layer_type():
    assert layer_type("blocks.0.attn.qkv") == "attn.qkv"
    assert layer_type("blocks.11.attn.qkv.q") == "attn.qkv.q"
    assert layer_type("stages.1.blocks.2.mlp.fc1") == "mlp.fc1"
    assert layer_type("head") == "head"


# --------------------------------------------------------------------- monitor
def test_monitor_metric_families_and_schedule(vit_factory):
    model = vit_factory()
    mon = SpectralMonitor(model, targets=TARGETS, topk=8, interval=2, every=5)
    assert mon.module_keys == [f"blocks.{b}.{t}" for b in range(2) for t in TARGETS]
    assert mon.types["attn.qkv"] == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]

    m0 = mon.maybe_measure(0)
    sv = {"sigma_max"} | {f"sv{i}" for i in (1, 3, 5, 7)} | {f"sv_last{i}" for i in (1, 3, 5, 7)}
    for mod in mon.module_keys:
        assert _keys_of(m0, mod) == sv  # first measurement: no delta / cos
    assert all(k.split("/")[1] in mon.module_keys for k in m0)  # head, patch_embed not selected

    for step in (1, 2, 3, 4, 6, 7):
        assert mon.maybe_measure(step) == {}

    m5 = mon.maybe_measure(5)
    K = 8
    cos = {f"cos_{t}{j}" for t in ("u", "v", "u_last", "v_last") for j in range(1, K + 1)}
    agg = {"cos_u_max", "cos_u_mean", "cos_v_max", "cos_v_mean"}
    for mod in mon.module_keys:
        assert _keys_of(m5, mod) == sv | cos | agg | {"delta_sv_rel"}
    assert mon.maybe_measure(5) == {}  # same step is never measured twice

    # weights unchanged: subspaces identical, spectrum unchanged
    for k, v in m5.items():
        if "/cos_" in k:
            assert v == pytest.approx(1.0, abs=1e-4), k
        if k.endswith("/delta_sv_rel"):
            assert v == pytest.approx(0.0, abs=1e-5), k
    assert [s for s, _ in mon.history] == [0, 5]

    _perturb(model)
    m10 = mon.maybe_measure(10)
    for mod in mon.module_keys:
        assert m10[f"spec/{mod}/delta_sv_rel"] > 1e-3
        assert m10[f"spec/{mod}/cos_u_mean"] < 1.0 - 1e-4
        assert 0.0 <= m10[f"spec/{mod}/cos_u_max"] <= 1.0
    assert m10["spec/blocks.0.attn.qkv/cos_u_max"] == m10["spec/blocks.0.attn.qkv/cos_u1"]


def test_monitor_small_rank_naming_and_no_vectors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5))  # rank 3 < topk
    mon = SpectralMonitor(model, targets=["0"], topk=8, interval=2, every=1, prefix="spec_ema")
    mon.maybe_measure(0)
    m = mon.maybe_measure(1)
    assert _keys_of(m, "0", "spec_ema") == (
        {"sigma_max", "sv1", "sv3", "sv_last1", "sv_last3", "delta_sv_rel"}
        | {f"cos_{t}{j}" for t in ("u", "v", "u_last", "v_last") for j in (1, 2, 3)}
        | {"cos_u_max", "cos_u_mean", "cos_v_max", "cos_v_mean"}
    )
    lean = SpectralMonitor(model, targets="0", every=1, track_subspaces=False)
    lean.maybe_measure(0)
    m = lean.maybe_measure(1)
    assert not any("/cos_" in k for k in m) and "spec/0/delta_sv_rel" in m


def test_monitor_split_qkv(vit_factory):
    model = vit_factory()
    mon = SpectralMonitor(model, targets=["attn.qkv"], split_qkv=True, every=1, topk=4, interval=1)
    assert mon.module_keys == [f"blocks.{b}.attn.qkv.{p}" for b in range(2) for p in "qkv"]
    m = mon.maybe_measure(0)
    W = model.blocks[1].attn.qkv.weight.detach().double().numpy()
    for i, p in enumerate("qkv"):
        s = np.linalg.svd(W[32 * i : 32 * (i + 1)], compute_uv=False)
        assert m[f"spec/blocks.1.attn.qkv.{p}/sigma_max"] == pytest.approx(s[0], rel=1e-5)
        assert m[f"spec/blocks.1.attn.qkv.{p}/sv_last1"] == pytest.approx(s[-1], rel=1e-4)
    assert not any(re.search(r"attn\.qkv/", k) for k in m)


def test_monitor_conv1x1_selection_and_wrappers():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("q_conv", nn.Conv1d(8, 16, kernel_size=1))
    model.add_module("k_conv", nn.Conv1d(8, 16, kernel_size=3))  # spatial: skipped
    model.add_module("g_conv", nn.Conv1d(8, 16, kernel_size=1, groups=2))  # grouped: skipped
    model.add_module("v_conv", nn.Conv2d(8, 6, kernel_size=1))
    model.add_module("norm", nn.BatchNorm1d(16))
    model.add_module("emb", nn.Embedding(10, 4))
    mon = SpectralMonitor(nn.DataParallel(model), targets=["conv", "norm", "emb"], every=1)
    assert mon.module_keys == ["q_conv", "v_conv"]
    m = mon.maybe_measure(0)
    s = np.linalg.svd(model.q_conv.weight.detach().double().numpy()[:, :, 0], compute_uv=False)
    assert m["spec/q_conv/sigma_max"] == pytest.approx(s[0], rel=1e-5)
    assert m["spec/v_conv/sv1"] == pytest.approx(m["spec/v_conv/sigma_max"])
    # fnmatch patterns
    mon2 = SpectralMonitor(model, targets=["*_conv"], every=1)
    assert mon2.module_keys == ["q_conv", "v_conv"]
    with pytest.warns(UserWarning):
        assert SpectralMonitor(model, targets=["nothing"]).maybe_measure(0) == {}


def test_monitor_state_dict_resume(vit_factory):
    model = vit_factory()
    mon = SpectralMonitor(model, targets=TARGETS, every=2)
    mon.maybe_measure(0)
    state = mon.state_dict()
    assert all(t.device.type == "cpu" for st in state["prev"].values() for t in st.values())
    fresh = SpectralMonitor(model, targets=TARGETS, every=2)
    fresh.load_state_dict(state)
    assert fresh.maybe_measure(0) == {}  # already measured at that step
    m = fresh.maybe_measure(2)
    assert m["spec/blocks.0.attn.qkv/cos_v_mean"] == pytest.approx(1.0, abs=1e-4)
    assert m["spec/blocks.1.mlp.fc2/delta_sv_rel"] == pytest.approx(0.0, abs=1e-5)
    assert [s for s, _ in fresh.history] == [0, 2]


def test_monitor_nan_weights_and_stop_rule():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    mon = SpectralMonitor(model, targets=["0", "1"], every=1)
    rule = SpectralStopRule(max_growth=10)
    assert rule.check(mon.maybe_measure(0)) is None
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    m = mon.maybe_measure(1)
    assert math.isnan(m["spec/1/sigma_max"]) and math.isfinite(m["spec/0/sigma_max"])
    assert m["spec/0/cos_u1"] == pytest.approx(1.0, abs=1e-5)
    reason = rule.check(m)
    assert reason is not None and "spec sigma_max of 1" in reason and "non-finite" in reason


def test_save_artifacts(vit_factory, tmp_path):
    model = vit_factory()
    mon = SpectralMonitor(model, targets=TARGETS, every=1)
    for step in range(3):
        mon.maybe_measure(step)
        _perturb(model, 0.01)
    paths = mon.save_artifacts(tmp_path)
    pngs = sorted(p.name for p in paths if p.suffix == ".png")
    assert pngs == sorted(f"spec_{t}.png" for t in TARGETS)
    for p in paths:
        assert p.exists() and p.stat().st_size > 0
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "spectra_last.json").read_text())
    rec = data["modules"]["blocks.1.attn.qkv"]
    assert rec["step"] == 2 and rec["shape"] == [96, 32] and len(rec["sv_topk"]) == 8
    assert rec["sigma_max"] == rec["sv_topk"][0] and rec["sigma_min"] == rec["sv_lastk"][-1]


# -------------------------------------------------------------------- analysis
@pytest.mark.parametrize("fmt", ["npz", "pt"])
def test_analyze_and_write_report_round_trip(vit_factory, tmp_path, fmt):
    model = vit_factory()
    rep = analyze_model(model, topk=4, save_vectors=True)
    assert rep["meta"]["model_class"] == "VisionTransformer"
    assert rep["meta"]["num_layers"] == len(rep["layers"]) == 9  # 2 x 4 block matrices + head
    assert "patch_embed.proj" not in rep["layers"]  # 8x8 conv is not a matrix
    text = summarize(rep)
    assert "blocks.0.attn.qkv" in text and "attn.qkv" in text.split("aggregate by layer type")[1]

    paths = write_report(rep, None, tmp_path, "hf-hub:timm/vit_tiny", fmt=fmt)
    assert [p.name for p in paths] == ["hf-hub_timm_vit_tiny_spectral.json", f"hf-hub_timm_vit_tiny_spectral_vectors.{fmt}"]
    data = json.loads(paths[0].read_text())
    assert "vectors" not in data and data["layers"].keys() == rep["layers"].keys()
    assert data["aggregate"]["attn.qkv"]["count"] == 2
    assert data["layers"]["blocks.0.mlp.fc1"]["sv_topk"] == pytest.approx(rep["layers"]["blocks.0.mlp.fc1"]["sv_topk"])

    vec = load_vectors(paths[1])
    assert vec.keys() == rep["layers"].keys()
    W = model.blocks[0].mlp.fc1.weight.detach().double().numpy()
    U, V = np.asarray(vec["blocks.0.mlp.fc1"]["U_top"], float), np.asarray(vec["blocks.0.mlp.fc1"]["V_top"], float)
    s = np.asarray(rep["layers"]["blocks.0.mlp.fc1"]["sv_topk"])
    np.testing.assert_allclose(W @ V, U * s, atol=1e-5)
    assert U.shape == (128, 4) and V.shape == (32, 4)

    # JSON only, split qkv, targets
    rep2 = analyze_model(model, targets=["attn.qkv"], split_qkv=True)
    assert list(rep2["layers"]) == [f"blocks.{b}.attn.qkv.{p}" for b in range(2) for p in "qkv"]
    paths2 = write_report(rep2, None, tmp_path / "j", "m", fmt="json")
    assert [p.name for p in paths2] == ["m_spectral.json"]


# -------------------------------------------------------------------- stopping
def test_sigma_growth_and_stop_rule():
    assert sigma_growth(2.0, 5.0) == pytest.approx(2.5)
    assert sigma_growth(0.0, 1.0) == math.inf
    assert math.isnan(sigma_growth(1.0, float("nan")))

    rule = SpectralStopRule(max_growth=10)
    assert rule.check({"spec/blocks.0.attn.qkv/sigma_max": 1.0, "spec/blocks.0.attn.qkv/sv1": 1.0}) is None
    assert rule.check({"spec/blocks.0.attn.qkv/sigma_max": 9.5, "loss": 3.0}) is None
    reason = rule.check({"spec/blocks.0.attn.qkv/sigma_max": 12.3})
    assert reason == "spec sigma_max of blocks.0.attn.qkv grew 12.3x (limit 10)"
    # zero-initialised layers take their reference at the first non-zero value
    rule2 = SpectralStopRule(5)
    assert rule2.check({"spec_ema/head/sigma_max": 0.0}) is None
    assert rule2.check({"spec_ema/head/sigma_max": 0.1}) is None
    assert rule2.check({"spec_ema/head/sigma_max": 0.4}) is None
    assert rule2.check({"spec_ema/head/sigma_max": 0.6}).startswith("spec_ema sigma_max of head grew 6.0x")
    assert "non-finite" in SpectralStopRule(10).check({"spec/x/sigma_max": float("inf")})
    st = rule.state_dict()
    rule3 = SpectralStopRule(10)
    rule3.load_state_dict(st)
    assert rule3.check({"spec/blocks.0.attn.qkv/sigma_max": 11.0}) is not None
