"""``run.compile``: the model through ``torch.compile`` (Inductor on this CPU), checked against eager on
the first batch; a model the compiler cannot take trains eagerly after one warning line; and
``data.num_workers: auto``."""

from __future__ import annotations

import logging

import pytest
import torch

from qksweep.config import ConfigError, build_config
from qksweep.models import create_model
from qksweep.trainables.core import CompiledOrEager, compile_model, maybe_reset
from qksweep.trainables.checkpoint import load_checkpoint

from .conftest import tiny_config
from .loop_harness import run_loop


# the spiking model (state reset around the compiled call); the ViT compiles in the training-run test below
@pytest.mark.parametrize("name,kw", [
    ("qkformer_cifar", dict(img_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2, time_steps=2)),
])
def test_compiled_first_batch_matches_eager(name, kw):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_chans=1, **kw).eval()
    spiking = bool(getattr(model, "is_spiking", False))
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        want = model(x)
        maybe_reset(model, spiking)
        compiled = compile_model(model, True, spiking)
        got = compiled(x)
        maybe_reset(model, spiking)
    assert isinstance(compiled, CompiledOrEager) and compiled.works == {False: True}, "it ran compiled"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert compile_model(model, False, spiking) is model


@torch.library.custom_op("qksweep_test::no_compiled_kernel", mutates_args=())
def no_compiled_kernel(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@no_compiled_kernel.register_fake
def _(x):  # what tracing calls: as an op the compiler has no kernel or shape rule for
    raise RuntimeError("this op has no compiled kernel")


class NotCompilable(torch.nn.Module):
    """A real model with an op the compiler cannot trace (eagerly it runs fine)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(no_compiled_kernel(x))


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_model_that_does_not_compile_runs_eagerly_after_one_warning():
    model = NotCompilable()
    wrapped = compile_model(model, "default", spiking=False)
    x = torch.randn(2, 4)
    seen, log = Lines(), logging.getLogger("qksweep")
    log.addHandler(seen)
    try:
        first, second = wrapped(x), wrapped(x)
        wrapped.eval()
        third = wrapped(x)
    finally:
        log.removeHandler(seen)
    torch.testing.assert_close(first, model(x))
    torch.testing.assert_close(second, first)
    torch.testing.assert_close(third, first)
    lines = [m for m in seen.lines if "run.compile" in m]
    assert len(lines) == 1 and "NotCompilable did not compile" in lines[0] and "\n" not in lines[0], lines


VIT = {"name": "vit_tiny_patch16_224", "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2, "mlp_ratio": 2}


def test_compiled_run_trains_and_checkpoints_the_eager_weights(tmp_path):
    # a one-block ViT: compiling the tiny QKFormer's train and eval graphs alone takes minutes on 2 CPUs
    cfg = tiny_config(tmp_path, optim={"epochs": 1}, run={"compile": True})
    cfg["model"] = dict(VIT)
    reports = run_loop(cfg, tmp_path / "c")
    (metrics, ckpt), = reports
    assert metrics["epoch"] == 1 and metrics["val/top1"] > 0 and torch.isfinite(torch.tensor(metrics["train/loss"]))
    state, conf = load_checkpoint(ckpt)
    assert conf["run"]["compile"] is True
    assert not [k for k in state["model"] if "_orig_mod" in k or k.startswith(("eager.", "compiled."))]
    in_chans = state["model"]["patch_embed.proj.weight"].shape[1]
    fresh = create_model(VIT["name"], num_classes=10, in_chans=in_chans, img_size=8,
                         **{k: v for k, v in VIT.items() if k != "name"})
    fresh.load_state_dict(state["model"])  # loads into a plain model: no compile needed to use it


@pytest.mark.parametrize("key,value,words", [
    ("run.compile", "fast", "run.compile: must be false, true or a torch.compile mode"),
    ("data.num_workers", -1, "data.num_workers: must be 'auto' or a whole number >= 0 (got -1)"),
    ("data.num_workers", "many", "data.num_workers: must be 'auto'"),
])
def test_bad_compile_or_loader_workers_is_one_line(tmp_path, key, value, words):
    section, field = key.split(".")
    with pytest.raises(ConfigError) as e:
        build_config(tiny_config(tmp_path, **{section: {field: value}}))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_loader_workers_auto_is_the_spare_cpus_for_files_and_none_in_memory(tmp_path):
    cfg = build_config(tiny_config(tmp_path, run={"cpus_per_worker": 4}))
    assert cfg.data.num_workers == "auto"
    assert cfg.loader_workers(in_memory=False) == 3 and cfg.loader_workers(in_memory=True) == 0
    assert build_config(tiny_config(tmp_path)).loader_workers(in_memory=False) == 0  # one CPU: it trains
    assert build_config(tiny_config(tmp_path, data={"num_workers": 2})).loader_workers(in_memory=True) == 2
