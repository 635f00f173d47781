"""Offline tools: validate, predict, attention, spectrum, split-dataset (no Ray).

Real checkpoints are made here in seconds: a tiny QKFormer and a tiny ViT trained a few
steps on digits, saved with ``save_checkpoint`` and also logged to a SQLite MLflow run under
``checkpoints/best`` (the layout qksweep's runs have)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qksweep.cli import main

BASE = {
    "experiment": "tools-test",
    "data": {"name": "digits", "img_size": 8, "batch_size": 64},
    "optim": {"epochs": 2, "warmup_epochs": 0, "lr": 3e-3},
    "spectral": {"enabled": False},
}
MODELS = {
    "qk": {"name": "qkformer_cifar", "embed_dim": 32, "num_heads": 2, "depth": 2, "mlp_ratio": 2, "time_steps": 1},
    "vit": {"name": "vit_tiny_patch16_224", "embed_dim": 32, "num_heads": 2, "depth": 2, "patch_size": 4},
}


def _train_and_save(model_cfg: dict, out: Path, steps: int = 4) -> dict:
    from spikingjelly.activation_based import functional

    from qksweep.config import build_config
    from qksweep.data import build_data
    from qksweep.models import create_model
    from qksweep.trainables.checkpoint import save_checkpoint

    cfg = build_config({**BASE, "model": model_cfg})
    bundle = build_data(cfg.data)
    torch.manual_seed(0)
    model = create_model(cfg.model.name, num_classes=bundle.num_classes, in_chans=3, img_size=cfg.data.img_size,
                         **cfg.model.overrides())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = bundle.train.tensors
    for i in range(steps):
        idx = slice(i * 64, (i + 1) * 64)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if model.is_spiking:
            functional.reset_net(model)
    save_checkpoint(out, {"model": model.state_dict(), "epoch": 1, "metrics": {}}, cfg.to_dict())
    return cfg.to_dict()


def _log_run(uri: str, artifacts: Path, ckpt: Path, cfg: dict, name: str) -> str:
    import yaml
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("tools-test")
    exp_id = exp.experiment_id if exp else c.create_experiment("tools-test", artifact_location=artifacts.as_uri())
    run = c.create_run(exp_id, run_name=name)
    rid = run.info.run_id
    c.log_artifacts(rid, str(ckpt), "checkpoints/best")
    cfg_file = ckpt.parent / f"{name}_config.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    c.log_artifact(rid, str(cfg_file))
    c.set_terminated(rid)
    return rid


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from PIL import Image

    from qksweep.data.in_memory import _digits_raw, digits_split

    root = tmp_path_factory.mktemp("tools")
    ckpt = {k: root / "ckpt" / k for k in MODELS}
    cfgs = {k: _train_and_save(MODELS[k], ckpt[k]) for k in MODELS}
    uri = f"sqlite:///{root / 'mlflow.db'}"
    runs = {k: _log_run(uri, root / "artifacts", ckpt[k], cfgs[k], k) for k in MODELS}

    # PNGs of validation digits (what a user would hand to predict), and a non-image
    images, target = _digits_raw()
    _, val_idx = digits_split(0.2, 0)
    pngs, labels, raw_idx = [], [], []
    for j, i in enumerate(val_idx[:6]):
        p = root / "images" / f"val{j}_label{target[i]}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(np.round(images[i] * 255).astype(np.uint8), mode="L").save(p)
        pngs.append(p)
        labels.append(int(target[i]))
        raw_idx.append(j)
    text = root / "images" / "notes.txt"
    text.write_text("not an image\n")
    return {"root": root, "ckpt": ckpt, "uri": uri, "runs": runs, "pngs": pngs, "labels": labels,
            "val_pos": raw_idx, "text": text}


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------------- source


def test_load_source_checkpoint_dir_file_and_run(env):
    from qksweep.tools.source import load_source

    a = load_source(env["ckpt"]["vit"])
    b = load_source(env["ckpt"]["vit"] / "checkpoint.pt")
    c = load_source(env["runs"]["vit"], tracking_uri=env["uri"])
    assert a.name == b.name == c.name == "vit_tiny_patch16_224"
    assert a.run_id is None and c.run_id == env["runs"]["vit"] and a.num_classes == 10
    assert not a.model.training
    for (k, v), w in zip(a.model.state_dict().items(), c.model.state_dict().values()):
        assert torch.equal(v, w), k
    q = load_source(env["ckpt"]["qk"])
    assert q.spiking and q.model.time_steps == 1


def test_bad_sources_exit_2_one_line(env, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # corrupt checkpoint file
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "checkpoint.pt").write_bytes(b"\x00garbage" * 50)
    (bad / "config.json").write_text((env["ckpt"]["qk"] / "config.json").read_text())
    assert main(["validate", str(bad)]) == 2
    assert "corrupt" in _one_line_error(capsys)
    # weights that do not fit the config's model
    mism = tmp_path / "mismatch"
    mism.mkdir()
    (mism / "checkpoint.pt").write_bytes((env["ckpt"]["qk"] / "checkpoint.pt").read_bytes())
    cfg = json.loads((env["ckpt"]["qk"] / "config.json").read_text())
    cfg["model"]["embed_dim"] = 64
    (mism / "config.json").write_text(json.dumps(cfg))
    assert main(["spectrum", str(mism)]) == 2
    assert "does not fit" in _one_line_error(capsys)
    # neither a path nor a run
    assert main(["predict", "no_such_thing", str(env["pngs"][0]), "--tracking-uri", env["uri"]]) == 2
    assert "is neither a checkpoint path nor an MLflow run id" in _one_line_error(capsys)
    assert main(["validate", "0" * 32, "--tracking-uri", env["uri"]]) == 2
    assert "neither" in _one_line_error(capsys)
    # a model name without --pretrained gets a hint; with it, uncached weights are refused
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert main(["spectrum", "vit_tiny_patch16_224"]) == 2
    assert "--pretrained" in _one_line_error(capsys)
    assert main(["spectrum", "vit_tiny_patch16_224", "--pretrained"]) == 2
    assert "cached" in _one_line_error(capsys)
    assert not (tmp_path / "mlflow.db").exists()


# ---------------------------------------------------------------------------- validate


def test_validate_run_id_logs_artifacts(env, tmp_path):
    from mlflow.tracking import MlflowClient

    from qksweep.tools.evaluate import validate

    rid = env["runs"]["qk"]
    res = validate(rid, tracking_uri=env["uri"], out_dir=tmp_path / "v")
    for k in ("top1", "top5", "loss"):
        assert np.isfinite(res[k])
    assert 0 <= res["top1"] <= res["top5"] <= 1
    assert res["n"] == 359 and sum(r["n"] for r in res["per_class"].values()) == 359
    assert np.array(res["confusion"]).sum() == 359
    assert Path(res["confusion_png"]).stat().st_size > 1000
    assert res["artifact_logged"]
    logged = {Path(a.path).name for a in MlflowClient(env["uri"]).list_artifacts(rid, "validate")}
    assert {"confusion_matrix.png", "validate.json"} <= logged


def test_validate_cli_checkpoint_matches_in_memory_eval(env, tmp_path, capsys, monkeypatch):
    from qksweep.data import build_data
    from qksweep.tools.source import load_source

    monkeypatch.chdir(tmp_path)
    assert main(["validate", str(env["ckpt"]["vit"]), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "top1" in out and "per-class accuracy" in out
    saved = json.loads((tmp_path / "validate_vit_tiny_patch16_224" / "validate.json").read_text())
    assert (tmp_path / "validate_vit_tiny_patch16_224" / "confusion_matrix.png").exists()
    # the same numbers as a direct evaluation of the model on the validation tensors
    loaded = load_source(env["ckpt"]["vit"])
    vx, vy = build_data(loaded.cfg.data).val.tensors
    with torch.no_grad():
        acc = (loaded.model(vx).argmax(-1) == vy).float().mean().item()
    assert saved["top1"] == pytest.approx(acc, abs=1e-6)


def test_validate_data_dir_uses_checkpoint_preprocessing(env, tmp_path):
    from qksweep.tools.evaluate import validate

    # an ImageFolder with three of the ten digit classes: matched to the model's classes by name
    for p, label in zip(env["pngs"], env["labels"]):
        d = tmp_path / "folder" / "val" / str(label)
        d.mkdir(parents=True, exist_ok=True)
        (d / p.name).write_bytes(p.read_bytes())
    res = validate(env["ckpt"]["vit"], data_dir=tmp_path / "folder", out_dir=tmp_path / "out")
    assert res["n"] == len(env["pngs"])
    assert set(res["per_class"]) == {str(x) for x in env["labels"]}
    assert 0 <= res["top1"] <= 1 and not res["artifact_logged"]


# ---------------------------------------------------------------------------- predict


def test_predict_json_and_matches_validation_preprocessing(env, capsys):
    from qksweep.data import build_data
    from qksweep.tools.source import load_source

    paths = [str(p) for p in env["pngs"]]
    assert main(["predict", env["runs"]["vit"], *paths, "--topk", "3", "--format", "json",
                 "--tracking-uri", env["uri"]]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in rows] == paths
    for r in rows:
        probs = [p["prob"] for p in r["predictions"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert all(p["class"] in [str(i) for i in range(10)] for p in r["predictions"])
    # a PNG of a validation digit gets (up to 8-bit rounding) the validation tensor's prediction
    loaded = load_source(env["ckpt"]["vit"])
    vx, _ = build_data(loaded.cfg.data).val.tensors
    with torch.no_grad():
        ref = loaded.model(vx[env["val_pos"]]).softmax(-1)
    for r, p_ref in zip(rows, ref):
        top = r["predictions"][0]
        assert top["index"] == int(p_ref.argmax())
        assert top["prob"] == pytest.approx(float(p_ref.max()), abs=2e-2)


def test_predict_table_spiking(env, capsys):
    assert main(["predict", str(env["ckpt"]["qk"]), str(env["pngs"][0]), str(env["pngs"][1])]) == 0
    out = capsys.readouterr().out
    assert out.count("1. ") == 2 and out.count("5. ") == 2


def test_predict_non_image_exit_2(env, capsys):
    assert main(["predict", str(env["ckpt"]["vit"]), str(env["pngs"][0]), str(env["text"])]) == 2
    err = _one_line_error(capsys)
    assert "notes.txt" in err and "not an image" in err
    assert main(["predict", str(env["ckpt"]["vit"]), str(env["root"] / "missing.png")]) == 2
    assert "missing.png" in _one_line_error(capsys)


# ---------------------------------------------------------------------------- attention


def test_rollout_math():
    from qksweep.tools.attention import rollout

    n = 5
    uniform = torch.full((1, 2, n, n), 1.0 / n)
    r = rollout([uniform, uniform])
    assert torch.allclose(r.sum(-1), torch.ones(1, n, dtype=torch.float64))
    eye = torch.eye(n).expand(1, 2, n, n)
    assert torch.allclose(rollout([eye, eye, eye])[0], torch.eye(n, dtype=torch.float64))


def test_attention_vit_and_qkformer(env, tmp_path, capsys):
    from PIL import Image

    from qksweep.tools.attention import attention_maps

    out = tmp_path / "vit.png"
    assert main(["attention", env["runs"]["vit"], str(env["pngs"][0]), "--out", str(out),
                 "--tracking-uri", env["uri"]]) == 0
    assert "rollout" in capsys.readouterr().out
    assert Image.open(out).size[0] > 200
    res = attention_maps(env["ckpt"]["vit"], env["pngs"][0], out=tmp_path / "vit2.png")
    m = res["maps"]["rollout"]
    assert res["kind"] == "vit_rollout" and m.shape == (2, 2) and m.min() >= 0 and m.max() <= 1

    res = attention_maps(env["ckpt"]["qk"], env["pngs"][1], out=tmp_path / "qk.png")
    assert res["kind"] == "qkformer_qk" and Path(res["png"]).stat().st_size > 1000
    assert set(res["maps"]) == {"stage1", "stage2"}
    assert res["maps"]["stage1"].shape == (8, 8) and res["maps"]["stage2"].shape == (4, 4)
    for m in res["maps"].values():
        assert 0 <= m.min() and m.max() <= 1  # firing rates
    # the model's fused attention is restored and the SNN state reset
    from qksweep.tools.source import load_source

    loaded = load_source(env["ckpt"]["vit"])
    before = [b.attn.fused_attn for b in loaded.model.blocks]
    attention_maps(loaded, env["pngs"][0], out=tmp_path / "vit3.png")
    assert [b.attn.fused_attn for b in loaded.model.blocks] == before


# ---------------------------------------------------------------------------- spectrum


def test_spectrum_run_id_split_qkv(env, tmp_path, capsys):
    d = tmp_path / "spec"
    assert main(["spectrum", env["runs"]["vit"], "--split-qkv", "--save-dir", str(d), "--topk", "4",
                 "--tracking-uri", env["uri"]]) == 0
    out = capsys.readouterr().out
    assert "aggregate by layer type" in out
    report = json.loads((d / "vit_tiny_patch16_224_spectral.json").read_text())
    layers = report["layers"]
    assert {"blocks.0.attn.qkv.q", "blocks.0.attn.qkv.k", "blocks.0.attn.qkv.v", "blocks.1.mlp.fc2"} <= set(layers)
    for info in layers.values():
        assert len(info["sv_topk"]) == 4 and info["sigma_max"] == pytest.approx(info["sv_topk"][0])
        assert info["sigma_max"] >= info["sigma_min"] >= 0
    assert report["meta"]["run_id"] == env["runs"]["vit"]


def test_spectrum_qkformer_defaults_and_vectors(env, tmp_path):
    from qksweep.spectral import load_vectors
    from qksweep.tools import spectrum

    report, paths = spectrum(str(env["ckpt"]["qk"]), save_dir=tmp_path, save_vectors=True, fmt="pt",
                             dtype="float64")
    names = set(report["layers"])
    assert any("qk_conv_bn" in n for n in names) and any("mlp.fc1" in n for n in names)
    assert [p.name for p in paths] == ["qkformer_cifar_spectral.json", "qkformer_cifar_spectral_vectors.pt"]
    vec = load_vectors(paths[1])
    assert set(vec) == names


# ---------------------------------------------------------------------------- split-dataset


def test_split_dataset_cli(env, tmp_path, capsys):
    src = tmp_path / "flat"
    for cls in ("a", "b"):
        (src / cls).mkdir(parents=True)
        for i in range(5):
            (src / cls / f"{i}.png").write_bytes(env["pngs"][0].read_bytes())
    out = tmp_path / "split"
    assert main(["split-dataset", "--data-dir", str(src), "--output-dir", str(out), "--val-ratio", "0.4",
                 "--seed", "1"]) == 0
    assert "2 classes, 6 train + 4 val" in capsys.readouterr().out
    assert len(list((out / "val" / "a").iterdir())) == 2 and (out / "train" / "b" / "0.png").exists() ^ (
        out / "val" / "b" / "0.png").exists()
    assert main(["split-dataset", "--data-dir", str(src), "--output-dir", str(out), "--val-ratio", "0.4",
                 "--seed", "1"]) == 2
    assert "not empty" in _one_line_error(capsys)


def test_spectrum_pretrained_timm_name_from_local_cache(tmp_path, monkeypatch, capsys):
    """--pretrained reads a timm model's weights from the local Hugging Face cache only."""
    import timm
    from safetensors.torch import save_file

    repo = tmp_path / "hub" / "models--timm--vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    torch.manual_seed(0)
    sd = timm.create_model("vit_tiny_patch16_224").state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(repo / "snapshots" / "abc" / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    d = tmp_path / "spec"
    assert main(["spectrum", "vit_tiny_patch16_224", "--pretrained", "--targets", "blocks.0.attn.qkv",
                 "--topk", "2", "--save-dir", str(d)]) == 0
    report = json.loads((d / "vit_tiny_patch16_224_spectral.json").read_text())
    assert list(report["layers"]) == ["blocks.0.attn.qkv"]
    s_ref = torch.linalg.svdvals(sd["blocks.0.attn.qkv.weight"])
    assert report["layers"]["blocks.0.attn.qkv"]["sigma_max"] == pytest.approx(float(s_ref[0]), rel=1e-4)
