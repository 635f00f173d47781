"""Knowledge distillation (``distill:``): the loss functions, teachers from a checkpoint, an MLflow
run or a timm name with a weights file, the loop's use of them, bad configs, and a real 2-worker run."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from qksweep import api
from qksweep.config import ConfigError, build_config
from qksweep.distill import distill_loss, hard_kd_loss, load_teacher, soft_kd_loss

from .conftest import run_cli, tiny_config
from .loop_harness import run_loop

# a tiny ViT teacher at 16 px: the QKFormer student sees 8 px, so the teacher's input is resized
VIT_TEACHER = {"name": "vit_tiny_patch16_224", "embed_dim": 32, "num_heads": 2, "depth": 1, "patch_size": 4,
               "mlp_ratio": 2}


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """A ViT trained 2 epochs on digits in this process: its last checkpoint folder."""
    tmp = tmp_path_factory.mktemp("teacher")
    cfg = tiny_config(tmp, model=VIT_TEACHER, data={"img_size": 16}, optim={"epochs": 2, "warmup_epochs": 0},
                      snn={"enabled": False})
    cfg["model"] = VIT_TEACHER
    reports = run_loop(cfg, tmp / "ckpts")
    return reports[-1][1], reports[-1][0]["val/top1"]


def test_losses_match_their_definitions():
    torch.manual_seed(0)
    s, t = torch.randn(6, 10), torch.randn(6, 10)
    tau = 3.0
    p_t = F.softmax(t / tau, -1)
    manual = (p_t * (p_t.log() - F.log_softmax(s / tau, -1))).sum(-1).mean() * tau**2
    assert soft_kd_loss(s, t, tau).item() == pytest.approx(manual.item(), rel=1e-5)
    assert soft_kd_loss(t, t, tau).item() == pytest.approx(0.0, abs=1e-6)
    assert hard_kd_loss(s, t).item() == pytest.approx(F.cross_entropy(s, t.argmax(-1)).item())
    base = torch.tensor(2.0)
    total, kd = distill_loss(base, s, t, kind="soft", alpha=0.25, tau=tau)
    assert total.item() == pytest.approx(0.75 * 2.0 + 0.25 * kd.item(), rel=1e-6)
    assert distill_loss(base, s, t, kind="hard", alpha=0.0, tau=tau)[0].item() == pytest.approx(2.0)
    # gradients flow to the student only
    s.requires_grad_(True)
    soft_kd_loss(s, t, tau).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_teacher_from_checkpoint_is_frozen_resizes_and_matches_its_own_accuracy(teacher_ckpt, tmp_path):
    ckpt, teacher_top1 = teacher_ckpt
    cfg = build_config(tiny_config(tmp_path, distill={"teacher": str(ckpt)}))
    from qksweep.data import build_data

    b = build_data(cfg.data, seed=1)
    teacher = load_teacher(cfg.distill, num_classes=10, tracking_uri=cfg.tracking.uri, student_data=cfg.data,
                           student_mean=b.mean, student_std=b.std)
    assert teacher.img_size == 16 and not teacher.training and not teacher.renorm
    teacher.train()  # stays in eval mode
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x, y = b.val.tensors  # 8 px student batches
    assert x.shape[-1] == 8
    out = teacher(x)
    assert out.shape == (len(y), 10) and not out.requires_grad
    with torch.no_grad():  # the same batch, resized to the 16 px the teacher was trained at
        direct = teacher.kd.model(F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False))
    assert torch.equal(out, direct)
    # its checkpoint is the one that validated at teacher_top1 on 16 px images
    x16 = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    assert teacher_top1 > 0.15 and (direct.argmax(-1) == y).float().mean().item() == pytest.approx(
        (teacher.kd.model(x16).argmax(-1) == y).float().mean().item())


def test_alpha_zero_trains_like_no_distillation_and_alpha_one_does_not(teacher_ckpt, tmp_path):
    ckpt, _ = teacher_ckpt
    base = dict(optim={"epochs": 1, "warmup_epochs": 0}, snn={"enabled": False})
    plain = run_loop(tiny_config(tmp_path / "p", **base), tmp_path / "p" / "c")[-1][0]
    zero = run_loop(tiny_config(tmp_path / "z", distill={"teacher": str(ckpt), "alpha": 0.0}, **base),
                    tmp_path / "z" / "c")[-1][0]
    one = run_loop(tiny_config(tmp_path / "o", distill={"teacher": str(ckpt), "alpha": 1.0, "tau": 2.0}, **base),
                   tmp_path / "o" / "c")[-1][0]
    assert zero["val/loss"] == pytest.approx(plain["val/loss"], rel=1e-9), "the teacher does not disturb the student"
    assert one["val/loss"] != pytest.approx(plain["val/loss"], rel=1e-6)
    from qksweep.data import build_data

    b = build_data(build_config(tiny_config(tmp_path)).data, seed=1)
    teacher = load_teacher(build_config(tiny_config(tmp_path, distill={"teacher": str(ckpt)})).distill, num_classes=10,
                           tracking_uri="sqlite:///nowhere.db", student_mean=b.mean, student_std=b.std)
    x, y = b.val.tensors
    teacher_acc = (teacher(x).argmax(-1) == y).float().mean().item()
    for m in (zero, one):
        assert m["train/kd_loss"] > 0
        # the loop validates in batches of 128, here in one: floating point may flip a digit or two
        assert m["distill/teacher_top1"] == pytest.approx(teacher_acc, abs=2.5 / 359), "the teacher sees the student's batch"
    assert "train/kd_loss" not in plain and "distill/teacher_top1" not in plain


def test_timm_name_teacher_with_weights_file(tmp_path):
    import timm

    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=10, depth=1).eval()
    # depth 1 is not the registry default (12): a weights file must fit the named architecture
    good = timm.create_model("vit_tiny_patch16_224", num_classes=10).eval()
    torch.save(good.state_dict(), tmp_path / "good.pth")
    torch.save(timm.create_model("vit_tiny_patch16_224", num_classes=5).state_dict(), tmp_path / "five.pth")
    torch.save(ref.state_dict(), tmp_path / "shallow.pth")
    d = build_config({"distill": {"teacher": "vit_tiny_patch16_224", "teacher_checkpoint": str(tmp_path / "good.pth")}}).distill
    teacher = load_teacher(d, num_classes=10, tracking_uri="sqlite:///nowhere.db")
    assert teacher.img_size == 224 and not teacher.training
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(teacher(x), good(x), atol=1e-5)
    d5 = d.model_copy(update={"teacher_checkpoint": str(tmp_path / "five.pth")})
    with pytest.raises(ConfigError, match="has 5 classes but the data has 10"):
        load_teacher(d5, num_classes=10, tracking_uri="sqlite:///nowhere.db")
    shallow = d.model_copy(update={"teacher_checkpoint": str(tmp_path / "shallow.pth")})
    with pytest.raises(ConfigError, match="does not fit vit_tiny_patch16_224"):
        load_teacher(shallow, num_classes=10, tracking_uri="sqlite:///nowhere.db")
    no_weights = d.model_copy(update={"teacher_checkpoint": None})
    with pytest.raises(ConfigError, match="without weights"):
        load_teacher(no_weights, num_classes=10, tracking_uri="sqlite:///nowhere.db")
    rnd = load_teacher(no_weights.model_copy(update={"teacher_weights": "none"}), num_classes=10,
                       tracking_uri="sqlite:///nowhere.db")
    assert rnd.num_classes == 10 and not rnd.training


@pytest.mark.parametrize("distill,expect", [
    ({"teacher": "does/not/exist.pt"}, "no such file or directory"),
    ({"teacher": "no_such_model"}, "nor a timm model name"),
    ({"teacher": "0123456789abcdef0123456789abcdef"}, "distill.teacher"),
    ({"teacher_checkpoint": "x.pth"}, "distill.teacher is missing but distill.teacher_checkpoint is set"),
    ({"alpha": 0.3}, "distill.teacher is missing but distill.alpha is set"),
    ({"teacher": "vit_tiny_patch16_224"}, "without weights"),
    ({"teacher": "vit_tiny_patch16_224", "teacher_checkpoint": "missing.pth"}, "is not a file"),
    ({"teacher": "vit_tiny_patch16_224", "alpha": 1.5}, "distill.alpha"),
    ({"teacher": "vit_tiny_patch16_224", "tau": 0}, "distill.tau"),
    ({"teacher": "vit_tiny_patch16_224", "kind": "medium"}, "distill.kind"),
])
def test_bad_distill_config_is_one_line(workdir, distill, expect):
    with pytest.raises(ConfigError) as e:
        api.resolve(tiny_config(workdir, distill=distill))
    assert expect in str(e.value) and "\n" not in str(e.value)
    assert not (workdir / "mlflow.db").exists()


def test_teacher_with_wrong_class_count_exits_2_in_one_line(teacher_ckpt, workdir):
    ckpt, _ = teacher_ckpt
    cfg = tiny_config(workdir, data={"name": "synthetic", "num_classes": 5, "train_size": 64, "val_size": 32},
                      distill={"teacher": str(ckpt)})
    (workdir / "c.yaml").write_text(json.dumps(cfg))
    p = run_cli("train", "c.yaml", cwd=workdir, timeout=180)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "predicts 10 classes but the data has 5" in lines[0], lines
    assert not (workdir / "mlflow.db").exists() and not (workdir / "results").exists()


def test_search_space_accepts_distill_keys(tmp_path):
    from qksweep.search_spaces import apply_sample, parse_space

    specs = parse_space({"distill.alpha": {"uniform": [0.1, 0.9]}, "distill.tau": {"choice": [1.0, 4.0]},
                         "distill.kind": {"choice": ["soft", "hard"]}})
    assert [s.key for s in specs] == ["distill.alpha", "distill.tau", "distill.kind"]
    cfg = apply_sample(tiny_config(tmp_path, distill={"teacher": "x"}),
                       {"distill.alpha": 0.3, "distill.tau": 4.0, "distill.kind": "hard"})
    assert (cfg.distill.alpha, cfg.distill.tau, cfg.distill.kind) == (0.3, 4.0, "hard")
    with pytest.raises(ConfigError, match="distill.alpha"):
        apply_sample(tiny_config(tmp_path), {"distill.alpha": 1.2})


@pytest.mark.slow
def test_two_workers_distill_from_an_mlflow_run(ray_session, workdir, teacher_ckpt):
    """The teacher is an MLflow run id; each of the two Ray Train workers loads it once."""
    from mlflow.tracking import MlflowClient

    ckpt, _ = teacher_ckpt
    cfg = tiny_config(workdir, run={"workers": 2}, snn={"enabled": False},
                      distill={"kind": "hard", "alpha": 0.5})
    uri = cfg["tracking"]["uri"]
    c = MlflowClient(uri)
    teacher_run = c.create_run(c.create_experiment("teachers")).info.run_id
    c.log_artifacts(teacher_run, str(ckpt), "checkpoints/best")
    c.set_terminated(teacher_run)
    cfg["distill"]["teacher"] = teacher_run
    res = api.train(cfg)
    run = c.get_run(res.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["distill.teacher"] == teacher_run and run.data.params["distill.kind"] == "hard"
    assert [m.step for m in c.get_metric_history(res.run_id, "train/kd_loss")] == [1, 2]
    assert 0.0 < c.get_metric_history(res.run_id, "distill/teacher_top1")[0].value <= 1.0
    top1 = c.get_metric_history(res.run_id, "val/top1")[-1].value
    assert abs(top1 * 359 - round(top1 * 359)) < 1e-6, "validated over both workers' shards"
