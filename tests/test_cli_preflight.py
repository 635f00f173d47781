"""Pre-flight of every command (issue 20, item 1): whatever a command line names is checked before Ray,
MLflow or the storage is touched; bad input is one line on stderr, exit 2, nothing written.

* A table over the whole argparse tree (built by ``cli.build_parser``, so a new subcommand or option is
  covered by default): every option is classified by its kind (``KIND_BY_DEST``, or ``KIND_BY_COMMAND``
  where one dest means two things), each kind has bad values, and a test fails until a new option is
  classified.
* The cases of the issue, and what needs a network: an unreachable or hanging tracking server, a
  cluster address that is malformed or does not answer, a port out of range or taken.
* Hypothesis fuzzing of argument strings, in-process: no traceback, no ``unexpected error``, exit
  0, 1 or 2, and Ray never started.

No Ray here: ``ray.init`` raises if anything calls it. Servers listen on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import yaml

from qksweep import cli

from .conftest import run_cli, tiny_config

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

NO_RUN = "0123456789abcdef0123456789abcdef"  # a well-formed MLflow run id that no store holds

# ---------------------------------------------------------------- the argparse tree


def commands(parser: argparse.ArgumentParser | None = None, path: tuple[str, ...] = ()):
    """(command path, its parser) of every leaf subcommand."""
    parser = parser or cli.build_parser()
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, p in subs[0].choices.items():
        yield from commands(p, (*path, name))


def options(parser: argparse.ArgumentParser):
    """The actions a user gives a value or flag to (help and subcommand choices left out)."""
    return [a for a in parser._actions
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


# ---------------------------------------------------------------- kinds and their bad values

# option dest -> kind. A new option fails test_every_option_is_classified until it is added here.
KIND_BY_DEST = {
    "debug": "flag", "sweeps": "flag", "pareto": "flag", "follow": "flag", "force": "flag", "ema": "flag",
    "pretrained": "flag", "split_qkv": "flag", "save_vectors": "flag", "full": "flag", "svd_on_cpu": "flag",
    "copy": "flag", "dry_run": "flag", "verbose": "flag",
    "format": "choice", "which": "choice", "dtype": "choice", "kind": "choice",
    "config": "config_file",
    "overrides": "override",
    "tracking_uri": "tracking_uri",  # train/sweep/resume get one too (another branch): same kind
    "address": "ray_dashboard",
    "storage": "storage",
    "port": "port", "host": "host",
    "num_samples": "positive_int", "epochs": "positive_int", "batch_size": "positive_int",
    "topk": "positive_int", "width": "positive_int", "subset_size": "positive_int", "val_size": "positive_int",
    "num_classes": "positive_int", "gpus_per_node": "positive_int", "max_workers": "positive_int",
    "keep_best": "positive_int",
    "limit": "nonneg_int",
    "seed": "seed", "wait": "seconds", "val_ratio": "fraction",
    "run_id": "run_id", "source": "source", "sweep": "sweep_lookup", "experiment": "experiment",
    "name": "sweep_name", "resume": "sweep_name", "warm_start": "sweep_lookup",
    "targets": "flush_target",
    "images": "existing_file", "image": "existing_file",
    "data_dir": "existing_dir", "working_dir": "existing_dir",
    "export": "output_dir", "out": "output_dir", "save_dir": "output_dir", "output_dir": "output_dir",
    "device": "device",
    "metric": "text", "sort": "text", "id": "text",
    "register": "model_name", "alias": "model_alias",
}
# where a dest means something else on one command
KIND_BY_COMMAND = {
    ("attention", "out"): "output_file",
    ("cluster", "template", "out"): "output_file",
    ("cluster", "template", "name"): "text",
    ("cluster", "template", "image"): "text",
    ("spectrum", "targets"): "text",
}

# kind -> bad values; {missing}, {file}, {dir}, {closed} are filled in per test
BAD = {
    "config_file": ["{missing}", "{dir}"],
    "override": ["optim.lr", "=3"],
    "tracking_uri": ["ftp://host/x", "http://127.0.0.1:{closed}", "http://exa mple:5000", "http://[::1:5000",
                     "http://127.0.0.1:99999", "file:///tmp/x"],
    "ray_dashboard": ["ray://127.0.0.1:10001", "http://exa mple:8265", "http://[::1:8265", "http://127.0.0.1:99999",
                      "http://127.0.0.1:{closed}", "auto"],
    "storage": ["ftp://bucket/x", "s3://", "s3://bucket/x#frag", "", "{missing}"],
    "port": ["99999", "0", "-1", "http"],
    "host": ["192.0.2.1", ""],
    "positive_int": ["0", "-3", "x", "1.5"],
    "nonneg_int": ["-1", "many"],
    "seed": ["-1", str(2**32)],
    "seconds": ["-5", "nan", "inf", "soon"],
    "fraction": ["0", "1", "1.5", "nan"],
    "run_id": [NO_RUN, ""],
    "source": ["{missing}", NO_RUN, "", "models:/no-such-model@champion", "models:/x"],
    "model_name": ["a/b", "x@y", "", " x"],
    "model_alias": ["latest", "v3", "a b", ""],
    "sweep_lookup": ["no-such-sweep", ""],
    "experiment": ["no-such-experiment", ""],
    "sweep_name": ["a/b", ".hidden", "a b", ""],
    "flush_target": ["{missing}"],
    "existing_file": ["{missing}", "{dir}"],
    "existing_dir": ["{missing}", "{file}"],
    "output_dir": ["{file}", "{file}/sub"],
    "output_file": ["{dir}", "{file}/x.png"],
    "device": ["gpu", "cuda:x"],
    "text": [""],
    "choice": ["no-such-choice"],
    "flag": [],
}

# valid values for what a command requires, so that the bad value under test is what gets refused
FILLERS = {
    "config": "{config}", "sweep": "no-such-sweep", "run_id": NO_RUN, "source": "{dir}", "images": "{png}",
    "image": "{png}", "out": "{tmp}/attention.png", "kind": "aws", "id": "raysubmit_none", "data_dir": "{dir}",
    "output_dir": "{tmp}/split_out",
}
# options given with every case of a command: the store of the lookups
ALWAYS = {"best": ["--tracking-uri", "{store}"], "runs": ["--tracking-uri", "{store}"],
          "continue": ["--tracking-uri", "{store}"], "resume": ["--storage", "{tmp}"], "gc": ["--storage", "{tmp}"]}


# what a lookup's refusal names instead of the option (a run id, a sweep that is not there)
LOOKUP_WORDS = {"run_id": ("run",), "sweep_lookup": ("sweep",), "experiment": ("experiment",),
                "source": ("run id", "registered model"),
                "flush_target": ("flush",)}


def kind_of(path: tuple[str, ...], action: argparse.Action) -> str | None:
    return KIND_BY_COMMAND.get((*path, action.dest), KIND_BY_DEST.get(action.dest))


def _all_options():
    """Every option of the tree: the top-level ones (--debug) and each leaf command's."""
    yield from (((), a) for a in options(cli.build_parser()))
    yield from ((path, a) for path, p in commands() for a in options(p))


