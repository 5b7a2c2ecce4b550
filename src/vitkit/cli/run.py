"""`vitkit predict | train | eval`: use a model on images, train one, and measure its accuracy."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path

from ..checkpoints import load_pretrained
from ..train.config import list_recipes
from .args import Subparsers, add_flip, add_precision, add_set, parse_overrides

log = logging.getLogger("vitkit")


def cmd_predict(args: argparse.Namespace) -> int:
    """Exits 1 when an image could not be read, after predicting on the rest (as `cp` or `gzip` do)."""
    from ..predict import annotate, annotated_paths, class_names, expand_images, predict

    if args.backend == "onnx":
        from ..onnx_model import OnnxModel

        if args.set:
            raise ValueError("--set changes the config, which an exported ONNX graph has fixed; export again instead")
        model = OnnxModel(args.model)
    elif Path(args.model).suffix.lower() == ".onnx":
        raise ValueError(f"{args.model} is an ONNX graph; run it with --backend onnx")
    else:
        model = load_pretrained(args.model, **parse_overrides(args.set))
    paths = expand_images(args.images)
    targets = annotated_paths(paths, args.annotate, args.overwrite) if args.annotate else []  # before predicting
    names = class_names(model, args.class_index)
    results = predict(model, paths, args.topk, names, precision=args.precision, flip=args.flip)
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
    unread = sum(bool(r.error) for r in results)
    if unread:
        log.warning("could not read %d of %d image(s)", unread, len(results))
    return 1 if unread else 0


def cmd_train(args: argparse.Namespace) -> None:
    from ..train import load_config, run_config, train

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
    if summary["skipped"]:
        log.warning("skipped %d unreadable image(s), listed in %s", summary["skipped"], Path(out) / "skipped.tsv")


def cmd_eval(args: argparse.Namespace) -> None:
    import torch

    from ..data import open_source
    from ..evaluate import check_report_dir, evaluate, summary, write_report
    from ..plots import require_matplotlib

    if args.out:
        require_matplotlib()  # before the evaluation, not after it
        check_report_dir(args.out, args.overwrite)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_pretrained(args.model, **parse_overrides(args.set))
    source = open_source(args.data, args.split, val_fraction=args.val_fraction, seed=args.split_seed)
    result = evaluate(
        model, source, batch_size=args.batch_size, workers=args.workers, device=device, precision=args.precision,
        flip=args.flip,
    )  # fmt: skip
    if args.out:
        written = write_report(result, args.out)
        log.info("wrote %s", ", ".join(str(p) for p in written))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(f"{args.model} on {source.name}, {len(source.classes)} classes")
        print(summary(result))


def add_predict(sub: Subparsers) -> None:
    p = sub.add_parser("predict", help="top-k classes for images, folders or globs")
    p.add_argument("model", help="checkpoint file or directory (any supported format)")
    p.add_argument("images", nargs="+")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--class-index", help="JSON of class names, e.g. ImageNet's imagenet_class_index.json")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.add_argument("--annotate", metavar="DIR", help="write copies of the images with the top-1 label drawn on")
    p.add_argument("--overwrite", action="store_true", help="replace existing files in the --annotate folder")
    add_precision(p)
    add_flip(p)
    add_set(p)
    p.add_argument(
        "--backend", choices=["torch", "onnx"], default="torch", help="onnx: MODEL is a file from `vitkit export`"
    )
    p.set_defaults(func=cmd_predict)


def add_train(sub: Subparsers) -> None:
    p = sub.add_parser("train", help="train from scratch or fine-tune; writes a run directory")
    p.add_argument("data", nargs="?", help="images to train on (as for eval); default: the embedded digits")
    p.add_argument("--recipe", help=f"a recipe YAML file or a built-in name ({', '.join(list_recipes())})")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="e.g. --set optim.lr=3e-4")
    p.add_argument("--out", help="the run directory (default: runs/<recipe or data name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete the run in --out and start over")
    p.add_argument(
        "--progress", choices=["bar", "json", "none"], default="bar",
        help="bar: a progress bar (on a log file, a plain line per record); json: one record per line",
    )  # fmt: skip
    p.set_defaults(func=cmd_train)


def add_eval(sub: Subparsers) -> None:
    p = sub.add_parser("eval", help="top-1/top-5 accuracy, loss and confusion matrix on a dataset")
    p.add_argument("model", help="checkpoint file or directory (any supported format)")
    p.add_argument("data", help="'digits', an image folder, CIFAR batches, an MNIST (IDX) folder or WebDataset tars")
    p.add_argument("--split", default="val", help="which split of the data (default: val)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held out of a tree without val/ (as in training)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of that split (as data.split_seed in training)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=0, help="decoding processes (0: decode in this process)")
    add_precision(p, gpu=True)
    add_flip(p)
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:N")
    p.add_argument(
        "--out", metavar="DIR", help="write metrics.json, confusion.csv, confusion.png (and skipped.tsv) here"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing report in --out")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON instead of the summary")
    add_set(p)
    p.set_defaults(func=cmd_eval)
