"""The ResNet v2 stem of the hybrid models (paper section 3.1, "Hybrid Architecture").

It follows the official `models_resnet.py`: weight-standardised convolutions, GroupNorm(32) and ReLU after every
convolution (no pre-activation), bottleneck units, TF "SAME" padding. Module names follow timm's ResNetV2
(`stem.conv`, `stages.S.blocks.U.conv1`, `downsample.conv`) so timm hybrid state dicts load as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import StemNumerics
from .kernels import max_pool


def _same_pad(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """Pad as TF/Flax "SAME" does: output = ceil(input / stride), the odd pixel of padding on the bottom/right."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad wants the last dimension first
        # (ceil(size / stride) - 1) * stride + kernel - size, written with the remainder: then a symbolic size (an
        # ONNX export with dynamic height and width, where the size is a multiple of the stride) gives a constant.
        rest = size % stride
        total = max(kernel - (rest if rest else stride), 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value) if any(pads) else x


class StdConv2dSame(nn.Conv2d):
    """Conv2d with weight standardisation (Qiao et al. 2019; BiT) and "SAME" padding, no bias."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, numerics: StemNumerics = "official"):
        super().__init__(cin, cout, kernel, stride=stride, padding=0, bias=False)
        self.numerics = numerics

    def standardized_weight(self) -> torch.Tensor:
        w = self.weight
        if self.numerics == "official":  # (w - mean) / (std + 1e-5) over (in, kh, kw), as the JAX code
            mean = w.mean(dim=(1, 2, 3), keepdim=True)
            std = w.std(dim=(1, 2, 3), keepdim=True, unbiased=False)
            return (w - mean) / (std + 1e-5)
        var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, unbiased=False)  # timm's StdConv2dSame
        return (w - mean) / torch.sqrt(var + 1e-8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel, stride = self.kernel_size[0], self.stride[0]
        if kernel == 1 and stride > 1:  # reads every stride-th pixel: slicing first is exact and ~1.6x faster
            return F.conv2d(x[..., ::stride, ::stride], self.standardized_weight())
        return F.conv2d(_same_pad(x, kernel, stride), self.standardized_weight(), None, stride)


def _group_norm(channels: int, numerics: StemNumerics) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6 if numerics == "official" else 1e-5)


class Downsample(nn.Module):
    """The projection shortcut of a stage's first unit."""

    def __init__(self, cin: int, cout: int, stride: int, numerics: StemNumerics):
        super().__init__()
        self.conv = StdConv2dSame(cin, cout, 1, stride, numerics)
        self.norm = _group_norm(cout, numerics)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (carries the stride) -> 1x1 with 4x expansion; GroupNorm after each conv, ReLU after the sum."""

    def __init__(self, cin: int, width: int, stride: int, numerics: StemNumerics):
        super().__init__()
        cout = width * 4
        self.downsample = Downsample(cin, cout, stride, numerics) if (cin != cout or stride != 1) else None
        self.conv1 = StdConv2dSame(cin, width, 1, 1, numerics)
        self.norm1 = _group_norm(width, numerics)
        self.conv2 = StdConv2dSame(width, width, 3, stride, numerics)
        self.norm2 = _group_norm(width, numerics)
        self.conv3 = StdConv2dSame(width, cout, 1, 1, numerics)
        self.norm3 = _group_norm(cout, numerics)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = F.relu(self.norm1(self.conv1(x)))
        x = F.relu(self.norm2(self.conv2(x)))
        x = self.norm3(self.conv3(x))
        return F.relu(x + shortcut)


class Stage(nn.Module):
    def __init__(self, cin: int, width: int, depth: int, stride: int, numerics: StemNumerics):
        super().__init__()
        self.blocks = nn.Sequential(
            *(Bottleneck(cin if i == 0 else width * 4, width, stride if i == 0 else 1, numerics) for i in range(depth))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Stem(nn.Module):
    """Root block: 7x7/2 conv, GroupNorm, ReLU, 3x3/2 max-pool (all "SAME")."""

    def __init__(self, cin: int, width: int, numerics: StemNumerics):
        super().__init__()
        self.conv = StdConv2dSame(cin, width, 7, 2, numerics)
        self.norm = _group_norm(width, numerics)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The stem keeps NCHW: on CPU, GroupNorm of channels-last bf16 activations is 5-7x slower. A grey batch
        # (C = 1) is NCHW- and NHWC-contiguous at once and the convolution answers it in NHWC, hence `contiguous`.
        x = F.relu(self.norm(self.conv(x).contiguous()))
        return max_pool(_same_pad(x, 3, 2, value=float("-inf")), 3, 2)


class ResNetStem(nn.Module):
    """Root block plus `len(depths)` stages; stage s has bottleneck width `width * 2**s`, stride 2 from stage 2 on.

    (B, C, H, W) -> (B, width * 4 * 2**(S-1), H / stride, W / stride), stride = 4 * 2**(S-1) (4 with no stages).
    """

    def __init__(self, in_chans: int, depths: tuple[int, ...], width: int = 64, numerics: StemNumerics = "official"):
        super().__init__()
        self.stem = Stem(in_chans, width, numerics)
        stages, cin = [], width
        for s, depth in enumerate(depths):
            stages.append(Stage(cin, width * 2**s, depth, 1 if s == 0 else 2, numerics))
            cin = width * 2**s * 4
        self.stages = nn.Sequential(*stages)
        self.out_channels = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))
