"""Does pretraining pay? Fine-tune a checkpoint and train the same model from scratch, same recipe, same seeds.

    .venv/bin/python benchmarks/finetune_gain.py runs/bench-cifar10/model ../shared/datasets/hymenoptera_ants_bees \
        --recipe ants_bees --points 10 --seeds 0 1 2

Both runs use the recipe as it stands; the fine-tune adds only `model.init=PRETRAINED`. On a small validation
set (153 images for ants/bees) one seed says little, so each seed runs both and the goal is on the mean gain,
printed with its standard error over the seeds. Prints the top-1 figures, the gains in points, and one JSON line at
the end for programs.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch

from vitkit.cli import parse_overrides
from vitkit.train import load_config, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pretrained", help="the checkpoint to fine-tune (any format vitkit loads)")
    p.add_argument("data", help="the dataset (as `vitkit train DATA` takes it)")
    p.add_argument("--recipe", default="ants_bees", help="a built-in recipe name or a YAML file")
    p.add_argument("--points", type=float, required=True, help="top-1 gain (percentage points) the fine-tune must show")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train.seed of each pair of runs")
    p.add_argument("--out", default="runs/bench-finetune", help="parent of the run directories")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    args = p.parse_args()

    runs = []
    for seed in args.seeds:
        top1 = {}
        for name, init in (("finetuned", args.pretrained), ("scratch", None)):
            overrides = {"data.path": args.data, "model.init": init, "train.seed": seed, **parse_overrides(args.set)}
            start = time.perf_counter()
            summary = train(
                load_config(args.recipe, overrides), Path(args.out) / f"{name}-{seed}", overwrite=True, progress="none"
            )
            top1[name] = summary["top1"]
            print(f"seed {seed} {name:>9}: top-1 {top1[name]:.2%} in {(time.perf_counter() - start) / 60:.1f} min")
        runs.append({"seed": seed, **top1, "gain_points": 100 * (top1["finetuned"] - top1["scratch"])})
        print(f"seed {seed}: fine-tuned - scratch = {runs[-1]['gain_points']:+.1f} points", flush=True)

    gains = [r["gain_points"] for r in runs]
    gain = statistics.fmean(gains)
    # how far the mean of these seeds may be from the mean over all seeds: the seeds' spread / sqrt(their number)
    sem = statistics.stdev(gains) / math.sqrt(len(gains)) if len(gains) > 1 else None
    sem_text = "" if sem is None else f", standard error {sem:.1f}"
    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"mean over {len(runs)} seeds: fine-tuned - scratch = {gain:+.1f} points{sem_text} (goal >= {args.points:g})")
    ok = gain >= args.points
    print("GOAL MET" if ok else "GOAL MISSED")
    record = {"recipe": args.recipe, "runs": runs, "mean_gain_points": gain, "gain_sem_points": sem}
    print(json.dumps({**record, "goal_points": args.points, "met": ok}))


if __name__ == "__main__":
    main()
