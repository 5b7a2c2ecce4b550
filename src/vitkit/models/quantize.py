"""int8 inference on CPU: the transformer's dense layers with int8 weights and dynamically quantized inputs.

`quantize_int8(model)` returns a copy of a model whose blocks' dense layers (qkv, proj, fc1, fc2: 95% of
ViT-B/16's multiply-accumulates) hold int8 weights, one scale per output channel, and quantize their input at
every call with one scale for the whole tensor, taken from its range (dynamic quantization). The products run
in int8 with int32 sums (PyTorch's quantized CPU kernels, fbgemm or oneDNN), and the output is fp32 again; the
patch embedding, the norms, attention, GELU and the head stay fp32. Nothing is calibrated and nothing is saved:
the copy is made from the fp32 weights when it is needed, in well under a second for ViT-B/16.

Without VNNI (AVX2 CPUs, and AVX-512 without it) the int8 products go through an instruction that adds pairs
of 16-bit products with saturation, so the inputs are quantized to 7 bits instead of 8 (`reduce_range`) to keep
those sums from clipping, as PyTorch's own dynamic quantization does there.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .linear import Linear

# The quantized engine that packs the weights. On a 2-thread Zen 3 (AVX2), ViT-B/16 at batch 8 with 7-bit inputs:
# fbgemm and onednn ran the int8 model within 5% of each other, 1.5-1.65x fp32; "x86" (PyTorch's default, which
# picks between them) 12% slower than fbgemm.
ENGINE = "onednn"


@functools.cache
def reduce_range() -> bool:
    """Whether inputs are quantized to 7 bits: on CPUs without VNNI, whose int8 products saturate at 8 bits."""
    return not torch.cpu._is_vnni_supported()


@contextlib.contextmanager
def _engine(name: str) -> Iterator[None]:
    if name not in torch.backends.quantized.supported_engines:
        raise RuntimeError(
            f"int8: PyTorch {torch.__version__} has no {name!r} quantized engine here "
            f"(it has {torch.backends.quantized.supported_engines})"
        )
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """PyTorch 2.13 warns, at first use, that its quantized tensors and `torch.ao.quantization` will go
    (pytorch/pytorch#184982); vitkit pins the torch it is tested with, so the warning says nothing a user can act
    on. When they go, these kernels move to torchao's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantiz.*deprecated", category=UserWarning)
        warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated", category=DeprecationWarning)
        yield


class Int8Linear(nn.Module):
    """y = x W^T + b with W in int8 (symmetric, one scale per output row) and x quantized per call (asymmetric,
    one scale per tensor); inference only."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        w = weight.detach().float().cpu()
        self.out_features, self.in_features = w.shape
        scale = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny).double()
        zero = torch.zeros(w.shape[0], dtype=torch.long)
        bias = None if bias is None else bias.detach().float().cpu()
        with _engine(ENGINE), _quiet():
            qweight = torch.quantize_per_channel(w, scale, zero, 0, torch.qint8)
            self._packed = torch.ops.quantized.linear_prepack(qweight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise RuntimeError(f"int8 layers run on CPU; the input is on {x.device}")
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("int8 layers are for inference: they have no gradients (train the fp32 model)")
        return torch.ops.quantized.linear_dynamic(x.float().contiguous(), self._packed, reduce_range())

    def forward_gelu(self, x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
        return F.gelu(self(x), approximate=approximate)

    def dequantized_weight(self) -> torch.Tensor:
        """The fp32 weight the layer computes with: its int8 values times their scales."""
        qweight, _ = torch.ops.quantized.linear_unpack(self._packed)
        return qweight.dequantize()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_torch_int8(model: nn.Module) -> nn.Module:
    """A copy of any model with every `nn.Linear` quantized by PyTorch's own dynamic quantization (the same
    scheme: int8 weights per output channel, inputs per call; packed by the same engine): how a peer's model
    is run in int8."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with _engine(ENGINE), _quiet():
        return quantize_dynamic(copy.deepcopy(model).cpu().eval(), {nn.Linear: per_channel_dynamic_qconfig})


def quantize_int8(model: nn.Module) -> nn.Module:
    """A copy of `model` (left as it is) in eval mode on CPU, with every `Linear` inside its transformer blocks
    replaced by an `Int8Linear`."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"int8: {type(model).__name__} has no transformer blocks to quantize")
    quantized = copy.deepcopy(model).cpu().eval().requires_grad_(False)  # no autograd graph through int8 layers
    dense = [(parent, name, child) for parent in quantized.blocks.modules() for name, child in parent.named_children()]
    for parent, name, child in dense:
        if isinstance(child, Linear):
            setattr(parent, name, Int8Linear(child.weight, child.bias))
    return quantized
