"""The model's dense layers, with a faster fp32 kernel on CPU.

On x86 CPUs PyTorch sends fp32 `F.linear` to MKL's sgemm. On AMD processors with AVX-512 MKL takes a slow code
path: on a 2-core Zen 5 it reaches about 190 GFLOP/s where oneDNN's matmul (the library PyTorch already uses for
convolutions and bf16 matmuls) reaches about 440. There `Linear` sends fp32 CPU work to oneDNN, forward and
backward (but for a Zen 4's weight gradients: `kernels.mkl_weight_grad`), and bf16 inference too where oneDNN
computes bf16 (bf16 weights and inputs: oneDNN fuses fc1's GELU, which PyTorch runs as a second pass over the bf16
output); `kernels.onednn_matmul` says where. Everything else (AVX2-only CPUs in fp32, autocast, bf16 training,
CUDA, tracing for export or torch.compile) goes to `F.linear`. `kernels.reference_kernels()` turns the fast path
off, for a numerics check or a comparison.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import fast_cpu, mkl_weight_grad, onednn_matmul

# Rows of the weight gradient's reduction summed per oneDNN call: one long reduction runs at MKL's speed,
# chunks of 512 rows at 1.5-2x it (measured on a Zen 5 on the shapes of ViT-S/16 and ViT-B/16 at batch 32).
_GRAD_CHUNK = 512


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias by oneDNN; x (..., in), weight (out, in)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _use_onednn(x: torch.Tensor, weight: torch.Tensor, needs_grad: bool) -> bool:
    return (
        fast_cpu(x)
        and x.dtype == weight.dtype
        and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and not needs_grad))
        and not torch.is_autocast_enabled("cpu")
        and onednn_matmul(x.dtype)
    )


def _weight_grad(g2: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """g2^T @ x2, (out, in), for g2 (M, out) and x2 (M, in): by MKL where `mkl_weight_grad` says, else by oneDNN
    summed over chunks of rows. oneDNN copies its first operand, transposed, into a contiguous block, so the
    narrower of the two goes first: for qkv and fc1 (out > in) that is x2, and the product is x2^T @ g2 =
    (g2^T @ x2)^T (1.05-1.3x faster than g2 first on those layers)."""
    if mkl_weight_grad():
        return torch.mm(g2.t(), x2)
    first, second = (x2, g2) if g2.shape[1] > x2.shape[1] else (g2, x2)
    total = _onednn(first[:_GRAD_CHUNK].t(), second[:_GRAD_CHUNK].t(), None)  # (a, M) @ (M, b)
    for start in range(_GRAD_CHUNK, first.shape[0], _GRAD_CHUNK):
        rows = slice(start, start + _GRAD_CHUNK)
        total += _onednn(first[rows].t(), second[rows].t(), None)
    return total.t().contiguous() if first is x2 else total


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn(grad, weight.t().contiguous(), None)  # (..., out) @ (out, in)
        g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])  # (M, out), (M, in)
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(g2, x2)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same state-dict keys) with the oneDNN path on CPU (fp32; bf16 inference) where
    `onednn_matmul` says it is faster."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        needs_grad = self._needs_grad(x)
        if not _use_onednn(x, self.weight, needs_grad):
            return F.linear(x, self.weight, self.bias)
        x = x.contiguous()
        if needs_grad:
            return _OneDNNLinear.apply(x, self.weight, self.bias)
        return _onednn(x, self.weight, self.bias)

    def forward_gelu(self, x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
        """gelu(self(x)). Without autograd on the oneDNN path the GELU runs inside the matmul kernel (about 15%
        faster than two passes for ViT-B's fc1 in fp32, with the same error against fp64; in bf16 also one rounding
        less)."""
        if self._needs_grad(x) or not _use_onednn(x, self.weight, needs_grad=False):
            return F.gelu(self(x), approximate=approximate)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.weight, self.bias, "gelu", [], approximate)

    def _needs_grad(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, self.weight, self.bias))
