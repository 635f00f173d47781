#!/usr/bin/env python
"""Training-step time of the CIFAR QKFormer on this CPU, eager and with ``torch.compile``.

``qkformer_cifar`` at the official CIFAR recipe's size (dim 384, layer 4, 8 heads, mlp 4, T=4,
10 classes), batch 16 of 32x32 inputs. One step = forward, cross-entropy, backward, neuron reset,
AdamW step, zero_grad (what ``train_loop`` does per update). For reference, the official CIFAR
QKFormer code takes about 2.5 s per such step on a machine like this one.

Threads: the measured steps run with ``--threads`` (default 1, the thread count of a qksweep worker
with ``run.cpus_per_worker: 1``); one step also runs at torch's default (all cores) and is reported
as ``qkformer_step_s_default_threads``. On a shared 2-vCPU machine the two-thread step can be several
times slower than the one-thread step (OpenMP threads wait for each other whenever a neighbour takes
a vCPU), so the default-thread figure is noisy.

Eager and compiled steps run alternately on the same module (``torch.compile`` wraps it, so both
update the same weights) after the compiled one has been warmed up, and each figure is a median:

* ``qkformer_step_s``: eager step time (median);
* ``qkformer_compile_speedup``: eager ÷ compiled step time (> 1 means compile helps), or ``null``
  with ``qkformer_compile_error`` when compiling fails or runs past ``--compile-timeout``;
* ``qkformer_compile_s``: the time of the first compiled steps (compilation);
* ``qkformer_compile_max_abs_diff``: max |logits_eager − logits_compiled| on one batch, same weights;
* ``qkformer_channels_last_speedup``: eager ÷ eager channels-last (when the model accepts it).

    python bench/qkformer_step.py --quick
    python bench/qkformer_step.py --no-compile
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, log, median  # noqa: E402

SIZE = dict(embed_dim=384, depth=4, num_heads=8, patch_size=4, mlp_ratio=4, time_steps=4)


class CompileTimeout(Exception):
    pass


def build(size: dict, num_classes: int = 10, img: int = 32):
    import torch

    from qksweep.models import create_model

    torch.manual_seed(0)
    model = create_model("qkformer_cifar", num_classes=num_classes, in_chans=3, img_size=img, **size)
    return model


def make_step(fwd_model, module, optimizer):
    import torch
    import torch.nn.functional as F
    from spikingjelly.activation_based import functional

    def step(x, y) -> dict[str, float]:
        t0 = time.perf_counter()
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 timed steps per variant")
    ap.add_argument("--steps", type=int, help="timed steps per variant (default 3 with --quick, else 6)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for the measured steps (default 1; one step also runs at torch's default "
                         "thread count and is reported as qkformer_step_s_default_threads)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-timeout", type=int, default=480, help="seconds allowed for compilation")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (dim 32, T 1): checks the script, not the CPU")
    args = ap.parse_args(argv)

    import torch
    from spikingjelly.activation_based import functional

    default_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    steps = args.steps or (3 if args.quick else 6)
    size = dict(SIZE)
    if args.tiny:
        size.update(embed_dim=32, num_heads=2, time_steps=1)
    model = build(size)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.06)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    out: dict = {"benchmark": "qkformer_step", "model": "qkformer_cifar", **size, "batch": args.batch, "img_size": 32,
                 "params": params, "threads": torch.get_num_threads(), "reference_official_step_s": 2.5}

    eager = make_step(model, model, optimizer)
    log(f"qkformer_cifar {params:,} params, batch {args.batch}, {torch.get_num_threads()} threads: eager warm-up")
    eager(x, y)
    eager_t = []
    default_t = None
    if default_threads != args.threads:
        torch.set_num_threads(default_threads)
        default_t = eager(x, y)["step"]
        torch.set_num_threads(args.threads)
        log(f"one eager step at torch's default {default_threads} threads: {default_t:.2f}s")

    # channels-last (eager): the model's convolutions on NHWC memory, alternating with plain eager
    # steps (the module is converted between steps; conversions are not timed)
    cl_speedup, cl_error, cl_t = None, None, []
    xc = x.contiguous(memory_format=torch.channels_last)
    cl = make_step(model, model, optimizer)
    try:
        model.to(memory_format=torch.channels_last)
        cl(xc, y)
        for _ in range(steps):
            model.to(memory_format=torch.contiguous_format)
            eager_t.append(eager(x, y))
            model.to(memory_format=torch.channels_last)
            cl_t.append(cl(xc, y))
    except Exception as e:  # noqa: BLE001 - report, do not fail the benchmark
        cl_error = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    finally:
        model.to(memory_format=torch.contiguous_format)
    if cl_t:
        cl_speedup = median(t["step"] for t in eager_t) / median(t["step"] for t in cl_t)
    while len(eager_t) < steps:
        eager_t.append(eager(x, y))

    compiled_t, compile_s, compile_err, max_diff = [], None, None, None
    if not args.no_compile:
        cmodel = torch.compile(model, mode=args.compile_mode)
        compiled = make_step(cmodel, model, optimizer)
        log(f"eager step {median(t['step'] for t in eager_t):.3f}s; compiling (timeout {args.compile_timeout}s)")

        def on_alarm(signum, frame):
            raise CompileTimeout(f"compilation ran past {args.compile_timeout}s")

        old = signal.signal(signal.SIGALRM, on_alarm)
        signal.alarm(args.compile_timeout)
        try:
            t = time.perf_counter()
            compiled(x, y)  # compiles forward and backward
            compiled(x, y)  # a recompile after the first reset would show here
            compile_s = time.perf_counter() - t
            signal.alarm(0)
            with torch.no_grad():
                model.eval()
                a = model(x)
                functional.reset_net(model)
                b = cmodel(x)
                functional.reset_net(model)
                model.train()
            max_diff = (a - b).abs().max().item()
            for _ in range(steps):
                compiled_t.append(compiled(x, y))
                eager_t.append(eager(x, y))
        except Exception as e:  # noqa: BLE001 - compile failures are a result, not a crash
            signal.alarm(0)
            compile_err = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
            log(f"compile failed: {compile_err}")
        finally:
            signal.signal(signal.SIGALRM, old)

    e_step = median(t["step"] for t in eager_t)
    out.update({
        "qkformer_step_s": e_step,
        "qkformer_fwd_s": median(t["fwd"] for t in eager_t),
        "qkformer_bwd_s": median(t["bwd"] for t in eager_t),
        "qkformer_opt_s": median(t["opt"] for t in eager_t),
        "qkformer_step_vs_reference": 2.5 / e_step,
        "qkformer_step_s_default_threads": default_t,
        "default_threads": default_threads,
        "qkformer_channels_last_speedup": cl_speedup,
    })
    if cl_error:
        out["qkformer_channels_last_error"] = cl_error
    if not args.no_compile:
        c_step = median(t["step"] for t in compiled_t) if compiled_t else None
        out.update({
            "qkformer_compile_speedup": (e_step / c_step) if c_step else None,
            "qkformer_compiled_step_s": c_step,
            "qkformer_compile_s": compile_s,
            "qkformer_compile_max_abs_diff": max_diff,
        })
        if compile_err:
            out["qkformer_compile_error"] = compile_err
    out["steps_timed"] = {"eager": len(eager_t), "channels_last": len(cl_t), "compiled": len(compiled_t)}
    emit(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
