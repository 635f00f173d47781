"""Tests of qksweep.data: in-memory datasets, ImageFolder, CIFAR from a fake
on-disk copy (no network), check_data errors and the split tool."""
from __future__ import annotations

import hashlib
import os
import pickle
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from qksweep.data import (
    DataBundle,
    DataError,
    build_data,
    check_data,
    eval_transform,
    list_datasets,
    options,
    prepare_data,
)
from qksweep.data import in_memory
from qksweep.data.base import balanced_indices
from qksweep.data.split import main as split_main
from qksweep.data.split import plan_split, split_dataset


def cfg(**kw):
    """A config object with only the given attributes (the rest take defaults)."""
    return SimpleNamespace(**kw)


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------- registry / options


def test_list_datasets():
    assert {"digits", "synthetic", "cifar10", "cifar100", "imagefolder"} <= set(list_datasets())


def test_options_defaults_and_mapping():
    o = options(cfg(name="Digits"))
    got = (o.name, o.img_size, o.val_fraction, o.hflip, o.interpolation, o.aa, o.split_seed)
    assert got == ("digits", 32, 0.2, 0.5, "bilinear", None, 0)
    assert options({"name": "synthetic", "aa": "none", "color_jitter": 0.0}).aa is None
    assert options(cfg(color_jitter=0.0)).color_jitter is None


# --------------------------------------------------------------------------- digits


def test_digits_shapes_split_and_classes():
    b = build_data(cfg(name="digits", img_size=32))
    assert isinstance(b, DataBundle) and b.in_memory and b.in_chans == 3 and b.num_classes == 10
    assert b.class_names == [str(i) for i in range(10)]
    x_tr, y_tr = b.train.tensors
    x_va, y_va = b.val.tensors
    assert x_tr.shape[1:] == (3, 32, 32) and x_va.shape[1:] == (3, 32, 32)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.long
    assert len(b.train) + len(b.val) == 1797
    assert abs(len(b.val) - 0.2 * 1797) <= 10
    # stratified: every class in both splits, in about the same proportion
    tr_counts, va_counts = torch.bincount(y_tr, minlength=10), torch.bincount(y_va, minlength=10)
    assert (va_counts > 0).all() and ((va_counts.float() / (tr_counts + va_counts)) - 0.2).abs().max() < 0.01
    # the three channels are the same grayscale image
    assert torch.equal(x_tr[:5, 0], x_tr[:5, 2])


def test_digits_split_fixed_across_seeds_and_calls():
    a = build_data(cfg(name="digits", img_size=16), seed=0)
    b = build_data(cfg(name="digits", img_size=16), seed=123)
    for da, db in ((a.train, b.train), (a.val, b.val)):
        assert torch.equal(da.tensors[0], db.tensors[0]) and torch.equal(da.tensors[1], db.tensors[1])
    # a different val_fraction / split_seed gives a different split
    c = build_data(cfg(name="digits", img_size=16, val_fraction=0.3))
    assert len(c.val) > len(a.val)
    d = build_data(cfg(name="digits", img_size=16, split_seed=1))
    assert not torch.equal(d.val.tensors[1], a.val.tensors[1])


def test_digits_normalized_with_train_stats():
    b = build_data(cfg(name="digits", img_size=32))
    x = b.train.tensors[0]
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(x.std(dim=(0, 2, 3), correction=0), torch.ones(3), atol=1e-3)
    assert b.val.tensors[0].mean().abs() < 0.1
    assert len(set(b.mean)) == 1 and 0.0 < b.mean[0] < 1.0 and 0.0 < b.std[0] < 1.0


def test_digits_caps_are_class_balanced():
    b = build_data(cfg(name="digits", img_size=8, train_size=100, val_size=50))
    assert len(b.train) == 100 and len(b.val) == 50
    assert torch.bincount(b.train.tensors[1]).tolist() == [10] * 10
    assert torch.bincount(b.val.tensors[1]).tolist() == [5] * 10


def test_digits_build_is_fast():
    in_memory._digits_raw.cache_clear()
    t = time.perf_counter()
    build_data(cfg(name="digits", img_size=32))
    assert time.perf_counter() - t < 1.0


