"""Tests for qksweep.models (CPU, small shapes; whole file well under a minute)."""

from __future__ import annotations

import os

import pytest
import timm
import torch
from spikingjelly.activation_based import functional, neuron, surrogate

import qksweep.models as M
from qksweep.models import ModelArgError, check_model_args, create_model
from qksweep.models.qkformer_cifar import CifarSelfAttention, QKFormerBlock, TimeDropPath


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


TINY = dict(embed_dim=32, depth=3, num_heads=2, time_steps=2, img_size=16)


# --------------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("num_classes, expected", [(10, 6_706_234), (100, 6_740_884)])
def test_qkformer_cifar_param_count_matches_official(num_classes, expected):
    m = create_model("qkformer_cifar", num_classes=num_classes)
    n = n_params(m)
    assert abs(n - expected) <= 10_000
    assert n == expected  # the reconstruction of the official layout is exact


@pytest.mark.parametrize("dim, paper_m", [(384, 16.47), (512, 29.08), (768, 64.96)])
def test_qkformer10_param_counts_match_paper(dim, paper_m):
    m = create_model(f"qkformer_10_{dim}", num_classes=1000)
    assert abs(n_params(m) / 1e6 - paper_m) <= 0.01
    assert m.is_spiking and m.time_steps == 4
    # detach_reset=True everywhere (the SpikingJelly port defaults stem/MLP LIFs to False)
    lifs = [mod for mod in m.modules() if isinstance(mod, neuron.LIFNode)]
    assert lifs and all(mod.detach_reset for mod in lifs)
    assert m.stage3[0].attn.attn_lif.v_threshold == 0.5


def test_qkformer10_384_same_as_spikingjelly_factory():
    from spikingjelly.activation_based.model.qkformer import qkformer_10_384

    ours = create_model("qkformer_10_384", num_classes=100)
    assert n_params(ours) == n_params(qkformer_10_384(num_classes=100))
    assert [b.attn.num_heads for b in ours.stage3] == [6] * 7


@pytest.mark.parametrize(
    "name, kw",
    [
        ("vit_tiny_patch16_224", {}),
        ("vit_small_patch16_224", dict(img_size=32, patch_size=4, depth=2, drop_path=0.1)),
        ("vit_base_patch16_224", dict(embed_dim=128, num_heads=4, depth=2, mlp_ratio=2.0)),
        ("vit_relpos_small_patch16_224", dict(depth=2)),
        ("vit_medium_patch16_rope_reg1_gap_256", dict(depth=1, img_size=64)),
    ],
)
def test_vit_param_count_equals_timm(name, kw):
    ours = create_model(name, num_classes=10, **kw)
    timm_kw = {("drop_path_rate" if k == "drop_path" else k): v for k, v in kw.items()}
    ref = timm.create_model(name, num_classes=10, **timm_kw)
    assert n_params(ours) == n_params(ref)
    assert ours.is_spiking is False


# --------------------------------------------------------------------------- forward / structure
def test_qkformer_cifar_tiny_forward_reset_and_heads():
    m = create_model("qkformer_cifar", num_classes=7, **TINY)
    assert m.is_spiking is True and m.time_steps == 2
    x = torch.randn(2, 3, 16, 16)
    y = m(x)
    assert y.shape == (2, 7)
    y.sum().backward()
    functional.reset_net(m)
    v = m.stage1[0].attn.qk_lif.v  # membrane state is back at v_reset
    assert (not v.any()) if torch.is_tensor(v) else v == 0.0
    assert m(x).shape == (2, 7)  # runs again after reset
    attns = [b.attn for st in (m.stage1, m.stage2, m.stage3) for b in st]
    assert len(attns) == 3 and all(a.num_heads == 2 for a in attns)
    assert [type(a).__name__ for a in attns] == ["CifarQKAttention", "CifarQKAttention", "CifarSelfAttention"]
    lifs = [mod for mod in m.modules() if isinstance(mod, neuron.LIFNode)]
    assert all(mod.detach_reset and mod.tau == 2.0 for mod in lifs)
    assert m.stage3[0].attn.attn_lif.v_threshold == 0.5


def test_qkformer_cifar_num_heads_honoured_at_full_width():
    m = create_model("qkformer_cifar", num_classes=10, num_heads=4)
    assert {b.attn.num_heads for st in (m.stage1, m.stage2, m.stage3) for b in st} == {4}


