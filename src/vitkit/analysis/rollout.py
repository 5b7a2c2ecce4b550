"""Attention rollout (Abnar & Zuidema 2020; paper appendix D.8) as pure functions of attention matrices.

Each layer's heads are fused into one (T, T) matrix, the residual connection is accounted for by adding the
identity, rows are renormalised, and the layers' matrices are multiplied from the first to the last:
joint = A'_L @ ... @ A'_1. Row t of `joint` says how much each input token contributes to token t at the output.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch

Fusion = Literal["mean", "max", "min"]
FUSIONS: tuple[str, ...] = Fusion.__args__


def fuse_heads(attn: torch.Tensor, fusion: Fusion = "mean") -> torch.Tensor:
    """(B, heads, T, T) -> (B, T, T): the mean (the paper's choice), max or min over heads."""
    if fusion == "mean":
        return attn.mean(dim=1)
    if fusion == "max":
        return attn.amax(dim=1)
    if fusion == "min":
        return attn.amin(dim=1)
    raise ValueError(f"head fusion {fusion!r}; expected one of {FUSIONS}")


def discard_lowest(fused: torch.Tensor, fraction: float, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Zero the lowest `fraction` of each image's fused attentions, keeping the prefix (class-token) columns.

    As jacobgil's vit_explain: the count is `int(fraction * T * T)` of all entries, ranked over the whole matrix;
    those that fall in a prefix column (attention *to* the class token) are kept, so fewer may be zeroed.
    Rows no longer sum to 1 afterwards; `rollout_step` renormalises them.

    Args:
        fused: (B, T, T) attention with heads fused.
        fraction: in [0, 1).
        num_prefix_tokens: leading tokens that are not patches (1 with a class token, else 0).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"discard fraction {fraction}; expected a value in [0, 1)")
    B, T, _ = fused.shape
    k = int(fraction * T * T)
    if k == 0:
        return fused
    lowest = fused.reshape(B, T * T).topk(k, dim=-1, largest=False).indices  # (B, k) flat indices
    drop = torch.zeros(B, T * T, dtype=torch.bool, device=fused.device)
    drop.scatter_(1, lowest, True)
    drop = drop.view(B, T, T)
    drop[:, :, :num_prefix_tokens] = False  # never the class-token column
    return fused.masked_fill(drop, 0.0)


def rollout_step(
    joint: torch.Tensor, attn: torch.Tensor, fusion: Fusion = "mean", discard: float = 0.0, num_prefix_tokens: int = 1
) -> torch.Tensor:
    """Fold one more layer into the rollout: joint <- normalise(0.5 A + 0.5 I) @ joint.

    Args:
        joint: (B, T, T) rollout of the layers below (the identity before the first).
        attn: (B, heads, T, T) this layer's attention probabilities.

    Returns:
        (B, T, T) in joint's dtype.
    """
    a = discard_lowest(fuse_heads(attn, fusion), discard, num_prefix_tokens).to(joint.dtype)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    a = 0.5 * a + 0.5 * eye  # the residual path carries the token itself (A' = 0.5 A + 0.5 I)
    a = a / a.sum(dim=-1, keepdim=True)  # rows sum to 1 again (only needed after a discard or max/min fusion)
    return a @ joint


def rollout(
    attentions: Iterable[torch.Tensor], fusion: Fusion = "mean", discard: float = 0.0, num_prefix_tokens: int = 1
) -> torch.Tensor:
    """The rollout of a stack of layers, first layer first.

    Args:
        attentions: (B, heads, T, T) per layer, in the order the layers run.

    Returns:
        (B, T, T) float64 joint attention.
    """
    joint = None
    for attn in attentions:
        if joint is None:
            B, _, T, _ = attn.shape
            joint = torch.eye(T, dtype=torch.float64, device=attn.device).expand(B, T, T)
        joint = rollout_step(joint, attn, fusion, discard, num_prefix_tokens)
    if joint is None:
        raise ValueError("no attention matrices to roll out")
    return joint


def token_map(
    attn: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int = 1, pool: str = "token"
) -> torch.Tensor:
    """What the pooled output attends to over the patch grid.

    With pool="token" this is the class-token row over the patch tokens; with pool="gap" the model's output is the
    mean of the patch tokens, so it is the mean over the patch-token rows (REFERENCE.md section 5).

    Args:
        attn: (..., T, T), a rollout or one layer's raw attention (with a head axis in front, per head).
        grid: (gh, gw) token grid, row-major.

    Returns:
        (..., gh, gw).
    """
    p = num_prefix_tokens
    assert attn.shape[-1] == p + grid[0] * grid[1], (attn.shape, grid, p)
    if pool == "token":
        row = attn[..., 0, p:]
    elif pool == "gap":
        row = attn[..., p:, p:].mean(dim=-2)
    else:
        raise ValueError(f"pool {pool!r}; expected 'token' or 'gap'")
    return row.reshape(*row.shape[:-1], *grid)
