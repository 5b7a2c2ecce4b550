"""Attention maps of a model on images: the rollout (paper Fig. 6, appendix D.8) and raw per-head maps.

The blocks are run one at a time on the manual attention path, and each layer's (B, heads, T, T) probabilities
are folded into the rollout and dropped before the next layer runs, so memory holds one layer's attention at a
time: a ViT-L/16 at 384 px (T = 577, 16 heads) needs about 21 MB per image for it, whatever the depth.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.images import decode
from ..models import VisionTransformer
from ..models.vit import layer_indices
from ..preprocess import normalize, resize_crop
from .rollout import Fusion, rollout_step, token_map

DISPLAY_SIDE = 512  # longest side, in pixels, of the pictures the maps are drawn on


def token_grid(model: VisionTransformer, images: torch.Tensor) -> tuple[int, int]:
    """(gh, gw) of the tokens `model` makes from `images`: input size over the token stride (for a hybrid the
    stem's stride times the patch size, so the grid is the stem's feature map cut into patches)."""
    h, w = images.shape[-2:]
    stride = model.cfg.stride
    if h % stride or w % stride:
        raise ValueError(f"input size {(h, w)} is not divisible by the model's token stride {stride}")
    return h // stride, w // stride


def iter_attention(model: VisionTransformer, images: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """Run the blocks one by one, yielding (layer, attention (B, heads, T, T)) as each is produced.

    The same computation as `model.forward_intermediates(images, attn_layers=None)` (tested against it), but the
    caller can reduce each layer's matrices before the next exists.
    """
    x = model.embed(images)
    for i, block in enumerate(model.blocks):
        x, attn = block(x, need_weights=True)
        yield i, attn


@dataclass
class AttentionMaps:
    """What `attention_maps` found, over the token grid.

    Attributes:
        rollout: (B, gh, gw) rollout of all layers: the class-token row (pool "token") or the mean of the patch
            rows (pool "gap") over the patch tokens. Not normalised: a row's patch share is below 1 when part of
            it stays on the class token.
        heads: (B, len(layers), heads, gh, gw) raw attention of each head of the chosen layers, read the same way.
        layers: the layer indices of `heads`.
        grid: (gh, gw).
    """

    rollout: np.ndarray
    heads: np.ndarray
    layers: list[int]
    grid: tuple[int, int]


@torch.no_grad()
def attention_maps(
    model: VisionTransformer,
    images: torch.Tensor,
    fusion: Fusion = "mean",
    discard: float = 0.0,
    layers: Sequence[int] = (),
    batch_size: int = 8,
) -> AttentionMaps:
    """Attention rollout of every image and, for the chosen layers, each head's raw attention map.

    Args:
        model: any ViT vitkit builds (token or average pooling, hybrids included); it is put in eval mode.
        images: (B, C, H, W) model inputs, normalised (`model.preprocess` or `load_images`); each batch is moved
            to the model's device.
        fusion: how heads are fused for the rollout: "mean", "max" or "min".
        discard: fraction of each layer's lowest fused attentions to zero (class-token column kept).
        layers: layers whose per-head maps to return (negative from the end); () for none.
        batch_size: images per forward pass (memory: one layer's attention of one batch at a time).
    """
    model.eval()
    cfg = model.cfg
    grid = token_grid(model, images)
    layers = layer_indices(layers, cfg.depth)
    p = cfg.num_prefix_tokens
    device = next(model.parameters()).device
    rollouts, heads = [], []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device)
        joint, per_layer = None, []
        for i, attn in iter_attention(model, batch):
            if joint is None:
                B, _, T, _ = attn.shape
                joint = torch.eye(T, dtype=torch.float64, device=attn.device).expand(B, T, T)
            joint = rollout_step(joint, attn, fusion, discard, p)
            if i in layers:
                per_layer.append(token_map(attn, grid, p, cfg.pool).float())  # (B, heads, gh, gw)
        rollouts.append(token_map(joint, grid, p, cfg.pool).cpu())
        heads.append(torch.stack(per_layer, 1).cpu() if per_layer else torch.zeros(len(batch), 0, cfg.heads, *grid))
    return AttentionMaps(torch.cat(rollouts).numpy(), torch.cat(heads).numpy(), layers, grid)


def attention_rollout(
    model: VisionTransformer, images: torch.Tensor, fusion: Fusion = "mean", discard: float = 0.0, batch_size: int = 8
) -> np.ndarray:
    """(B, gh, gw) float64 attention rollout of each image; see `attention_maps`."""
    return attention_maps(model, images, fusion, discard, (), batch_size).rollout


def load_images(model: VisionTransformer, paths: Sequence[str | Path]) -> tuple[torch.Tensor, list[np.ndarray]]:
    """Read image files as the model's inputs, and the pictures to draw their maps on.

    Inputs are made by the model's own preprocessing (`model.preprocess`). The picture is the region the model
    saw: the centre crop for "shorter" preprocessing, the whole image for "squash" (whose map is stretched back to
    the image's own aspect when drawn).

    Returns:
        (B, C, H, W) float32 inputs and B uint8 arrays (h, w, 3) or (h, w).

    Raises:
        vitkit.data.UnreadableImage (a ValueError): a file is not a readable image.
    """
    prep = model.preprocess
    inputs, pictures = [], []
    for path in paths:
        image = decode(Path(path), str(path), channels=model.cfg.in_chans)
        model_view = resize_crop(image, prep)
        inputs.append(normalize(model_view, prep))
        if prep.resize == "squash":
            image.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE))  # a picture to draw on, not a camera original
        pictures.append(np.asarray(image if prep.resize == "squash" else model_view))
    return torch.stack(inputs), pictures