def test_digits_eval_transform_matches_dataset():
    from sklearn.datasets import load_digits

    b = build_data(cfg(name="digits", img_size=32))
    _, val_idx = in_memory.digits_split(0.2, 0)
    raw = load_digits().images[val_idx[0]]  # values 0..16
    img = Image.fromarray(np.round(raw * 255 / 16).astype(np.uint8), mode="L")
    x = eval_transform(cfg(name="digits", img_size=32), b.mean, b.std)(img)
    assert x.shape == (3, 32, 32)
    assert torch.allclose(x, b.val.tensors[0][0], atol=0.02)


# --------------------------------------------------------------------------- synthetic


def test_synthetic_defaults_and_determinism():
    b = build_data(cfg(name="synthetic"), seed=0)
    assert b.in_memory and b.num_classes == 10 and len(b.train) == 512 and len(b.val) == 128
    assert b.train.tensors[0].shape == (512, 3, 32, 32)
    assert len(b.class_names) == 10
    b2 = build_data(cfg(name="synthetic"), seed=5)
    assert torch.equal(b.train.tensors[0], b2.train.tensors[0])
    assert torch.allclose(b.train.tensors[0].mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)


def test_synthetic_custom_sizes_and_learnable():
    b = build_data(cfg(name="synthetic", num_classes=4, train_size=80, val_size=40, img_size=16))
    x_tr, y_tr = b.train.tensors
    x_va, y_va = b.val.tensors
    assert x_tr.shape == (80, 3, 16, 16) and x_va.shape == (40, 3, 16, 16) and b.num_classes == 4
    assert torch.bincount(y_tr).tolist() == [20] * 4
    # nearest class centroid classifies val almost perfectly: the data is learnable
    cent = torch.stack([x_tr[y_tr == k].mean(0) for k in range(4)]).flatten(1)
    pred = torch.cdist(x_va.flatten(1), cent).argmin(1)
    assert (pred == y_va).float().mean() > 0.9
    x = eval_transform(cfg(name="synthetic", img_size=16), b.mean, b.std)(Image.new("RGB", (16, 16)))
    assert x.shape == (3, 16, 16)


# --------------------------------------------------------------------------- imagefolder


