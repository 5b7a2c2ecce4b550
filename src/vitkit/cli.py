"""`vitkit` subcommands: thin wrappers over importable functions."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path
from typing import Any

import yaml

from .checkpoints import convert, load_pretrained, save_pretrained
from .models import count_macs, create_model, list_models
from .models.variants import config_for
from .train.config import list_recipes

log = logging.getLogger("vitkit")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` pairs; values are read as YAML (`img_size=[384,384]`, `gelu=tanh`, `num_classes=10`)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected key=value")
        out[key.strip()] = yaml.safe_load(value)
    return out


def cmd_models(args: argparse.Namespace) -> None:
    import torch

    rows = []
    for name in list_models():
        if args.filter and args.filter.lower() not in name:
            continue
        cfg = config_for(name)
        with torch.device("meta"):
            params = sum(p.numel() for p in create_model(cfg).parameters())
        rows.append((name, params, count_macs(cfg) / 1e9, cfg))
    print(f"{'name':<14} {'params':>13} {'GMACs':>7}  width depth heads patch  stem")
    for name, params, gmacs, cfg in rows:
        stem = "-" if cfg.hybrid is None else "resnet " + (",".join(map(str, cfg.hybrid)) or "root only")
        print(
            f"{name:<14} {params:>13,} {gmacs:>7.2f}  {cfg.width:>5} {cfg.depth:>5} {cfg.heads:>5} {cfg.patch_size:>5}"
            f"  {stem}"
        )
    print("(224x224, 1000 classes; aliases such as ViT-B/16, ViT-B_16, vit_base_patch16_224, R50+ViT-B/16 work too)")


def cmd_create(args: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(args.seed)
    model = create_model(args.name, **parse_overrides(args.set))
    out = save_pretrained(model, args.out, to=args.to, overwrite=args.overwrite)
    print(f"wrote a freshly initialised {model.cfg.name or args.name} ({args.to}) to {out}")


def cmd_convert(args: argparse.Namespace) -> None:
    out = convert(args.src, args.dst, to=args.to, overwrite=args.overwrite, **parse_overrides(args.set))
    print(f"converted {args.src} -> {out} ({args.to})")


def cmd_predict(args: argparse.Namespace) -> None:
    from .predict import annotate, annotated_paths, class_names, expand_images, predict

    model = load_pretrained(args.model, **parse_overrides(args.set))
    paths = expand_images(args.images)
    targets = annotated_paths(paths, args.annotate, args.overwrite) if args.annotate else []  # before predicting
    results = predict(model, paths, args.topk, class_names(model, args.class_index))
    if args.annotate:
        written = [annotate(r.path, r, t) for r, t in zip(results, targets, strict=True) if not r.error]
        log.info("wrote %d annotated image(s) to %s", len(written), args.annotate)
    if args.format == "json":
        print(json.dumps([r.__dict__ for r in results], indent=2))
    elif args.format == "csv":
        w = csv.writer(sys.stdout)
        w.writerow(["path", "rank", "label", "prob", "error"])
        for r in results:
            for rank, (label, p) in enumerate(zip(r.labels, r.probs, strict=True), 1):
                w.writerow([r.path, rank, label, f"{p:.6f}", ""])
            if r.error:
                w.writerow([r.path, "", "", "", r.error])
    else:
        for r in results:
            print(r.path)
            if r.error:
                print(f"    could not read: {r.error}")
            for label, p in zip(r.labels, r.probs, strict=True):
                print(f"    {p:7.2%}  {label}")


def cmd_train(args: argparse.Namespace) -> None:
    from .train import load_config, run_config, train

    if args.resume:
        if args.recipe or args.set or args.data:
            raise ValueError("--resume continues a run with the config it was started with; drop DATA, --recipe, --set")
        if args.out is None:
            raise ValueError("--resume needs --out RUN_DIR (the run to continue)")
        cfg = run_config(args.out)
        out = args.out
    else:
        overrides = parse_overrides(args.set)
        if args.data is not None:
            overrides["data.path"] = args.data
        recipe = args.recipe or ("digits" if args.data is None else None)
        cfg = load_config(recipe, overrides)
        out = args.out or str(Path("runs") / (Path(str(recipe)).stem if recipe else Path(args.data).name))
    progress = "none" if args.quiet else args.progress
    summary = train(cfg, out, resume=args.resume, overwrite=args.overwrite, progress=progress)
    if progress == "json":
        print(json.dumps({"kind": "summary", **summary}))
    elif not summary.get("interrupted") and progress != "none":
        print(f"trained {summary['step']} steps; {out}/model holds the final weights")
        if "top1" in summary:
            print(f"val top-1 {summary['top1']:.2%}, top-5 {summary['top5']:.2%}, loss {summary['loss']:.4f}")


def cmd_eval(args: argparse.Namespace) -> None:
    import torch

    from .data import open_source
    from .evaluate import evaluate, summary, write_report
    from .plots import require_matplotlib

    if args.out:
        require_matplotlib()  # before the evaluation, not after it
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_pretrained(args.model, **parse_overrides(args.set))
    source = open_source(args.data, args.split, val_fraction=args.val_fraction, seed=args.split_seed)
    result = evaluate(
        model, source, batch_size=args.batch_size, workers=args.workers, device=device, precision=args.precision
    )
    if args.out:
        written = write_report(result, args.out)
        log.info("wrote %s", ", ".join(str(p) for p in written))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(f"{args.model} on {source.name}, {len(source.classes)} classes")
        print(summary(result))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitkit", description=__doc__)
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the named variants with parameter counts and GMACs")
    p.add_argument("filter", nargs="?", help="only names containing this text")
    p.set_defaults(func=cmd_models)

    set_help = "override a config field, key=value (repeatable), e.g. --set num_classes=10 --set img_size=384"
    p = sub.add_parser("create", help="build a named variant with fresh weights and save it")
    p.add_argument("name", help="variant name, e.g. vit_b16, ViT-B/16, vit_base_patch16_224, R50+ViT-B/16")
    p.add_argument("out", help="output path")
    p.add_argument("--to", default="vitkit", choices=["vitkit", "npz", "hf", "timm"])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_create)

    p = sub.add_parser("convert", help="convert a checkpoint of any supported format")
    p.add_argument("src", help="checkpoint file or directory (format detected)")
    p.add_argument("dst", help="output path")
    p.add_argument("--to", default="vitkit", choices=["vitkit", "npz", "hf", "timm"])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("predict", help="top-k classes for images, folders or globs")
    p.add_argument("model", help="checkpoint file or directory (any supported format)")
    p.add_argument("images", nargs="+")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--class-index", help="JSON of class names, e.g. ImageNet's imagenet_class_index.json")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.add_argument("--annotate", metavar="DIR", help="write copies of the images with the top-1 label drawn on")
    p.add_argument("--overwrite", action="store_true", help="replace existing files in the --annotate folder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("train", help="train from scratch or fine-tune; writes a run directory")
    p.add_argument("data", nargs="?", help="images to train on (as for eval); default: the embedded digits")
    p.add_argument("--recipe", help=f"a recipe YAML file or a built-in name ({', '.join(list_recipes())})")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="e.g. --set optim.lr=3e-4")
    p.add_argument("--out", help="the run directory (default: runs/<recipe or data name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete the run in --out and start over")
    p.add_argument("--progress", choices=["bar", "json", "none"], default="bar", help="json: one record per line")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="top-1/top-5 accuracy, loss and confusion matrix on a dataset")
    p.add_argument("model", help="checkpoint file or directory (any supported format)")
    p.add_argument("data", help="'digits', an image folder, CIFAR batches, an MNIST (IDX) folder or WebDataset tars")
    p.add_argument("--split", default="val", help="which split of the data (default: val)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held out of a tree without val/ (as in training)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of that split (as data.split_seed in training)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=0, help="decoding processes (0: decode in this process)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="fp16 needs a GPU")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:N")
    p.add_argument("--out", metavar="DIR", help="write metrics.json, confusion.csv and confusion.png here")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON instead of the summary")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="vitkit: %(message)s")
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError, ImportError) as e:
        print(f"vitkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
