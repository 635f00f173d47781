"""Event-camera data end to end: SpikingJelly's datasets read from fake roots in its own on-disk layout,
the official DVS QKFormer, the DVS augmentation, energy on spike input, bad input, and training and a
sweep on event frames."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest
import torch

from qksweep.config import DataConfig
from qksweep.data import DataError, build_data, check_data, data_shape, prepare_data
from qksweep.data.events import EventFrames, SNNAugmentWide, frames_dir, resize_frames, split_per_class
from qksweep.models import create_model, frames_batch_first

from .conftest import tiny_config
from qksweep.data.fake_events import make_event_dataset


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# --------------------------------------------------------------------------- the model


@pytest.mark.parametrize("mlp_ratio, num_classes, official", [(4, 11, 1_999_371), (1, 10, 1_504_138)])
def test_qkformer_dvs_param_count_matches_official(mlp_ratio, num_classes, official):
    # official: dvs128-gesture/model.py (mlp_ratios 4, 11 classes) and cifar10-dvs/model.py (1, 10), counted
    # by building them with their LIF nodes stubbed (they hold no parameters)
    m = create_model("qkformer_dvs", num_classes=num_classes, in_chans=2, mlp_ratio=mlp_ratio)
    assert n_params(m) == official
    assert m.time_steps == 16 and [b.attn.num_heads for b in (*m.stage1, *m.stage2)] == [16, 16]


def test_qkformer_dvs_honours_heads_and_runs_frames_one_step_each():
    m = create_model("qkformer_dvs", num_classes=3, in_chans=2, embed_dim=32, num_heads=4, depth=3, time_steps=3,
                     img_size=32)
    assert [b.attn.num_heads for b in (*m.stage1, *m.stage2)] == [4, 4, 4] and len(m.stage2) == 2
    frames = torch.poisson(torch.full((3, 2, 2, 32, 32), 0.5))  # [T, N, C, H, W]
    out = m(frames)
    assert out.shape == (2, 3)
    # batch first, as the loaders give it, through the pre-hook: the same logits
    from spikingjelly.activation_based import functional

    functional.reset_net(m)
    m2 = frames_batch_first(m)
    assert torch.allclose(m2(frames.transpose(0, 1)), out)


@pytest.mark.parametrize("kw, words", [
    (dict(img_size=40), ["img_size=40", "divisible by 16"]),
    (dict(embed_dim=64, num_heads=3), ["num_heads=3", "stage widths 32, 64"]),
    (dict(depth=1), ["depth=1", ">= 2"]),
    (dict(patch_size=4), ["patch_size=4", "fixed at 16"]),
])
def test_qkformer_dvs_bad_shapes_are_one_line(kw, words):
    from qksweep.models import ModelArgError, check_model_args

    with pytest.raises(ModelArgError) as e:
        check_model_args("qkformer_dvs", num_classes=10, in_chans=2, **kw)
    assert all(w in str(e.value) for w in words) and "\n" not in str(e.value)


# --------------------------------------------------------------------------- the data


@pytest.mark.parametrize("name, size", [("cifar10_dvs", 128), ("dvs128_gesture", 128), ("n_mnist", 34)])
def test_each_dataset_reads_spikingjelly_layout_as_frames(tmp_path, name, size):
    root = make_event_dataset(tmp_path / name, name, classes=3, per_class=10, test_per_class=4)
    cfg = DataConfig(name=name, root=str(root), frames=4, img_size=size, event_aug="none", hflip=0.0)
    assert data_shape(cfg) == (2, 4)
    prepare_data(cfg)
    cache = frames_dir(DataConfig(name=name, root=str(root), frames=4))
    assert cache.is_dir() and not cache.with_name(cache.name + ".building").exists()
    stamp = sorted(p.stat().st_mtime_ns for p in cache.rglob("*.npz"))
    b = build_data(cfg)
    assert sorted(p.stat().st_mtime_ns for p in cache.rglob("*.npz")) == stamp  # integrated once, not again
    assert b.in_chans == 2 and b.frames == 4 and b.num_classes == 3 and not b.in_memory
    if name == "cifar10_dvs":  # no split of its own: the first 90 % of each class, in file order
        assert (len(b.train), len(b.val)) == (27, 3)
        assert b.class_names == ["airplane", "automobile", "bird"]
    else:  # its own train/test folders
        assert (len(b.train), len(b.val)) == (30, 12)
    x, y = b.train[0]
    assert x.shape == (4, 2, size, size) and x.dtype == torch.float32
    assert torch.equal(x, x.round()) and x.min() >= 0
    raw = np.load(next((root / "events_np").rglob("*.npz")))
    assert 0 < float(x.sum()) <= len(raw["t"])  # counts of events (a sample's own total, at most)


def test_split_per_class_is_spikingjellys_rule():
    from spikingjelly.datasets.utils import _split_class_indices

    targets = [0] * 7 + [1] * 10 + [2] * 3
    label_idx = [[i for i, t in enumerate(targets) if t == c] for c in range(3)]
    assert split_per_class(targets) == _split_class_indices(label_idx, 0.9, False)


def _build(root: str, q, start) -> None:
    try:
        start.wait(timeout=60)  # both processes have imported everything: their first builds coincide
        b = build_data(DataConfig(name="dvs128_gesture", root=root, frames=3, img_size=32))
        q.put(len(b.train))
    except Exception as e:  # noqa: BLE001 - the parent reports it
        q.put(repr(e))


def test_two_processes_building_one_root_do_not_race(tmp_path):
    # SpikingJelly refuses a cache another process is still writing (its .building marker): without the
    # root's lock one of two concurrent first builds fails
    root = make_event_dataset(tmp_path / "g", "dvs128_gesture", per_class=20, n_events=2000)
    ctx = mp.get_context("spawn")
    q, start = ctx.Queue(), ctx.Barrier(2)
    procs = [ctx.Process(target=_build, args=(str(root), q, start)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert got == [60, 60], got
    assert len(list(frames_dir(DataConfig(name="dvs128_gesture", root=str(root), frames=3)).rglob("*.npz"))) == 60 + 12


def test_augmentation_keeps_counts_and_is_off_for_validation():
    torch.manual_seed(0)
    frames = np.random.default_rng(0).poisson(0.3, (4, 2, 128, 128)).astype(np.float32)
    val = EventFrames(32, train=False, hflip=1.0, policy="snn_wide", roll=3)(frames)
    assert float(val.sum()) == float(frames.sum())  # a whole-number shrink sums pixels: every event kept
    assert torch.equal(val, resize_frames(torch.as_tensor(frames), 32))
    flip = EventFrames(32, train=True, hflip=1.0, policy="none")(frames)
    assert torch.equal(flip, val.flip(-1))
    aug = EventFrames(32, train=True, hflip=0.5, policy="snn_wide", roll=3)
    outs = [aug(frames) for _ in range(20)]
    assert all(torch.equal(o, o.round()) and o.min() >= 0 for o in outs)  # still counts
    assert sum(not torch.equal(o, val) for o in outs) >= 10  # and it does change the sample
    # the policy is applied to the whole sample: every frame gets the same op
    x = torch.zeros(3, 2, 16, 16)
    x[:, :, 8, 8] = 1.0
    for _ in range(20):
        y = SNNAugmentWide()(x)
        assert all(torch.equal(y[0], y[t]) for t in range(3))
    assert torch.equal(resize_frames(torch.ones(1, 2, 34, 34), 16), torch.ones(1, 2, 16, 16))  # nearest


def test_missing_and_incomplete_roots_name_what_spikingjelly_expects(tmp_path):
    with pytest.raises(DataError, match="does not exist.*CIFAR10DVS.*airplane.zip.*download"):
        check_data(DataConfig(name="cifar10_dvs", root=str(tmp_path / "nope")))
    (tmp_path / "g" / "download").mkdir(parents=True)
    (tmp_path / "g" / "download" / "gesture_mapping.csv").write_text("x")
    with pytest.raises(DataError) as e:
        check_data(DataConfig(name="dvs128_gesture", root=str(tmp_path / "g")))
    assert "lacks DvsGesture.tar.gz, LICENSE.txt, README.txt" in str(e.value)
    assert str(tmp_path / "g" / "download") in str(e.value) and "gesture_mapping.csv" not in str(e.value)
    root = make_event_dataset(tmp_path / "n", "n_mnist", per_class=2)
    marker = frames_dir(DataConfig(name="n_mnist", root=str(root), frames=5))
    marker.with_name(marker.name + ".building").touch()
    with pytest.raises(DataError, match="interrupted.*delete"):
        check_data(DataConfig(name="n_mnist", root=str(root), frames=5))
    for empty in (root / "events_np" / "test" / "1").glob("*.npz"):
        empty.unlink()
    with pytest.raises(DataError, match="has no .npz samples"):
        check_data(DataConfig(name="n_mnist", root=str(root)))


# --------------------------------------------------------------------------- energy


def test_energy_on_events_counts_the_first_layer_as_accumulates():
    from qksweep.snn import SNNMeter

    kw = dict(num_classes=3, in_chans=2, embed_dim=32, num_heads=2, time_steps=4, img_size=32)
    events = frames_batch_first(create_model("qkformer_dvs", **kw)).eval()
    meter = SNNMeter(events)
    x = torch.poisson(torch.full((2, 4, 2, 32, 32), 0.3))  # [N, T, C, H, W] counts
    meter.update(x)
    r = meter.compute()
    first_conv = events.patch_embed1.conv0
    fan_out = first_conv.out_channels * 9  # each input spike reaches 3x3 positions of every output channel
    assert meter.n_images == 2
    assert r["snn/flops_first_layer"] == 0.0  # no real-valued first layer on spikes
    assert r["snn/sops"] >= 0.8 * float(x.sum()) / 2 * fan_out  # the first layer's own accumulates, at least
    image = create_model("qkformer_dvs", **kw).eval()
    image.load_state_dict(events.state_dict())
    m2 = SNNMeter(image)
    m2.update(torch.rand(2, 2, 32, 32))  # a real-valued image: the encoding layer is MACs
    assert m2.compute()["snn/flops_first_layer"] > 0


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("overrides, words", [
    (["data.root=/nonexistent/cifar10dvs", "data.name=cifar10_dvs"], ["/nonexistent/cifar10dvs", "does not exist"]),
    (["data.frames=4", "model.time_steps=8"], ["model.time_steps=8", "data.frames=4", "one time step per frame"]),
    (["model.in_chans=3"], ["model.in_chans=3", "2 channels", "set it to 2"]),
    (["model.name=vit_tiny_patch16_224"], ["spiking model", "qkformer_dvs"]),
    (["data.aa=original"], ["data.aa", "event frames"]),
])
def test_bad_event_input_is_one_line_exit_2_nothing_written(workdir, capsys, overrides, words):
    import yaml

    from qksweep.cli import main

    root = make_event_dataset(workdir / "g", "dvs128_gesture", per_class=1)
    cfg = tiny_config(workdir, model={"name": "qkformer_dvs", "embed_dim": 32, "num_heads": 2},
                      data={"name": "dvs128_gesture", "root": str(root), "img_size": 32, "frames": 4})
    cfg["model"].pop("time_steps")
    cfg["model"].pop("depth")
    (workdir / "c.yaml").write_text(yaml.safe_dump(cfg))
    before = sorted(p.name for p in workdir.iterdir())
    for cmd in ("train", "sweep"):
        rc = main([cmd, str(workdir / "c.yaml"), *[a for o in overrides for a in ("-s", o)]])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert all(w in err for w in words), err
    assert sorted(p.name for p in workdir.iterdir()) == before  # no mlflow.db, no results folder
    assert not any(p.name.startswith("frames_number") for p in root.iterdir())


# --------------------------------------------------------------------------- training and a sweep


@pytest.mark.slow
def test_train_and_sweep_on_event_frames(ray_session, workdir):
    from mlflow.tracking import MlflowClient

    from qksweep import api

    root = make_event_dataset(workdir / "gesture", "dvs128_gesture", classes=3, per_class=8, test_per_class=2)
    model = {"name": "qkformer_dvs", "embed_dim": 32, "num_heads": 2, "depth": 2, "mlp_ratio": 1}
    cfg = tiny_config(workdir, optim={"epochs": 1},
                      data={"name": "dvs128_gesture", "root": str(root), "img_size": 32, "frames": 2, "batch_size": 8},
                      snn={"enabled": True, "val_batches": 1})
    cfg["model"] = model
    res = api.train(cfg)  # qksweep train: a TorchTrainer on Ray Train
    c = MlflowClient(cfg["tracking"]["uri"])
    run = c.get_run(res.run_id)
    assert run.info.status == "FINISHED" and run.data.params["data.frames"] == "2"
    assert run.data.metrics["snn/flops_first_layer"] == 0.0 and run.data.metrics["snn/sops"] > 0
    assert [m.step for m in c.get_metric_history(res.run_id, "epoch")] == [1]

    cfg["sweep"] = {"num_samples": 2, "scheduler": {"name": "none"}, "searcher": {"sampler": "grid", "seed": 0},
                    "space": {"data.frames": {"choice": [2, 3]}, "model.neuron.type": {"choice": ["lif"]},
                              "model.neuron.tau": {"choice": [1.5]}}}
    api.sweep(cfg, name="events")
    trials = [r for r in c.search_runs([c.get_experiment_by_name("test").experiment_id])
              if r.data.tags.get("qksweep.kind") == "trial"]
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials)
    assert sorted(r.data.params["data.frames"] for r in trials) == ["2", "3"]
    assert all(r.data.params["model.neuron.tau"] == "1.5" for r in trials)
    for frames in (2, 3):  # both integrated before the trials started, once each
        assert frames_dir(DataConfig(name="dvs128_gesture", root=str(root), frames=frames)).is_dir()
