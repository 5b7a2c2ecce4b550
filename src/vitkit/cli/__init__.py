"""`vitkit` subcommands: thin wrappers over importable functions."""

from __future__ import annotations

import argparse
import logging
import sys

from ..allocator import keep_freed_memory
from . import analyze, bench, deploy, models, run
from .args import parse_overrides

__all__ = ["build_parser", "main", "parse_overrides"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitkit", description=__doc__)
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    # One adder per command, in the order `vitkit --help` lists them.
    for add in (
        models.add_models,
        models.add_create,
        models.add_convert,
        run.add_predict,
        deploy.add_export,
        deploy.add_serve,
        run.add_train,
        run.add_eval,
        analyze.add_analyze,
        bench.add_bench,
    ):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="vitkit: %(message)s")
    keep_freed_memory()  # the process is the command's: large activations are reused, not faulted in per batch
    try:
        status = args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError, ImportError) as e:
        print(f"vitkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    return status or 0
