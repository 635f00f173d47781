#!/usr/bin/env python
"""Training throughput on a GPU: images/s of ``qkformer_10_384`` (T=4, 224x224, bf16 autocast) and
``vit_small_patch16_224`` (224x224, bf16 autocast), eager and with ``torch.compile``.

One step = forward under ``torch.autocast(cuda, bfloat16)``, cross-entropy, backward, neuron reset
(SNNs), AdamW step, zero_grad, on a fixed random batch (the data pipeline is not measured).
Each variant: warm-up steps (compilation included for the compiled one, timed as ``compile_s``),
then timed steps between ``torch.cuda.synchronize()`` calls; images/s = batch x steps / time, the
median over ``--repeats`` blocks. Run by ``bench/run.py --gpu``; needs CUDA (exits 2 otherwise).

    python bench/gpu_throughput.py
    python bench/gpu_throughput.py --device cpu --tiny     # checks the script on a CPU (tiny sizes)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, log, median  # noqa: E402

MODELS = {
    # key: (model name, overrides, default batch)
    "qkformer_10_384": ("qkformer_10_384", {"time_steps": 4}, 32),
    "vit_small": ("vit_small_patch16_224", {}, 128),
}


def bench_model(key: str, *, device, img: int, batch: int, steps: int, repeats: int, warmup: int,
                compile_model: bool, tiny: bool) -> dict:
    import torch
    import torch.nn.functional as F

    from qksweep.models import create_model

    name, overrides, _ = MODELS[key]
    overrides = dict(overrides)
    if tiny:
        overrides.update({"time_steps": 1, "embed_dim": 64, "depth": 3, "num_heads": 2} if key.startswith("qkformer")
                         else {"embed_dim": 64, "depth": 2, "num_heads": 2})
    torch.manual_seed(0)
    model = create_model(name, num_classes=1000, in_chans=3, img_size=img, **overrides).to(device)
    model.train()
    spiking = bool(getattr(model, "is_spiking", False))
    fwd = torch.compile(model) if compile_model else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=device.type == "cuda")
    x = torch.randn(batch, 3, img, img, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = fwd(x)
            loss = F.cross_entropy(out.float(), y)
        loss.backward()
        if spiking:
            from spikingjelly.activation_based import functional

            functional.reset_net(model)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(warmup):
        loss = step()
    sync()
    warm_s = time.perf_counter() - t
    if not torch.isfinite(loss.detach()).item():
        raise FloatingPointError(f"{key}: non-finite loss")
    rates = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        rates.append(batch * steps / (time.perf_counter() - t))
    res = {"model": name, "overrides": overrides, "img_size": img, "batch": batch, "compiled": compile_model,
           "images_per_s": median(rates), "blocks": rates, "warmup_s": warm_s,
           "params": sum(p.numel() for p in model.parameters())}
    if device.type == "cuda":
        res["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1024**3
    del model, fwd, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny models at 32x32 (checks the script, not the device)")
    ap.add_argument("--quick", action="store_true", help="fewer steps")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--batch-qkformer", type=int)
    ap.add_argument("--batch-vit", type=int)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args(argv)

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        msg = "no CUDA device here: the GPU benchmarks need one (the CPU suite is `python bench/run.py --quick`)"
        log(msg)
        emit({"benchmark": "gpu_throughput", "error": msg})
        return 2
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    img = 32 if args.tiny else 224
    steps, repeats, warmup = (1, 1, 1) if args.tiny else (10, 3, 5) if args.quick else (20, 5, 8)
    out: dict = {"benchmark": "gpu_throughput", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "cuda": torch.version.cuda, "dtype": "bfloat16 autocast",
                 "tiny": args.tiny, "results": {}}
    for key in [k.strip() for k in args.models.split(",") if k.strip()]:
        _, _, default_batch = MODELS[key]
        batch = (args.batch_qkformer if key.startswith("qkformer") else args.batch_vit) or (2 if args.tiny else default_batch)
        for compiled in ([False] if args.no_compile else [False, True]):
            label = f"{key}{'_compiled' if compiled else ''}"
            log(f"{label}: batch {batch}, {img}x{img} ...")
            try:
                r = bench_model(key, device=device, img=img, batch=batch, steps=steps, repeats=repeats, warmup=warmup,
                                compile_model=compiled, tiny=args.tiny)
                log(f"  {r['images_per_s']:.1f} images/s")
            except Exception as e:  # noqa: BLE001 - one failing variant (OOM, compile) must not hide the others
                r = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"}
                log(f"  failed: {r['error']}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            out["results"][label] = r
            out[f"gpu_{label}_img_s"] = r.get("images_per_s")
        e, c = out.get(f"gpu_{key}_img_s"), out.get(f"gpu_{key}_compiled_img_s")
        if not args.no_compile:
            out[f"gpu_{key}_compile_speedup"] = (c / e) if e and c else None
    emit(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
