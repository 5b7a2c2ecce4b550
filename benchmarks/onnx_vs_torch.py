"""Throughput of the exported ONNX graph on onnxruntime (CPU) against the same model in PyTorch (CPU).

Both run the same weights on the same batch, with the same number of threads, timed alternately in one process
(round r times PyTorch, then onnxruntime), so that a machine that gets busier or quieter affects both alike.

    .venv/bin/python benchmarks/onnx_vs_torch.py                                   # ViT-S/16, 224 px, batch 8
    .venv/bin/python benchmarks/onnx_vs_torch.py --model vit_b16 --batch 16 --threads 2 --rounds 5 --dynamic-size
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from vitkit import create_model
from vitkit.export import export_onnx


def images_per_second(run, batch: int, seconds: float) -> float:
    """Call `run` until `seconds` have passed (at least twice) and return images per second."""
    done, start = 0, time.perf_counter()
    while done < 2 or time.perf_counter() - start < seconds:
        run()
        done += 1
    return done * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_s16", help="variant name (default vit_s16: ViT-S/16)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="for both (default: torch's)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0, help="timed per backend per round")
    parser.add_argument("--dynamic-size", action="store_true", help="export with dynamic height and width")
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = create_model(args.model, img_size=args.img_size).eval()
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = export_onnx(model, Path(tmp) / "model.onnx", dynamic_size=args.dynamic_size)
        export_s = time.perf_counter() - start
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"images": x.numpy()}

    def run_torch() -> None:
        with torch.inference_mode():
            model(x)

    def run_ort() -> None:
        session.run(None, feed)

    with torch.inference_mode():
        difference = float(np.abs(session.run(None, feed)[0] - model(x).numpy()).max())
    for run in (run_torch, run_ort):  # warm-up: first calls allocate and pick kernels
        run()
        run()
    rates: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
    for _ in range(args.rounds):
        rates["torch"].append(images_per_second(run_torch, args.batch, args.seconds))
        rates["onnxruntime"].append(images_per_second(run_ort, args.batch, args.seconds))

    size = f"{args.img_size}x{args.img_size}" + (", dynamic-size graph" if args.dynamic_size else "")
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {args.threads} threads, fp32")
    print(
        f"{args.model}, batch {args.batch}, {size}; export {export_s:.1f} s; max abs logit difference {difference:.1e}"
    )
    print(f"{'backend':<12} {'img/s (median)':>14} {'min':>8} {'max':>8}")
    for name, values in rates.items():
        print(f"{name:<12} {statistics.median(values):>14.2f} {min(values):>8.2f} {max(values):>8.2f}")
    ratio = statistics.median(rates["onnxruntime"]) / statistics.median(rates["torch"])
    print(f"ratio onnxruntime / torch: {ratio:.2f}")


if __name__ == "__main__":
    main()
