"""Peak memory of a step, and the largest batch that fits in a memory budget.

Memory grows linearly with the batch (weights, gradients and optimizer state are fixed; activations are per
image), so two measurements at small batches fit `memory = fixed + per_image * batch`, and the line predicts
the largest batch within a budget without trying batches that do not fit.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..models import ViTConfig
from ..sizes import format_size


def peak_memory(
    cfg: ViTConfig,
    batch: int,
    *,
    task: str = "train",
    dtype: str = "fp32",
    device: str | torch.device = "cpu",
    peer: str | None = None,
    grad_checkpointing: bool = False,
    threads: int | None = None,
) -> int:
    """Peak memory in bytes of building the model of `cfg` (or `peer`'s twin of it) and running two steps of
    `throughput.make_step` (eager) at `batch`; the second step has the optimizer state the first created.

    On CUDA: `torch.cuda.max_memory_allocated` over the steps less what was allocated before, i.e. the model's
    tensors (weights, gradients, optimizer state, activations); the CUDA context and the caching allocator's
    slack come on top.

    On CPU: the peak resident set size (VmHWM on Linux, else `ru_maxrss`) of a fresh Python process that builds
    the model and runs the steps. That is the whole process, interpreter and libraries included, not the growth
    during the step: what must fit in the machine's memory. A fresh process, because a peak RSS never comes down
    and this process may have run anything before.

    Args:
        threads: CPU threads of the fresh process (default: this process's `torch.get_num_threads()`).
    """
    spec = {
        "config": cfg.to_dict(),
        "batch": batch,
        "task": task,
        "dtype": dtype,
        "device": str(device),
        "peer": peer,
        "grad_checkpointing": grad_checkpointing,
        "threads": threads or torch.get_num_threads(),
    }
    if torch.device(device).type == "cuda":
        return _measure(spec)
    code = "import sys; from vitkit.bench.memory import _child; _child(sys.argv[1])"
    done = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True)
    if done.returncode != 0:
        what = f"killed by signal {-done.returncode}" if done.returncode < 0 else f"exit status {done.returncode}"
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"the memory measurement at batch {batch} failed ({what}):\n{tail}")
    return int(json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"])


def _build(spec: dict) -> torch.nn.Module:
    from ..models import create_model
    from .peers import build_peer

    cfg = ViTConfig.from_dict(spec["config"])
    model = build_peer(spec["peer"], cfg) if spec["peer"] else create_model(cfg)
    if spec["grad_checkpointing"]:
        enable = getattr(model, "set_grad_checkpointing", None)
        if enable is None:
            raise ValueError(f"{type(model).__name__} has no set_grad_checkpointing(); gradient checkpointing needs it")
        enable(True)
    return model


def _measure(spec: dict) -> int:
    """Build and run two steps in this process; bytes at the peak (CUDA: allocated by them; CPU: the RSS)."""
    from .throughput import make_step

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    model = _build(spec)
    cfg = ViTConfig.from_dict(spec["config"])
    step = make_step(model, cfg, spec["batch"], task=spec["task"], dtype=spec["dtype"], device=device)
    step()
    step()
    if cuda:
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del model, step
        torch.cuda.empty_cache()
        return peak
    return _peak_rss()


def _peak_rss() -> int:
    """This process's peak resident set size in bytes.

    On Linux, VmHWM of /proc/self/status, not `ru_maxrss`: the kernel carries the peak RSS of the process image
    an `exec` replaces into `ru_maxrss`, and the process `subprocess` execs from is (a vfork of) its parent, so
    `ru_maxrss` would report the parent's peak whenever that is larger. VmHWM belongs to this image alone.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # "VmHWM:  123456 kB"
    except OSError:
        pass
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB elsewhere


def _child(spec_json: str) -> None:
    """Entry point of the fresh process `peak_memory` starts on CPU: prints {"peak_bytes": N}."""
    print(json.dumps({"peak_bytes": _measure(json.loads(spec_json))}))


# ---- the largest batch in a budget ---------------------------------------------------------------------------
@dataclass
class MemoryFit:
    """The line fitted to measured peak memory, and the largest batch it allows in the budget.

    Attributes:
        budget: bytes allowed.
        points: (batch, bytes) measured, the fit's and any verification's.
        fixed: bytes the line puts at batch 0 (weights, gradients, optimizer state, libraries).
        per_image: bytes each image of the batch adds (activations).
        max_batch: the largest batch predicted (and, when verified, measured) to fit.
        verified: bytes measured at max_batch, when asked to verify.
    """

    budget: int
    fixed: float
    per_image: float
    max_batch: int
    points: list[tuple[int, int]] = field(default_factory=list)
    verified: int | None = None


def fit_line(points: Sequence[tuple[int, int]]) -> tuple[float, float]:
    """Least-squares (fixed, per_image) of `memory = fixed + per_image * batch` through (batch, memory) points."""
    if len({b for b, _ in points}) < 2:
        raise ValueError(f"measurements at {[b for b, _ in points]}; a line needs two different batch sizes")
    n = len(points)
    mean_b = sum(b for b, _ in points) / n
    mean_m = sum(m for _, m in points) / n
    slope = sum((b - mean_b) * (m - mean_m) for b, m in points) / sum((b - mean_b) ** 2 for b, _ in points)
    return mean_m - slope * mean_b, slope


def largest_batch(fixed: float, per_image: float, budget: int) -> int:
    """The largest batch whose predicted memory is within the budget (0 when not even one image fits)."""
    if per_image <= 0:
        raise ValueError(
            f"peak memory did not grow with the batch (fitted {format_size(per_image)} per image); measure at "
            "batches further apart"
        )
    return max(math.floor((budget - fixed) / per_image), 0)


def max_batch(
    cfg: ViTConfig,
    budget: int,
    *,
    task: str = "train",
    dtype: str = "fp32",
    device: str | torch.device = "cpu",
    grad_checkpointing: bool = False,
    batches: Sequence[int] = (8, 16),
    verify: bool = False,
    threads: int | None = None,
    measure: Callable[[int], int] | None = None,
) -> MemoryFit:
    """The largest batch of `cfg`'s step whose peak memory (`peak_memory`) fits in `budget` bytes.

    Measures at `batches`, fits a line, predicts. The default batches are past the small-batch plateau: below
    about 4 images the peak comes from the weights, gradients and the optimizer state being created, not from
    activations (ViT-B/16 training on CPU: 1.76 GiB at 1 and 1.77 at 2, then about 120 MiB more per image), and
    a line through 2 and 4 predicted twice the batch that fits.

    With `verify`, also measures at the predicted batch and, while that does not fit, predicts again from the
    line through the smallest batch and the one that did not fit. `fixed` and `per_image` of the result are of
    the line the answer came from.

    Args:
        measure: batch -> peak bytes; default `peak_memory` with the other arguments (tests pass a fake).
    """
    if measure is None:
        device = torch.device(device)
        if verify and device.type == "cpu" and budget > _physical_memory():
            raise ValueError(
                f"cannot verify a budget of {format_size(budget)} on a machine with {format_size(_physical_memory())}"
                " of memory; drop --verify to predict only"
            )

        def measure(batch: int) -> int:
            kind = {"task": task, "dtype": dtype, "device": device, "threads": threads}
            return peak_memory(cfg, batch, grad_checkpointing=grad_checkpointing, **kind)

    points = [(b, measure(b)) for b in batches]
    fixed, per_image = fit_line(points)
    best = largest_batch(fixed, per_image, budget)
    verified = None
    while verify and best >= 1:
        used = measure(best)
        points.append((best, used))
        if used <= budget:
            verified = used
            break
        # The secant from the smallest batch to the one that did not fit. Memory grows a little faster than
        # linearly (measured on CPU: ViT-Ti/16 at 64 px adds 2.0 MiB per image from batch 2 to 4, 2.6 from 64 to
        # 128), so the secant lies above the curve below that batch and the batch it allows fits, usually at once.
        fixed, per_image = fit_line([points[0], points[-1]])
        best = min(best - 1, largest_batch(fixed, per_image, budget))
    if best < 1:
        raise ValueError(
            f"a budget of {format_size(budget)} does not fit one image: about {format_size(fixed + per_image)} at "
            f"batch 1 (measured {', '.join(f'{b}: {format_size(m)}' for b, m in points)})"
        )
    return MemoryFit(budget, fixed, per_image, best, points, verified)


def _physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
