"""vitkit's CPU attention kernel against PyTorch's (the flash kernel), alternating in one process, forward and
forward + backward, fp32.

    .venv/bin/python benchmarks/attention_speed.py --threads 2            # the README's table
    .venv/bin/python benchmarks/attention_speed.py --shapes 4x17x32x128   # heads x tokens x head size x batch

Prints the best time of each kernel over the rounds and PyTorch's time over vitkit's (above 1, vitkit is faster).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable

import torch

from vitkit.allocator import keep_freed_memory
from vitkit.models import kernels, native
from vitkit.models.kernels import reference_kernels

# ViT-S/16 and ViT-B/16 at 224 px (batch 32), and the hybrids' 4x4 grid plus the class token (batch 128).
SHAPES = ["6x197x64x32", "12x197x64x32", "4x17x32x128"]


def _timed(step: Callable[[], None], reference: bool, times: list[float]) -> None:
    with reference_kernels() if reference else contextlib.nullcontext():
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=SHAPES, help="HEADSxTOKENSxHEAD_SIZExBATCH")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as `vitkit train` runs: the gradients' pages are not faulted in again each step
    if native.library() is None:
        raise SystemExit("vitkit's attention kernel could not be built here (see the warning above)")
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")
    print(f"{'heads x tokens x d, batch':26} {'pass':8} {'pytorch ms':>10} {'vitkit ms':>10} {'vitkit x':>9}")
    for shape in args.shapes:
        heads, tokens, d, batch = (int(n) for n in shape.split("x"))
        for name, step in _steps(heads, tokens, d, batch).items():
            ours, theirs = [], []
            _timed(step, False, [])  # warm-up: first calls allocate and build
            _timed(step, True, [])
            for _ in range(args.rounds):
                _timed(step, False, ours)
                _timed(step, True, theirs)
            ms = f"{min(theirs) * 1e3:10.1f} {min(ours) * 1e3:10.1f}"
            print(f"{f'{heads} x {tokens} x {d}, {batch}':26} {name:8} {ms} {min(theirs) / min(ours):9.2f}")


def _steps(heads: int, tokens: int, d: int, batch: int) -> dict[str, Callable[[], None]]:
    """The forward and the forward + backward of attention on a fixed random (batch, tokens, 3 x heads x d) qkv."""
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(batch, tokens, 3 * heads * d, generator=gen)
    grad = torch.randn(batch, tokens, heads * d, generator=gen)
    leaf = qkv.clone().requires_grad_()

    def forward() -> None:
        kernels.attention(qkv, heads, 0.0, False)

    def forward_backward() -> None:
        torch.autograd.grad(kernels.attention(leaf, heads, 0.0, False)[0], leaf, grad)

    return {"fwd": forward, "fwd+bwd": forward_backward}


if __name__ == "__main__":
    main()
