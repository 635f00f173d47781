"""Offline tools on a trained model: ``qksweep validate``, ``predict``, ``attention``, ``spectrum``,
and ``qksweep split-dataset``.  SOURCE is a checkpoint directory (or its checkpoint.pt) or an
MLflow run id; ``spectrum`` also takes a timm model name with ``--pretrained``."""

from __future__ import annotations

import json

from .config import DEFAULT_TRACKING_URI as DEFAULT_URI


def _source_args(p, *, overrides: bool = True) -> None:
    from .cli import add_overrides
    from .cli_checks import device, nonempty, tracking_uri

    p.add_argument("source", type=nonempty, help="checkpoint directory or file, or an MLflow run id")
    p.add_argument("--tracking-uri", type=tracking_uri, default=None,
                   help=f"MLflow tracking URI for a run id (default: $MLFLOW_TRACKING_URI or {DEFAULT_URI})")
    p.add_argument("--which", choices=["best", "last"], default="best",
                   help="which checkpoint of a run (default best; falls back to the other)")
    p.add_argument("--ema", action="store_true", help="use the EMA weights (runs trained with optim.ema=true)")
    p.add_argument("--device", type=device, default="auto", help="cpu, cuda, cuda:N (default: cuda when available)")
    if overrides:
        add_overrides(p)


def cmd_validate(args) -> int:
    from .tools.evaluate import format_report, validate

    res = validate(args.source, data_dir=args.data_dir, overrides=args.overrides, tracking_uri=args.tracking_uri,
                   out_dir=args.out, which=args.which, use_ema=args.ema, device=args.device,
                   batch_size=args.batch_size)
    if args.format == "json":
        print(json.dumps({k: v for k, v in res.items() if k != "confusion"}, indent=1))
        return 0
    print(format_report(res))
    print(f"\nconfusion matrix: {res['confusion_png']}   metrics: {res['json']}")
    if res["artifact_logged"]:
        print(f"logged to MLflow run {res['run_id']} under validate/")
    return 0


def cmd_predict(args) -> int:
    from .tools.predict import format_predictions, predict

    rows = predict(args.source, args.images, topk=args.topk, tracking_uri=args.tracking_uri, which=args.which,
                   overrides=args.overrides, use_ema=args.ema, device=args.device)
    print(format_predictions(rows, args.format))
    return 0


def cmd_attention(args) -> int:
    from .tools.attention import attention_maps

    res = attention_maps(args.source, args.image, out=args.out, tracking_uri=args.tracking_uri, which=args.which,
                         overrides=args.overrides, use_ema=args.ema, device=args.device)
    p = res["prediction"]
    what = "attention rollout" if res["kind"] == "vit_rollout" else f"Q-K attention of {', '.join(res['maps'])}"
    print(f"{what} -> {res['png']}  (predicted {p['class']} with p={p['prob']:.3f})")
    return 0


def cmd_spectrum(args) -> int:
    from .spectral import summarize
    from .tools import spectrum

    report, paths = spectrum(
        args.source, topk=args.topk, targets=args.targets, split_qkv=args.split_qkv, save_vectors=args.save_vectors,
        fmt=args.format, save_dir=args.save_dir, full=args.full, dtype=args.dtype,
        svd_on_cpu=args.svd_on_cpu or args.device in ("cpu", "auto"), pretrained=args.pretrained,
        tracking_uri=args.tracking_uri, which=args.which, use_ema=args.ema,
        device="cpu" if args.device == "auto" else args.device,
    )
    print(summarize(report))
    print("\nwrote " + ", ".join(str(p) for p in paths))
    return 0


def cmd_split_dataset(args) -> int:
    from .data.split import split_dataset

    r = split_dataset(args.data_dir, args.output_dir, val_ratio=args.val_ratio, seed=args.seed,
                      subset_size=args.subset_size, val_size=args.val_size, num_classes=args.num_classes,
                      copy=args.copy)
    if args.format == "json":
        print(json.dumps(r, indent=1))
        return 0
    print(f"{r['mode']}: {r['classes']} classes, {r['train']} train + {r['val']} val images -> {r['output_dir']}")
    if r["skipped_empty"]:
        print(f"skipped {len(r['skipped_empty'])} class folder(s) without images: {', '.join(r['skipped_empty'][:5])}")
    return 0