def test_every_option_is_classified():
    missing = [f"{' '.join(path)} {a.option_strings[0] if a.option_strings else a.dest} (dest {a.dest})"
               for path, a in _all_options() if kind_of(path, a) is None]
    assert not missing, ("classify these options in KIND_BY_DEST (or KIND_BY_COMMAND) and give their kind bad "
                         f"values: {missing}")
    unknown = {kind_of(path, a) for path, a in _all_options()} - set(BAD)
    assert not unknown, f"kinds without bad values in BAD: {unknown}"


def test_choice_kinds_really_have_choices():
    for path, p in commands():
        for a in options(p):
            if kind_of(path, a) == "choice":
                assert a.choices, f"{' '.join(path)} {a.dest} is classified as a choice but has none"
            if kind_of(path, a) == "flag":
                assert a.nargs == 0, f"{' '.join(path)} {a.dest} is classified as a flag but takes a value"


def _cases():
    out = []
    for path, p in commands():
        for a in options(p):
            for bad in BAD[kind_of(path, a)]:
                out.append(pytest.param(path, a.dest, bad, id=f"{'-'.join(path)}:{a.dest}={bad or 'empty'}"))
    return out


# ---------------------------------------------------------------- fixtures


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens here once the socket is closed


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """A real MLflow SQLite store with one experiment and no runs."""
    from mlflow.tracking import MlflowClient

    d = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("preflight")
    return uri


