"""Train a recipe from scratch and check it against its goal: accuracy reached within a time budget.

    .venv/bin/python benchmarks/train_accuracy.py fashion_mnist ../shared/datasets/fashion_mnist \
        --goal 0.93 --minutes 30 --peer 0.93

The peer figure is the published accuracy of comparable models (REFERENCE.md section 4), printed beside
vitkit's with their ratio. Prints one JSON line at the end for programs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from vitkit.cli import parse_overrides
from vitkit.train import load_config, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="a built-in recipe name or a YAML file")
    p.add_argument("data", help="the dataset (as `vitkit train DATA` takes it)")
    p.add_argument("--goal", type=float, required=True, help="val/test top-1 the run must reach")
    p.add_argument("--minutes", type=float, required=True, help="wall-clock budget for the whole run")
    p.add_argument("--peer", type=float, help="published top-1 of a comparable model, for the ratio")
    p.add_argument("--out", help="run directory (default: runs/bench-<recipe>)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    args = p.parse_args()

    cfg = load_config(args.recipe, {"data.path": args.data, **parse_overrides(args.set)})
    out = args.out or f"runs/bench-{os.path.basename(args.recipe).removesuffix('.yaml')}"
    start = time.perf_counter()
    summary = train(cfg, out, overwrite=True, progress="bar")
    minutes = (time.perf_counter() - start) / 60
    top1 = summary["top1"]
    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{args.recipe}: top-1 {top1:.2%} in {minutes:.1f} min (goal {args.goal:.2%} within {args.minutes:g} min)")
    if args.peer:
        print(f"published peer {args.peer:.2%}; vitkit / peer = {top1 / args.peer:.3f}")
    ok = top1 >= args.goal and minutes <= args.minutes
    print("GOAL MET" if ok else "GOAL MISSED")
    record = {"recipe": args.recipe, "top1": top1, "minutes": minutes, "goal": args.goal, "budget": args.minutes}
    print(json.dumps({**record, "peer": args.peer, "met": ok}))


if __name__ == "__main__":
    main()
