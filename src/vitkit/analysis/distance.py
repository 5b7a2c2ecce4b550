"""Mean attention distance (paper Fig. 7 right, appendix D.7): how far, in input pixels, each head looks.

For one head and one image: for each query patch, the attention-weighted mean of the distances from it to the
patches it attends to; then the mean over query patches. The paper averages that over 128 images and plots one
dot per head against depth; early layers hold both local and global heads, later layers only global ones.

Conventions (the paper does not spell them out; these follow the common implementation, `probing-vits`):
- distance between two patches is the distance between their centres: grid distance x the token stride in input
  pixels (the patch size; for a hybrid the stem's stride x the patch size, i.e. image size / grid);
- the class token (any prefix token) has no position, so it is left out as a query and as a key, and each
  query's attention over the patch tokens is renormalised to sum to 1. Without the renormalisation
  (`probing-vits` does not renormalise) a head that parks attention on the class token would look local; with it
  the number says where the head's attention *to the image* goes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from ..data.images import UnreadableImage
from ..data.sources import Source
from ..models import VisionTransformer
from .attention import iter_attention, token_grid

log = logging.getLogger("vitkit")


def patch_distances(grid: tuple[int, int], patch_px: float) -> torch.Tensor:
    """(N, N) float64 distances in pixels between the centres of the patches of a row-major (gh, gw) grid."""
    ys, xs = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64), indexing="ij"
    )
    centres = torch.stack([ys.flatten(), xs.flatten()], dim=1) * patch_px  # (N, 2); the half-patch offset cancels
    return torch.cdist(centres, centres)


def mean_distance(attn: torch.Tensor, distances: torch.Tensor, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Mean attention distance of each head of each image.

    Args:
        attn: (B, heads, T, T) attention probabilities, T = num_prefix_tokens + N.
        distances: (N, N) distances between patches (`patch_distances`).
        num_prefix_tokens: leading non-patch tokens, left out as queries and keys.

    Returns:
        (B, heads) float64.
    """
    p = num_prefix_tokens
    a = attn[..., p:, p:].double()  # (B, h, N, N) patch-to-patch
    a = a / a.sum(dim=-1, keepdim=True)  # each query's attention over the patches sums to 1
    per_query = (a * distances.to(a.device)).sum(dim=-1)  # (B, h, N)
    return per_query.mean(dim=-1)


@torch.no_grad()
def mean_attention_distance(
    model: VisionTransformer, batches: Iterable[torch.Tensor], max_images: int | None = None
) -> np.ndarray:
    """Mean attention distance in input pixels of every head of every layer, averaged over images.

    Memory stays bounded: batches are streamed and each layer's attention is reduced to (B, heads) distances
    before the next layer runs; only per-(layer, head) sums are kept.

    Args:
        model: any ViT vitkit builds; it is put in eval mode.
        batches: (B, C, H, W) normalised model inputs (`sample_batches`, or any iterable of tensors).
        max_images: stop after this many images (None: all of `batches`).

    Returns:
        (layers, heads) float64 distances in pixels of the model's input.
    """
    model.eval()
    cfg = model.cfg
    device = next(model.parameters()).device
    sums = torch.zeros(cfg.depth, cfg.heads, dtype=torch.float64)
    count = 0
    distances = None
    for images in batches:
        if max_images is not None:
            images = images[: max_images - count]
        if len(images) == 0:
            break
        images = images.to(device)
        grid = token_grid(model, images)
        if distances is None or distances.shape[0] != grid[0] * grid[1]:
            distances = patch_distances(grid, cfg.stride)  # stride = image size / grid, hybrids included
        for i, attn in iter_attention(model, images):
            sums[i] += mean_distance(attn, distances, cfg.num_prefix_tokens).sum(dim=0).cpu()
        count += len(images)
        if max_images is not None and count >= max_images:
            break
    if count == 0:
        raise ValueError("no images to measure attention distance on")
    return (sums / count).numpy()


def sample_batches(
    model: VisionTransformer, source: Source, count: int = 128, batch_size: int = 16, seed: int = 0
) -> Iterator[torch.Tensor]:
    """Batches of `count` images drawn at random (seeded, without replacement) from `source`, made into inputs by
    the model's preprocessing. Unreadable images are skipped with a warning.

    Yields:
        (B, C, H, W) float32 normalised inputs.
    """
    if count < 1 or batch_size < 1:
        raise ValueError(f"count={count}, batch_size={batch_size}: expected >= 1")
    n = len(source)
    if n == 0:
        raise ValueError(f"{source.name}: no images")
    picked = np.sort(np.random.default_rng(seed).choice(n, size=min(count, n), replace=False))
    prep = model.preprocess
    h, w = prep.img_size
    draft = (math.ceil(2 * w / prep.crop_pct), math.ceil(2 * h / prep.crop_pct))  # as the evaluation loader
    batch = []
    for i in picked.tolist():
        try:
            batch.append(prep(source.load(i, model.cfg.in_chans, draft=draft)))
        except UnreadableImage as e:
            log.warning("skipped %s: %s", e.where, e.reason)
            continue
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)
