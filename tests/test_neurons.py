"""model.neuron: the spiking neurons of every SNN family as config keys. The defaults build today's
networks exactly; non-default values reach every neuron module (attention neurons apart); impossible
values are refused in one line before anything starts; the Optuna searcher learns from dead networks."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from spikingjelly.activation_based import functional, neuron

from qksweep.config import NEURON_TYPES, SURROGATES, ConfigError, load_config
from qksweep.models import create_model, model_info
from qksweep.models.neurons import ATTENTION_NEURON, neuron_settings, replace_neurons, resolve

from .conftest import run_cli, tiny_config

# one tiny member of each SNN family, with its input size
FAMILIES = {
    "qkformer_cifar": (dict(embed_dim=32, num_heads=2, depth=3, mlp_ratio=2), 8),
    "qkformer_10_384": (dict(embed_dim=32, num_heads=2, depth=4, mlp_ratio=2), 16),
    "spikformer_cifar10": (dict(embed_dim=32, num_heads=2, depth=1, mlp_ratio=2), 8),
    "spiking_resnet18": ({}, 8),
    "sew_resnet18": ({}, 8),
}


def _build(name: str, **kw):
    over, img = FAMILIES[name]
    torch.manual_seed(0)
    return create_model(name, num_classes=10, img_size=img, time_steps=2, **over, **kw), img


def _neurons(net):
    return [(n.rsplit(".", 1)[-1], m) for n, m in net.named_modules() if isinstance(m, neuron.BaseNode)]


def _logits(net, img):
    torch.manual_seed(1)
    x = torch.rand(4, 3, img, img)
    net.eval()
    with torch.no_grad():
        out = net(x)
    functional.reset_net(net)
    return out


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_defaults_rebuild_todays_network_exactly(name):
    today, img = _build(name)
    explicit, _ = _build(name, neuron={"type": "lif", "tau": 2.0, "v_threshold": 1.0, "v_reset": 0.0})
    # the replacement itself, forced with the model's own settings, gives the same network
    rebuilt = copy.deepcopy(today)
    n = replace_neurons(rebuilt, resolve(None, model_info(name).neurons))
    assert n == len(_neurons(today)) > 0
    assert all(a is not b for (_, a), (_, b) in zip(_neurons(today), _neurons(rebuilt)))
    rebuilt.load_state_dict(today.state_dict())
    count = sum(p.numel() for p in today.parameters())
    assert count == sum(p.numel() for p in explicit.parameters()) == sum(p.numel() for p in rebuilt.parameters())
    ref = _logits(today, img)
    assert torch.equal(ref, _logits(explicit, img)) and torch.equal(ref, _logits(rebuilt, img))
    assert [neuron_settings(m) for _, m in _neurons(today)] == [neuron_settings(m) for _, m in _neurons(rebuilt)]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_sampled_settings_reach_every_neuron(name):
    rng = random.Random(hash(name) % 1000)
    attention = model_info(name).neurons["attention"]
    for kind in NEURON_TYPES:
        want = dict(type=kind, tau=round(rng.uniform(1.2, 5.0), 3), v_threshold=round(rng.uniform(0.3, 2.0), 3),
                    v_reset=rng.choice([None, -0.1]), detach_reset=rng.choice([True, False]),
                    decay_input=rng.choice([True, False]), surrogate=rng.choice(SURROGATES),
                    surrogate_alpha=round(rng.uniform(0.5, 5.0), 3))
        if attention:
            want["attn_v_threshold"] = round(rng.uniform(0.1, 0.29), 3)
        net, img = _build(name, neuron=want)
        found = _neurons(net)
        assert found and all(type(m).__name__ != "LIFNode" or kind == "lif" for _, m in found)
        for pos, m in found:
            got = neuron_settings(m)
            assert got["type"] == kind and got["surrogate"] == want["surrogate"], (pos, got)
            assert got["surrogate_alpha"] == pytest.approx(want["surrogate_alpha"])
            is_attn = pos == ATTENTION_NEURON
            assert not is_attn or attention
            assert got["v_threshold"] == (want["attn_v_threshold"] if is_attn else want["v_threshold"]), (pos, got)
            assert got["v_reset"] == want["v_reset"] and got["detach_reset"] == want["detach_reset"]
            if kind != "if":
                assert got["tau"] == pytest.approx(want["tau"], rel=1e-5), (pos, got)
            if kind in ("lif", "plif", "klif"):
                assert got["decay_input"] == want["decay_input"]
        assert any(pos == ATTENTION_NEURON for pos, _ in found) == attention
        out = net(torch.rand(2, 3, img, img))
        out.sum().backward()  # surrogate gradients flow
        assert out.shape == (2, 10) and torch.isfinite(out).all()
        functional.reset_net(net)


def test_plif_adds_one_learnable_tau_per_neuron():
    today, _ = _build("qkformer_cifar")
    plif, _ = _build("qkformer_cifar", neuron={"type": "plif", "tau": 3.0})
    extra = sum(p.numel() for p in plif.parameters()) - sum(p.numel() for p in today.parameters())
    assert extra == len(_neurons(today))


@pytest.mark.parametrize("overrides, says", [
    (["model.neuron.tau=1"], "model.neuron.tau"),
    (["model.neuron.tau=0.5"], "model.neuron.tau"),
    (["model.neuron.v_threshold=0"], "model.neuron.v_threshold"),
    (["model.neuron.attn_v_threshold=-1"], "model.neuron.attn_v_threshold"),
    (["model.neuron.surrogate=atn"], "did you mean 'atan'"),
    (["model.neuron.type=lifnode"], "unknown neuron type"),
    (["model.neuron.surrogate_alpha=0"], "model.neuron.surrogate_alpha"),
    (["model.neuron.v_reset=1.0"], "model.neuron.v_reset=1.0 must be below"),
    (["model.neuron.tua=3"], "unknown key 'model.neuron.tua'"),
    (["model.name=vit_tiny_patch16_224", "model.patch_size=4", "model.time_steps=null", "model.neuron.tau=3"],
     "model.neuron is for spiking models"),
    (["model.name=spiking_resnet18", "model.embed_dim=null", "model.num_heads=null", "model.depth=null",
      "model.mlp_ratio=null", "model.patch_size=null", "model.neuron.attn_v_threshold=0.3"], "no attention neurons"),
    (["sweep.space.model.neuron.v_threshold={uniform: [0.0, 1.0]}"], "model.neuron.v_threshold"),
    (["sweep.space.model.neuron.v_threshold={uniform: [0.2, 1.0]}", "sweep.space.model.neuron.v_reset={choice: [0.0, 0.3]}"],
     "sweep.space can sample invalid neurons at"),
    (["sweep.space.model.neuron.surrogate={choice: [atan, sigmod]}"], "unknown surrogate 'sigmod'"),
])
def test_impossible_neuron_settings_are_one_line(workdir, overrides, says):
    from qksweep.checks import check_config, check_sweep

    with pytest.raises(ConfigError) as e:
        cfg = load_config(_config_file(workdir), overrides)
        check_config(cfg)
        check_sweep(cfg)
    msg = str(e.value)
    assert says in msg and "\n" not in msg, msg


def _config_file(workdir):
    import yaml

    p = workdir / "c.yaml"
    if not p.exists():
        cfg = tiny_config(workdir)
        cfg["sweep"] = {"space": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}}
        p.write_text(yaml.safe_dump(cfg))
    return p


def test_bad_neuron_key_on_the_command_line_exits_2_before_anything_is_written(workdir):
    out = run_cli("train", str(_config_file(workdir)), "-s", "model.neuron.surrogate=atn", cwd=workdir, timeout=120)
    assert out.returncode == 2, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert "did you mean 'atan'" in out.stderr
    assert not (workdir / "mlflow.db").exists() and not (workdir / "results").exists()


def test_neuron_keys_are_searchable_and_logged_resolved():
    from qksweep.checks import check_sweep
    from qksweep.models import run_neuron_params
    from qksweep.search_spaces import apply_sample

    cfg = load_config({**tiny_config(__import__("pathlib").Path("/tmp")), "sweep": {"space": {
        "model.neuron.type": {"choice": ["if", "lif", "plif"]}, "model.neuron.tau": {"uniform": [1.5, 4.0]},
        "model.neuron.surrogate": {"choice": ["atan", "erf"]}, "model.neuron.v_threshold": {"uniform": [0.5, 1.5]}}}})
    check_sweep(cfg)
    trial = apply_sample(cfg.to_dict(), {"model.neuron.type": "plif", "model.neuron.tau": 3.0,
                                         "model.neuron.surrogate": "erf", "model.neuron.v_threshold": 0.7})
    params, tags = run_neuron_params(trial.model)
    assert tags == {"qksweep.neuron": "plif"}
    assert params == {"model.neuron.type": "plif", "model.neuron.tau": 3.0, "model.neuron.v_threshold": 0.7,
                      "model.neuron.attn_v_threshold": 0.5, "model.neuron.v_reset": 0.0,
                      "model.neuron.detach_reset": True, "model.neuron.decay_input": True,
                      "model.neuron.surrogate": "erf", "model.neuron.surrogate_alpha": 2.0}
    # a config without model.neuron logs the model's own neurons (qkformer_cifar: LIFNode's sigmoid, alpha 4)
    params, _ = run_neuron_params(cfg.model)
    assert params["model.neuron.surrogate"] == "sigmoid" and params["model.neuron.surrogate_alpha"] == 4.0
    vit = load_config({"model": {"name": "vit_tiny_patch16_224", "patch_size": 4}})
    assert run_neuron_params(vit.model) == ({}, {})


@pytest.mark.parametrize("objectives", [["val/top1"], ["val/top1", "snn/energy_mj"]])
def test_dead_network_is_told_to_optuna_as_infeasible(objectives):
    import optuna

    from qksweep.config import Config
    from qksweep.orchestrator.searcher import DEAD_CONSTRAINT, make_searcher
    from qksweep.search_spaces import parse_space

    from pathlib import Path

    cfg = tiny_config(Path("/tmp"), optim={"epochs": 4})
    cfg["sweep"] = {"metric": objectives, "mode": ["max", "min"][:len(objectives)],
                    "stop_on": {"firing_rate": {"low": 0.01, "high": 0.9, "patience": 1}},
                    "searcher": {"sampler": "tpe", "seed": 0}, "scheduler": {"name": "none"},
                    "space": {"model.neuron.v_threshold": {"uniform": [0.5, 8.0]}}}
    cfg = Config.model_validate(cfg)
    s = make_searcher(cfg, parse_space(cfg.sweep.space), None)
    s.set_search_properties(None, None, {})
    for tid in ("dead", "alive", "pruned"):
        assert s.suggest(tid)
    epoch = {"val/top1": 0.1, "val/loss": 2.3, "snn/energy_mj": 1e-4, "snn/firing_rate": 0.0, "epoch": 1}
    s.on_trial_result("dead", epoch)
    s.on_trial_complete("dead", {**epoch, "epoch": 2, "stopped_by": "firing_rate"})
    s.on_trial_complete("alive", {**epoch, "snn/firing_rate": 0.2, "val/top1": 0.8, "epoch": 4})
    s.on_trial_complete("pruned", {**epoch, "snn/firing_rate": 0.2, "epoch": 2})  # stopped by ASHA, not dead
    by = {t.user_attrs["tune_trial_id"]: t for t in s._ot_study.get_trials()}
    dead = by["dead"]
    assert dead.constraints[DEAD_CONSTRAINT] == pytest.approx(0.01) and dead.user_attrs["stopped_by"] == "firing_rate"
    if len(objectives) == 1:  # pruned with its intermediate values, and infeasible
        assert dead.state == optuna.trial.TrialState.PRUNED and dead.intermediate_values == {1: 0.1, 2: 0.1}
        assert by["pruned"].state == optuna.trial.TrialState.PRUNED
    else:  # NSGA-II and multi-objective TPE rank COMPLETE trials: told with its values, infeasible
        assert dead.state == optuna.trial.TrialState.COMPLETE and dead.values == [0.1, 1e-4]
    assert by["alive"].state == optuna.trial.TrialState.COMPLETE
    assert DEAD_CONSTRAINT not in by["alive"].constraints and DEAD_CONSTRAINT not in by["pruned"].constraints
    from optuna.samplers._tpe.sampler import _get_infeasible_trial_score

    assert _get_infeasible_trial_score(dead) > 0 and _get_infeasible_trial_score(by["alive"]) == 0
