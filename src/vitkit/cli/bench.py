"""`vitkit bench`: throughput, FLOP/s against the measured peak and peak memory, beside the peers; or the largest
batch that fits a memory budget."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..bench.peers import PEERS  # cheap: the peers' libraries are imported only when a peer is built
from .args import Subparsers, add_set, parse_overrides


def cmd_bench(args: argparse.Namespace) -> None:
    import torch

    from ..bench import load_model
    from ..models import resolve_config

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads {args.threads}; expected at least 1")
        torch.set_num_threads(args.threads)
    if args.rounds < 1:
        raise ValueError(f"--rounds {args.rounds}; expected at least 1")
    if args.grad_checkpointing and args.task != "train":
        raise ValueError("--grad-checkpointing changes training steps only; add --task train")
    device = _device(args.device)
    overrides = parse_overrides(args.set)
    if args.img_size is not None:
        overrides["img_size"] = args.img_size
    if args.max_batch:
        # Only the config is needed here: the measurements build their models in fresh processes.
        saved = Path(args.model).exists()
        cfg = load_model(args.model, **overrides).cfg if saved else resolve_config(args.model, **overrides)
        _max_batch(args, cfg, device)
        return
    if args.memory is not None:
        raise ValueError("--memory is the budget of --max-batch; add --max-batch")
    model = load_model(args.model, **overrides)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    _throughput(args, model, device)


def _device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}; expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}; expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: PyTorch {torch.__version__} sees no CUDA GPU here")
    return device


def _setting(args: argparse.Namespace, cfg: Any, device: Any) -> str:
    import torch

    n = torch.get_num_threads()
    threads = f" ({n} thread{'' if n == 1 else 's'})" if device.type == "cpu" else ""
    checkpointing = ", gradient checkpointing" if args.grad_checkpointing else ""
    h, w = cfg.img_size
    return f"{args.task}, {args.dtype}, {h}x{w} px{checkpointing}, {device}{threads}, torch {torch.__version__}"


def _throughput(args: argparse.Namespace, model: Any, device: Any) -> None:
    from ..bench import compare, matmul_peak
    from ..sizes import format_size

    if args.batch < 1:
        raise ValueError(f"--batch {args.batch}; expected at least 1")
    results = compare(
        model,
        args.vs,
        batch=args.batch,
        task=args.task,
        dtype=args.dtype,
        mode=args.mode,
        device=device,
        rounds=args.rounds,
        memory=not args.no_memory,
    )
    peak = matmul_peak(args.dtype, device)  # after the models: a peer that cannot be built fails before any work
    if args.json:
        record = {
            "model": args.model,
            "config": model.cfg.to_dict(),
            **{k: getattr(args, k) for k in ("batch", "task", "dtype", "mode", "rounds")},
            "device": str(device),
            "threads": _threads(device),
            "peak": {**asdict(peak), "gflops": peak.gflops, "kernel": peak.kernel},
            "results": [{**asdict(r), "percent_of_peak": 100 * r.gflops / peak.gflops} for r in results],
        }
        print(json.dumps(record, indent=2))
        return
    others = ", ".join(f"{k} {v:.0f}" for k, v in peak.kernels.items() if k != peak.kernel)
    print(f"vitkit bench {args.model}: batch {args.batch}, {args.mode}, {_setting(args, model.cfg, device)}")
    unit = "GOP/s" if args.dtype == "int8" else "GFLOP/s"  # int8 multiplies integers
    print(f"{args.dtype} matmul peak {peak.gflops:.0f} {unit} ({peak.kernel}{'; ' + others if others else ''})")
    print(f"{'model':<12} {'img/s':>9} {unit:>8} {'% of peak':>9} {'peak memory':>12} {'vitkit x':>8}")
    for r in results:
        memory = "-" if r.memory_bytes is None else format_size(r.memory_bytes)
        print(
            f"{r.name:<12} {r.images_per_s:>9.2f} {r.gflops:>8.1f} {100 * r.gflops / peak.gflops:>8.1f}% "
            f"{memory:>12} {r.ratio:>8.2f}"
        )
    if args.mode == "compiled":
        print("compile time: " + ", ".join(f"{r.name} {r.compile_s:.1f} s" for r in results))
    if not args.no_memory and device.type == "cpu":
        print("peak memory: the peak RSS of a fresh process running eager steps (what must fit in RAM)")


def _threads(device: Any) -> int | None:
    import torch

    return torch.get_num_threads() if device.type == "cpu" else None


def _max_batch(args: argparse.Namespace, cfg: Any, device: Any) -> None:
    from ..bench import max_batch, parse_size
    from ..sizes import format_size

    if args.memory is None:
        raise ValueError("--max-batch needs --memory SIZE, the budget, e.g. --memory 16GiB")
    if args.vs:
        raise ValueError("--max-batch measures vitkit's model only; drop --vs")
    budget = parse_size(args.memory)
    fit = max_batch(
        cfg,
        budget,
        task=args.task,
        dtype=args.dtype,
        device=device,
        grad_checkpointing=args.grad_checkpointing,
        verify=args.verify,
        threads=_threads(device),
    )
    if args.json:
        record = {"model": args.model, "config": cfg.to_dict(), "device": str(device), "threads": _threads(device)}
        print(json.dumps({**record, "task": args.task, "dtype": args.dtype, **asdict(fit)}, indent=2))
        return
    print(f"vitkit bench {args.model} --max-batch: {_setting(args, cfg, device)}")
    print("measured: " + ", ".join(f"batch {b} -> {format_size(m)}" for b, m in fit.points))
    print(f"fit: memory = {format_size(fit.fixed)} + {format_size(fit.per_image)} x batch")
    predicted = fit.fixed + fit.per_image * fit.max_batch
    verified = "" if fit.verified is None else f"; measured {format_size(fit.verified)}"
    print(f"largest batch in {format_size(budget)}: {fit.max_batch} (predicted {format_size(predicted)}{verified})")


def add_bench(sub: Subparsers) -> None:
    p = sub.add_parser(
        "bench", help="images/s, FLOP/s against the measured peak, and memory, beside peers; or the largest batch"
    )
    p.add_argument("model", help="a variant name (see `vitkit models`) or a saved model (any supported format)")
    p.add_argument("--batch", type=int, default=32, help="images per step (default 32)")
    p.add_argument("--img-size", type=int, metavar="N", help="N x N inputs (default: the model's img_size)")
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "int8"],
        default="fp32",
        help="bf16: weights and inputs in bfloat16 (infer), autocast with fp32 master weights (train); int8: the "
        "blocks' dense layers in int8 (infer, CPU; peers through PyTorch's dynamic quantization)",
    )
    p.add_argument("--mode", choices=["eager", "compiled"], default="eager", help="compiled: torch.compile")
    p.add_argument(
        "--task", choices=["infer", "train"], default="infer", help="train: forward, cross-entropy, backward, AdamW"
    )
    p.add_argument(
        "--vs",
        nargs="+",
        choices=PEERS,
        default=[],
        metavar="PEER",
        help="peers measured alternately in the same run: hf (transformers), timm, torchvision (where they import)",
    )
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per model, alternating; the median counts")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: PyTorch's choice)")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:N")
    p.add_argument("--no-memory", action="store_true", help="skip peak memory (on CPU, a fresh process per model)")
    p.add_argument("--max-batch", action="store_true", help="instead, the largest batch that fits in --memory")
    p.add_argument("--memory", metavar="SIZE", help="the budget of --max-batch, e.g. 16GiB, 500MB")
    p.add_argument("--verify", action="store_true", help="with --max-batch: measure at the predicted batch too")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in backward")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    add_set(p)
    p.set_defaults(func=cmd_bench)
