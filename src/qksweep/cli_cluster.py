"""``qksweep submit``, ``qksweep jobs list|status|logs|stop`` and ``qksweep cluster template``:
sweeps on a Ray cluster through Ray Jobs."""

from __future__ import annotations

import functools
import json
import os
import sys

ADDRESS_HELP = "Ray dashboard address, e.g. http://127.0.0.1:8265 (default: $RAY_ADDRESS)"


def _one_line_errors(fn):
    """Bad input (exit 2) and failed requests (exit 1) as one line, like ``qksweep.cli.main`` does, but
    without its error classification importing torch and timm: a wrong address answers in seconds."""

    @functools.wraps(fn)
    def run(args) -> int:
        from .cli import one_line
        from .config import ConfigError
        from .tracking.runs import mask_secrets
        from .trainables.train import JobFailed

        try:
            return fn(args)
        except (ConfigError, JobFailed) as e:
            if getattr(args, "debug", False) or os.environ.get("QKSWEEP_DEBUG") == "1":
                import traceback

                traceback.print_exc()
            bad_input = isinstance(e, ConfigError)
            print(f"qksweep: {'error: ' if bad_input else ''}{one_line(mask_secrets(str(e)))}", file=sys.stderr)
            return 2 if bad_input else 1

    return run


def _exit_for(status: str) -> int:
    return 0 if status == "SUCCEEDED" else 1


def _follow(client, job_id: str) -> int:
    from .cluster import jobs

    try:
        status = jobs.follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\nqksweep: stopped following; job {job_id} keeps running "
              f"(stop it with: qksweep jobs stop {job_id} --address {client._qksweep_address})", file=sys.stderr)
        raise
    print(f"job {job_id} {status}", file=sys.stderr if status != "SUCCEEDED" else sys.stdout)
    return _exit_for(status)


@_one_line_errors
def cmd_submit(args) -> int:
    from .cluster import jobs

    jobs.probe(jobs.resolve_address(args.address))  # a wrong address: one line in seconds, before the config checks
    sub = jobs.build_submission(args.config, args.overrides, args.address, name=args.name, resume=args.resume,
                                num_samples=args.num_samples, working_dir=args.working_dir)
    try:
        for w in sub.warnings:
            jobs.warn(w)
        client = jobs.connect(sub.address, quiet=True)
        head = jobs.head_python(client, sub.address, sub.runtime_env.get("env_vars"))  # its Python, its qksweep
        job_id = jobs.submit(jobs.with_python(sub, head), client)
    finally:
        sub.cleanup()
    print(f"submitted {job_id}: {sub.entrypoint}")
    print(f"  sweep {sub.name} on {sub.address}; storage {sub.config.run.storage}")
    if sub.config.tracking.enabled:
        from .tracking.runs import mask_secrets

        print(f"  browse: qksweep runs --sweep {sub.name} --tracking-uri {mask_secrets(sub.config.tracking.uri)}")
    print(f"  follow: qksweep jobs logs {job_id} --follow --address {sub.address}", flush=True)
    if args.follow:
        return _follow(client, job_id)
    return 0


@_one_line_errors
def cmd_jobs_list(args) -> int:
    from .cluster import jobs

    client = jobs.connect(args.address)
    rows = jobs.job_rows(client)
    if args.format == "json":
        print(json.dumps([{k: v for k, v in r.items() if k != "start_time"} for r in rows], indent=1))
    else:
        print(jobs.format_jobs(rows, width=args.width))
    return 0


@_one_line_errors
def cmd_jobs_status(args) -> int:
    from .cluster import jobs

    info = jobs.job_info(jobs.connect(args.address), args.id)
    if args.format == "json":
        print(json.dumps(info, indent=1))
    else:
        for k in ("id", "status", "sweep", "entrypoint", "start", "end", "message", "driver_exit_code"):
            if info.get(k) not in (None, ""):
                print(f"{k + ':':<18}{info[k]}")
    return 0


@_one_line_errors
def cmd_jobs_logs(args) -> int:
    from .cluster import jobs

    client = jobs.connect(args.address)
    if args.follow:
        return _follow(client, args.id)
    sys.stdout.write(jobs.logs(client, args.id))
    sys.stdout.flush()
    return 0


@_one_line_errors
def cmd_jobs_stop(args) -> int:
    from .cluster import jobs

    client = jobs.connect(args.address)
    sent, status = jobs.stop(client, args.id, wait=args.wait)
    if not sent and status in jobs.TERMINAL:
        print(f"job {args.id} had already ended: {status}")
        return 0
    if status in jobs.TERMINAL:
        print(f"job {args.id} {status}")
        return 0
    print(f"job {args.id}: stop requested, still {status} after {args.wait:g} s "
          f"(check with: qksweep jobs status {args.id})")
    return 1