def write_image(path: Path, rng: np.random.Generator, size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def make_imagefolder(root: Path, val_name="validation", classes=("cat", "dog", "fox"), n=4) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", val_name):
        for c in classes:
            for i in range(n):
                write_image(root / split / c / f"{c}_{i}.png", rng)
    return root


@pytest.mark.parametrize("val_name", ["val", "validation", "valid"])
def test_imagefolder_loads_with_val_aliases(tmp_path, val_name):
    root = make_imagefolder(tmp_path / "ds", val_name=val_name)
    b = build_data(cfg(name="imagefolder", root=str(root), img_size=24))
    assert not b.in_memory and b.num_classes == 3 and b.class_names == ["cat", "dog", "fox"]
    assert len(b.train) == 12 and len(b.val) == 12
    x, y = b.train[0]
    # train samples stay uint8 (the loader workers' part); the bundle's batch transform does the rest
    assert x.shape == (3, 24, 24) and x.dtype == torch.uint8 and y == 0
    assert b.train_batch_transform(x[None]).dtype == torch.float32
    assert b.val[5][0].shape == (3, 24, 24) and b.val[5][0].dtype == torch.float32
    assert b.mean == (0.485, 0.456, 0.406)


def test_imagefolder_augment_and_eval_transform(tmp_path):
    root = make_imagefolder(tmp_path / "ds")
    c = cfg(name="tiny_imagenet", root=str(root), img_size=32, aa="rand-m9-mstd0.5-inc1",
            reprob=0.25, remode="pixel", color_jitter=0.4, train_size=6)
    b = build_data(c)
    assert len(b.train) == 6 and b.train[0][0].shape == (3, 32, 32)
    tf = eval_transform(c, b.mean, b.std)
    for mode in ("L", "RGBA", "RGB"):
        assert tf(Image.new(mode, (50, 70))).shape == (3, 32, 32)


def test_batch_normalize_matches_the_per_image_pipeline():
    # what the workers no longer do per image (ToTensor, Normalize), done once per batch, gives the same
    # numbers; random erasing then changes some of them, drawn where the batch is
    from torchvision import transforms

    from qksweep.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD
    from qksweep.data.transforms import BatchNormalize

    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)) for _ in range(4)]
    ref = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    want = torch.stack([ref(im) for im in imgs])
    batch = torch.stack([transforms.functional.pil_to_tensor(im) for im in imgs])
    got = BatchNormalize(IMAGENET_MEAN, IMAGENET_STD)(batch)
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-5)
    torch.manual_seed(0)
    erased = BatchNormalize(IMAGENET_MEAN, IMAGENET_STD, re_prob=1.0, re_mode="pixel")(batch)
    changed = (erased != want).flatten(1).any(1)
    assert changed.all() and not (erased != want).all()
    with pytest.raises(TypeError, match="uint8"):
        BatchNormalize(IMAGENET_MEAN, IMAGENET_STD)(want)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="data.root is required"):
        check_data(cfg(name="imagefolder"))
    with pytest.raises(DataError, match="does not exist"):
        check_data(cfg(name="imagefolder", root=str(tmp_path / "nope")))

    flat = tmp_path / "flat"
    write_image(flat / "a" / "x.png", np.random.default_rng(0))
    with pytest.raises(DataError, match="no train/ folder.*qksweep.data.split") as e:
        check_data(cfg(name="imagefolder", root=str(flat)))
    one_line(e)

    root = make_imagefolder(tmp_path / "noval", val_name="test")
    with pytest.raises(DataError) as e:
        check_data(cfg(name="imagefolder", root=str(root)))
    assert "val/, validation/, valid/" in one_line(e) and str(root) in str(e.value)

    root = make_imagefolder(tmp_path / "mismatch")
    (root / "validation" / "dog").rename(root / "validation" / "wolf")
    with pytest.raises(DataError) as e:
        build_data(cfg(name="imagefolder", root=str(root)))
    msg = one_line(e)
    assert "class folders differ" in msg and "dog" in msg and "wolf" in msg

    root = make_imagefolder(tmp_path / "empty")
    for f in (root / "validation" / "fox").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="no images in .*fox"):
        check_data(cfg(name="imagefolder", root=str(root)))

    root = make_imagefolder(tmp_path / "ok")
    with pytest.raises(DataError, match="num_classes=5 .* 3 classes"):
        check_data(cfg(name="imagefolder", root=str(root), num_classes=5))


# --------------------------------------------------------------------------- cifar


def _pickle(path: Path, obj) -> str:
    path.write_bytes(pickle.dumps(obj, protocol=2))
    return hashlib.md5(path.read_bytes()).hexdigest()


def make_fake_cifar(root: Path, monkeypatch, *, hundred=False, per_batch=4, n_test=6, seed=0):
    """Write a few random images in torchvision's CIFAR pickle format and point
    torchvision's md5 table at them, so CIFAR(download=False) loads them offline."""
    from torchvision import datasets

    rng = np.random.default_rng(seed)
    cls = datasets.CIFAR100 if hundred else datasets.CIFAR10
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    k = 100 if hundred else 10
    label_key = "fine_labels" if hundred else "labels"

    counter = iter(range(10**6))

    def batch(n):  # labels cycle through the classes across batches
        labels = [next(counter) % k for _ in range(n)]
        return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                label_key: labels, "filenames": [f"{i}.png" for i in range(n)]}

    train_list = [[name, _pickle(folder / name, batch(per_batch))] for name, _ in cls.train_list]
    test_list = [[name, _pickle(folder / name, batch(n_test))] for name, _ in cls.test_list]
    names = [f"class{i}" for i in range(k)]
    meta = dict(cls.meta, md5=_pickle(folder / cls.meta["filename"], {cls.meta["key"]: names}))
    monkeypatch.setattr(cls, "train_list", train_list)
    monkeypatch.setattr(cls, "test_list", test_list)
    monkeypatch.setattr(cls, "meta", meta)
    return names, len(train_list) * per_batch, n_test


