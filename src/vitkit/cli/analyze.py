"""`vitkit analyze attention | distance | posembed | filters`: the paper's figures (Fig. 6, Fig. 7) from any
checkpoint, as PNG and JSON."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..checkpoints import load_pretrained
from .args import Subparsers, add_set, parse_overrides


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

    from ..plots import require_matplotlib

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
    from ..analysis import attention_maps, load_images
    from ..analysis.figures import heads_figure, rollout_figure
    from ..models.vit import layer_indices
    from ..predict import expand_images

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
    from ..analysis import mean_attention_distance, sample_batches
    from ..analysis.figures import distance_figure
    from ..data import open_source

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
    from ..analysis import grid_for_size, posembed_similarity
    from ..analysis.figures import posembed_figure

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
    from ..analysis import filter_components
    from ..analysis.figures import filters_figure

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


def add_analyze(sub: Subparsers) -> None:
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
        add_set(q)

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
