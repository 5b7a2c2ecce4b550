"""The models vitkit is measured against, each built with the same config as a vitkit model.

A peer is another library's ViT with the same width, depth, heads, MLP size, patch size, image size, classes,
LayerNorm epsilon and GELU, so that it does the same arithmetic; its weights are random (speed does not depend
on them). Every peer's forward takes images and returns logits, as vitkit's does.

transformers is a test dependency and imports everywhere. timm and torchvision are optional: on CPU-only
PyTorch builds the published torchvision wheel is a CUDA build and fails at import (and timm imports
torchvision), so they are peers where they import, as on a GPU machine with a CUDA build of PyTorch.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models import VisionTransformer, ViTConfig

PEERS = ("hf", "timm", "torchvision")
LIBRARIES = {"hf": "transformers", "timm": "timm", "torchvision": "torchvision"}


def load_model(source: str, **overrides: Any) -> VisionTransformer:
    """vitkit's model for `source`: a variant name (`vit_b16`, `ViT-B/16`, ...) with fresh weights, or a saved
    model (file or directory of any supported format), with config overrides applied."""
    from ..checkpoints import load_pretrained
    from ..models import create_model
    from ..models.variants import config_for

    if Path(source).exists():
        return load_pretrained(source, **overrides)
    try:
        cfg = config_for(source)
    except ValueError as e:
        raise ValueError(f"{source!r} is neither a saved model (no such file or directory) nor a variant: {e}") from e
    return create_model(cfg, **overrides)


def check_plain(cfg: ViTConfig, peer: str) -> None:
    """Refuse configs the peers cannot build: only plain class-token ViTs have a twin in every library."""
    refused = {
        "hybrid": cfg.hybrid is not None,
        "pool": cfg.pool != "token",
        "representation_size": cfg.representation_size is not None,
        "pos_embed": cfg.pos_embed != "learn",
    }
    for name, bad in refused.items():
        if bad:
            raise ValueError(
                f"--vs {peer}: ViTConfig.{name}={getattr(cfg, name)!r}; peers are built for plain class-token ViTs "
                "only (hybrid=None, pool='token', representation_size=None, pos_embed='learn')"
            )


def build_peer(peer: str, cfg: ViTConfig) -> nn.Module:
    """`peer`'s ViT ("hf", "timm" or "torchvision") with the architecture of `cfg`, randomly initialised.

    Raises:
        ValueError: an unknown peer, or a config the peer cannot express (named).
        ImportError: the peer's library does not import here; the message carries the library's own error.
    """
    if peer not in PEERS:
        raise ValueError(f"unknown peer {peer!r}; expected one of {', '.join(PEERS)}")
    check_plain(cfg, peer)
    builder = {"hf": _hf, "timm": _timm, "torchvision": _torchvision}[peer]
    try:
        return builder(cfg)
    except ImportError as e:
        raise ImportError(
            f"--vs {peer}: {LIBRARIES[peer]} does not import here ({e}); it is a peer where it imports, e.g. on a "
            "GPU machine with a CUDA build of PyTorch"
        ) from e


class LogitsOf(nn.Module):
    """Wraps a Hugging Face model so that forward(images) returns the logits tensor, not an output object."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def _hf(cfg: ViTConfig) -> nn.Module:
    from transformers import ViTConfig as HFConfig
    from transformers import ViTForImageClassification

    from ..checkpoints.hf_config import GELU_NAME

    h, w = cfg.img_size
    hf_cfg = HFConfig(
        hidden_size=cfg.width,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.heads,
        intermediate_size=cfg.mlp_dim,
        hidden_act=GELU_NAME[cfg.gelu],
        layer_norm_eps=cfg.norm_eps,
        image_size=h if h == w else (h, w),
        patch_size=cfg.patch_size,
        num_channels=cfg.in_chans,
        qkv_bias=cfg.qkv_bias,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.attn_dropout,
        num_labels=cfg.num_classes,
        attn_implementation="sdpa",  # the fused kernel, as vitkit's forward uses
    )
    return LogitsOf(ViTForImageClassification(hf_cfg))


def _timm(cfg: ViTConfig) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    return TimmViT(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        num_classes=cfg.num_classes,
        global_pool="token",
        embed_dim=cfg.width,
        depth=cfg.depth,
        num_heads=cfg.heads,
        mlp_ratio=cfg.mlp_dim / cfg.width,
        qkv_bias=cfg.qkv_bias,
        drop_rate=cfg.dropout,
        attn_drop_rate=cfg.attn_dropout,
        drop_path_rate=cfg.drop_path,
        norm_layer=partial(nn.LayerNorm, eps=cfg.norm_eps),
        act_layer=partial(nn.GELU, approximate="tanh" if cfg.gelu == "tanh" else "none"),
    )


def _torchvision(cfg: ViTConfig) -> nn.Module:
    from torchvision.models import VisionTransformer as TorchvisionViT

    h, w = cfg.img_size
    refused = {
        "img_size": (h != w, "square images only"),
        "gelu": (cfg.gelu != "exact", "exact GELU only"),
        "qkv_bias": (not cfg.qkv_bias, "biases on q, k, v always"),
        "in_chans": (cfg.in_chans != 3, "3 input channels only"),
    }
    for name, (bad, why) in refused.items():
        if bad:
            raise ValueError(f"--vs torchvision: ViTConfig.{name}={getattr(cfg, name)!r}; torchvision's ViT has {why}")
    return TorchvisionViT(
        image_size=h,
        patch_size=cfg.patch_size,
        num_layers=cfg.depth,
        num_heads=cfg.heads,
        hidden_dim=cfg.width,
        mlp_dim=cfg.mlp_dim,
        dropout=cfg.dropout,
        attention_dropout=cfg.attn_dropout,
        num_classes=cfg.num_classes,
        norm_layer=partial(nn.LayerNorm, eps=cfg.norm_eps),
    )