def register(sub) -> None:
    from .cli_checks import (existing_dir, existing_file, fraction, nonempty, output_dir, output_file, positive_int,
                             seed)

    v = sub.add_parser("validate", help="top-1/top-5/loss, per-class accuracy and a confusion matrix of a checkpoint")
    _source_args(v)
    v.add_argument("--data-dir", type=existing_dir, default=None, metavar="DIR",
                   help="validate on this ImageFolder (DIR/val/<class>/ or DIR/<class>/) instead of the "
                        "checkpoint's own validation split")
    v.add_argument("--out", type=output_dir, default=None, metavar="DIR",
                   help="where confusion_matrix.png and validate.json go (default ./validate_<model>/)")
    v.add_argument("--batch-size", type=positive_int, default=None, help="evaluation batch size (default data.eval_batch_size)")
    v.add_argument("--format", choices=["table", "json"], default="table")
    v.set_defaults(func=cmd_validate)

    p = sub.add_parser("predict", help="class names and probabilities for image files")
    _source_args(p)
    p.add_argument("images", nargs="+", metavar="IMAGE", type=existing_file)
    p.add_argument("--topk", type=positive_int, default=5)
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_predict)

    a = sub.add_parser("attention", help="attention map of one image: ViT rollout, or QKFormer Q-K attention per stage")
    _source_args(a)
    a.add_argument("image", metavar="IMAGE", type=existing_file)
    a.add_argument("--out", required=True, metavar="FILE.png", type=output_file)
    a.set_defaults(func=cmd_attention)

    s = sub.add_parser("spectrum", help="singular values of a model's weight matrices (offline)")
    _source_args(s, overrides=False)
    s.add_argument("--pretrained", action="store_true",
                   help="SOURCE is a timm model name whose pretrained weights are cached locally")
    s.add_argument("--topk", type=positive_int, default=8)
    s.add_argument("--targets", type=nonempty, default=None,
                   help="comma-separated module-name patterns (default: the model's spectral targets)")
    s.add_argument("--split-qkv", action="store_true", help="analyse fused qkv weights as separate q, k, v")
    s.add_argument("--save-vectors", action="store_true", help="also save the top/last-k singular vectors")
    s.add_argument("--format", choices=["json", "npz", "pt"], default="json",
                   help="vector file format with --save-vectors (json: npz)")
    s.add_argument("--save-dir", type=output_dir, default=".", help="where <model>_spectral.json goes (default .)")
    s.add_argument("--full", action="store_true", help="keep the whole spectrum per layer")
    s.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    s.add_argument("--svd-on-cpu", action="store_true", help="run the SVDs on the CPU (with --device cuda)")
    s.set_defaults(func=cmd_spectrum)

    d = sub.add_parser("split-dataset", help="split an ImageFolder into train/ and val/ per class (symlinks)")
    d.add_argument("--data-dir", type=existing_dir, required=True, help="flat <class>/ folder or a folder with train/")
    d.add_argument("--output-dir", type=output_dir, required=True, help="new (or empty) folder for train/ and val/")
    d.add_argument("--val-ratio", type=fraction, default=0.2)
    d.add_argument("--seed", type=seed, default=42)
    d.add_argument("--subset-size", type=positive_int, default=None, help="total train images (class-balanced)")
    d.add_argument("--val-size", type=positive_int, default=None, help="total val images (class-balanced)")
    d.add_argument("--num-classes", type=positive_int, default=None, help="keep this many classes (seeded)")
    d.add_argument("--copy", action="store_true", help="copy files instead of symlinking them")
    d.add_argument("--format", choices=["table", "json"], default="table")
    d.set_defaults(func=cmd_split_dataset)
