"""``qksweep runs``, ``qksweep best`` and ``qksweep ui``: browsing what MLflow holds."""

from __future__ import annotations

import json

from .config import DEFAULT_STORAGE, DEFAULT_TRACKING_URI as DEFAULT_URI


def _uri(args) -> str:
    import os

    return args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def cmd_runs(args) -> int:
    from .tracking.browse import format_trials, list_sweeps, list_trials

    uri = _uri(args)
    if args.sweeps:
        print(format_trials(list_sweeps(uri, experiment=args.experiment), args.format))
        return 0
    df = list_trials(uri, experiment=args.experiment, sweep=args.sweep, sort=args.sort, limit=args.limit)
    print(format_trials(df, args.format))
    return 0


def cmd_best(args) -> int:
    from .orchestrator.export import best_trial, export_best

    uri = _uri(args)
    if args.pareto:
        from .orchestrator.export import pareto_front

        front = pareto_front(uri, args.sweep, experiment=args.experiment)
        print(json.dumps(front, indent=1, default=str) if args.format == "json" else _pareto_table(front))
        return 0
    best = best_trial(uri, args.sweep, metric=args.metric, experiment=args.experiment)
    if args.format == "json":
        print(json.dumps(best, indent=1, default=str))
    else:
        print(f"best trial {best['trial_id']} of sweep {args.sweep}: {best['metric']} = {best['value']:.4f}")
        print(f"  MLflow run {best['run_id']}")
        for k, v in sorted((best.get("params") or {}).items()):
            print(f"  {k} = {v}")
    if args.register:
        from .tools.mlflow_model import register_run

        reg = register_run(uri, best["run_id"], args.register, alias=args.alias,
                           tags={"qksweep.sweep": args.sweep, "qksweep.trial_id": str(best["trial_id"])})
        print(f"registered {reg.model_uri} (version {reg.version}) from run {reg.run_id}'s best checkpoint: "
              f"qksweep validate {reg.model_uri}")
    if args.export:
        files = export_best(uri, args.sweep, args.export, metric=args.metric, experiment=args.experiment)
        print(f"exported to {args.export}: " + ", ".join(str(f) for f in files))
    return 0


def _pareto_table(front: list[dict]) -> str:
    if not front:
        return "no Pareto front yet (no finished trial has every objective)"
    keys = list(front[0]["values"])
    lines = ["  ".join(["trial_id", *keys, "run_id"])]
    for row in front:
        lines.append("  ".join([str(row["trial_id"]), *(f"{row['values'][k]:.4g}" for k in keys), row["run_id"]]))
    return "\n".join(lines)


def cmd_ui(args) -> int:
    from .tracking.ui import start_ui, stop_ui, wait_until_up

    uri = _uri(args)
    proc = start_ui(uri, host=args.host, port=args.port)
    if proc is None:
        print(f"{uri} is already an MLflow server: open it in a browser")
        return 0
    url = f"http://{args.host}:{args.port}"
    try:
        wait_until_up(url, timeout=60, proc=proc)
        print(f"MLflow UI for {uri} at {url}/#/experiments  (Ctrl-C stops it)", flush=True)
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop_ui(proc)
    return 0


def _add_uri(p) -> None:
    from .cli_checks import nonempty, tracking_uri

    p.add_argument("--tracking-uri", type=tracking_uri, default=None, help=f"MLflow tracking URI (default: $MLFLOW_TRACKING_URI or {DEFAULT_URI})")
    p.add_argument("--experiment", type=nonempty, default=None, help="MLflow experiment name (default: all)")


def cmd_flush(args) -> int:
    from . import api

    results = api.flush_mlflow(*args.targets, storage=args.storage, wait_s=args.wait)
    return 1 if any(r.left for r in results) else 0


def cmd_gc(args) -> int:
    from . import api
    from .orchestrator.gc import human

    res = api.gc(args.sweep, storage=args.storage, keep_best=args.keep_best, dry_run=args.dry_run)
    for c in res.plan.remove:
        print(f"  {'would remove' if res.dry_run else 'removed'} {c.path}  (trial {c.trial_id}, epoch "
              f"{c.epoch if c.epoch is not None else '?'}, {human(c.bytes)})")
    print(res.summary())
    return 1 if res.failed else 0


def register(sub) -> None:
    from .cli_checks import model_alias, model_name, nonempty, positive_int, nonneg_int, output_dir, port, seconds, storage, tracking_uri

    r = sub.add_parser("runs", help="one row per trial: status, searched params, metric, epochs, run id")
    _add_uri(r)
    r.add_argument("--sweep", type=nonempty, help="only this sweep's trials")
    r.add_argument("--sweeps", action="store_true", help="list sweeps instead of trials")
    r.add_argument("--sort", type=nonempty, help="column or metric to sort by (best first for metrics; -name/+name forces order)")
    r.add_argument("--limit", type=nonneg_int)
    r.add_argument("--format", choices=["table", "json", "csv"], default="table")
    r.set_defaults(func=cmd_runs)

    b = sub.add_parser("best", help="the best trial of a sweep; --export writes config, checkpoint, metrics")
    b.add_argument("sweep", type=nonempty)
    _add_uri(b)
    b.add_argument("--metric", type=nonempty, help="metric to rank by (default: the sweep's)")
    b.add_argument("--export", metavar="DIR", type=output_dir, help="write config.yaml, checkpoint/ and metrics.json here")
    b.add_argument("--pareto", action="store_true", help="the Pareto front of a multi-objective sweep")
    b.add_argument("--register", type=model_name, metavar="NAME",
                   help="log the best trial's best checkpoint as an MLflow model and register it as NAME")
    b.add_argument("--alias", type=model_alias, default="champion",
                   help="the alias --register points at the new version (default champion)")
    b.add_argument("--format", choices=["table", "json"], default="table")
    b.set_defaults(func=cmd_best)

    f = sub.add_parser("flush", help="send to MLflow what runs kept in their pending file while the server was away")
    f.add_argument("targets", nargs="*", help="pending files, run or sweep folders, or sweep names (default: all "
                                              "under --storage)")
    f.add_argument("--storage", type=storage, default=None, help=f"run.storage the sweeps live in (default {DEFAULT_STORAGE})")
    f.add_argument("--wait", type=seconds, default=30, help="seconds to wait for the server per file (default 30)")
    f.set_defaults(func=cmd_flush)

    g = sub.add_parser("gc", help="remove the checkpoints a sweep no longer needs (each finished trial keeps its best "
                                  "and last; --keep-best K keeps only the K best trials)")
    g.add_argument("sweep", type=nonempty, help="sweep name (under --storage), its directory, or its URI")
    g.add_argument("--storage", type=storage, default=None, help=f"run.storage the sweep lives in (default {DEFAULT_STORAGE})")
    g.add_argument("--keep-best", type=positive_int, default=None, metavar="K",
                   help="also remove every checkpoint of the trials outside the K best (their MLflow artifacts stay)")
    g.add_argument("--dry-run", action="store_true", help="print what would be removed and remove nothing")
    g.set_defaults(func=cmd_gc)

    u = sub.add_parser("ui", help="start the MLflow UI for the tracking store on 127.0.0.1")
    u.add_argument("--tracking-uri", type=tracking_uri, default=None)
    u.add_argument("--host", type=nonempty, default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 exposes it)")
    u.add_argument("--port", type=port, default=5000, help="port to listen on, 1-65535, free (default 5000)")
    u.set_defaults(func=cmd_ui)
