"""What several subcommands share: `--set key=value` overrides and the help that goes with them."""

from __future__ import annotations

import argparse
from typing import Any

import yaml

# `sub.add_parser(...)` of the top-level parser; each command module registers its parsers on it.
Subparsers = argparse._SubParsersAction

SET_HELP = "override a config field, key=value (repeatable), e.g. --set num_classes=10 --set img_size=384"


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` pairs; values are read as YAML (`img_size=[384,384]`, `gelu=tanh`, `num_classes=10`)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected key=value")
        out[key.strip()] = yaml.safe_load(value)
    return out


def add_set(p: argparse.ArgumentParser) -> None:
    """The `--set KEY=VALUE` option of the commands that build or load a model."""
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)


def add_precision(p: argparse.ArgumentParser, gpu: bool = False) -> None:
    """The `--precision` option of the commands that classify images (`vitkit.evaluate.inference_model`); `gpu`
    adds fp16, for a command that can run on a GPU."""
    choices = ["fp32", "bf16", "int8"] + (["fp16"] if gpu else [])
    more = "; fp16: autocast on a GPU" if gpu else ""
    p.add_argument(
        "--precision",
        choices=choices,
        default="fp32",
        help=f"bf16: autocast, faster on CPUs with bf16 units; int8: the dense layers in int8 (CPU){more}",
    )


def add_flip(p: argparse.ArgumentParser) -> None:
    """The `--flip` option of the commands that classify images (`vitkit.evaluate.class_scores`)."""
    p.add_argument(
        "--flip", action="store_true", help="average each image's probabilities with its mirror image's (2x compute)"
    )