@pytest.fixture
def place(tmp_path, store, monkeypatch):
    """A clean cwd, files and folders to name, and Ray that must not start."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "folder").mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")
    cfg = tiny_config(tmp_path)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    _no_ray(monkeypatch)
    values = {"missing": str(tmp_path / "missing"), "file": str(tmp_path / "a.txt"), "dir": str(tmp_path / "folder"),
              "closed": str(_closed_port()), "config": str(tmp_path / "config.yaml"), "store": store,
              "png": str(tmp_path / "img.png"),
              "tmp": str(tmp_path)}
    return cwd, values


class RayStarted(BaseException):
    """Raised by ray.init in these tests: nothing that is refused may get that far."""


def _no_ray(monkeypatch) -> None:
    import ray

    def refuse(*a, **k):
        raise RayStarted("ray.init was called")

    monkeypatch.setattr(ray, "init", refuse)


def _fill(text: str, values: dict) -> str:
    return text.format(**values) if "{" in text else text


EXTRA_DEST = {"--tracking-uri": "tracking_uri", "--storage": "storage"}


def argv_for(path, dest, bad, values):
    """The command, its positionals in order (the bad value in its place, fillers elsewhere), the
    required options, the command's ALWAYS options, then the bad option."""
    parser = dict(commands())[path]
    argv, opts = list(path), []
    for a in options(parser):
        if not a.option_strings:
            value = bad if a.dest == dest else FILLERS.get(a.dest)
            if value is not None:  # nargs="*" (flush targets) without a filler is left out
                argv.append(_fill(value, values))
        elif a.dest == dest:
            if a.nargs == 0:
                pytest.skip("a flag takes no value")
            opts += [a.option_strings[0], _fill(bad, values)]
        elif a.required:
            opts += [a.option_strings[0], _fill(FILLERS[a.dest], values)]
    extra = ALWAYS.get(path[0], [])
    if extra and EXTRA_DEST.get(extra[0]) != dest:
        opts += [_fill(v, values) for v in extra]
    return argv + opts


def assert_refused(rc, err, cwd: Path, before: set[str]):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, f"exit {rc}, stderr: {err!r}"
    assert "Traceback" not in err and "unexpected error" not in err, err
    assert len(lines) == 1, f"not one line: {err!r}"
    after = {p.name for p in cwd.iterdir()}
    assert after == before, f"written in the cwd: {sorted(after - before)}"


# ---------------------------------------------------------------- the table


@pytest.mark.parametrize("path,dest,bad", _cases())
def test_every_option_refuses_its_bad_values(path, dest, bad, place, capsys):
    cwd, values = place
    argv = argv_for(path, dest, bad, values)
    before = {p.name for p in cwd.iterdir()}
    t0 = time.monotonic()
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert_refused(rc, err, cwd, before)
    assert time.monotonic() - t0 < 30, "bad input must be refused within seconds"
    shown = _fill(bad, values)
    opt = next(a for a in options(dict(commands())[path]) if a.dest == dest)
    names = [*opt.option_strings, opt.dest, str(opt.metavar or ""), shown, repr(shown),
             *LOOKUP_WORDS.get(kind_of(path, opt), ())]
    assert any(n and n in err for n in names), f"the line names neither the option nor the value: {err!r}"


def test_parsing_reads_no_file_so_entrypoints_for_other_machines_parse():
    """Paths are checked by the pre-flight, not by argparse: the entrypoint of a Ray job or a KubeRay
    manifest names a config on the cluster, and tests parse it here."""
    args = cli.build_parser().parse_args(["sweep", "/home/ray/qksweep/sweep.yaml", "--name", "s1"])
    assert args.config == "/home/ray/qksweep/sweep.yaml"
    from qksweep.cli_checks import check_paths
    from qksweep.config import ConfigError

    with pytest.raises(ConfigError, match=r"qksweep sweep: argument config: /home/ray/qksweep/sweep.yaml does not exist"):
        check_paths(args, cli.build_parser())


