"""timm's ViT state dicts (`vit_*` and the hybrids `vit_*_r50_*`): vitkit uses timm's names, so this is only
detection, a few renamed keys of older timm releases, and the writer."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ..models import VisionTransformer
from .checkpoint import Checkpoint

# Older timm releases named the pre-logits layer like this.
RENAMED = {"pre_logits.weight": "pre_logits.fc.weight", "pre_logits.bias": "pre_logits.fc.bias"}


def matches(keys: set[str]) -> bool:
    return "patch_embed.proj.weight" in keys and "blocks.0.attn.qkv.weight" in keys


def from_tensors(tensors: dict[str, torch.Tensor], path: Path) -> Checkpoint:
    sd = {RENAMED.get(k, k): v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    # timm hybrids standardise weights as sqrt(var + 1e-8) with GroupNorm eps 1e-5.
    defaults = {"norm_eps": 1e-6, "gelu": "exact", "stem_numerics": "timm"}
    return Checkpoint(sd, "timm", str(path), defaults=defaults)


def write(model: VisionTransformer, path: Path) -> None:
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, str(path))
