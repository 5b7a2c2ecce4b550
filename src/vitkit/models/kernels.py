"""Which kernel runs a layer: faster CPU paths where PyTorch's default is slow, and the switch back to the default.

- Dense layers (`linear.Linear`): fp32 CPU matmuls go to oneDNN instead of MKL's sgemm (2.2x on AMD).
- Attention (`attention`): with bf16/fp16 on CPU and autograd recording, explicit matmuls (oneDNN's bf16 batched
  gemm) and a softmax instead of the CPU flash kernel, whose backward is 1.5x (ViT-B/16, 197 tokens) to 9x (a
  hybrid's 17 tokens) slower. Inference and fp32 keep the flash kernel, which is as fast or faster there.

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
