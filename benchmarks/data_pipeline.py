"""The input pipeline measured on its own, then the data wait of real ViT-S/16 training (issue 7, "Data").

    .venv/bin/python benchmarks/data_pipeline.py                  # the full table and the data wait (slow)
    .venv/bin/python benchmarks/data_pipeline.py --datasets ants --workers 0 1 --batches 4 --wait-steps 0

The table: images/s of decode + crop (loader workers, as `vitkit.data.batches`) followed by the batched augment +
normalise on the device (`DeviceAugment`, as the training loop calls it), with no model, for each dataset, image
size, augmentation and number of loader workers; "per worker" divides by the decoding processes (the main process
when workers=0). The peer of each row is the same pipeline decoding in the main process (workers=0), measured in
the same run: "x w0" is the speed-up over it. "wait" and "augment" split the wall time: with workers=0 "wait" is
all of decode + crop, with workers it is the part the workers did not hide. "epochs" counts the epochs begun
inside the timed window (the workers carry on across them, as in training). With `--cache SIZE` (as `data.cache`)
and a `--warmup` of an epoch or more (several with workers: each keeps what it decoded), the rows time the
pipeline cropping decoded images from memory:

    .venv/bin/python benchmarks/data_pipeline.py --datasets ants --warmup 24 --batches 30 --cache 512MiB --wait-steps 0

Datasets:
  ants   ../shared/datasets/hymenoptera_ants_bees: 245 training photos, JPEGs of about 500x375, at 224 px
  cifar  CIFAR-10 as an ImageFolder tree, 50,000 training JPEGs of 32x32, at 32 px (native) and 224 px; make it
         with `python ../shared/datasets/cifar10_jpeg/to_imagefolder.py /work/cifar10`

The data wait: a few steps of `vitkit train` (the loop itself) of ViT-S/16 at 224 px on ants/bees with the
`ants_bees` recipe's workers, batch, augmentation and precision, and the share of wall time the loop waited for
its next batch, as it writes it to metrics.jsonl (issue 7's goal: at most 5%). The recipe has 7 steps an epoch, so
take --wait-steps 8 or more to include an epoch's cold first batch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from dataclasses import asdict
from pathlib import Path

import torch

from vitkit.bench.data import PipelineSpeed, pipeline_speed, training_data_wait
from vitkit.cli import parse_overrides
from vitkit.sizes import format_size, parse_size
from vitkit.train import load_config
from vitkit.train.config import AugmentConfig

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
MAKE_CIFAR = "python ../shared/datasets/cifar10_jpeg/to_imagefolder.py /work/cifar10"


def augment_config(name: str) -> AugmentConfig | bool:
    """off: the evaluation path; basic: AugmentConfig's defaults (crop 0.08-1, flips); else a recipe's section."""
    if name == "off":
        return False
    if name == "basic":
        return AugmentConfig()
    return load_config(name, {"model.init": None}).augment


def row(dataset: str, aug: str, r: PipelineSpeed, base: PipelineSpeed | None) -> str:
    speedup = f"{r.images_per_s / base.images_per_s:.2f}" if base is not None else "-"
    size = "x".join(map(str, r.img_size))
    return (
        f"{dataset:<6} {size:>7} {aug:>8} {r.workers:>7} {r.images:>6} {r.seconds:>7.2f} {r.images_per_s:>8.1f} "
        f"{r.images_per_s_per_worker:>10.1f} {speedup:>5} {100 * r.wait_seconds / r.seconds:>5.0f}% "
        f"{100 * r.augment_seconds / r.seconds:>7.0f}% {r.epoch_starts:>6}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", choices=["ants", "cifar"], default=["ants", "cifar"])
    p.add_argument("--ants", default=str(SHARED / "hymenoptera_ants_bees"), help="the ants/bees ImageFolder tree")
    p.add_argument("--cifar", default="/work/cifar10", help="CIFAR-10 as an ImageFolder tree")
    p.add_argument("--ants-sizes", type=int, nargs="+", default=[224])
    p.add_argument("--cifar-sizes", type=int, nargs="+", default=[32, 224])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader worker counts")
    p.add_argument("--batch", type=int, default=64, help="images per batch")
    p.add_argument("--batches", type=int, default=20, help="timed batches per row, after the warm-up")
    p.add_argument("--warmup", type=int, default=1, help="untimed batches per row first")
    p.add_argument(
        "--cache", default="0", metavar="SIZE",
        help="decoded-image cache per decoding process, as data.cache (e.g. 256MiB); with --warmup of an epoch or "
        "more, the rows time cropping from memory",
    )  # fmt: skip
    p.add_argument(
        "--augment", nargs="+", default=["basic"], help="off (evaluation path), basic (crop + flip) or a recipe name"
    )
    p.add_argument("--device", default="cpu", help="where the augmentation runs (cpu, cuda)")
    p.add_argument("--wait-steps", type=int, default=8, help="timed training steps for the data wait (0: skip it)")
    p.add_argument("--wait-recipe", default="ants_bees", help="the recipe of the data-wait run")
    p.add_argument("--wait-model", default="vit_s16")
    p.add_argument("--wait-size", type=int, default=224)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="data-wait overrides")
    p.add_argument("--json", action="store_true", help="also print every result as a JSON line")
    args = p.parse_args()
    try:
        cache_bytes = parse_size(args.cache)
    except ValueError as e:
        p.error(f"--cache: {e}")

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, augment on {args.device}, "
        f"{args.warmup} warm-up batches, cache {format_size(cache_bytes) if cache_bytes else 'none'}"
    )
    datasets = {"ants": (args.ants, args.ants_sizes), "cifar": (args.cifar, args.cifar_sizes)}
    header = f"{'data':<6} {'size':>7} {'augment':>8} {'workers':>7} {'images':>6} {'s':>7} {'img/s':>8} "
    print(header + f"{'per worker':>10} {'x w0':>5} {'wait':>6} {'augment':>8} {'epochs':>6}")
    results = []
    for name in args.datasets:
        path, sizes = datasets[name]
        if not Path(path).exists():
            print(f"{name}: {path} not found, skipped" + (f" (make it with `{MAKE_CIFAR}`)" if name == "cifar" else ""))
            continue
        for size in sizes:
            for aug in args.augment:
                base = None
                for workers in args.workers:
                    r = pipeline_speed(
                        path, img_size=size, batch_size=args.batch, workers=workers, augment=augment_config(aug),
                        num_batches=args.batches, warmup_batches=args.warmup, cache_bytes=cache_bytes,
                        device=args.device,
                    )  # fmt: skip
                    base = r if workers == 0 else base
                    print(row(name, aug, r, base), flush=True)
                    results.append({"kind": "pipeline", "name": name, "augment_name": aug, **asdict(r)})

    if args.wait_steps > 0:
        overrides = {
            "data.path": args.ants, "model.name": args.wait_model, "model.img_size": args.wait_size,
            "model.overrides": {}, "model.init": None, **parse_overrides(args.set),
        }  # fmt: skip
        cfg = load_config(args.wait_recipe, overrides)
        w = training_data_wait(cfg, steps=args.wait_steps)
        print(
            f"data wait: {cfg.model.name} training at {args.wait_size} px on {args.ants}, recipe {args.wait_recipe} "
            f"({cfg.data.workers} workers, batch {cfg.train.batch_size}, {cfg.train.precision}), {w.steps} steps "
            f"after 1 warm-up: {w.images_per_s:.1f} images/s, waited {w.wait_seconds:.2f} s of {w.seconds:.2f} s = "
            f"{100 * w.fraction:.1f}% (goal <= 5%); per step: {' '.join(f'{100 * f:.1f}%' for f in w.per_step)}"
        )
        results.append({"kind": "data_wait", "recipe": args.wait_recipe, "model": cfg.model.name, **asdict(w)})
    if args.json:
        for r in results:
            print(json.dumps(r))


if __name__ == "__main__":
    main()
