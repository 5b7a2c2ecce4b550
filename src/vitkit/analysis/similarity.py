"""Position-embedding similarity (paper Fig. 7 centre): the cosine similarity of each grid position's embedding
with every other position's, drawn as a grid of grids. The class-token row has no position and is left out.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..models import VisionTransformer
from ..models.posembed import resample_pos_embed, sincos_2d


def cosine_similarity_grid(embeddings: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Cosine similarity of every pair of positions.

    Args:
        embeddings: (gh * gw, D) position embeddings in row-major grid order.
        grid: (gh, gw).

    Returns:
        (gh, gw, gh, gw) float64: out[i, j] is the (gh, gw) map of position (i, j)'s similarity to all positions.
    """
    gh, gw = grid
    if embeddings.shape[0] != gh * gw:
        raise ValueError(f"{embeddings.shape[0]} position embeddings do not fill a {gh}x{gw} grid")
    e = F.normalize(embeddings.double(), dim=-1)
    return (e @ e.T).reshape(gh, gw, gh, gw)


def grid_pos_embed(model: VisionTransformer, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """(gh * gw, D) position embeddings of the grid positions, without the prefix rows.

    At another grid than the model's, learned embeddings are resampled the way the model itself does it at
    forward time (`resample_pos_embed` with the model's interpolation and antialias settings); fixed sin-cos
    ones are computed for the grid.
    """
    cfg = model.cfg
    grid = cfg.grid if grid is None else (int(grid[0]), int(grid[1]))
    if min(grid) < 1:
        raise ValueError(f"grid {grid}: expected positive sides")
    if cfg.pos_embed == "sincos":
        return sincos_2d(grid, cfg.width)[0]
    p = cfg.num_prefix_tokens
    pos = resample_pos_embed(model.pos_embed.detach(), grid, cfg.grid, p, cfg.pos_interp, cfg.pos_antialias)
    return pos[0, p:]


def grid_for_size(model: VisionTransformer, size: tuple[int, int]) -> tuple[int, int]:
    """The token grid of an input of `size` (height, width) pixels."""
    stride = model.cfg.stride
    if size[0] % stride or size[1] % stride or min(size) < stride:
        raise ValueError(f"input size {tuple(size)} is not a positive multiple of the model's token stride {stride}")
    return size[0] // stride, size[1] // stride


@torch.no_grad()
def posembed_similarity(model: VisionTransformer, grid: tuple[int, int] | None = None) -> np.ndarray:
    """(gh, gw, gh, gw) float64 cosine similarity of the model's position embeddings, at its own grid or, resampled,
    at `grid` (`grid_for_size` turns an input size into one)."""
    grid = model.cfg.grid if grid is None else grid
    return cosine_similarity_grid(grid_pos_embed(model, grid), grid).cpu().numpy()