def test_cifar_missing_without_download(tmp_path):
    c = cfg(name="cifar10", root=str(tmp_path), download=False)
    for fn in (check_data, build_data, prepare_data):
        with pytest.raises(DataError) as e:
            fn(c)
        msg = one_line(e)
        assert str(tmp_path / "cifar-10-batches-py") in msg and "data.download: true" in msg and "data.root" in msg


def test_cifar10_from_fake_disk_copy(tmp_path, monkeypatch):
    names, n_train, n_test = make_fake_cifar(tmp_path, monkeypatch)
    c = cfg(name="cifar10", root=str(tmp_path), download=False, img_size=32, hflip=0.0, reprob=0.0)
    prepare_data(c)
    b = build_data(c)
    assert not b.in_memory and b.num_classes == 10 and b.class_names == names
    assert len(b.train) == n_train == 20 and len(b.val) == n_test
    assert b.mean == (0.4914, 0.4822, 0.4465)
    x, y = b.train[3]
    assert x.shape == (3, 32, 32) and y == 3
    # QKFormer small-image policy: no crop, so without flip/aa/erasing train == eval == raw normalized
    raw = torch.from_numpy(b.train.data[3]).permute(2, 0, 1).float() / 255
    expect = (raw - torch.tensor(b.mean).view(3, 1, 1)) / torch.tensor(b.std).view(3, 1, 1)
    assert torch.allclose(x, expect, atol=1e-5)
    assert torch.allclose(b.val[0][0], eval_transform(c, b.mean, b.std)(Image.fromarray(b.val.data[0])))


def test_cifar10_augmented_upsampled_and_capped(tmp_path, monkeypatch):
    make_fake_cifar(tmp_path, monkeypatch)
    small = build_data(cfg(name="torch/cifar10", root=str(tmp_path), img_size=32, aa="rand-m9-mstd0.5-inc1",
                           reprob=0.25, crop_padding=4, train_size=10))
    assert len(small.train) == 10 and small.train[0][0].shape == (3, 32, 32)
    assert sorted(small.train.dataset.targets[i] for i in small.train.indices) == list(range(10))
    names = [type(t).__name__ for t in small.train.dataset.transform.transforms]
    assert names[:2] == ["RandomResizedCropAndInterpolation", "RandomCrop"] and "RandomErasing" in names
    big = build_data(cfg(name="cifar10", root=str(tmp_path), img_size=64 + 16))
    assert big.train[0][0].shape == (3, 80, 80) and big.val[0][0].shape == (3, 80, 80)


@pytest.mark.parametrize("aa", ["rand-m9-mstd0.5-inc1", "v0r", "augmix-m5-w4-d2"])
def test_posterize_at_top_magnitude_gives_black_not_an_error(tmp_path, monkeypatch, aa):
    """timm maps the top magnitude of the increasing posterize to 0 bits, which Pillow 13 refuses;
    QKFormer's CIFAR policy reaches it through its magnitude noise (it ended a CIFAR epoch)."""
    from PIL import Image
    from timm.data.auto_augment import AutoAugment

    make_fake_cifar(tmp_path, monkeypatch)
    tf = build_data(cfg(name="cifar10", root=str(tmp_path), img_size=32, aa=aa)).train.transform
    aug = next(t for t in tf.transforms if type(t).__name__ in ("RandAugment", "AutoAugment", "AugMixAugment"))
    ops = [op for sub in aug.policy for op in sub] if isinstance(aug, AutoAugment) else aug.ops
    posterize = [op for op in ops if op.name.startswith("Posterize")]
    assert posterize, [op.name for op in ops]
    img = Image.fromarray(np.random.default_rng(0).integers(1, 256, (32, 32, 3), dtype=np.uint8))
    for op in posterize:
        for bits in (0, -1):
            assert not np.asarray(op.aug_fn(img, bits)).any(), (op.name, bits)
        assert (np.asarray(op.aug_fn(img, 8)) == np.asarray(img)).all()
        assert (np.asarray(op.aug_fn(img, 1)) % 128 == 0).all()
    inc = [op for op in posterize if op.name == "PosterizeIncreasing"]
    if inc:  # the whole op at its top magnitude, as RandAugment calls it
        op = inc[0]
        op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0.0
        assert not np.asarray(op(img)).any()


