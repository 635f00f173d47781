"""Config loading, overrides and bad input: one line, exit 2, nothing written — checked before Ray or
MLflow is touched (these tests never start Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from qksweep.cli import main
from qksweep.config import ConfigError, build_config, load_config, parse_override
from qksweep.search_spaces import parse_space

from .conftest import ROOT, run_cli, tiny_config


def test_overrides_convert_types_and_lists():
    cfg = load_config(ROOT / "configs/digits_qkformer.yaml",
                      ["optim.lr=3e-4", "model.time_steps=3", "optim.amp=true", "sweep.metric=[val/top1, val/loss]",
                       "sweep.mode=[max, min]", "sweep.scheduler.name=none", "data.root=null"])
    assert cfg.optim.lr == 3e-4 and cfg.model.time_steps == 3 and cfg.optim.amp is True
    assert cfg.sweep.metrics == ["val/top1", "val/loss"] and cfg.sweep.modes == ["max", "min"]


def test_keyword_overrides_and_dict_source():
    cfg = load_config({"model": {"name": "vit_tiny_patch16_224"}}, optim__lr=0.01, data__img_size=16)
    assert cfg.optim.lr == 0.01 and cfg.data.img_size == 16 and cfg.model.name == "vit_tiny_patch16_224"


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_validate(name, tmp_path):
    from qksweep.checks import check_config
    from qksweep.checks import check_sweep

    from qksweep.data.fake_events import make_event_dataset

    raw = yaml.safe_load((ROOT / "configs" / name).read_text())
    if raw["data"]["name"] in ("cifar10_dvs", "dvs128_gesture", "n_mnist"):  # the user's own archives
        raw["data"]["root"] = str(make_event_dataset(tmp_path / "events", raw["data"]["name"], per_class=1))
    stand_in = {"cifar10": ["data.download=true"], "cifar100": ["data.download=true"],  # nothing is downloaded by a check
                "imagefolder": ["data.name=synthetic", "data.root=null", "data.num_classes=100"]}
    extra = list(stand_in.get(raw["data"]["name"], []))
    if isinstance(raw.get("distill"), dict) and not raw["distill"].get("teacher"):  # the user's own teacher run id
        extra += ["distill.teacher=vit_tiny_patch16_224", "distill.teacher_weights=none"]
    cfg = check_config(load_config(raw, ["run.gpus_per_worker=0", *extra]))
    check_sweep(cfg)


def _write(tmp: Path, cfg: dict) -> str:
    p = tmp / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


BAD = [
    # (description, config changes or raw text, -s overrides, words the message must contain)
    ("missing file", None, [], ["does not exist"]),
    ("yaml syntax", "model: {name: x\n  bad: [", [], ["not valid YAML", "line 2"]),
    ("unknown top key", {"modle": {}}, [], ["unknown key 'modle'", "did you mean 'model'"]),
    ("unknown nested key", {"optim": {"lrr": 1}}, [], ["optim.lrr", "optim.lr"]),
    ("wrong type", {"model": {"embed_dim": "big"}}, [], ["model.embed_dim"]),
    ("negative lr", {"optim": {"lr": -1}}, [], ["optim.lr"]),
    ("zero epochs", {"optim": {"epochs": 0}}, [], ["optim.epochs"]),
    ("zero batch", {"data": {"batch_size": 0}}, [], ["data.batch_size"]),
    ("zero time steps", {"model": {"time_steps": 0}}, [], ["model.time_steps"]),
    ("zero workers", {"run": {"workers": 0}}, [], ["run.workers"]),
    ("heads do not divide", {"model": {"embed_dim": 64, "num_heads": 3}}, [], ["num_heads"]),
    ("img not divisible by patch", {"model": {"name": "vit_tiny_patch16_224", "patch_size": 5}, "data": {"img_size": 16}}, [], ["patch"]),
    ("unknown model", {"model": {"name": "vit_tine_patch16_224"}}, [], ["vit_tiny_patch16_224"]),
    ("unknown dataset", {"data": {"name": "digitz"}}, [], ["digitz", "digits"]),
    ("unknown optimizer", {"optim": {"name": "adamww"}}, [], ["adamww", "adamw"]),
    ("unknown scheduler", {"optim": {"sched": "cosin"}}, [], ["cosin", "cosine"]),
    ("unknown sampler", {"sweep": {"searcher": {"sampler": "tpee"}}}, [], ["sweep.searcher.sampler"]),
    ("missing dataset folder", {"data": {"name": "imagefolder", "root": "/nonexistent/imagenet"}}, [], ["/nonexistent/imagenet"]),
    ("cifar not downloaded", {"data": {"name": "cifar10", "root": "/nonexistent/cifar"}}, [], ["download"]),
    ("override without =", {}, ["optim.lr"], ["no '='"]),
    ("override unknown key", {}, ["optim.lrr=1"], ["optim.lrr"]),
    ("tracking scheme", {"tracking": {"uri": "ftp://x/y"}}, [], ["tracking.uri", "scheme"]),
    ("gpus where none exist", {"run": {"gpus_per_worker": 1}}, [], ["GPU"]),
]

BAD_SWEEP = [
    ("unknown distribution", {"optim.lr": {"lognormal": [1, 2]}}, ["lognormal", "loguniform"]),
    ("empty choice", {"model.num_heads": {"choice": []}}, ["non-empty"]),
    ("loguniform low <= 0", {"optim.lr": {"loguniform": [0, 1e-3]}}, ["low > 0"]),
    ("space key the config lacks", {"model.embed_dimm": {"choice": [32]}}, ["model.embed_dimm", "model.embed_dim"]),
    ("space could break shapes", {"model.num_heads": {"choice": [2, 3]}}, ["invalid model", "head_dim"]),
]


def _assert_one_line_exit_2(rc, err, words, tmp):
    assert rc == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not (tmp / "mlflow.db").exists() and not (tmp / "qksweep_results").exists(), "nothing written"


@pytest.mark.parametrize("desc,change,overrides,words", BAD, ids=[b[0] for b in BAD])
def test_bad_config_input_exits_2_with_one_line(desc, change, overrides, words, workdir, capsys):
    cfg = tiny_config(workdir)
    cfg["run"]["storage"] = "qksweep_results"
    cfg["tracking"]["uri"] = "sqlite:///mlflow.db"
    if change is None:
        path = str(workdir / "missing.yaml")
    elif isinstance(change, str):
        path = str(workdir / "raw.yaml")
        Path(path).write_text(change)
    else:
        for section, values in change.items():
            cfg[section] = {**cfg.get(section, {}), **values} if isinstance(values, dict) else values
        path = _write(workdir, cfg)
    args = ["train", path] + [x for o in overrides for x in ("-s", o)]
    rc = main(args)
    _assert_one_line_exit_2(rc, capsys.readouterr().err, words, workdir)


@pytest.mark.parametrize("desc,space,words", BAD_SWEEP, ids=[b[0] for b in BAD_SWEEP])
def test_bad_sweep_input_exits_2_before_ray(desc, space, words, workdir, capsys):
    cfg = tiny_config(workdir)
    cfg["run"]["storage"] = "qksweep_results"
    cfg["tracking"]["uri"] = "sqlite:///mlflow.db"
    cfg["sweep"] = {"space": space}
    rc = main(["sweep", _write(workdir, cfg)])
    _assert_one_line_exit_2(rc, capsys.readouterr().err, words, workdir)


@pytest.mark.parametrize("sweep,words", [
    ({"metric": "val/acc", "space": {"optim.lr": {"choice": [0.001]}}}, ["val/acc", "never reported"]),
    ({"mode": "maximum", "space": {"optim.lr": {"choice": [0.001]}}}, ["sweep.mode"]),
    ({"metric": ["val/top1", "val/loss"], "mode": ["max", "min"], "space": {"optim.lr": {"choice": [0.001]}}},
     ["scheduler", "none"]),
])
def test_bad_sweep_objectives(sweep, words, workdir, capsys):
    cfg = tiny_config(workdir)
    cfg["run"]["storage"] = "qksweep_results"
    cfg["tracking"]["uri"] = "sqlite:///mlflow.db"
    cfg["sweep"] = sweep
    rc = main(["sweep", _write(workdir, cfg)])
    _assert_one_line_exit_2(rc, capsys.readouterr().err, words, workdir)


def test_resume_unknown_sweep(workdir, capsys):
    rc = main(["resume", "no-such-sweep"])
    _assert_one_line_exit_2(rc, capsys.readouterr().err, ["no-such-sweep"], workdir)


def test_process_level_no_traceback(workdir):
    out = run_cli("train", "nope.yaml", cwd=workdir, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


# ---------------------------------------------------------------- fuzzing: only our own error escapes

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=6))
_trees = st.recursive(_scalars, lambda ch: st.one_of(st.lists(ch, max_size=3),
                                                      st.dictionaries(st.text(max_size=8), ch, max_size=3)), max_leaves=8)
_keys = st.sampled_from(["model", "data", "optim", "run", "sweep", "tracking", "spectral", "experiment", "x"])


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(_keys, _trees, max_size=4))
def test_fuzz_config_loader_raises_only_config_error(data):
    try:
        build_config(data)
    except ConfigError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_fuzz_override_parser_raises_only_config_error(text):
    try:
        key, _ = parse_override(text)
        build_config({}, [text])
    except ConfigError:
        pass


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(["optim.lr", "model.num_heads", "model.head_dim", "include", "bogus", "optim.x"]),
                       _trees, max_size=3))
def test_fuzz_space_parser_raises_only_config_error(space):
    try:
        parse_space(space)
    except ConfigError:
        pass


def test_trial_launcher_auto_tune_train_and_tune_with_several_workers_refused(tmp_path):
    from qksweep.checks import check_config

    def launcher(**run):
        return build_config(tiny_config(tmp_path, run=run)).trial_launcher()

    assert launcher() == "tune" and launcher(workers=2) == "train"
    assert launcher(launcher="train") == "train" and launcher(launcher="tune") == "tune"
    with pytest.raises(ConfigError) as e:
        check_config(build_config(tiny_config(tmp_path, run={"launcher": "tune", "workers": 2})))
    assert "run.launcher: tune" in str(e.value) and "run.workers=2" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError) as e:
        build_config(tiny_config(tmp_path, run={"launcher": "local"}))
    assert "run.launcher" in str(e.value) and "\n" not in str(e.value)


def test_a_sweep_started_before_run_launcher_resumes_on_ray_train(tmp_path):
    from qksweep.orchestrator.sweep import stored_config

    conf = build_config(tiny_config(tmp_path)).to_dict()
    assert stored_config({"config": conf}).trial_launcher() == "tune"  # written by this version: auto
    old = {**conf, "run": {k: v for k, v in conf["run"].items() if k != "launcher"}}
    assert stored_config({"config": old}).trial_launcher() == "train"
