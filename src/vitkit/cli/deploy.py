"""`vitkit export | serve`: an ONNX graph, and an HTTP prediction service."""

from __future__ import annotations

import argparse

from ..checkpoints import load_pretrained
from .args import Subparsers, add_flip, add_precision, add_set, parse_overrides


def cmd_export(args: argparse.Namespace) -> None:
    from ..export import export_onnx

    model = load_pretrained(args.model, **parse_overrides(args.set))
    out = export_onnx(model, args.out, opset=args.opset, dynamic_size=args.dynamic_size, overwrite=args.overwrite)
    h, w = model.cfg.img_size
    size = f"any height and width divisible by {model.cfg.stride}" if args.dynamic_size else f"{h}x{w} only"
    print(f"wrote {out} (ONNX opset {args.opset}; input 'images': any batch, {size})")


def cmd_serve(args: argparse.Namespace) -> None:
    from ..serve import serve
    from ..serve.app import Limits

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
        precision=args.precision,
        flip=args.flip,
    )


def add_export(sub: Subparsers) -> None:
    p = sub.add_parser("export", help="write an ONNX graph (dynamic batch; --dynamic-size: any height and width)")
    p.add_argument("model", help="checkpoint file or directory (any supported format)")
    p.add_argument("out", help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset, 18 or newer (default 18)")
    p.add_argument("--dynamic-size", action="store_true", help="accept any input size divisible by the token stride")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    add_set(p)
    p.set_defaults(func=cmd_export)


def add_serve(sub: Subparsers) -> None:
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
    add_precision(p)
    add_flip(p)
    add_set(p)
    p.set_defaults(func=cmd_serve)
