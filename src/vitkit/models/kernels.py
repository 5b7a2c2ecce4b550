"""Which kernel runs a layer: faster CPU paths where PyTorch's default is slow, and the switch back to the default.

- Dense layers (`linear.Linear`): fp32 CPU matmuls go to oneDNN instead of MKL's sgemm where that is faster
  (`onednn_matmul`: 2.2x on AMD CPUs with AVX-512), and so does bf16 inference where oneDNN computes bf16; on a
  Zen 4 the fp32 weight gradients stay with MKL (`mkl_weight_grad`).
- Attention (`attention`): in fp32 on CPU, vitkit's own kernel (`attention.cpp`, built on first use by `native`
  for the CPU it runs on), forward and backward: with AVX-512 about 2x PyTorch's flash kernel, whose fp32 products
  go to MKL's slow path on AMD (1.5-1.6x on a Zen 4, where that path is not slow); with AVX2 1.3-1.45x at 197
  tokens and 2.3-2.9x at the hybrids' 17. bf16 inference takes the same kernel's bf16 forward (fp32 inside). With
  bf16/fp16 on CPU and autograd recording, explicit matmuls (oneDNN's bf16 batched gemm) and a softmax instead of
  the flash kernel, whose backward is 1.5x (ViT-B/16, 197 tokens) to 9x (a hybrid's 17 tokens) slower.
- Max-pooling (`max_pool`, the hybrid stem's): on CPU channels-last, forward and backward, with NCHW in and out;
  PyTorch's NCHW max-pool kernel is about 5x slower on CPU.

`reference_kernels()` turns every fast path off, for a numerics check or a comparison.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import re
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from . import native

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


@functools.cache
def onednn_matmul(dtype: torch.dtype) -> bool:
    """Whether `Linear` sends CPU matmuls of `dtype` to oneDNN rather than PyTorch's default (MKL for fp32).

    fp32: where MKL's sgemm takes its generic code path, AMD CPUs with AVX-512: on a 2-thread Zen 5 oneDNN reaches
    425 GFLOP/s and MKL 187. On an AVX2 CPU MKL's path is the faster one (a Zen 3: 171 against 136; ViT-S/16
    inference 0.87x through oneDNN), so it keeps MKL. bf16: where oneDNN computes bf16 at all (AVX-512; the bf16
    instructions or AMX make it faster); without AVX-512 it refuses bf16 matmuls. `ATEN_CPU_CAPABILITY=avx2` in the
    environment turns the fp32 path off on an AVX-512 machine.
    """
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return torch.backends.cpu.get_cpu_capability() == "AVX512"
    return dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@functools.cache
def mkl_weight_grad() -> bool:
    """Whether `Linear`'s fp32 weight gradients go to MKL's sgemm although the rest of the oneDNN path stays.

    MKL runs its AVX2 code on AMD CPUs. A Zen 5 computes AVX-512 at full width, so that code reaches half the
    peak there; a Zen 4 (AMD family 25 with AVX-512) splits each 512-bit operation into two 256-bit halves, so
    AVX2 loses nothing, and MKL's sum over the batch's rows runs 1.02-1.2x oneDNN's chunked products, which
    copy their transposed operands (ViT-B/16 fp32 training step 1.03x). Forward and input gradients stay with
    oneDNN there (1.05-1.1x MKL).
    """
    return onednn_matmul(torch.float32) and _amd_cpu_family() == 25


_CPUINFO = "/proc/cpuinfo"


def _amd_cpu_family() -> int | None:
    """The CPU family of an AMD processor (25: Zen 3 and Zen 4, 26: Zen 5) from /proc/cpuinfo; None elsewhere."""
    try:
        with open(_CPUINFO) as f:
            head = f.read(4096)  # the first processor's entry
    except OSError:
        return None
    family = re.search(r"^cpu family\s*:\s*(\d+)", head, re.MULTILINE)
    return int(family.group(1)) if "AuthenticAMD" in head and family else None


def attention(
    qkv: torch.Tensor, heads: int, dropout: float, need_weights: bool, queries: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Multi-head softmax(q k^T / sqrt(d)) v from the fused projection `qkv` (B, T, 3 * D), its last dimension laid
    out (q; k; v) x heads x d, with dropout on the probabilities. Returns the heads' outputs concatenated, (B, Q, D),
    and the probabilities (B, heads, Q, T) when `need_weights`, else None. Q = T, or `queries`: then only the first
    `queries` tokens ask (every token still gives keys and values), as for a class token read alone."""
    B, T, _ = qkv.shape
    d = qkv.shape[-1] // (3 * heads)
    if queries is None and not need_weights and dropout == 0.0 and _native_attention(qkv, d):
        if qkv.dtype == torch.bfloat16:
            return _native_bf16_inference(qkv, heads), None
        return _NativeAttention.apply(qkv, heads), None
    q, k, v = qkv.view(B, T, 3, heads, d).permute(2, 0, 3, 1, 4)  # 3 x (B, heads, T, d)
    q = q[:, :, :queries]
    if queries is not None and not need_weights and qkv.dtype == torch.bfloat16 and _native_attention(qkv, d):
        q, k, v = q.float(), k.float(), v.float()  # as the native bf16 forward: fp32 inside, the output rounded once
    explicit = need_weights or (
        fast_cpu(q) and q.dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled() and q.requires_grad
    )
    if explicit:
        attn = ((q * d**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, Q, T)
        out = F.dropout(attn, dropout) @ v
    else:
        out, attn = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout), None
    return out.transpose(1, 2).reshape(B, q.shape[2], heads * d).to(qkv.dtype), attn


