"""Images per second and achieved FLOP/s of an inference or training step, vitkit and its peers measured
alternately in the same run.

Alternating (one timed round of each model in turn, the median round counts) makes drifts in machine load,
clock and temperature hit every model alike, so the ratio is fair even on a shared machine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..allocator import keep_freed_memory
from ..models import VisionTransformer, ViTConfig, count_macs
from ..models.quantize import quantize_int8, quantize_torch_int8
from .peak import DTYPES, sync

TASKS = ("infer", "train")
MODES = ("eager", "compiled")


@dataclass
class Throughput:
    """One model's figures in one run.

    Attributes:
        name: "vitkit" or the peer's name.
        images_per_s: median over the timed rounds.
        gflops: achieved GFLOP/s at that rate: the FLOPs the model computes (`flops_per_image`; as run for vitkit,
            whose class-token models skip most of the last block for the other tokens, the architecture's for
            the peers, which compute it all), so the share of the peak is the hardware's, not inflated by work
            skipped.
        seconds: seconds per step of each timed round.
        compile_s: in compiled mode, the first call's time less a steady step's: compilation, mostly.
        memory_bytes: peak memory of a step (see `memory.peak_memory`), when measured.
        ratio: this model's step time over the first model's (vitkit's) in the same round, the median over the
            rounds; above 1, vitkit is faster. Paired by round, so a slow spell of a shared machine that lasts
            several rounds slows both sides of those rounds alike instead of only the model timed in it.
    """

    name: str
    images_per_s: float
    gflops: float
    seconds: list[float] = field(default_factory=list)
    compile_s: float | None = None
    memory_bytes: int | None = None
    ratio: float = 1.0


def flops_per_image(cfg: ViTConfig, task: str, as_run: bool = False) -> int:
    """FLOPs of one image through one step: 2 per multiply-accumulate of the forward (`count_macs` at the config's
    img_size; with `as_run`, those vitkit's forward computes). Training adds the backward pass, which computes
    gradients of the activations and of the weights, each about a forward's worth: 3 forwards in all (the usual
    convention of model-FLOP-utilisation figures)."""
    if task not in TASKS:
        raise ValueError(f"task {task!r}; expected one of {TASKS}")
    return 2 * count_macs(cfg, as_run) * (3 if task == "train" else 1)


def make_step(
    model: nn.Module,
    cfg: ViTConfig,
    batch: int,
    *,
    task: str = "infer",
    dtype: str = "fp32",
    mode: str = "eager",
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> Callable[[], None]:
    """A function that runs one step of `model` on a fixed random batch shaped by `cfg` (img_size, in_chans).

    task "infer": eval mode under inference_mode; with dtype "bf16" the weights and the input are cast to
    bfloat16 (the fastest inference); with "int8" (CPU only) an int8 copy of the model runs
    (`vitkit.models.quantize`; a peer's is quantized by PyTorch's own `quantize_dynamic`). task "train":
    forward, cross-entropy, backward, AdamW step, zero_grad; with dtype "bf16" the forward runs under
    torch.autocast(bfloat16) with fp32 master weights, as mixed-precision training does. mode "compiled" wraps the
    model in torch.compile (its first call compiles). The model is moved to `device` (and cast, for bf16 inference)
    in place.
    """
    for name, value, allowed in (("task", task, TASKS), ("dtype", dtype, tuple(DTYPES)), ("mode", mode, MODES)):
        if value not in allowed:
            raise ValueError(f"{name} {value!r}; expected one of {allowed}")
    if batch < 1:
        raise ValueError(f"batch {batch}; expected at least 1")
    if dtype == "int8" and (task != "infer" or torch.device(device).type != "cpu"):
        raise ValueError(f"dtype int8 is for inference on CPU, not {task} on {device}; use fp32 or bf16 there")
    keep_freed_memory()  # as `vitkit train` runs: for vitkit and the peers alike, who share the process
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_chans, *cfg.img_size, generator=gen).to(device)
    model.to(device)
    if task == "infer":
        model.eval()
        if dtype == "bf16":
            model.to(torch.bfloat16)
            x = x.to(torch.bfloat16)
        if dtype == "int8":  # vitkit's int8 copy, or a peer's through PyTorch's dynamic quantization
            model = quantize_int8(model) if isinstance(model, VisionTransformer) else quantize_torch_int8(model)
        forward = torch.compile(model) if mode == "compiled" else model

        def infer() -> None:
            with torch.inference_mode():
                forward(x)

        return infer

    model.train()
    outputs = cfg.num_classes or cfg.width  # a model without a head puts out features; any targets will do
    y = torch.randint(0, outputs, (batch,), generator=gen).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # vitkit's, for vitkit and every peer
    forward = torch.compile(model) if mode == "compiled" else model

    def train() -> None:
        with torch.autocast(device.type, torch.bfloat16, enabled=dtype == "bf16"):
            loss = F.cross_entropy(forward(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return train


def measure(
    models: dict[str, nn.Module],
    cfg: ViTConfig,
    batch: int,
    *,
    task: str = "infer",
    dtype: str = "fp32",
    mode: str = "eager",
    device: str | torch.device = "cpu",
    rounds: int = 5,
    steps: int = 1,
) -> list[Throughput]:
    """Throughput of each model, timed in alternating rounds of `steps` steps; the median round counts, and
    each ratio to the first model is the median of the rounds' ratios.

    Args:
        models: name -> model; the first is the reference of every `ratio` (vitkit's, by convention).
        cfg: the architecture all of them share, at the benchmark's img_size (input shape and FLOPs).
        rounds: timed rounds per model.
        steps: steps per round (more for tiny models whose single step is too short to time well).

    On CUDA, each model's peak memory (`torch.cuda.max_memory_allocated` during a step, less what was allocated
    before the model was moved there) is filled in too; on CPU see `memory.peak_memory`.
    """
    if rounds < 1 or steps < 1:
        raise ValueError(f"rounds={rounds}, steps={steps}; expected at least 1 of each")
    device = torch.device(device)
    cuda = device.type == "cuda"
    prepared: dict[str, tuple[Callable[[], None], float, int | None]] = {}
    for name, model in models.items():
        base = torch.cuda.memory_allocated(device) if cuda else 0
        step = make_step(model, cfg, batch, task=task, dtype=dtype, mode=mode, device=device)
        first = _timed(step, device)  # compiles in compiled mode; creates optimizer state in training
        _timed(step, device)
        memory = None
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            _timed(step, device)
            memory = torch.cuda.max_memory_allocated(device) - base
        prepared[name] = (step, first, memory)

    seconds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, (step, _, _) in prepared.items():
            seconds[name].append(_timed(step, device, steps) / steps)

    results = []
    for name, (_, first, memory) in prepared.items():
        per_step = statistics.median(seconds[name])
        rate = batch / per_step
        compile_s = max(first - per_step, 0.0) if mode == "compiled" else None
        flops = flops_per_image(cfg, task, as_run=isinstance(models[name], VisionTransformer))
        results.append(Throughput(name, rate, rate * flops / 1e9, seconds[name], compile_s, memory))
    reference = results[0].seconds
    for r in results:
        r.ratio = statistics.median(theirs / ours for ours, theirs in zip(reference, r.seconds, strict=True))
    return results


def compare(
    model: VisionTransformer,
    peers: Sequence[str] = (),
    *,
    batch: int = 32,
    task: str = "infer",
    dtype: str = "fp32",
    mode: str = "eager",
    device: str | torch.device = "cpu",
    rounds: int = 5,
    steps: int = 1,
    memory: bool = True,
) -> list[Throughput]:
    """vitkit's `model` and each named peer built with its config ("hf", "timm", "torchvision"), measured
    alternately (`measure`), with peak memory when `memory` (on CPU a fresh process per model, eager mode)."""
    from .peers import build_peer

    cfg = model.cfg
    models: dict[str, nn.Module] = {"vitkit": model}
    models.update({peer: build_peer(peer, cfg) for peer in peers})
    device = torch.device(device)
    results = measure(models, cfg, batch, task=task, dtype=dtype, mode=mode, device=device, rounds=rounds, steps=steps)
    if memory and device.type != "cuda":
        from .memory import peak_memory

        checkpointing = bool(getattr(model, "grad_checkpointing", False))
        for r in results:
            peer = None if r.name == "vitkit" else r.name
            r.memory_bytes = peak_memory(
                cfg,
                batch,
                task=task,
                dtype=dtype,
                device=device,
                peer=peer,
                grad_checkpointing=checkpointing and peer is None,
            )
    return results


def _timed(step: Callable[[], None], device: torch.device, repeat: int = 1) -> float:
    """Seconds `repeat` calls of `step` take, waiting for the GPU's queued work at both ends."""
    sync(device)
    t = time.perf_counter()
    for _ in range(repeat):
        step()
    sync(device)
    return time.perf_counter() - t
