"""Inference and training-step throughput of vitkit's ViT-S/16 and ViT-B/16 against Hugging Face's ViT built with
the same config, in fp32 and bf16, measured alternately in one process (`vitkit.bench`), with achieved FLOP/s as
a fraction of this machine's measured matrix-multiply peak for the same dtype, and peak memory.

    .venv/bin/python benchmarks/model_speed.py --threads 2                  # the README's table (long on a CPU)
    .venv/bin/python benchmarks/model_speed.py --models vit_ti16 --img-size 32 --batch 2 --rounds 2   # a smoke run

bf16 inference casts the weights and inputs to bfloat16; bf16 training runs under autocast with fp32 weights.
int8 (`--dtypes int8`, inference only) runs the blocks' dense layers in int8 (`vitkit.models.quantize`), the peers
through PyTorch's own dynamic quantization; its peak and rates count int8 operations.
"""

from __future__ import annotations

import argparse

import torch

from vitkit.bench import compare, load_model, matmul_peak
from vitkit.sizes import format_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit_s16", "vit_b16"])
    parser.add_argument("--tasks", nargs="+", choices=["infer", "train"], default=["infer", "train"])
    parser.add_argument(
        "--dtypes", nargs="+", choices=["fp32", "bf16", "int8"], default=["fp32", "bf16"], help="int8: inference only"
    )
    parser.add_argument("--vs", nargs="+", default=["hf"], help="peers: hf, timm, torchvision (where they import)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--img-size", type=int, help="N x N inputs (default: each model's, 224)")
    parser.add_argument("--mode", choices=["eager", "compiled"], default="eager")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed rounds per model")
    parser.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's choice)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-memory", action="store_true", help="skip peak memory (on CPU a process per model)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    peaks = {dtype: matmul_peak(dtype, device) for dtype in args.dtypes}
    where = f"{device} ({torch.get_num_threads()} threads)" if device.type == "cpu" else str(device)
    print(f"torch {torch.__version__}, {where}, batch {args.batch}, {args.mode}")
    for dtype, peak in peaks.items():
        kernels = ", ".join(f"{k} {v:.0f}" for k, v in peak.kernels.items())
        print(f"{dtype} matmul peak {peak.gflops:.0f} {'GOP/s' if dtype == 'int8' else 'GFLOP/s'} ({kernels})")
    head = f"{'model':<9} {'task':<5} {'dtype':<5} {'who':<12} {'img/s':>9} {'GFLOP/s':>8} {'% of peak':>9}"
    print(head + f" {'memory':>10} {'vitkit x':>8}")
    overrides = {"img_size": args.img_size} if args.img_size else {}
    for name in args.models:
        for task in args.tasks:
            for dtype in args.dtypes:
                if dtype == "int8" and task != "infer":
                    continue  # int8 layers have no gradients
                model = load_model(name, **overrides)
                results = compare(
                    model,
                    args.vs,
                    batch=args.batch,
                    task=task,
                    dtype=dtype,
                    mode=args.mode,
                    device=device,
                    rounds=args.rounds,
                    memory=not args.no_memory,
                )
                for r in results:
                    memory = "-" if r.memory_bytes is None else format_size(r.memory_bytes)
                    share = 100 * r.gflops / peaks[dtype].gflops
                    print(
                        f"{name:<9} {task:<5} {dtype:<5} {r.name:<12} {r.images_per_s:>9.2f} {r.gflops:>8.1f} "
                        f"{share:>8.1f}% {memory:>10} {r.ratio:>8.2f}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
