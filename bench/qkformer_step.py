#!/usr/bin/env python
"""Training-step time of the CIFAR QKFormer on this CPU, eager and with ``torch.compile``.

``qkformer_cifar`` at the official CIFAR recipe's size (dim 384, layer 4, 8 heads, mlp 4, T=4,
10 classes), batch 16 of 32x32 inputs. One step = forward, cross-entropy, backward, neuron reset,
AdamW step, zero_grad (what ``train_loop`` does per update). For reference, the official CIFAR
QKFormer code takes about 2.5 s per such step on a machine like this one.

1. Eager steps alternate between one torch thread (a qksweep worker with ``run.cpus_per_worker: 1``)
   and torch's default (all cores). ``qkformer_step_s`` is the better of the two medians (what this
   CPU can do); both are reported. On a shared 2-vCPU machine the all-core step swings between
   ~0.5x and ~3x the one-thread time with the neighbours' load (OpenMP threads wait for each other
   whenever a neighbour holds a vCPU).
2. Channels-last: eager steps with the module and input in NHWC alternate with plain ones
   (``qkformer_channels_last_speedup`` = plain ÷ channels-last).
3. ``torch.compile`` runs in a child process with a hard time limit (``--compile-timeout``; on 2 CPUs
   compiling this model takes minutes: T=4 time steps of every LIF neuron are unrolled into the
   graph). The child compiles, checks the logits against eager on one batch with the same weights
   (``qkformer_compile_max_abs_diff``), then alternates eager and compiled steps on the same module.
   ``qkformer_compile_speedup`` = eager ÷ compiled median step time; ``null`` with
   ``qkformer_compile_error`` when compiling fails or runs past the limit. Inductor caches compiled
   graphs (``/tmp/torchinductor_$USER``): ``qkformer_compile_cache_warm`` says whether that cache
   held anything before the run, because a warm cache turns minutes of compiling into seconds.
4. bf16 autocast (what ``optim.amp: true`` runs on a CPU): steps with forward and loss under
   ``torch.autocast("cpu", dtype=torch.bfloat16)`` alternate with plain fp32 steps on the same module
   (``qkformer_bf16_speedup`` = fp32 ÷ bf16 median step; ``qkformer_bf16_logit_max_abs_diff``: eval-mode
   logits against fp32 with the same weights). Not the default: results are close, not equal.
5. ``qkformer_step_gflop``: the step's FLOPs (``torch.utils.flop_counter``; convolutions are ~99 %),
   and ``qkformer_step_gflops`` = that ÷ the eager step: the arithmetic floor a step time meets on
   this CPU (its fp32 peak is cores × GHz × FLOPs per cycle, 32 with AVX-512/AVX2 FMA on two pipes).

    python bench/qkformer_step.py --quick             # 2 steps per variant, compile limited to 300 s
    python bench/qkformer_step.py                     # 5 steps per variant, compile limited to 1800 s
    python bench/qkformer_step.py --tiny --quick      # a tiny model: checks the script, not the CPU
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, log, median  # noqa: E402

SIZE = dict(embed_dim=384, depth=4, num_heads=8, patch_size=4, mlp_ratio=4, time_steps=4)
TINY = dict(embed_dim=32, depth=4, num_heads=2, patch_size=4, mlp_ratio=4, time_steps=1)
SCRIPT = str(Path(__file__).resolve())


def build(size: dict, num_classes: int = 10, img: int = 32):
    import torch

    from qksweep.models import create_model

    torch.manual_seed(0)
    return create_model("qkformer_cifar", num_classes=num_classes, in_chans=3, img_size=img, **size)


def make_step(fwd_model, module, optimizer, amp: bool = False):
    import contextlib

    import torch
    import torch.nn.functional as F
    from spikingjelly.activation_based import functional

    def step(x, y) -> dict[str, float]:
        t0 = time.perf_counter()
        # as train_loop with optim.amp on a CPU: forward and loss under bf16 autocast, backward outside
        with (torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext()):
            out = fwd_model(x)
            loss = F.cross_entropy(out, y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        functional.reset_net(module)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError("non-finite loss")
        return {"step": t3 - t0, "fwd": t1 - t0, "bwd": t2 - t1, "opt": t3 - t2}

    return step


def setup(size: dict, batch: int):
    import torch

    model = build(size)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.06)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return model, optimizer, x, y


def compiled_child(size: dict, batch: int, steps: int, threads: int, mode: str | None) -> dict:
    """In a child process: compile, compare, then alternate eager and compiled steps."""
    import torch
    from spikingjelly.activation_based import functional

    torch.set_num_threads(threads)
    model, optimizer, x, y = setup(size, batch)
    eager = make_step(model, model, optimizer)
    eager(x, y)  # warm-up
    cmodel = torch.compile(model, mode=mode)
    compiled = make_step(cmodel, model, optimizer)
    t = time.perf_counter()
    compiled(x, y)  # compiles forward and backward
    compiled(x, y)  # a recompile after the first reset would show here
    compile_s = time.perf_counter() - t
    with torch.no_grad():
        model.eval()
        a = model(x)
        functional.reset_net(model)
        b = cmodel(x)
        functional.reset_net(model)
        model.train()
    max_diff = (a - b).abs().max().item()
    e_t, c_t = [], []
    for _ in range(steps):
        c_t.append(compiled(x, y))
        e_t.append(eager(x, y))
    return {"compile_s": compile_s, "max_abs_diff": max_diff, "eager": e_t, "compiled": c_t, "threads": threads}


def inductor_cache_dir() -> Path | None:
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        return Path(cache_dir())
    except Exception:  # noqa: BLE001 - private API; only informative
        return None


def run_child(args, size: dict, threads: int) -> tuple[dict | None, str | None, float]:
    cmd = [sys.executable, SCRIPT, "--compiled-child", "--threads", str(threads), "--batch", str(args.batch),
           "--steps", str(args.steps)] + (["--tiny"] if args.tiny else []) + (
           ["--compile-mode", args.compile_mode] if args.compile_mode else [])
    t = time.perf_counter()
    # its own session, so that a timeout kills the compiler's worker processes too
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=args.compile_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        return None, f"torch.compile did not finish within {args.compile_timeout}s (compile + {args.steps} steps)", time.perf_counter() - t
    took = time.perf_counter() - t
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line), None, took
            except json.JSONDecodeError:
                break
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    msg = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else f"exit {p.returncode}")
    return None, msg.strip()[:300], took


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 steps per variant, compile limited to 300 s")
    ap.add_argument("--steps", type=int, help="timed steps per variant (default 2 with --quick, else 5)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-timeout", type=int, help="seconds for the compile child (default 180 with --quick, else 1800)")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (dim 32, T 1): checks the script, not the CPU")
    ap.add_argument("--compiled-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.steps = args.steps or (2 if args.quick else 5)
    args.compile_timeout = args.compile_timeout or (300 if args.quick else 1800)
    size = dict(TINY if args.tiny else SIZE)

    if args.compiled_child:
        emit(compiled_child(size, args.batch, args.steps, args.threads or 1, args.compile_mode))
        return 0

    import torch

    default_threads = torch.get_num_threads()
    model, optimizer, x, y = setup(size, args.batch)
    params = sum(p.numel() for p in model.parameters())
    out: dict = {"benchmark": "qkformer_step", "model": "qkformer_cifar", **size, "batch": args.batch, "img_size": 32,
                 "params": params, "default_threads": default_threads, "reference_official_step_s": 2.5}
    eager = make_step(model, model, optimizer)

    # 1. eager, one thread vs torch's default, alternating
    thread_counts = [1] if default_threads == 1 else [1, default_threads]
    log(f"qkformer_cifar {params:,} params, batch {args.batch}: eager warm-up")
    by_threads: dict[int, list[dict]] = {n: [] for n in thread_counts}
    for n in thread_counts:
        torch.set_num_threads(n)
        eager(x, y)
    # --quick: one all-core step (it is the slow, noisy one on a shared 2-vCPU machine)
    other_steps = 1 if args.quick else args.steps
    for i in range(args.steps):
        for n in (thread_counts if i % 2 == 0 else thread_counts[::-1]):
            if n != 1 and len(by_threads[n]) >= other_steps:
                continue
            torch.set_num_threads(n)
            by_threads[n].append(eager(x, y))
    med = {n: median(t["step"] for t in ts) for n, ts in by_threads.items()}
    best = min(med, key=med.get)
    log("eager step: " + ", ".join(f"{n} thread(s) {m:.2f}s" for n, m in med.items()) + f"; using {best}")
    torch.set_num_threads(best)
    eager_t = by_threads[best]

    # 2. channels-last, alternating with plain eager steps (conversions not timed)
    cl_t, plain_t, cl_error = [], [], None
    xc = x.contiguous(memory_format=torch.channels_last)
    try:
        model.to(memory_format=torch.channels_last)
        eager(xc, y)
        for _ in range(max(1, args.steps - 1) if args.quick else args.steps):
            model.to(memory_format=torch.contiguous_format)
            plain_t.append(eager(x, y))
            model.to(memory_format=torch.channels_last)
            cl_t.append(eager(xc, y))
    except Exception as e:  # noqa: BLE001 - report, do not fail the benchmark
        cl_error = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    finally:
        model.to(memory_format=torch.contiguous_format)
    cl_speedup = median(t["step"] for t in plain_t) / median(t["step"] for t in cl_t) if cl_t else None
    if cl_speedup:
        log(f"channels-last: {median(t['step'] for t in cl_t):.2f}s vs {median(t['step'] for t in plain_t):.2f}s")

    # 4. bf16 autocast (optim.amp), alternating with fp32 steps
    bf_t, fp_t, bf_diff, bf_error = [], [], None, None
    try:
        bf16 = make_step(model, model, optimizer, amp=True)
        bf16(x, y)  # warm-up
        for i in range(max(1, args.steps - 1) if args.quick else args.steps):
            for amp in ((False, True) if i % 2 == 0 else (True, False)):
                (bf_t if amp else fp_t).append((bf16 if amp else eager)(x, y))
        from spikingjelly.activation_based import functional

        with torch.no_grad():
            model.eval()
            ref = model(x)
            functional.reset_net(model)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = model(x).float()
            functional.reset_net(model)
            model.train()
        bf_diff = (ref - low).abs().max().item()
    except Exception as e:  # noqa: BLE001 - report, do not fail the benchmark
        bf_error = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    bf_speedup = median(t["step"] for t in fp_t) / median(t["step"] for t in bf_t) if bf_t else None
    if bf_speedup:
        log(f"bf16 autocast: {median(t['step'] for t in bf_t):.2f}s vs fp32 {median(t['step'] for t in fp_t):.2f}s")

    # 5. FLOPs of one step (forward + backward), counted, not timed
    gflop = None
    try:
        import torch.nn.functional as F
        from spikingjelly.activation_based import functional
        from torch.utils.flop_counter import FlopCounterMode

        fc = FlopCounterMode(display=False)
        with fc:
            F.cross_entropy(model(x), y).backward()
        functional.reset_net(model)
        optimizer.zero_grad(set_to_none=True)
        gflop = fc.get_total_flops() / 1e9
    except Exception as e:  # noqa: BLE001
        log(f"flop count failed: {e}")

    e_step = median(t["step"] for t in eager_t)
    out.update({
        "qkformer_step_s": e_step,
        "qkformer_step_threads": best,
        "qkformer_step_s_by_threads": {str(n): m for n, m in med.items()},
        "qkformer_fwd_s": median(t["fwd"] for t in eager_t),
        "qkformer_bwd_s": median(t["bwd"] for t in eager_t),
        "qkformer_opt_s": median(t["opt"] for t in eager_t),
        "qkformer_step_vs_reference": 2.5 / e_step,
        "qkformer_channels_last_speedup": cl_speedup,
        "qkformer_bf16_speedup": bf_speedup,
        "qkformer_bf16_step_s": median(t["step"] for t in bf_t) if bf_t else None,
        "qkformer_bf16_fp32_step_s": median(t["step"] for t in fp_t) if fp_t else None,
        "qkformer_bf16_logit_max_abs_diff": bf_diff,
        "qkformer_step_gflop": gflop,
        "qkformer_step_gflops": gflop / e_step if gflop else None,
    })
    if bf_error:
        out["qkformer_bf16_error"] = bf_error
    if cl_error:
        out["qkformer_channels_last_error"] = cl_error

    # 3. torch.compile in a child process with a hard limit
    if not args.no_compile:
        del model, optimizer
        cache = inductor_cache_dir()
        warm = cache is not None and cache.is_dir() and any(cache.iterdir())
        log(f"torch.compile in a child process ({best} thread(s), limit {args.compile_timeout}s; "
            f"inductor cache {cache} {'warm' if warm else 'cold'}) ...")
        res, err, took = run_child(args, size, best)
        out["qkformer_compile_child_s"] = took
        out["qkformer_compile_cache_warm"] = warm  # a warm inductor cache turns minutes of compiling into seconds
        if res:
            ce = median(t["step"] for t in res["eager"])
            cc = median(t["step"] for t in res["compiled"])
            out.update({
                "qkformer_compile_speedup": ce / cc,
                "qkformer_compiled_step_s": cc,
                "qkformer_compile_eager_step_s": ce,
                "qkformer_compile_s": res["compile_s"],
                "qkformer_compile_max_abs_diff": res["max_abs_diff"],
            })
            log(f"compiled {cc:.2f}s vs eager {ce:.2f}s (compiled in {res['compile_s']:.0f}s)")
        else:
            out.update({"qkformer_compile_speedup": None, "qkformer_compile_error": err})
            log(f"compile: {err}")
    out["steps_timed"] = {"eager": {str(n): len(v) for n, v in by_threads.items()}, "channels_last": len(cl_t),
                          "bf16": len(bf_t)}
    emit(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
