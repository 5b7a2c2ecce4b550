"""Do the fast inference modes change the answers? The same images through a model in fp32 and in each faster
mode: bf16 autocast (`vitkit eval --precision bf16`), bf16 weights (`vitkit bench --dtype bf16`) and int8 dense
layers (`vitkit eval --precision int8`, `vitkit.models.quantize`): top-1 agreement with fp32, logit differences,
and each one's accuracy.

    .venv/bin/python benchmarks/precision_agreement.py runs/bench-cifar10/model /work/cifar10 --split test
    .venv/bin/python benchmarks/precision_agreement.py MODEL DATA --modes int8    # where bf16 is emulated (AVX2)

Prints one line per mode and one JSON line at the end for programs.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch

from vitkit.checkpoints import load_pretrained
from vitkit.data import batches, open_source
from vitkit.data.augment import normalize
from vitkit.evaluate import autocast
from vitkit.models.quantize import quantize_int8

MODES = ("bf16-autocast", "bf16-weights", "int8")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a trained model (any format vitkit loads)")
    p.add_argument("data", help="labelled images (as `vitkit eval` takes them)")
    p.add_argument("--split", default="val")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--limit", type=int, default=None, help="stop after this many images")
    args = p.parse_args()

    model = load_pretrained(args.model).eval()
    runs = {mode: _runner(mode, model, args.model) for mode in args.modes}
    source = open_source(args.data, args.split)
    prep = model.preprocess
    logits: dict[str, list[torch.Tensor]] = {"fp32": [], **{mode: [] for mode in runs}}
    labels = []
    with torch.inference_mode():
        for batch in batches(
            source, batch_size=args.batch_size, img_size=prep.img_size, channels=model.cfg.in_chans, train=False,
            preprocess=prep,
        ):  # fmt: skip
            x = normalize(torch.as_tensor(batch.images), prep.mean, prep.std)
            logits["fp32"].append(model(x))
            for mode, run in runs.items():
                logits[mode].append(run(x).float())
            labels.append(torch.as_tensor(batch.labels))
            if args.limit and sum(len(y) for y in labels) >= args.limit:
                break
    y = torch.cat(labels)
    fp32 = torch.cat(logits.pop("fp32"))
    record = {"images": len(y), "top1_fp32": (fp32.argmax(1) == y).float().mean().item()}
    record["mean_abs_logit"] = fp32.abs().mean().item()
    print(f"{len(y)} images of {source.name}: fp32 top-1 {record['top1_fp32']:.2%}, mean |logit| "
          f"{record['mean_abs_logit']:.2f}")  # fmt: skip
    for mode, parts in logits.items():
        fast = torch.cat(parts)
        diff = (fast - fp32).abs()
        record[mode] = {
            "top1": (fast.argmax(1) == y).float().mean().item(),
            "top1_agreement": (fp32.argmax(1) == fast.argmax(1)).float().mean().item(),
            "max_abs_logit_diff": diff.max().item(),
            "mean_abs_logit_diff": diff.mean().item(),
        }
        r = record[mode]
        print(
            f"{mode:<13}: top-1 {r['top1']:.2%}, agreement with fp32 {r['top1_agreement']:.2%}, "
            f"|logit - fp32| max {r['max_abs_logit_diff']:.3f} mean {r['mean_abs_logit_diff']:.4f}"
        )
    print(json.dumps(record))


def _runner(mode: str, model: torch.nn.Module, path: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The forward pass of `model` (loaded from `path`) in `mode`."""
    if mode == "int8":
        return quantize_int8(model)
    if mode == "bf16-weights":
        bf16 = load_pretrained(path).eval().to(torch.bfloat16)
        return lambda x: bf16(x.to(torch.bfloat16))

    def autocast_bf16(x: torch.Tensor) -> torch.Tensor:
        with autocast("cpu", "bf16"):
            return model(x)

    return autocast_bf16


if __name__ == "__main__":
    main()
