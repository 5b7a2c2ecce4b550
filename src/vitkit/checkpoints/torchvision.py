"""torchvision's `VisionTransformer` state dicts (`vit_b_16`, `vit_l_32`, ... in torchvision.models).

The math is vitkit's: pre-norm blocks, LayerNorm eps 1e-6, exact GELU, a class token whose position embedding
is row 0, and `nn.MultiheadAttention`, whose `in_proj_weight` already stacks the q; k; v rows as vitkit's fused
`qkv` does. So the conversion is a key table plus two named special cases: the older MLP names and the conv stem
variant vitkit does not build. The head count is not stored; load.py settles it from the width.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .checkpoint import Checkpoint, require

# Whole-model keys, torchvision name -> vitkit name.
KEYS = {
    "class_token": "cls_token",  # (1, 1, D)
    "conv_proj.weight": "patch_embed.proj.weight",  # (D, C, p, p)
    "conv_proj.bias": "patch_embed.proj.bias",
    "encoder.pos_embedding": "pos_embed",  # (1, 1 + N, D), row 0 = class token
    "encoder.ln.weight": "norm.weight",
    "encoder.ln.bias": "norm.bias",
    "heads.pre_logits.weight": "pre_logits.fc.weight",  # Linear then tanh, when representation_size is set
    "heads.pre_logits.bias": "pre_logits.fc.bias",
    "heads.head.weight": "head.weight",
    "heads.head.bias": "head.bias",
}

# Per-block keys under `encoder.layers.encoder_layer_{i}.`, torchvision suffix -> vitkit suffix under `blocks.{i}.`.
BLOCK_KEYS = {
    "ln_1.weight": "norm1.weight",
    "ln_1.bias": "norm1.bias",
    "self_attention.in_proj_weight": "attn.qkv.weight",  # (3D, D), rows q; k; v
    "self_attention.in_proj_bias": "attn.qkv.bias",
    "self_attention.out_proj.weight": "attn.proj.weight",
    "self_attention.out_proj.bias": "attn.proj.bias",
    "ln_2.weight": "norm2.weight",
    "ln_2.bias": "norm2.bias",
    # MLP = Sequential(Linear, GELU, Dropout, Linear, Dropout) since torchvision 0.13 ...
    "mlp.0.weight": "mlp.fc1.weight",
    "mlp.0.bias": "mlp.fc1.bias",
    "mlp.3.weight": "mlp.fc2.weight",
    "mlp.3.bias": "mlp.fc2.bias",
    # ... and `linear_1` / `linear_2` in older files (torchvision renames them the same way on load, PR 6053).
    "mlp.linear_1.weight": "mlp.fc1.weight",
    "mlp.linear_1.bias": "mlp.fc1.bias",
    "mlp.linear_2.weight": "mlp.fc2.weight",
    "mlp.linear_2.bias": "mlp.fc2.bias",
}

_BLOCK = re.compile(r"encoder\.layers\.encoder_layer_(\d+)\.(.+)")
# What every block must hold, with either MLP naming.
_REQUIRED_BLOCK = (
    "ln_1.weight",
    "ln_1.bias",
    "self_attention.in_proj_weight",
    "self_attention.out_proj.weight",
    "self_attention.out_proj.bias",
    "ln_2.weight",
    "ln_2.bias",
)


def matches(keys: set[str]) -> bool:
    """torchvision's telltales: its position-embedding name and its `encoder_layer_N` blocks."""
    return (
        "class_token" in keys
        and "encoder.pos_embedding" in keys
        and any(k.startswith("encoder.layers.encoder_layer_") for k in keys)
    )


def from_tensors(tensors: dict[str, torch.Tensor], path: Path) -> Checkpoint:
    """A torchvision state dict -> vitkit names, float32, with torchvision's numerics as defaults."""
    if any(k.startswith("conv_proj.conv_") for k in tensors):
        # `conv_stem_configs` (Xiao et al. 2021, "Early convolutions help transformers see better").
        raise ValueError(
            f"{path}: a torchvision ViT with a convolutional stem (keys `conv_proj.conv_bn_relu_*`, "
            "`conv_proj.conv_last`); vitkit builds the patchify stem only"
        )
    sd: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in tensors.items():
        name = vitkit_name(key)
        if name is None:
            unknown.append(key)
            continue
        if name in sd:
            raise ValueError(f"{path}: two keys map to {name!r} (both MLP namings in one block?); one is {key!r}")
        sd[name] = value.float() if value.is_floating_point() else value
    if unknown:
        raise ValueError(f"{path}: torchvision keys vitkit cannot place: {sorted(unknown)[:8]}")
    _require_complete(tensors, path)
    return Checkpoint(sd, "torchvision", str(path), defaults={"norm_eps": 1e-6, "gelu": "exact"})


def vitkit_name(key: str) -> str | None:
    """The vitkit name of a torchvision key, or None for a key outside the table."""
    if key in KEYS:
        return KEYS[key]
    m = _BLOCK.fullmatch(key)
    if m and m[2] in BLOCK_KEYS:
        return f"blocks.{m[1]}.{BLOCK_KEYS[m[2]]}"
    return None


def _require_complete(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Name the first missing torchvision key rather than letting a vitkit name surface later."""
    for key in ("conv_proj.weight", "class_token", "encoder.pos_embedding", "encoder.ln.weight", "encoder.ln.bias"):
        require(tensors, key, str(path))
    depth = 1 + max(int(m[1]) for k in tensors if (m := _BLOCK.fullmatch(k)))
    for i in range(depth):
        prefix = f"encoder.layers.encoder_layer_{i}."
        mlp = ("linear_1", "linear_2") if f"{prefix}mlp.linear_1.weight" in tensors else ("0", "3")
        needed = [*_REQUIRED_BLOCK, *(f"mlp.{m}.{p}" for m in mlp for p in ("weight", "bias"))]
        for suffix in needed:
            require(tensors, prefix + suffix, str(path))
