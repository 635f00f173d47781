"""Pruning (``prune:``): the torch.nn.utils.prune helpers, the loop's prune-then-fine-tune schedule,
restarts after pruning, bad configs, and a real sweep whose exported best checkpoint is pruned."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from qksweep import api
from qksweep.config import ConfigError
from qksweep.models import create_model
from qksweep.prune import (apply_masks, apply_pruning, classifier, is_pruned, make_permanent, masks,
                           plain_state_dict, prunable, sparsity)
from qksweep.trainables.checkpoint import load_checkpoint

from .conftest import run_cli, tiny_config
from .loop_harness import run_loop

PRUNE = {"method": "l1_unstructured", "amount": 0.5, "at_epoch": 1}


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("qkformer_cifar", num_classes=10, in_chans=3, img_size=8, embed_dim=32, num_heads=2,
                        depth=2, mlp_ratio=2, time_steps=1)


def _zero_fraction(model) -> float:
    ws = [m.weight for _, m in prunable(model)]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


@pytest.mark.parametrize("method,scope", [("l1_unstructured", "layer"), ("l1_unstructured", "global"),
                                          ("ln_structured", "layer")])
def test_pruning_reaches_amount_keeps_head_dense_and_plain_state_loads(method, scope):
    model = _tiny_model()
    head = classifier(model)
    assert head is model.head and all(m is not head for _, m in prunable(model))
    apply_pruning(model, method, 0.5, scope)
    assert is_pruned(model) and not torch.nn.utils.prune.is_pruned(head)
    assert sparsity(model) == pytest.approx(0.5, abs=0.02)
    if method == "ln_structured":  # whole output channels (dim 0) are zero, about half of each layer's
        for _, m in prunable(model):
            rows = m.weight.detach().flatten(1)
            dead = int((rows.abs().sum(1) == 0).sum())
            assert dead == round(0.5 * rows.shape[0]), (m, dead)
    sd = plain_state_dict(model)
    assert not [k for k in sd if k.endswith(("_orig", "_mask"))]
    fresh = _tiny_model()
    assert set(sd) == set(fresh.state_dict())
    fresh.load_state_dict(sd, strict=True)
    assert _zero_fraction(fresh) == pytest.approx(sparsity(model))
    # make_permanent (prune.remove) gives the same plain tensors
    make_permanent(model)
    assert not is_pruned(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_masks_reapplied_keep_zeros_through_optimizer_steps():
    model = _tiny_model()
    apply_pruning(model, "l1_unstructured", 0.3)
    saved, plain = masks(model), plain_state_dict(model)
    restarted = _tiny_model()
    restarted.load_state_dict(plain)
    apply_masks(restarted, saved)
    x = torch.randn(4, 3, 8, 8)
    from spikingjelly.activation_based import functional

    model.eval(), restarted.eval()
    assert torch.allclose(model(x), restarted(x), atol=1e-6)
    functional.reset_net(model), functional.reset_net(restarted)
    restarted.train()
    opt = torch.optim.AdamW(restarted.parameters(), lr=0.1)
    for _ in range(2):
        restarted(x).sum().backward()
        functional.reset_net(restarted)
        opt.step()
        opt.zero_grad()
    after = plain_state_dict(restarted)
    for key, mask in saved.items():
        assert torch.all(after[key][~mask] == 0), key
    with pytest.raises(KeyError):
        apply_masks(_tiny_model(), {"nonexistent.weight": next(iter(saved.values()))})


def test_loop_prunes_at_epoch_logs_sparsity_and_restart_after_pruning_is_exact(tmp_path):
    cfg = tiny_config(tmp_path, optim={"epochs": 3, "warmup_epochs": 0}, prune=PRUNE, snn={"enabled": False})
    reports = run_loop(cfg, tmp_path / "a")
    assert [m["epoch"] for m, _ in reports] == [1, 2, 3]
    assert "prune/sparsity" not in reports[0][0]  # dense epoch
    assert [round(m["prune/sparsity"], 3) for m, _ in reports[1:]] == [0.5, 0.5]
    dense, _ = load_checkpoint(reports[0][1])
    assert "prune_masks" not in dense
    state, conf = load_checkpoint(reports[1][1])
    assert conf["prune"]["at_epoch"] == 1
    assert not [k for k in state["model"] if k.endswith(("_orig", "_mask"))], "checkpoints hold permanent weights"
    assert state["prune_masks"] and all(m.dtype == torch.bool for m in state["prune_masks"].values())
    # a worker restarted from the epoch-2 checkpoint re-applies the masks and trains epoch 3 exactly as before
    again = run_loop(cfg, tmp_path / "b", resume=reports[1][1])
    assert [m["epoch"] for m, _ in again] == [3]
    for key in ("val/loss", "val/top1", "train/loss", "prune/sparsity"):
        assert again[0][0][key] == pytest.approx(reports[2][0][key], rel=1e-9, abs=1e-12), key
    final, _ = load_checkpoint(again[0][1])
    for key, mask in state["prune_masks"].items():
        assert torch.all(final["model"][key][~mask] == 0), f"{key}: masked weights stayed zero while fine-tuning"


@pytest.mark.parametrize("overrides,expect", [
    (["prune.method=l1_unstructured", "prune.amount=1.5", "prune.at_epoch=1"], "prune.amount"),
    (["prune.method=l1_unstructured", "prune.amount=0", "prune.at_epoch=1"], "prune.amount"),
    (["prune.method=l1_unstructured"], "prune.at_epoch is missing"),
    (["prune.method=l1_unstructured", "prune.at_epoch=2"], "must be smaller than optim.epochs=2"),
    (["prune.method=l1_unstructured", "prune.at_epoch=1", "prune.finetune_epochs=3"], "must equal optim.epochs=2"),
    (["prune.method=ln_structured", "prune.at_epoch=1", "prune.scope=global"], "prune.scope=global"),
    (["prune.method=l1_unstructured", "prune.at_epoch=1", "optim.ema=true"], "optim.ema"),
    (["prune.method=random", "prune.at_epoch=1"], "prune.method"),
    (["prune.amount=0.3"], "prune.method is missing but prune.amount is set"),
])
def test_bad_prune_config_is_one_line(tmp_path, overrides, expect):
    with pytest.raises(ConfigError) as e:
        api.resolve(tiny_config(tmp_path), overrides)
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_cli_bad_prune_config_exits_2_before_anything_is_written(workdir):
    (workdir / "c.yaml").write_text(json.dumps(tiny_config(workdir)))
    p = run_cli("train", "c.yaml", "-s", "prune.method=l1_unstructured", "-s", "prune.at_epoch=1",
                "-s", "prune.finetune_epochs=5", cwd=workdir, timeout=180)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "prune.finetune_epochs=5 must equal optim.epochs=2" in lines[0]
    assert not (workdir / "mlflow.db").exists() and not (workdir / "results").exists()


@pytest.mark.slow
def test_sweep_with_pruning_and_searched_distill_alpha_exports_a_pruned_checkpoint(ray_session, workdir):
    """A real 2-trial sweep: distill.alpha sampled per trial reaches the loop, pruning runs in every
    trial, and `qksweep best --export` writes plain weights with the expected zeros; validate loads them."""
    teacher = run_loop(tiny_config(workdir / "t", optim={"epochs": 1, "warmup_epochs": 0}, snn={"enabled": False}),
                       workdir / "t" / "ckpts")[-1][1]
    cfg = tiny_config(workdir, optim={"epochs": 2, "warmup_epochs": 0},
                      prune={"method": "l1_unstructured", "amount": 0.6, "at_epoch": 1},
                      distill={"teacher": str(teacher), "kind": "soft", "tau": 2.0},
                      snn={"enabled": False},
                      sweep={"num_samples": 2, "scheduler": {"name": "none"},
                             "searcher": {"name": "optuna", "sampler": "random", "seed": 3},
                             "space": {"distill.alpha": {"uniform": [0.1, 0.9]}}})
    res = api.sweep(cfg, name="pd")
    assert res.num_errors == 0  # the trials are counted from MLflow below
    from mlflow.tracking import MlflowClient

    uri = cfg["tracking"]["uri"]
    c = MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name("test").experiment_id], "tags.`qksweep.kind` = 'trial'")
    alphas = sorted(float(r.data.params["distill.alpha"]) for r in runs)
    assert len(alphas) == 2 and alphas[0] != alphas[1] and all(0.1 <= a <= 0.9 for a in alphas)
    for r in runs:
        assert [m.step for m in c.get_metric_history(r.info.run_id, "prune/sparsity")] == [2]
        assert c.get_metric_history(r.info.run_id, "train/kd_loss")
    out = workdir / "best"
    p = run_cli("best", "pd", "--export", str(out), "--tracking-uri", uri, cwd=workdir, timeout=300)
    assert p.returncode == 0, p.stderr
    state, conf = load_checkpoint(out / "checkpoint")
    best_run = json.loads((out / "metrics.json").read_text())["run_id"]
    assert conf["distill"]["alpha"] == pytest.approx(float(c.get_run(best_run).data.params["distill.alpha"])), \
        "the sampled alpha is the one the loop ran with"
    assert state["epoch"] == 2 and not [k for k in state["model"] if k.endswith(("_orig", "_mask"))]
    model = _tiny_model()
    model.load_state_dict(state["model"], strict=True)
    assert _zero_fraction(model) == pytest.approx(0.6, abs=0.01)
    p = run_cli("validate", str(out / "checkpoint"), cwd=workdir, timeout=300)
    assert p.returncode == 0, p.stderr
