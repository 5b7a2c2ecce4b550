"""`vitkit` subcommands: thin wrappers over importable functions."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from collections.abc import Iterator
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

    if args.backend == "onnx":
        from .onnx_model import OnnxModel

        if args.set:
            raise ValueError("--set changes the config, which an exported ONNX graph has fixed; export again instead")
        model = OnnxModel(args.model)
    elif Path(args.model).suffix.lower() == ".onnx":
        raise ValueError(f"{args.model} is an ONNX graph; run it with --backend onnx")
    else:
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


def cmd_export(args: argparse.Namespace) -> None:
    from .export import export_onnx

    model = load_pretrained(args.model, **parse_overrides(args.set))
    out = export_onnx(model, args.out, opset=args.opset, dynamic_size=args.dynamic_size, overwrite=args.overwrite)
    h, w = model.cfg.img_size
    size = f"any height and width divisible by {model.cfg.stride}" if args.dynamic_size else f"{h}x{w} only"
    print(f"wrote {out} (ONNX opset {args.opset}; input 'images': any batch, {size})")


def cmd_serve(args: argparse.Namespace) -> None:
    from .serve import serve
    from .serve.app import Limits

    model = load_pretrained(args.model, **parse_overrides(args.set))
    limits = Limits(max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=args.max_pixels)
    serve(
        model,
        args.host,
        args.port,
        access_log=args.access_log,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        limits=limits,
        name=args.name or args.model,
    )


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
    if summary["skipped"]:
        log.warning("skipped %d unreadable image(s), listed in %s", summary["skipped"], Path(out) / "skipped.tsv")


def cmd_eval(args: argparse.Namespace) -> None:
    import torch

    from .data import open_source
    from .evaluate import check_report_dir, evaluate, summary, write_report
    from .plots import require_matplotlib

    if args.out:
        require_matplotlib()  # before the evaluation, not after it
        check_report_dir(args.out, args.overwrite)
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


# ---- analyze: the paper's figures (Fig. 6, Fig. 7) --------------------------------------------------------------


def _analysis_targets(out_dir: str, names: list[str], overwrite: bool) -> list[Path]:
    """Output paths in out_dir; refuses, before any work, to replace existing files unless `overwrite`."""
    targets = [Path(out_dir) / name for name in names]
    existing = [t for t in targets if t.exists()]
    if existing and not overwrite:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise FileExistsError(f"{existing[0]}{more} exist; refusing to overwrite (pass --overwrite)")
    return targets


def _write_json(path: Path, record: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record) + "\n")
    return path


def _analysis_model(args: argparse.Namespace) -> Any:
    import torch

    from .plots import require_matplotlib

    require_matplotlib()  # before loading and computing, not after
    model = load_pretrained(args.model, **parse_overrides(args.set))
    device = getattr(args, "device", "cpu")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device)


def _parse_layers(spec: str | None, depth: int) -> list[int]:
    if not spec:
        return []
    if spec == "all":
        return list(range(depth))
    try:
        return [int(item) for item in spec.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"--layers {spec!r}: expected 'all' or comma-separated layer numbers, e.g. 0,5,-1") from None


def cmd_analyze_attention(args: argparse.Namespace) -> None:
    from .analysis import attention_maps, load_images
    from .analysis.figures import heads_figure, rollout_figure
    from .models.vit import layer_indices
    from .predict import expand_images

    if not 0.0 <= args.discard < 1.0:
        raise ValueError(f"--discard {args.discard}: expected a fraction in [0, 1)")
    model = _analysis_model(args)
    paths = expand_images(args.images)
    if not paths:
        raise FileNotFoundError(f"no images in {' '.join(args.images)}")
    layers = layer_indices(_parse_layers(args.layers, model.cfg.depth), model.cfg.depth)
    names = ["attention.png", "attention.json"] + [f"attention_heads_{i}.png" for i in range(len(paths)) if layers]
    targets = _analysis_targets(args.out, names, args.overwrite)
    inputs, pictures = load_images(model, paths)
    maps = attention_maps(model, inputs, args.fusion, args.discard, layers, args.batch_size)
    discard = f", lowest {args.discard:.0%} discarded" if args.discard else ""
    title = f"attention rollout ({args.fusion} over heads{discard}; {model.cfg.pool} pooling)"
    rollout_figure(pictures, maps.rollout, targets[0], [p.name for p in paths], title)
    for i, (path, target) in enumerate(zip(paths, targets[2:], strict=False)):
        heads_figure(maps.heads[i], maps.layers, target, f"{path.name}: attention of the pooled output per head")
    record = {
        "model": str(args.model),
        "fusion": args.fusion,
        "discard": args.discard,
        "pool": model.cfg.pool,
        "grid": list(maps.grid),
        "layers": maps.layers,
        "images": [
            {"path": str(p), "rollout": maps.rollout[i].tolist(), "heads": maps.heads[i].tolist()}
            for i, p in enumerate(paths)
        ],
    }
    _write_json(targets[1], record)
    print("wrote " + ", ".join(str(t) for t in targets))


def cmd_analyze_distance(args: argparse.Namespace) -> None:
    from .analysis import mean_attention_distance, sample_batches
    from .analysis.figures import distance_figure
    from .data import open_source

    model = _analysis_model(args)
    targets = _analysis_targets(args.out, ["distance.png", "distance.json"], args.overwrite)
    source = open_source(args.data, args.split, val_fraction=args.val_fraction, seed=args.split_seed)
    counted = []

    def counting(batches: Iterator[Any]) -> Iterator[Any]:  # how many images were measured (unreadable: skipped)
        for batch in batches:
            counted.append(len(batch))
            yield batch

    batches = sample_batches(model, source, args.images, args.batch_size, args.seed)
    distances = mean_attention_distance(model, counting(batches))
    cfg = model.cfg
    n = sum(counted)
    title = f"mean attention distance over {n} images of {source.name} ({cfg.img_size[0]}x{cfg.img_size[1]} px)"
    distance_figure(distances, targets[0], title)
    record = {
        "model": str(args.model),
        "data": source.name,
        "images": n,
        "img_size": list(cfg.img_size),
        "grid": list(cfg.grid),
        "patch_px": cfg.stride,
        "distance_px": distances.tolist(),
    }
    _write_json(targets[1], record)
    print("wrote " + ", ".join(str(t) for t in targets))


def cmd_analyze_posembed(args: argparse.Namespace) -> None:
    from .analysis import grid_for_size, posembed_similarity
    from .analysis.figures import posembed_figure

    model = _analysis_model(args)
    cfg = model.cfg
    grids = [cfg.grid]
    size = tuple(args.size) if args.size else (args.img_size, args.img_size) if args.img_size else None
    if size is not None and grid_for_size(model, size) != cfg.grid:
        grids.append(grid_for_size(model, size))
    names = []
    for grid in grids:
        stem = "posembed" if grid == cfg.grid else f"posembed_{grid[0] * cfg.stride}x{grid[1] * cfg.stride}"
        names += [f"{stem}.png", f"{stem}.json"]
    targets = _analysis_targets(args.out, names, args.overwrite)
    for grid, png, js in zip(grids, targets[::2], targets[1::2], strict=True):
        similarity = posembed_similarity(model, grid)
        how = "" if grid == cfg.grid else f", resampled from {cfg.grid[0]}x{cfg.grid[1]}"
        title = f"position embedding similarity ({grid[0]}x{grid[1]} grid{how}; {cfg.pos_embed})"
        posembed_figure(similarity, png, title)
        record = {
            "model": str(args.model),
            "pos_embed": cfg.pos_embed,
            "img_size": [grid[0] * cfg.stride, grid[1] * cfg.stride],
            "grid": list(grid),
            "model_grid": list(cfg.grid),
            "similarity": similarity.tolist(),
        }
        _write_json(js, record)
    print("wrote " + ", ".join(str(t) for t in targets))


def cmd_analyze_filters(args: argparse.Namespace) -> None:
    from .analysis import filter_components
    from .analysis.figures import filters_figure

    model = _analysis_model(args)
    components, ratios = filter_components(model, args.count)  # a hybrid is refused here, before the files
    targets = _analysis_targets(args.out, ["filters.png", "filters.json"], args.overwrite)
    p, c = components.shape[1], components.shape[3]
    title = f"patch-embedding filters ({p}x{p}x{c}): first {len(components)} principal components"
    filters_figure(components, ratios, targets[0], title)
    record = {
        "model": str(args.model),
        "patch_size": p,
        "channels": c,
        "count": len(components),
        "explained_variance_ratio": ratios.tolist(),
        "components": components.tolist(),
    }
    _write_json(targets[1], record)
    print("wrote " + ", ".join(str(t) for t in targets))


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
    p.add_argument(
        "--backend", choices=["torch", "onnx"], default="torch", help="onnx: MODEL is a file from `vitkit export`"
    )
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="write an ONNX graph (dynamic batch; --dynamic-size: any height and width)")
    p.add_argument("model", help="checkpoint file or directory (any supported format)")
    p.add_argument("out", help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset, 18 or newer (default 18)")
    p.add_argument("--dynamic-size", action="store_true", help="accept any input size divisible by the token stride")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="an HTTP prediction service with a web page (POST /predict, GET /health, /model)")
    p.add_argument("model", help="checkpoint file or directory (any supported format)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="most requests per forward pass; 1 turns batching off")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest upload accepted (MiB)")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image accepted (width x height)")
    p.add_argument("--access-log", action="store_true", help="log one line per request")
    p.add_argument("--name", help="what the page and GET /model call the model (default: MODEL as given)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    p.set_defaults(func=cmd_serve)

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
    p.add_argument(
        "--out", metavar="DIR", help="write metrics.json, confusion.csv, confusion.png (and skipped.tsv) here"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing report in --out")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON instead of the summary")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("analyze", help="the paper's analyses as figures (PNG) and numbers (JSON)")
    analyses = p.add_subparsers(dest="analysis", required=True)

    def analysis_parser(name: str, text: str) -> argparse.ArgumentParser:
        q = analyses.add_parser(name, help=text)
        q.add_argument("model", help="checkpoint file or directory (any supported format)")
        return q

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "--out", default="analysis", metavar="DIR", help="folder for the PNG and JSON (default: analysis)"
        )
        q.add_argument("--overwrite", action="store_true", help="replace existing output files")
        q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)

    q = analysis_parser("attention", "attention rollout over each image (paper Fig. 6) and per-head maps")
    q.add_argument("images", nargs="+", help="image files, folders or globs")
    q.add_argument("--fusion", choices=["mean", "max", "min"], default="mean", help="how heads are fused")
    q.add_argument("--discard", type=float, default=0.0, help="fraction of lowest attentions zeroed per layer")
    q.add_argument("--layers", metavar="all|I,J,...", help="also draw each head's raw attention of these layers")
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    common(q)
    q.set_defaults(func=cmd_analyze_attention)

    q = analysis_parser("distance", "mean attention distance of every head against depth (paper Fig. 7 right)")
    q.add_argument("data", help="'digits', an image folder, CIFAR batches, an MNIST (IDX) folder or WebDataset tars")
    q.add_argument("--split", default="val", help="which split of the data (default: val)")
    q.add_argument("--val-fraction", type=float, default=0.1, help="held out of a tree without val/ (as in training)")
    q.add_argument("--split-seed", type=int, default=0, help="seed of that split (as data.split_seed in training)")
    q.add_argument("--images", type=int, default=128, help="images drawn at random from the split (paper: 128)")
    q.add_argument("--seed", type=int, default=0, help="seed of that draw")
    q.add_argument("--batch-size", type=int, default=16)
    q.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    common(q)
    q.set_defaults(func=cmd_analyze_distance)

    q = analysis_parser("posembed", "cosine similarity of the position embeddings (paper Fig. 7 centre)")
    size = q.add_mutually_exclusive_group()
    size.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="also resampled for this input size")
    size.add_argument("--img-size", type=int, metavar="N", help="also resampled for an N x N input")
    common(q)
    q.set_defaults(func=cmd_analyze_posembed)

    q = analysis_parser("filters", "principal components of the patch-embedding filters (paper Fig. 7 left)")
    q.add_argument("--count", type=int, default=28, help="components to draw (default 28, as the paper)")
    common(q)
    q.set_defaults(func=cmd_analyze_filters)
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
