"""Which kernel runs a layer: faster CPU paths where PyTorch's default is slow, and the switch back to the default.

- Dense layers (`linear.Linear`): fp32 CPU matmuls go to oneDNN instead of MKL's sgemm (2.2x on AMD).
- Attention (`attention`): with bf16/fp16 on CPU and autograd recording, explicit matmuls (oneDNN's bf16 batched
  gemm) and a softmax instead of the CPU flash kernel, whose backward is 1.5x (ViT-B/16, 197 tokens) to 9x (a
  hybrid's 17 tokens) slower. Inference and fp32 keep the flash kernel, which is as fast or faster there.
- Max-pooling (`max_pool`, the hybrid stem's): on CPU channels-last, forward and backward, with NCHW in and out;
  PyTorch's NCHW max-pool kernel is about 5x slower on CPU.

`reference_kernels()` turns every fast path off, for a numerics check or a comparison.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

_fast = {"enabled": True}


@contextlib.contextmanager
def reference_kernels() -> Iterator[None]:
    """Within this block the model runs PyTorch's default kernels everywhere (the reference numerics)."""
    before = _fast["enabled"]
    _fast["enabled"] = False
    try:
        yield
    finally:
        _fast["enabled"] = before


def fast_cpu(x: torch.Tensor) -> bool:
    """Whether a fast CPU path may replace the default for `x`: on, on CPU, and not inside a trace (torch.compile
    and torch.export choose their own kernels)."""
    return (
        _fast["enabled"]
        and x.device.type == "cpu"
        and x.numel() > 0
        and not torch.compiler.is_compiling()  # also true while torch.export traces for ONNX
        and not torch.jit.is_tracing()
    )


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float, need_weights: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(q k^T / sqrt(d)) v for (B, heads, T, d) inputs, with dropout on the probabilities; the probabilities
    (B, heads, T, T) are returned too when `need_weights`, else None."""
    explicit = need_weights or (
        fast_cpu(q) and q.dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled() and q.requires_grad
    )
    if not explicit:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout), None
    attn = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, h, T, T)
    return F.dropout(attn, dropout) @ v, attn


def max_pool(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """F.max_pool2d(x, kernel, stride) of an NCHW tensor, the same values and gradients."""
    if not fast_cpu(x):
        return F.max_pool2d(x, kernel, stride)
    return _ChannelsLastMaxPool.apply(x, kernel, stride)


class _ChannelsLastMaxPool(torch.autograd.Function):
    """Max-pooling computed channels-last (ResNet stem at batch 128, bf16, 64 channels, 17x17: forward 1.5 ms instead
    of 7.6, with the backward 5.3 instead of 10). Output and input gradient come back NCHW: the stem's GroupNorms
    are several times slower on channels-last tensors."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        out, indices = torch.ops.aten.max_pool2d_with_indices(x, [kernel, kernel], [stride, stride])
        ctx.save_for_backward(x, indices)
        ctx.kernel, ctx.stride = kernel, stride
        return out.contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        x, indices = ctx.saved_tensors
        k, s = [ctx.kernel] * 2, [ctx.stride] * 2
        grad = grad.contiguous(memory_format=torch.channels_last)
        grad_x = torch.ops.aten.max_pool2d_with_indices_backward(grad, x, k, s, [0, 0], [1, 1], False, indices)
        return grad_x.contiguous(), None, None