def test_cifar100_from_fake_disk_copy(tmp_path, monkeypatch):
    names, _, n_test = make_fake_cifar(tmp_path, monkeypatch, hundred=True, per_batch=200)
    b = build_data(cfg(name="cifar100", root=str(tmp_path)))
    assert b.num_classes == 100 and b.class_names == names and len(b.train) == 200 and len(b.val) == n_test


# --------------------------------------------------------------------------- check_data


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(name="mnist"), "unknown dataset 'mnist'.*digits"),
        (dict(name="digits", img_size=0), "data.img_size"),
        (dict(name="digits", remode="zero"), "data.remode"),
        (dict(name="digits", reprob=1.5), "data.reprob"),
        (dict(name="digits", val_fraction=1.0), "data.val_fraction"),
        (dict(name="digits", interpolation="lanczos"), "data.interpolation"),
        (dict(name="digits", num_classes=7), "data.num_classes=7"),
        (dict(name="synthetic", num_classes=20, train_size=10), "data.train_size=10"),
        (dict(name="cifar10", download=True, aa="not-a-policy"), "data.aa"),
    ],
)
def test_check_data_errors(kw, match):
    with pytest.raises(DataError, match=match) as e:
        check_data(cfg(**kw))
    one_line(e)
    assert isinstance(e.value, ValueError)


def test_check_data_ok_and_ignores_aug_for_in_memory():
    check_data(cfg(name="digits", aa="rand-m9-mstd0.5-inc1", reprob=0.25))
    check_data(cfg(name="synthetic"))
    prepare_data(cfg(name="digits"))


def test_balanced_indices():
    t = np.repeat(np.arange(3), [10, 2, 10])
    idx = balanced_indices(t, 9, seed=0)
    assert np.bincount(t[idx]).tolist() == [4, 2, 3] or np.bincount(t[idx]).tolist() == [3, 2, 4]
    assert np.array_equal(idx, balanced_indices(t, 9, seed=0))
    assert len(balanced_indices(t, 100, seed=0)) == 22


# --------------------------------------------------------------------------- split tool


def make_flat(root: Path, classes=("a", "b", "c"), n=10) -> Path:
    rng = np.random.default_rng(1)
    for c in classes:
        for i in range(n):
            write_image(root / c / f"{c}{i:02d}.png", rng, size=(8, 8))
    return root


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.is_symlink(), p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def listing(out: Path) -> dict:
    return {s: {c.name: sorted(f.name for f in c.iterdir()) for c in sorted((out / s).iterdir())}
            for s in ("train", "val")}


def test_split_counts_symlinks_and_source_untouched(tmp_path):
    src = make_flat(tmp_path / "src")
    before = snapshot(src)
    r = split_dataset(src, tmp_path / "out", val_ratio=0.2, seed=42)
    assert (r["classes"], r["train"], r["val"], r["mode"]) == (3, 24, 6, "symlink")
    assert r["per_class"]["b"] == {"train": 8, "val": 2}
    out = tmp_path / "out"
    files = list((out / "train" / "a").iterdir()) + list((out / "val" / "a").iterdir())
    assert len(files) == 10 and all(f.is_symlink() and os.path.isabs(os.readlink(f)) for f in files)
    assert {Path(os.readlink(f)).name for f in files} == {f"a{i:02d}.png" for i in range(10)}
    lst = listing(out)
    assert not set(lst["train"]["a"]) & set(lst["val"]["a"])
    assert (out / "split_info.json").is_file()
    assert snapshot(src) == before
    # the output is a valid imagefolder dataset
    b = build_data(cfg(name="imagefolder", root=str(out), img_size=16))
    assert len(b.train) == 24 and len(b.val) == 6 and b.class_names == ["a", "b", "c"]


def test_split_deterministic_and_copy(tmp_path):
    src = make_flat(tmp_path / "src")
    split_dataset(src, tmp_path / "o1", seed=7)
    split_dataset(src, tmp_path / "o2", seed=7, copy=True)
    split_dataset(src, tmp_path / "o3", seed=8)
    assert listing(tmp_path / "o1") == listing(tmp_path / "o2")
    assert listing(tmp_path / "o1") != listing(tmp_path / "o3")
    copied = next((tmp_path / "o2" / "val" / "c").iterdir())
    assert copied.is_file() and not copied.is_symlink()
    assert copied.read_bytes() == (src / "c" / copied.name).read_bytes()


