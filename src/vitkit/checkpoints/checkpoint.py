"""The in-memory form every reader produces: weights under vitkit's (timm's) names plus what the file says."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..preprocess import Preprocess


@dataclass
class Checkpoint:
    """A checkpoint read from any format.

    Attributes:
        state_dict: tensors under vitkit's names (`patch_embed.proj.weight`, `blocks.0.attn.qkv.weight`, ...).
        source: the format it came from ("vitkit", "official-npz", "big_vision", "timm", "hf", "torchvision",
            "mindspore").
        path: the file or directory read.
        determined: config fields the file fixes beyond what tensor shapes show (for example `heads` from an
            npz kernel or an HF config.json); a user override that differs is an error.
        defaults: config fields the source implies but a user may change (its numerics: norm_eps, gelu).
        preprocess: the preprocessing stored with the file, if it stores one.
        classes: class names stored with the file, if any.
    """

    state_dict: dict[str, torch.Tensor]
    source: str
    path: str
    determined: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    preprocess: Preprocess | None = None
    classes: list[str] | None = None


def require(tensors: dict[str, Any], key: str, path: str) -> Any:
    """tensors[key], or an error that names the file and the key."""
    if key not in tensors:
        raise ValueError(
            f"{path}: key {key!r} is missing; the file has {len(tensors)} keys such as {sorted(tensors)[:5]}"
        )
    return tensors[key]
