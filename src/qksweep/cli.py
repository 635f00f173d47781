"""The ``qksweep`` command: argument parsing and exit codes over :mod:`qksweep.api`.

Exit codes: 0 success, 1 the job itself failed, 2 bad input, 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(ValueError):
    """Bad command-line input (exit 2)."""


def one_line(text: object) -> str:
    """An error message as the one line it is meant to be: a value the user typed with a newline or
    another control character in it is shown escaped (``\\n``), not as a second line."""
    return "".join(ch if ch.isprintable() or ch == " " else repr(ch)[1:-1] for ch in str(text))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other bad input
        raise UsageError(f"{self.prog}: {message}")


def add_overrides(p: argparse.ArgumentParser) -> None:
    from .cli_checks import override

    p.add_argument("-s", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", type=override,
                   help="override a config key, e.g. -s optim.lr=3e-4 (repeatable)")


def cmd_train(args) -> int:
    from . import api

    from .console import verbose_console

    with verbose_console(args.verbose):
        res = api.train(args.config, args.overrides)
    m = res.metrics
    print(f"finished: val/top1 {m.get('val/top1', float('nan')):.4f}  epochs {m.get('epoch')}  "
          f"MLflow run {res.run_id}  checkpoint {res.checkpoint_path}")
    return EXIT_OK


def print_sweep_result(res) -> None:
    m = res.best_metrics
    epoch = m.get("epoch")
    epoch = int(epoch) if isinstance(epoch, float) and epoch.is_integer() else epoch  # MLflow keeps floats
    print(f"\nbest trial {res.best_trial_id}: val/top1 {m.get('val/top1', float('nan')):.4f} at epoch {epoch}")
    for k, v in sorted((m.get("searched") or {}).items()):
        print(f"  {k} = {v}")
    print(f"  MLflow run {res.best_run_id} (sweep parent {res.parent_run_id})")
    print(f"browse: qksweep runs --sweep {res.name}   or   qksweep ui")
    if res.num_errors:
        print(f"{res.num_errors} trial(s) errored; see qksweep runs --sweep {res.name}")


def cmd_sweep(args) -> int:
    from . import api

    from .console import verbose_console

    with verbose_console(args.verbose):
        res = api.sweep(args.config, args.overrides, name=args.name, num_samples=args.num_samples,
                        warm_start=args.warm_start)
    print_sweep_result(res)
    return EXIT_OK


def cmd_resume(args) -> int:
    from . import api
    from .orchestrator.sweep import SweepComplete

    from .console import verbose_console

    try:
        with verbose_console(args.verbose):
            res = api.resume(args.sweep, storage=args.storage, num_samples=args.num_samples)
    except SweepComplete as e:  # a budget ended it: nothing to do, and nothing wrong
        print(f"qksweep: {e}")
        return EXIT_OK
    print_sweep_result(res)
    return EXIT_OK


def cmd_continue(args) -> int:
    from . import api

    res = api.continue_trial(args.run_id, epochs=args.epochs, overrides=args.overrides, tracking_uri=args.tracking_uri)
    m = res.metrics
    print(f"finished: val/top1 {m.get('val/top1', float('nan')):.4f}  epochs {m.get('epoch')}  "
          f"new MLflow run {res.run_id} (continued from {args.run_id})")
    return EXIT_OK


def register_core(sub) -> None:
    from .cli_checks import existing_file, nonempty, positive_int, storage, sweep_name, tracking_uri

    t = sub.add_parser("train", help="one training run through Ray Train, logged to MLflow")
    t.add_argument("config", type=existing_file, help="YAML config, e.g. configs/digits_qkformer.yaml")
    add_overrides(t)
    t.add_argument("--verbose", action="store_true", help="show Ray's and the libraries' messages too (always in "
                                                         "the run folder's train.log)")
    t.set_defaults(func=cmd_train)

    sw = sub.add_parser("sweep", help="a Tune sweep (Optuna + ASHA), one MLflow child run per trial")
    sw.add_argument("config", type=existing_file)
    add_overrides(sw)
    sw.add_argument("--name", type=sweep_name, help="sweep name (default: <experiment>-<date>-<time>)")
    sw.add_argument("--num-samples", type=positive_int, help="number of trials (overrides sweep.num_samples)")
    sw.add_argument("--warm-start", type=nonempty, metavar="SWEEP",
                    help="seed the study with an earlier sweep's trials: its name under run.storage, its folder or "
                         "its URI (sets sweep.warm_start)")
    sw.add_argument("--verbose", action="store_true", help="show Ray's and the libraries' messages too (always in "
                                                          "the sweep folder's sweep.log)")
    sw.set_defaults(func=cmd_sweep)

    r = sub.add_parser("resume", help="continue an interrupted sweep where it stopped")
    r.add_argument("sweep", type=nonempty, help="sweep name (under --storage), its directory, or its URI (s3://BUCKET/PREFIX/NAME)")
    r.add_argument("--storage", type=storage, help="the run.storage the sweep used: a path or an s3:// / gs:// URI "
                                     "(default ./qksweep_results)")
    r.add_argument("--num-samples", type=positive_int, help="extend the sweep to this many trials in all (also one a "
                                                           "budget ended)")
    r.add_argument("--verbose", action="store_true", help="show Ray's and the libraries' messages too")
    r.set_defaults(func=cmd_resume)

    c = sub.add_parser("continue", help="train a finished trial further from its checkpoint, as a new MLflow run")
    c.add_argument("run_id", type=nonempty, help="MLflow run id of a trial or train run")
    c.add_argument("--epochs", type=positive_int, help="total epochs to train to (default: the run's optim.epochs)")
    c.add_argument("--tracking-uri", type=tracking_uri, default=None, help="MLflow tracking URI (default: sqlite:///mlflow.db)")
    add_overrides(c)
    c.set_defaults(func=cmd_continue)


# Feature modules add their own subcommands: each has register(sub) using add_overrides/set_defaults(func=...).
COMMAND_MODULES = ["qksweep.cli_browse", "qksweep.cli_tools", "qksweep.cli_cluster"]


def build_parser() -> argparse.ArgumentParser:
    import importlib

    p = _Parser(prog="qksweep", description="Sweeps of ViTs and QKFormers on Ray Tune + Optuna + ASHA, tracked in MLflow.")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    register_core(sub)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return p


# OSErrors that name a path (the file or folder is missing, of the wrong kind, or not ours to touch): the
# paths a command line names are checked before the command runs (cli_checks), so one of these left is a
# path the check could not foresee (e.g. a folder root may write in by its mode but not in fact, like /proc)
PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def _bad_input_types() -> tuple[type[BaseException], ...]:
    from .config import ConfigError
    from .data import DataError
    from .models import ModelArgError
    from .orchestrator.export import ExportError
    from .tracking.browse import BrowseError
    from .trainables.checkpoint import CheckpointError

    return (ConfigError, CheckpointError, UsageError, DataError, ModelArgError, BrowseError, ExportError)


def console_env() -> None:
    """How Ray forwards the trials' output to this console (read when Ray is imported, so before it):
    every line as printed, none merged by Ray's log dedup (an epoch line must never be folded into
    ``[repeated 3x across cluster]``), and without Ray's coloured ``(trial_driver pid=…)`` prefix: qksweep's
    own lines name their trial. Set only where the user has not set them."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_DISABLE_WORKER_LOG_PREFIX", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no download bars between the lines
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # nor "Creating initial MLflow database tables..."


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    console_env()
    debug = "--debug" in argv or os.environ.get("QKSWEEP_DEBUG") == "1"
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        from .cli_checks import preflight

        preflight(args, parser)  # what the command line names is checked before Ray, MLflow or the storage is touched
        return args.func(args)
    except KeyboardInterrupt as e:
        print(f"qksweep: {e or 'interrupted'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except Exception as e:  # noqa: BLE001 - the one place that turns errors into exit codes
        from .config import ConfigError

        if debug:
            traceback.print_exc()
        if isinstance(e, (ConfigError, UsageError)):  # before the classification below, which imports torch
            print(f"qksweep: error: {one_line(e)}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if isinstance(e, PATH_ERRORS) and e.filename:  # a path the user named that cannot be read or written
            print(f"qksweep: error: {one_line(e.filename)}: {e.strerror or type(e).__name__}; check the path", file=sys.stderr)
            return EXIT_BAD_INPUT
        from .trainables.train import JobFailed

        if isinstance(e, _bad_input_types()):
            print(f"qksweep: error: {one_line(e)}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if isinstance(e, JobFailed):
            print(f"qksweep: {e}", file=sys.stderr)
            return EXIT_FAILED
        print(f"qksweep: unexpected error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              "(run with --debug for the traceback)", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