@_one_line_errors
def cmd_template(args) -> int:
    from .cluster import templates

    text = templates.write(args.kind, args.out, force=args.force, gpus_per_node=args.gpus_per_node,
                           max_workers=args.max_workers, name=args.name, image=args.image)
    if args.out:
        nxt = "ray up" if args.kind != "kuberay" else "kubectl apply -f"
        print(f"wrote {args.out} ({args.kind}); read the comments at its top, then: {nxt} {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def _add_address(p) -> None:
    from .cli_checks import ray_dashboard

    p.add_argument("--address", type=ray_dashboard, default=None, help=ADDRESS_HELP)


def register(sub) -> None:
    from .cli import add_overrides
    from .cli_checks import existing_dir, existing_file, nonempty, nonneg_int, output_file, positive_int, seconds, sweep_name

    s = sub.add_parser("submit", help="run a sweep on a Ray cluster through Ray Jobs")
    s.add_argument("config", type=existing_file, help="YAML sweep config (checked here, sent as the job's working_dir)")
    _add_address(s)
    add_overrides(s)
    s.add_argument("--name", type=sweep_name, help="sweep name (default: <experiment>-<date>-<time>)")
    s.add_argument("--num-samples", type=positive_int, help="number of trials (overrides sweep.num_samples)")
    s.add_argument("--resume", metavar="NAME", type=sweep_name, help="continue the interrupted sweep NAME on the cluster instead")
    s.add_argument("--follow", action="store_true", help="stream the job's logs until it ends; exit 0 if it SUCCEEDED, else 1")
    s.add_argument("--working-dir", type=existing_dir, default=None,
                   help="also ship this project folder (results, MLflow stores, data, .venv, .git excluded)")
    s.set_defaults(func=cmd_submit)

    j = sub.add_parser("jobs", help="list, inspect, follow and stop Ray jobs on a cluster")
    jsub = j.add_subparsers(dest="jobs_command", required=True, parser_class=type(j))
    jl = jsub.add_parser("list", help="one row per job: id, status, sweep, start/end, entrypoint")
    _add_address(jl)
    jl.add_argument("--format", choices=["table", "json"], default="table")
    jl.add_argument("--width", type=positive_int, default=48, help="entrypoint column width (default 48)")
    jl.set_defaults(func=cmd_jobs_list)
    js = jsub.add_parser("status", help="a job's status, entrypoint, times and message")
    js.add_argument("id", type=nonempty, help="submission id (see qksweep jobs list)")
    _add_address(js)
    js.add_argument("--format", choices=["table", "json"], default="table")
    js.set_defaults(func=cmd_jobs_status)
    jg = jsub.add_parser("logs", help="a job's output (--follow: until it ends; exit 0 if it SUCCEEDED, else 1)")
    jg.add_argument("id", type=nonempty)
    _add_address(jg)
    jg.add_argument("--follow", "-f", action="store_true")
    jg.set_defaults(func=cmd_jobs_logs)
    jt = jsub.add_parser("stop", help="stop a job (its trials end; resume it later with submit --resume)")
    jt.add_argument("id", type=nonempty)
    _add_address(jt)
    jt.add_argument("--wait", type=seconds, default=60.0, help="seconds to wait for it to end (default 60; 0: don't)")
    jt.set_defaults(func=cmd_jobs_stop)

    c = sub.add_parser("cluster", help="cluster templates")
    csub = c.add_subparsers(dest="cluster_command", required=True, parser_class=type(c))
    t = csub.add_parser("template", help="write a Ray cluster launcher YAML (aws, gcp) or a KubeRay RayJob manifest")
    t.add_argument("kind", choices=["aws", "gcp", "kuberay"])
    t.add_argument("--gpus-per-node", type=positive_int, default=8, help="GPUs per worker node (default 8)")
    t.add_argument("--max-workers", type=nonneg_int, default=8, help="most GPU worker nodes (default 8)")
    t.add_argument("--name", type=nonempty, default="qksweep", help="cluster / RayJob name (default qksweep)")
    t.add_argument("--image", type=nonempty, default=None, help="container image with qksweep installed (kuberay)")
    t.add_argument("--out", "-o", type=output_file, default=None, help="write here instead of printing")
    t.add_argument("--force", action="store_true", help="overwrite --out")
    t.set_defaults(func=cmd_template)