def test_drop_path_present_only_when_requested():
    m = create_model("qkformer_cifar", num_classes=10, drop_path=0.2, **TINY)
    dps = [mod for mod in m.modules() if isinstance(mod, TimeDropPath)]
    assert len(dps) == 2  # linearly increasing from 0 over the 3 blocks: the first is Identity
    assert isinstance(m.stage1[0].drop_path, torch.nn.Identity)
    rates = [b.drop_path.drop_prob for b in (m.stage2[0], m.stage3[0])]
    assert rates == pytest.approx([0.1, 0.2])
    m0 = create_model("qkformer_cifar", num_classes=10, **TINY)
    assert not any(isinstance(mod, TimeDropPath) for mod in m0.modules())


def test_time_drop_path_is_per_sample_and_shared_over_time():
    dp = TimeDropPath(0.5).train()
    torch.manual_seed(0)
    out = dp(torch.ones(3, 64, 5))  # [T, N, C]
    kept = out[0, :, 0] != 0
    assert 0 < kept.sum() < 64
    for t in range(3):  # same samples dropped at every time step
        assert torch.equal(out[t] != 0, out[0] != 0)


def test_qka_type_channel_builds_and_runs():
    m = create_model("qkformer_cifar", num_classes=5, qka_type="channel", **TINY)
    assert m.stage1[0].attn.qka_type == "channel"
    assert m(torch.randn(2, 3, 16, 16)).shape == (2, 5)
    m10 = create_model("qkformer_10_384", num_classes=5, embed_dim=64, num_heads=2, depth=4,
                       time_steps=1, qka_type="channel")
    assert m10.stage1[0].attn.qka_type == "channel"
    assert m10(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_qkformer10_depth_mapping_and_small_forward():
    m = create_model("qkformer_10_512", num_classes=3, embed_dim=64, num_heads=4, depth=5,
                     time_steps=2, mlp_ratio=2.0)
    assert (len(m.stage1), len(m.stage2), len(m.stage3)) == (1, 2, 2)
    assert m.T == 2
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    functional.reset_net(m)


def test_ssa_block_batch_independent():
    torch.manual_seed(0)
    blk = QKFormerBlock(32, 4, 4.0, self_attention=True).eval()
    assert isinstance(blk.attn, CifarSelfAttention)
    x = (torch.rand(3, 2, 32, 16) > 0.6).float()  # [T, N, C, L] spikes
    with torch.no_grad():
        both = blk(x)
        functional.reset_net(blk)
        alone = blk(x[:, :1])
        functional.reset_net(blk)
    assert torch.equal(both[:, :1], alone)


def test_qkformer_cifar_batch_independent_eval():
    torch.manual_seed(0)
    m = create_model("qkformer_cifar", num_classes=4, **TINY).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        both = m(x)
        functional.reset_net(m)
        alone = m(x[:1])
        functional.reset_net(m)
    torch.testing.assert_close(both[:1], alone)


def test_spiking_resnets_and_spikformer_wrappers():
    r = create_model("spiking_resnet18", num_classes=4, in_chans=1, time_steps=2)
    assert r.is_spiking and r.time_steps == 2
    assert r(torch.randn(2, 1, 32, 32)).shape == (2, 4)
    functional.reset_net(r)
    lifs = [mod for mod in r.modules() if isinstance(mod, neuron.LIFNode)]
    assert lifs and all(mod.detach_reset and isinstance(mod.surrogate_function, surrogate.ATan)
                        and mod.step_mode == "m" for mod in lifs)
    s = create_model("sew_resnet18", num_classes=4, time_steps=1)
    assert s(torch.randn(2, 3, 32, 32)).shape == (2, 4)

    sf = create_model("spikformer_cifar10", num_classes=4, time_steps=2, embed_dim=64,
                      num_heads=4, depth=1)
    assert sf.is_spiking and sf.time_steps == 2 and sf.blocks[0].attn.num_heads == 4
    assert sf(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    functional.reset_net(sf)
    assert sf.blocks[0].attn.attn_lif.v_threshold == 0.5


def test_spikformer_defaults_match_spikingjelly():
    from spikingjelly.activation_based.model.spikformer import spikformer_cifar10, spikformer_ti

    assert n_params(create_model("spikformer_cifar10", num_classes=10)) == n_params(spikformer_cifar10())
    assert n_params(create_model("spikformer_ti", num_classes=1000)) == n_params(spikformer_ti())


# --------------------------------------------------------------------------- registry / validation
def test_list_models_and_info():
    names = M.list_models()
    for n in ("qkformer_cifar", "qkformer_10_384", "qkformer_10_768", "spiking_resnet18",
              "sew_resnet18", "spikformer_ti", "vit_tiny_patch16_224"):
        assert n in names
    assert set(M.list_models("vit_*")) == set(timm.list_models("vit_*"))
    assert M.list_models("qkformer_10_*") == ["qkformer_10_384", "qkformer_10_512", "qkformer_10_768"]
    info = M.model_info("qkformer_cifar")
    assert (info.family, info.is_spiking) == ("snn", True)
    assert "qka_type" in info.supported_overrides and "drop_rate" not in info.supported_overrides
    vinfo = M.model_info("vit_small_patch16_224")
    assert (vinfo.family, vinfo.is_spiking) == ("vit", False)
    assert vinfo.defaults["embed_dim"] == 384 and vinfo.defaults["num_heads"] == 6
    assert "pretrained" in vinfo.supported_overrides


def test_unknown_model_suggests_close_match():
    with pytest.raises(ModelArgError, match=r"unknown model 'vit_tine_patch16_224'; did you mean 'vit_tiny_patch16_224'\?"):
        check_model_args("vit_tine_patch16_224", num_classes=10)
    with pytest.raises(ModelArgError, match="qkformer_cifar"):
        create_model("qkformer_cifr", num_classes=10)


def test_heads_not_dividing():
    with pytest.raises(ModelArgError) as e:
        check_model_args("qkformer_cifar", num_classes=10, embed_dim=256, num_heads=5)
    msg = str(e.value)
    assert msg == ("model.num_heads=5 must divide every stage width of qkformer_cifar "
                   "(embed_dim 256 -> stage widths 64, 128, 256)")
    assert "\n" not in msg
    with pytest.raises(ModelArgError, match=r"model\.num_heads=6 \(default\)"):
        check_model_args("qkformer_10_384", num_classes=10, embed_dim=128)  # 32 % 6
    with pytest.raises(ModelArgError, match=r"model.embed_dim=192 \(default\) must be divisible by model.num_heads=5"):
        check_model_args("vit_tiny_patch16_224", num_classes=10, num_heads=5)
    with pytest.raises(ModelArgError, match="model.embed_dim=100"):
        check_model_args("qkformer_cifar", num_classes=10, embed_dim=100)


def test_img_size_not_divisible():
    with pytest.raises(ModelArgError, match=r"img_size=30 must be divisible by 4"):
        check_model_args("qkformer_cifar", num_classes=10, img_size=30)
    with pytest.raises(ModelArgError, match=r"img_size=40 must be divisible by 16"):
        check_model_args("qkformer_10_384", num_classes=10, img_size=40)
    with pytest.raises(ModelArgError, match=r"^img_size=100 must be divisible by model.patch_size=16 \(default\)"):
        check_model_args("vit_tiny_patch16_224", num_classes=10, img_size=100)
    with pytest.raises(ModelArgError, match=r"img_size=32 must be divisible by model.patch_size=7 for"):
        check_model_args("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=7)
    with pytest.raises(ModelArgError, match=r"model.patch_size=2 .*fixed at 4"):
        check_model_args("qkformer_cifar", num_classes=10, patch_size=2)
    check_model_args("qkformer_cifar", num_classes=10, patch_size=4, img_size=64)


def test_unknown_and_unsupported_override_keys():
    with pytest.raises(ModelArgError, match=r"unknown override 'model.dropout'.*did you mean 'model.drop_rate'"):
        check_model_args("qkformer_cifar", num_classes=10, dropout=0.1)
    with pytest.raises(ModelArgError, match=r"model.drop_rate=0.1 is not supported by qkformer_cifar"):
        check_model_args("qkformer_cifar", num_classes=10, drop_rate=0.1)
    with pytest.raises(ModelArgError, match=r"model.time_steps=4 is not supported by vit_tiny"):
        check_model_args("vit_tiny_patch16_224", num_classes=10, time_steps=4)
    with pytest.raises(ModelArgError, match=r"model.embed_dim=64 is not supported by spiking_resnet18"):
        check_model_args("spiking_resnet18", num_classes=10, embed_dim=64)
    with pytest.raises(ModelArgError, match=r"model.qka_type='cross'"):
        check_model_args("qkformer_cifar", num_classes=10, qka_type="cross")
    with pytest.raises(ModelArgError, match=r"model.depth=1 must be >= 2"):
        check_model_args("qkformer_cifar", num_classes=10, depth=1)
    with pytest.raises(ModelArgError, match=r"model.depth=2 must be >= 3"):
        check_model_args("qkformer_10_384", num_classes=10, depth=2)
    with pytest.raises(ModelArgError, match=r"model.pretrained=True is not supported by qkformer_cifar"):
        check_model_args("qkformer_cifar", num_classes=10, pretrained=True)
    # None values are ignored; pretrained=False is accepted by every model
    check_model_args("qkformer_cifar", num_classes=10, drop_rate=None, embed_dim=None, pretrained=False)


def test_check_does_not_build(monkeypatch):
    import qksweep.models.qkformer_cifar as qc

    def boom(*a, **k):
        raise AssertionError("built a model during validation")

    monkeypatch.setattr(qc, "QKFormerCIFAR", boom)
    monkeypatch.setattr(timm, "create_model", boom)
    check_model_args("qkformer_cifar", num_classes=10, embed_dim=256, num_heads=4)
    check_model_args("vit_base_patch16_224", num_classes=10, depth=2)


def test_pretrained_requires_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ModelArgError, match=r"pretrained=True: no locally cached weights"):
        check_model_args("vit_tiny_patch16_224", num_classes=10, pretrained=True)
    with pytest.raises(ModelArgError, match=r"cannot be combined with model.depth=2"):
        check_model_args("vit_tiny_patch16_224", num_classes=10, pretrained=True, depth=2)

    # fake a hub cache entry: it is loaded from disk, nothing is downloaded
    from safetensors.torch import save_file

    cfg = timm.models.get_pretrained_cfg("vit_tiny_patch16_224")
    repo = tmp_path / "hf" / ("models--" + cfg.hf_hub_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    ref = timm.create_model("vit_tiny_patch16_224")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, os.fspath(snap / "model.safetensors"))
    m = create_model("vit_tiny_patch16_224", num_classes=10, pretrained=True)
    assert torch.equal(m.blocks[0].attn.qkv.weight, ref.blocks[0].attn.qkv.weight)
    assert m.head.weight.shape == (10, 192)


def test_spectral_targets_select_matrix_modules():
    assert M.VIT_SPECTRAL_TARGETS == ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
    assert M.default_spectral_targets("vit_tiny_patch16_224") == M.VIT_SPECTRAL_TARGETS
    assert M.default_spectral_targets("qkformer_cifar") == M.QKFORMER_SPECTRAL_TARGETS
    assert M.default_spectral_targets("qkformer_10_384") == M.QKFORMER_SPECTRAL_TARGETS
    assert M.default_spectral_targets("spiking_resnet18") == []
    with pytest.raises(ModelArgError):
        M.default_spectral_targets("nope_model")

    def selected(model, targets):
        return {n: mod for n, mod in model.named_modules()
                if any(t in n for t in targets) and getattr(mod, "weight", None) is not None
                and mod.weight.ndim >= 2}

    m = create_model("qkformer_cifar", num_classes=10, **TINY)
    sel = selected(m, M.QKFORMER_SPECTRAL_TARGETS)
    # per block: q/k(/v) fused conv, proj, fc1, fc2
    assert len(sel) == 4 * 3
    assert all("attn." in n or "mlp.fc" in n for n in sel)
    assert all(mod.weight.squeeze(-1).ndim == 2 for mod in sel.values())
    assert "stage3.0.attn.qkv_conv_bn.0" in sel and "stage1.0.attn.qk_conv_bn.0" in sel
    assert "stage2.0.mlp.fc1" in sel and "stage2.0.mlp.fc2" in sel

    v = create_model("vit_tiny_patch16_224", num_classes=10, depth=1)
    assert set(selected(v, M.VIT_SPECTRAL_TARGETS)) == {
        "blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"}


def test_register_model_decorator():
    from qksweep.models import _registry

    @M.register_model
    def _tmp_test_net(*, num_classes, in_chans=3, img_size=None, depth=2):
        return torch.nn.Linear(in_chans, num_classes)

    try:
        info = M.model_info("_tmp_test_net")
        assert info.supported_overrides == ("depth",) and info.defaults["depth"] == 2
        m = create_model("_tmp_test_net", num_classes=4, depth=3)
        assert m.is_spiking is True and m.out_features == 4
        with pytest.raises(ModelArgError, match="model.embed_dim"):
            check_model_args("_tmp_test_net", num_classes=4, embed_dim=3)
    finally:
        _registry._ENTRIES.pop("_tmp_test_net", None)