def _native_attention(qkv: torch.Tensor, d: int) -> bool:
    if qkv.dtype == torch.float32:
        supported = not torch.is_autocast_enabled("cpu")
    else:  # bf16: a forward only, so not while autograd records
        supported = qkv.dtype == torch.bfloat16 and not (torch.is_grad_enabled() and qkv.requires_grad)
    return (
        supported
        and fast_cpu(qkv)
        and d % 16 == 0  # the kernel's vectors are 16 floats
        and native.library() is not None
    )


class _NativeAttention(torch.autograd.Function):
    """`native`'s fp32 attention. It reads q, k and v in place from the qkv projection, writes the heads' outputs
    straight into the (B, T, D) layout the output projection takes, and returns the gradient as one qkv tensor."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, heads: int) -> torch.Tensor:
        qkv = qkv.contiguous()
        B, T, _ = qkv.shape
        d = qkv.shape[-1] // (3 * heads)
        out = qkv.new_empty(B, T, heads, d)
        stats = qkv.new_empty(B, heads, T, 2)  # per row: the maximum score and 1 / the sum of the exponentials
        q, k, v = qkv.view(B, T, 3, heads, d).unbind(2)
        _call("forward", [q, k, v, out], heads, stats.data_ptr())
        ctx.save_for_backward(qkv, out, stats)
        return out.view(B, T, heads * d)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        qkv, out, stats = ctx.saved_tensors
        B, T, heads, d = out.shape
        grad_qkv = torch.empty_like(qkv)
        q, k, v = qkv.view(B, T, 3, heads, d).unbind(2)
        dq, dk, dv = grad_qkv.view(B, T, 3, heads, d).unbind(2)
        _call("backward", [q, k, v, out, grad.contiguous().view(B, T, heads, d), dq, dk, dv], heads, stats.data_ptr())
        return grad_qkv, None


def _native_bf16_inference(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """`native`'s bf16 forward: q, k and v widened to fp32 head by head in the kernel, the output rounded once."""
    qkv = qkv.contiguous()
    B, T, _ = qkv.shape
    d = qkv.shape[-1] // (3 * heads)
    out = qkv.new_empty(B, T, heads, d)
    q, k, v = qkv.view(B, T, 3, heads, d).unbind(2)
    _call("forward_bf16", [q, k, v, out], heads)
    return out.view(B, T, heads * d)


def _call(kernel: str, tensors: list[torch.Tensor], heads: int, *stats: int) -> None:
    """Runs a native kernel on (B, T, heads, d) views whose last dimension is contiguous; `stats`: the pointer to
    the forward's row statistics, for the fp32 kernels."""
    B, T, _, d = tensors[0].shape
    pointers = (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])
    strides = [s for t in tensors for s in (t.stride(0), t.stride(2), t.stride(1))]  # batch, head, token
    strides = (ctypes.c_long * len(strides))(*strides)
    run = getattr(native.library(), f"vitkit_attention_{kernel}")
    run(pointers, strides, B, heads, T, d, d**-0.5, *stats, torch.get_num_threads())


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