def test_a_bad_subcommand_is_one_line(place, capsys):
    cwd, _ = place
    before = {p.name for p in cwd.iterdir()}
    for argv in (["nosuch"], ["jobs", "nosuch"], ["cluster", "nosuch"], [], ["ui", "--nosuch-option"]):
        assert_refused(cli.main(argv), capsys.readouterr().err, cwd, before)


# ---------------------------------------------------------------- the cases, and the network


@pytest.fixture
def silent_server():
    """A TCP server on 127.0.0.1 that accepts connections and never answers (a hung tracking server)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    stop = threading.Event()
    held = []

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    stop.set()
    t.join(5)
    for c in held:
        c.close()
    srv.close()


def test_train_with_an_unreachable_tracking_server_is_refused_in_seconds_before_ray(place, capsys):
    cwd, values = place
    before = {p.name for p in cwd.iterdir()}
    t0 = time.monotonic()
    rc = cli.main(["train", values["config"], "-s", f"tracking.uri=http://127.0.0.1:{values['closed']}"])
    err = capsys.readouterr().err
    assert_refused(rc, err, cwd, before)
    assert "no MLflow server answers" in err and "connection refused" in err, err
    assert time.monotonic() - t0 < 60  # the config checks import timm; the probe itself is instant here
    assert not (Path(values["tmp"]) / "results").exists(), "nothing may be written to the storage"


def test_sweep_and_runs_with_a_hung_tracking_server_give_up_after_the_probe_timeout(place, capsys, silent_server):
    cwd, values = place
    before = {p.name for p in cwd.iterdir()}
    t0 = time.monotonic()
    rc = cli.main(["runs", "--tracking-uri", silent_server])
    took = time.monotonic() - t0
    err = capsys.readouterr().err
    assert_refused(rc, err, cwd, before)
    assert "no answer within 3 s" in err, err
    assert took < 10, f"the probe is bounded (3 s), took {took:.1f} s"
    rc = cli.main(["sweep", values["config"], "-s", f"tracking.uri={silent_server}", "-s",
                   "sweep.space={optim.lr: {loguniform: [1.0e-4, 1.0e-2]}}"])
    err = capsys.readouterr().err
    assert_refused(rc, err, cwd, before)
    assert "no answer within 3 s" in err, err
    assert not (Path(values["tmp"]) / "results").exists()


def test_a_real_mlflow_server_passes_the_probe(tmp_path):
    """The probe's request is one MLflow answers (GET experiments/search), so a live server is not refused."""
    from qksweep.checks import check_tracking_server
    from qksweep.config import ConfigError
    from qksweep.tracking.ui import free_port, start_ui, stop_ui, wait_until_up

    port = free_port()
    proc = start_ui(f"sqlite:///{tmp_path / 'mlflow.db'}", port=port, log_file=tmp_path / "server.log")
    try:
        wait_until_up(proc.url, timeout=120, proc=proc)
        check_tracking_server(proc.url)
        with pytest.raises(ConfigError, match="HTTP 404"):  # a server that is not MLflow's API
            check_tracking_server(proc.url + "/no/such/prefix")
    finally:
        stop_ui(proc)


def test_ui_port_out_of_range_or_taken_is_one_line_and_starts_no_server(place, capsys, monkeypatch):
    import qksweep.tracking.ui as ui

    started = []
    monkeypatch.setattr(ui, "start_ui", lambda *a, **k: started.append(a) or None)
    cwd, _ = place
    before = {p.name for p in cwd.iterdir()}
    for bad in ("99999", "-1", "0"):
        assert_refused(cli.main(["ui", "--port", bad]), capsys.readouterr().err, cwd, before)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        rc = cli.main(["ui", "--port", str(taken.getsockname()[1])])
        err = capsys.readouterr().err
        assert_refused(rc, err, cwd, before)
        assert "already in use" in err and "--port" in err, err
    assert started == []


