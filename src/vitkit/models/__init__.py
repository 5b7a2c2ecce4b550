"""Models: the config, the named variants and the module."""

from __future__ import annotations

from typing import Any

import torch

from .config import ViTConfig
from .variants import config_for, list_models
from .vit import VisionTransformer

__all__ = [
    "ViTConfig",
    "VisionTransformer",
    "count_macs",
    "count_params",
    "create_model",
    "list_models",
    "resolve_config",
]


def resolve_config(model: str | ViTConfig, **overrides: Any) -> ViTConfig:
    """A config from a variant name (any accepted spelling) or a config, with field overrides applied."""
    cfg = config_for(model) if isinstance(model, str) else model
    return cfg.replace(**overrides) if overrides else cfg


def create_model(model: str | ViTConfig, **overrides: Any) -> VisionTransformer:
    """Build a freshly initialised model, e.g. `create_model("ViT-B/16", num_classes=10, img_size=(384, 384))`."""
    return VisionTransformer(resolve_config(model, **overrides))


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(cfg: ViTConfig, as_run: bool = False) -> int:
    """Multiply-accumulates of one forward pass of one image, counted by PyTorch's FLOP counter on a model built
    on the meta device (no memory, no arithmetic): the architecture's, every token through every block (the
    figure papers quote), or with `as_run` what vitkit's forward computes (a class-token head's last block
    computes that token's output alone: 6% fewer for ViT-B/16)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = VisionTransformer(cfg).eval()
        x = torch.empty(1, cfg.in_chans, *cfg.img_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x) if as_run else model.forward_head(model.forward_features(x))
    return counter.get_total_flops() // 2
