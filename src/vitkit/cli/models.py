"""`vitkit models | create | convert`: the named variants, fresh models, and checkpoint conversion."""

from __future__ import annotations

import argparse

from ..checkpoints import convert, save_pretrained
from ..models import count_macs, create_model, list_models
from ..models.variants import config_for
from .args import Subparsers, add_set, parse_overrides


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


def add_models(sub: Subparsers) -> None:
    p = sub.add_parser("models", help="list the named variants with parameter counts and GMACs")
    p.add_argument("filter", nargs="?", help="only names containing this text")
    p.set_defaults(func=cmd_models)


def add_create(sub: Subparsers) -> None:
    p = sub.add_parser("create", help="build a named variant with fresh weights and save it")
    p.add_argument("name", help="variant name, e.g. vit_b16, ViT-B/16, vit_base_patch16_224, R50+ViT-B/16")
    p.add_argument("out", help="output path")
    p.add_argument("--to", default="vitkit", choices=["vitkit", "npz", "hf", "timm"])
    add_set(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_create)


def add_convert(sub: Subparsers) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint of any supported format")
    p.add_argument("src", help="checkpoint file or directory (format detected)")
    p.add_argument("dst", help="output path")
    p.add_argument("--to", default="vitkit", choices=["vitkit", "npz", "hf", "timm"])
    add_set(p)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_convert)