def test_a_tracking_server_from_the_environment_is_probed_where_the_command_reads_mlflow(place, capsys, monkeypatch):
    cwd, values = place
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{values['closed']}")
    before = {p.name for p in cwd.iterdir()}
    for argv in (["runs"], ["best", "s1"], ["continue", NO_RUN], ["validate", NO_RUN]):
        rc = cli.main(argv)
        err = capsys.readouterr().err
        assert_refused(rc, err, cwd, before)
        assert "MLFLOW_TRACKING_URI" in err and "connection refused" in err, (argv, err)
    # a checkpoint path needs no MLflow: the variable is not probed (the path's own check answers)
    rc = cli.main(["validate", values["missing"]])
    assert rc == 2 and "MLFLOW_TRACKING_URI" not in capsys.readouterr().err


def test_a_malformed_cluster_address_is_one_line(place, capsys):
    cwd, values = place
    before = {p.name for p in cwd.iterdir()}
    for address in ("http://exa mple:8265", "http://[::1:8265", "http://127.0.0.1:99999",
                    f"http://127.0.0.1:{values['closed']}"):
        for argv in (["jobs", "list", "--address", address], ["submit", values["config"], "--address", address]):
            assert_refused(cli.main(argv), capsys.readouterr().err, cwd, before)


def test_ray_address_that_does_not_answer_is_refused_before_ray(place):
    """In a fresh process, as a user runs it: inside this pytest process another test may already have
    connected to the session's Ray, and a connected process keeps its cluster whatever RAY_ADDRESS says."""
    cwd, values = place
    before = {p.name for p in cwd.iterdir()}
    r = run_cli("train", values["config"], cwd=cwd, timeout=120, env={"RAY_ADDRESS": f"127.0.0.1:{values['closed']}"})
    assert_refused(r.returncode, r.stderr, cwd, before)
    assert "RAY_ADDRESS" in r.stderr and "connection refused" in r.stderr, r.stderr
    r = run_cli("train", values["config"], cwd=cwd, timeout=120, env={"RAY_ADDRESS": "http://127.0.0.1:8265"})
    assert_refused(r.returncode, r.stderr, cwd, before)
    assert "GCS" in r.stderr, r.stderr


