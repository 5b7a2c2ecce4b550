"""Scaling curves of vitkit's ViTs (`vitkit.bench`): inference throughput against batch size and against image
size (token count), and training-step peak memory against batch size, drawn into one PNG with the numbers as
JSON beside it (for the README).

    .venv/bin/python benchmarks/scaling.py --threads 2                      # ViT-S/16 and ViT-B/16 (long on a CPU)
    .venv/bin/python benchmarks/scaling.py --models vit_ti16 --batches 1 2 --sizes 32 64 --batch 2 \\
        --memory-batches 1 2 --rounds 1 --out /tmp/scaling.png                      # a smoke run

The image-size sweep runs one model built for 224 px with `dynamic_img_size=True`, which resamples its position
embeddings to each input's grid at forward time (as serving images of several sizes would); its FLOPs are counted
at each size. Memory on CPU is the peak RSS of a fresh process per point (see `vitkit.bench.memory`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from vitkit.bench import load_model, matmul_peak, measure, peak_memory
from vitkit.plots import require_matplotlib


def sweep(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """{model: {"batch": [...], "size": [...], "memory": [...]}}, each a list of records, one per point."""
    out: dict[str, Any] = {}
    for name in args.models:
        model = load_model(name, dynamic_img_size=True)
        cfg = model.cfg
        curves: dict[str, list[dict[str, Any]]] = {"batch": [], "size": [], "memory": []}
        for batch in args.batches:
            (r,) = measure({name: model}, cfg, batch, dtype=args.dtype, device=device, rounds=args.rounds)
            curves["batch"].append({"batch": batch, "images_per_s": r.images_per_s, "gflops": r.gflops})
            print(f"{name} batch {batch}: {r.images_per_s:.2f} img/s, {r.gflops:.1f} GFLOP/s", flush=True)
        for size in args.sizes:
            at = cfg.replace(img_size=size)  # the input's shape and the FLOPs at it; the model stays 224 px
            (r,) = measure({name: model}, at, args.batch, dtype=args.dtype, device=device, rounds=args.rounds)
            tokens = at.grid[0] * at.grid[1]
            curves["size"].append(
                {"img_size": size, "tokens": tokens, "images_per_s": r.images_per_s, "gflops": r.gflops}
            )
            print(f"{name} {size} px ({tokens} tokens): {r.images_per_s:.2f} img/s, {r.gflops:.1f} GFLOP/s", flush=True)
        for batch in args.memory_batches:
            used = peak_memory(cfg, batch, task="train", dtype=args.dtype, device=device)
            curves["memory"].append({"batch": batch, "bytes": used})
            print(f"{name} training batch {batch}: peak memory {used / 2**30:.2f} GiB", flush=True)
        out[name] = curves
    return out


def draw(record: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    by_batch, by_size, memory = fig.subplots(1, 3)
    for name, curves in record["models"].items():
        points = curves["batch"]
        by_batch.plot([p["batch"] for p in points], [p["images_per_s"] for p in points], "o-", label=name)
        points = curves["size"]
        by_size.plot([p["tokens"] for p in points], [p["images_per_s"] for p in points], "o-", label=name)
        points = curves["memory"]
        memory.plot([p["batch"] for p in points], [p["bytes"] / 2**30 for p in points], "o-", label=name)
    s = record["setting"]
    by_batch.set(xscale="log", xlabel="batch size", ylabel="images/s", title=f"inference, {s['dtype']}")
    by_size.set(xscale="log", xlabel="tokens per image (image side)", ylabel="images/s")
    by_size.set_title(f"inference, {s['dtype']}, batch {s['batch']}")
    memory.set(xscale="log", xlabel="batch size", ylabel="peak memory (GiB)", title=f"training step, {s['dtype']}")
    # Ticks at the measured points, labelled with plain numbers (a log axis would print 2^k or 10^k).
    first = next(iter(record["models"].values()))
    by_batch.set_xticks([p["batch"] for p in first["batch"]], [str(p["batch"]) for p in first["batch"]])
    by_size.set_xticks(
        [p["tokens"] for p in first["size"]], [f"{p['tokens']}\n{p['img_size']} px" for p in first["size"]]
    )
    memory.set_xticks([p["batch"] for p in first["memory"]], [str(p["batch"]) for p in first["memory"]])
    for ax in (by_batch, by_size, memory):
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"vitkit scaling on {s['device']}, torch {s['torch']}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit_s16", "vit_b16"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--sizes", nargs="+", type=int, default=[112, 160, 224, 288, 384], help="image sides (px)")
    parser.add_argument("--batch", type=int, default=8, help="batch of the image-size sweep")
    parser.add_argument("--memory-batches", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per point; the median counts")
    parser.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's choice)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("docs/scaling.png"), help="the PNG; the JSON goes beside it")
    args = parser.parse_args()
    require_matplotlib()  # before the measurements, not after them
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = (
        f"{device} ({torch.get_num_threads()} threads)" if device.type == "cpu" else torch.cuda.get_device_name(device)
    )
    peak = matmul_peak(args.dtype, device)
    setting = {k: getattr(args, k) for k in ("batch", "sizes", "dtype", "rounds")}
    setting.update(device=where, torch=torch.__version__, peak_gflops=peak.gflops, peak_kernels=peak.kernels)
    record = {"setting": setting, "models": sweep(args, device)}
    draw(record, args.out)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
