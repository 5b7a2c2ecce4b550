"""The machine's own matrix-multiply peak: the yardstick that achieved FLOP/s are a fraction of.

On CPU, PyTorch has two fp32 matrix-multiply kernels and they differ by more than 2x on some machines: on an
AMD EPYC (Zen 5, 2 threads, torch 2.13) `torch.matmul` goes to MKL's sgemm and reaches about 193 GFLOP/s, while
oneDNN's linear (`torch.ops.mkldnn._linear_pointwise`, what inductor and `torch.jit.freeze` lower to) reaches
about 445. A peak taken from `torch.matmul` alone would flatter every model that reaches oneDNN, so both are
measured and the peak is the best of them; each kernel's figure is kept, so a report can show both.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..models.kernels import onednn_matmul
from ..models.quantize import Int8Linear

# The type of the tensors that go in and come out; int8 layers take and return fp32 and multiply in int8.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.float32}


@dataclass
class Peak:
    """Measured matrix-multiply throughput of one dtype on one device.

    Attributes:
        dtype: "fp32", "bf16" or "int8" (its figures count int8 operations).
        device: where it was measured ("cpu", "cuda:0").
        kernels: kernel name -> GFLOP/s, e.g. {"torch.matmul": 193.0, "onednn.linear": 445.0}.
    """

    dtype: str
    device: str
    kernels: dict[str, float]

    @property
    def gflops(self) -> float:
        """The peak: the best kernel's GFLOP/s (% of peak is against this)."""
        return max(self.kernels.values())

    @property
    def kernel(self) -> str:
        """The name of the best kernel."""
        return max(self.kernels, key=self.kernels.__getitem__)


def matmul_kernels(
    device: torch.device, dtype: str = "fp32"
) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """The matrix-multiply kernels worth measuring on `device` for `dtype`, by name. oneDNN is measured for fp32
    wherever it is built in (the peak is the faster kernel's, whichever `Linear` takes), and for bf16 where it
    computes bf16 (without AVX-512 it refuses)."""
    if dtype == "int8":
        # The int8 layers' own kernel (fp32 in, the input quantized per call, int8 products, fp32 out), on CPU only;
        # the weight is packed on the first call, in the warm-up, as a model packs its weights once.
        return {"int8.linear": lambda x, w: _int8_layer(w)(x)} if device.type == "cpu" else {}
    kernels: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"torch.matmul": torch.matmul}
    onednn = torch.backends.mkldnn.is_available() and (dtype == "fp32" or onednn_matmul(DTYPES[dtype]))
    if device.type == "cpu" and onednn:
        # y = x @ w.T with no bias and no fused activation; w.T of a random square matrix costs the same as w.
        kernels["onednn.linear"] = lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    return kernels


@functools.lru_cache(maxsize=1)
def _int8_layer(weight: torch.Tensor) -> Int8Linear:
    return Int8Linear(weight, None)


def matmul_peak(
    dtype: str = "fp32", device: str | torch.device = "cpu", n: int | None = None, repeats: int = 5
) -> Peak:
    """Best GFLOP/s of an n x n by n x n product over `repeats` timed calls of each kernel, after a warm-up.

    Args:
        dtype: "fp32", "bf16" or "int8" (CPU only; its figures count int8 operations, GOP/s).
        device: "cpu", "cuda" or "cuda:N". Runs with the current `torch.get_num_threads()` on CPU.
        n: matrix side; default 2048 on CPU and 8192 on CUDA (a 2048 product takes a few microseconds on a large
            GPU, too short to keep it busy, so its peak would be understated).
        repeats: timed calls per kernel; the fastest counts (a peak is what the hardware can do, not a typical).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    if dtype == "int8" and torch.device(device).type != "cpu":
        raise ValueError(f"dtype int8 runs on CPU, not on {device!r}")
    if repeats < 1:
        raise ValueError(f"repeats={repeats}; expected at least 1")
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 2048)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device, DTYPES[dtype])
    b = torch.randn(n, n, generator=gen).to(device, DTYPES[dtype])
    flops = 2 * n**3
    kernels = {}
    for name, kernel in matmul_kernels(device, dtype).items():
        for _ in range(2):  # warm-up: first-call dispatch, oneDNN primitive creation, cuBLAS handles
            kernel(a, b)
        best = float("inf")
        for _ in range(repeats):
            sync(device)
            t = time.perf_counter()
            kernel(a, b)
            sync(device)
            best = min(best, time.perf_counter() - t)
        kernels[name] = flops / best / 1e9
    return Peak(dtype, str(device), kernels)


def sync(device: torch.device) -> None:
    """Wait for the work queued on a GPU (timings would otherwise measure only the launches)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