def test_split_subset_sizes_and_train_layout(tmp_path):
    src = make_flat(tmp_path / "src" / "train")  # data_dir/train/<class> layout
    (tmp_path / "src" / "val").mkdir()  # ignored
    r = split_dataset(tmp_path / "src", tmp_path / "tiny", subset_size=10, val_size=3)
    assert (r["train"], r["val"]) == (10, 3)
    assert sorted(p["train"] for p in r["per_class"].values()) == [3, 3, 4]
    assert all(p["val"] == 1 for p in r["per_class"].values())
    r = split_dataset(tmp_path / "src", tmp_path / "two", num_classes=2, subset_size=8, val_size=2)
    assert r["classes"] == 2 and r["train"] == 8 and r["val"] == 2
    with pytest.raises(DataError, match="has 10 images"):
        split_dataset(tmp_path / "src", tmp_path / "big", subset_size=30, val_size=6)
    assert not (tmp_path / "big").exists()
    # class-balanced val_size only: the rest is train
    plan = plan_split({"x": [f"{i}.png" for i in range(5)], "y": [f"{i}.png" for i in range(7)]}, val_size=4)
    assert [len(v) for _, v in plan.values()] == [2, 2] and [len(t) for t, _ in plan.values()] == [3, 5]


def test_split_nested_files(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("n01", "n02"):
        for i in range(5):
            write_image(tmp_path / "src" / "train" / c / "images" / f"{c}_{i}.JPEG", rng, size=(8, 8))
    r = split_dataset(tmp_path / "src", tmp_path / "out", val_ratio=0.4)
    assert (r["train"], r["val"]) == (6, 4)
    assert all(n.startswith("images_") for n in listing(tmp_path / "out")["val"]["n01"])


def test_split_refusals(tmp_path):
    src = make_flat(tmp_path / "src")
    before = snapshot(src)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="not empty"):
        split_dataset(src, out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    with pytest.raises(DataError, match="overlaps"):
        split_dataset(src, src / "split")
    with pytest.raises(DataError, match="overlaps"):
        split_dataset(src, src)
    with pytest.raises(DataError, match="does not exist"):
        split_dataset(tmp_path / "missing", tmp_path / "o")
    (tmp_path / "nothing" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        split_dataset(tmp_path / "nothing", tmp_path / "o")
    assert snapshot(src) == before
    (tmp_path / "emptyout").mkdir()  # an existing empty folder is fine
    assert split_dataset(src, tmp_path / "emptyout")["val"] == 6


def test_split_cli(tmp_path, capsys):
    src = make_flat(tmp_path / "src", n=5)
    assert split_main(["--data_dir", str(src), "--output_dir", str(tmp_path / "o"), "--seed", "1", "--copy"]) == 0
    assert "3 classes" in capsys.readouterr().out
    assert split_main(["--data-dir", str(src), "--output-dir", str(tmp_path / "o")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_file_backed_batches_outside_ray_train_come_on_the_device(tmp_path):
    # a one-worker trial in its own process (run.launcher: tune) has no Ray Train to prepare its loaders
    from qksweep.config import build_config
    from qksweep.trainables.core import LoaderBatches, build_batches

    from .conftest import tiny_config

    root = make_imagefolder(tmp_path / "ds")
    c = build_config(tiny_config(tmp_path, data={"name": "imagefolder", "root": str(root), "img_size": 16,
                                                 "batch_size": 4, "num_workers": 0}))
    bundle = build_data(c.data)
    train, val = build_batches(c, bundle, rank=0, world=1, device=torch.device("cpu"), ray_train=False)
    assert isinstance(train, LoaderBatches) and train.device == torch.device("cpu")
    x, y = next(iter(train))
    assert x.shape == (4, 3, 16, 16) and x.device.type == "cpu" and y.dtype == torch.long
    assert x.dtype == torch.float32 and -3 < x.mean() < 3  # normalised by the bundle's batch transform
    assert sum(len(yb) for _, yb in val) == len(bundle.val)