def test_flush_of_a_path_that_does_not_exist_is_bad_input_not_nothing_pending(place, capsys):
    cwd, values = place
    before = {p.name for p in cwd.iterdir()}
    for argv in (["flush", values["missing"]], ["flush", "--storage", values["missing"]],
                 ["flush", "no-such-sweep"]):
        rc = cli.main(argv)
        err = capsys.readouterr().err
        assert_refused(rc, err, cwd, before)
    # what exists but holds nothing is still "nothing pending", exit 0
    assert cli.main(["flush", values["dir"]]) == 0
    assert "nothing pending" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["ui", "--port", "99999"],
    ["jobs", "list", "--address", "http://exa mple:8265"],
    ["flush", "/no/such/path"],
])
def test_subprocess_cases_are_one_line_exit_2(argv, tmp_path):
    """A few of the issue's cases through the real entry point, in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(cli.__file__).parents[1]), env.get("PYTHONPATH", "")])
    r = run_cli(*argv, cwd=tmp_path, timeout=120, env=env)
    assert r.returncode == 2, r
    assert "Traceback" not in r.stderr and "unexpected error" not in r.stderr, r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1, r.stderr
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- fuzzing

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

TOKENS = ["0", "-1", "1", "65536", "nan", "1e309", "", " ", "x", "http://", "http://[", "http://a b:1", "ray://x",
          "sqlite://", "sqlite:///:memory:", "::", "..", "/", "~", "-", "--", "=", "a=b", "%", "\x00", "é", "\t"]
FUZZED = [("runs",), ("best",), ("flush",), ("ui",), ("cluster", "template"), ("split-dataset",), ("jobs", "list"),
          ("jobs", "status"), ("resume",), ("continue",), ("submit",), ("validate",), ("predict",), ("train",)]


class Reached(BaseException):
    """The command got past every check to the point where it would start its work."""


# values of each kind that pass its checks, so that examples get past one option to the next check
GOOD = {
    "config_file": ["config.yaml"], "override": ["optim.lr=1e-3", "run.seed=3", "optim.epochs=0", "model.depth=x"],
    "tracking_uri": ["sqlite:///mlflow.db", "http://127.0.0.1:1"], "ray_dashboard": ["http://127.0.0.1:1"],
    "storage": [".", "results"], "port": ["5001"], "host": ["127.0.0.1"], "positive_int": ["1", "3"],
    "nonneg_int": ["0"], "seed": ["7"], "seconds": ["0", "0.5"], "fraction": ["0.3"], "run_id": [NO_RUN],
    "source": [".", "img.png"], "sweep_lookup": ["s1"], "experiment": ["test"], "sweep_name": ["s1"],
    "flush_target": ["."], "existing_file": ["img.png"], "existing_dir": ["."], "output_dir": ["out"],
    "output_file": ["out.yaml"], "device": ["cpu", "auto"], "text": ["x"], "flag": [], "choice": [],
    "model_name": ["m1"], "model_alias": ["champion"],
}


def _argv_strategy(path):
    """The command, then values in its positionals' places and for a random subset of its options (a
    flag alone), in a random order, sometimes with a stray token. Two values in three pass their own
    option's check (``GOOD``), so most examples get past argparse to the checks after it."""
    parser = dict(commands())[path]
    text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
    fuzz = st.one_of(st.sampled_from(TOKENS), text, st.integers(-2**33, 2**33).map(str),
                     st.floats(allow_nan=True, allow_infinity=True).map(str))

    def value(a):
        good = list(a.choices or []) + GOOD[kind_of(path, a)]
        return st.one_of(st.sampled_from(good), st.sampled_from(good), fuzz) if good else fuzz

    positionals = [a for a in options(parser) if not a.option_strings]
    flagged = [a for a in options(parser) if a.option_strings]

    @st.composite
    def argv(draw):
        out = [draw(value(a)) for a in positionals]
        chosen = draw(st.lists(st.sampled_from(flagged), max_size=4, unique_by=lambda a: a.dest)) if flagged else []
        for a in chosen:
            out += [a.option_strings[0]] if a.nargs == 0 else [a.option_strings[0], draw(value(a))]
        if draw(st.integers(0, 3)) == 0 and len(out) > 1:
            out = draw(st.permutations(out))
        if draw(st.integers(0, 9)) == 0:
            out.append(draw(fuzz))
        return [*path, *out]

    return argv()


@pytest.fixture
def fuzz_place(tmp_path, monkeypatch):
    import qksweep.api as api
    import qksweep.cluster.jobs as jobs
    import qksweep.tracking.ui as ui
    from qksweep.config import ConfigError

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    _no_ray(monkeypatch)

    def reached(*a, **k):
        raise Reached()

    monkeypatch.setattr(ui, "start_ui", lambda *a, **k: None)  # a valid `ui`: no server in a fuzz loop
    monkeypatch.setattr(api, "run_training", reached)
    import qksweep.orchestrator.sweep as sweep

    monkeypatch.setattr(sweep, "run_sweep", reached)
    monkeypatch.setattr(sweep, "resume_sweep", reached)

    def no_cluster(address, timeout=3.0):  # never talk to a Ray dashboard that happens to run on this machine
        raise ConfigError(f"cannot reach the Ray dashboard at {address} (fuzzing: not probed)")

    monkeypatch.setattr(jobs, "probe", no_cluster)
    cfg = tiny_config(tmp_path)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")
    return tmp_path


@pytest.mark.parametrize("path", FUZZED, ids=["-".join(p) for p in FUZZED])
def test_fuzzed_argument_strings_never_give_a_traceback(path, fuzz_place, capsys):
    @settings(max_examples=60, deadline=30_000, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(argv=_argv_strategy(path))
    def run(argv):
        capsys.readouterr()
        try:
            rc = cli.main(argv)
        except Reached:
            rc = 0
        out, err = capsys.readouterr()
        event(f"exit {rc}" + (": argparse" if "argument" in err or "usage" in err else ""))
        assert "Traceback" not in err + out, (argv, err)
        assert "unexpected error" not in err, (argv, err)
        assert rc in (0, 1, 2), (argv, rc, err)
        if rc == 2:
            assert len([ln for ln in err.splitlines() if ln.strip()]) == 1, (argv, err)

    run()
