"""Position embeddings: fixed 2-D sin-cos tables and resampling of learned ones to another grid."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sincos_2d(grid: tuple[int, int], width: int, temperature: float = 10_000.0) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings as big_vision's `posemb_sincos_2d`.

    Returns:
        (1, H*W, width) float32, rows in row-major grid order; features are [sin x, cos x, sin y, cos y].
    """
    h, w = grid
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    quarter = width // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64) / max(quarter - 1, 1))
    x = x.flatten()[:, None] * omega[None, :]  # (H*W, D/4)
    y = y.flatten()[:, None] * omega[None, :]
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)[None].float()


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    mode: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resample learned position embeddings to another token grid (paper section 3.2, fine-tuning at higher
    resolution). The class-token row(s) are kept apart and left as they are.

    Args:
        pos_embed: (1, prefix + H*W, D).
        new_grid: (H', W') wanted.
        old_grid: (H, W) of `pos_embed`; a square grid is assumed when None.
        num_prefix_tokens: leading rows that are not on the grid.
        mode: "bicubic" (timm, Hugging Face) or "bilinear" (the official code's
            `scipy.ndimage.zoom(order=1)`, whose default grid_mode=False aligns the corner pixel centres).
        antialias: with "bicubic", low-pass when shrinking the grid (timm does; Hugging Face does not).

    Returns:
        (1, prefix + H'*W', D) in the dtype of `pos_embed`.
    """
    prefix, grid_rows = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    n = grid_rows.shape[1]
    if old_grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"position embedding has {n} grid rows, not a square grid; pass old_grid")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != n:
        raise ValueError(f"position embedding has {n} grid rows, but old_grid={old_grid}")
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    dim = grid_rows.shape[-1]
    dtype = pos_embed.dtype
    grid_rows = grid_rows.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)  # (1, D, H, W)
    antialias = antialias and mode == "bicubic" and (new_grid[0] < old_grid[0] or new_grid[1] < old_grid[1])
    align = mode == "bilinear"
    grid_rows = F.interpolate(grid_rows, size=tuple(new_grid), mode=mode, align_corners=align, antialias=antialias)
    grid_rows = grid_rows.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(dtype)
    return torch.cat([prefix, grid_rows], dim=1)


def resample_pos_embed_traced(
    pos_embed: torch.Tensor,
    new_grid: tuple,
    old_grid: tuple[int, int],
    num_prefix_tokens: int = 1,
    mode: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """`resample_pos_embed` for a grid known only when an exported graph runs (ONNX with dynamic height and
    width), with the same numbers and no Python branch on `new_grid`.

    The eager function decides in Python whether to resample at all and whether the grid shrinks (antialias);
    a traced graph cannot, since `new_grid` holds traced sizes (SymInt under torch.export, 0-d tensors under
    torch.jit.trace). So the plain interpolation always runs, which at an unchanged grid is the identity (bicubic
    and bilinear weights at offset 0 are exactly 1 and 0), and with antialias the antialiased one runs too and
    `torch.where` picks it when either side shrinks. Both act on the (1, D, H, W) table, not on images: cheap.

    Args:
        pos_embed: (1, prefix + H*W, D).
        new_grid: (H', W'), ints or traced sizes.
        old_grid: (H, W) of `pos_embed`.
        num_prefix_tokens, mode, antialias: as `resample_pos_embed`.

    Returns:
        (1, prefix + H'*W', D) in the dtype of `pos_embed`.
    """
    prefix, grid_rows = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = grid_rows.shape[-1]
    grid_rows = grid_rows.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)  # (1, D, H, W)
    size = (new_grid[0], new_grid[1])
    out = F.interpolate(grid_rows, size=size, mode=mode, align_corners=mode == "bilinear")
    if antialias and mode == "bicubic":
        smooth = F.interpolate(grid_rows, size=size, mode=mode, align_corners=False, antialias=True)
        shrinks = (torch.scalar_tensor(size[0]) < old_grid[0]) | (torch.scalar_tensor(size[1]) < old_grid[1])
        out = torch.where(shrinks, smooth, out)
    out = out.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)  # (1, H'*W', D), row-major
    return torch.cat([prefix, out], dim=1)
