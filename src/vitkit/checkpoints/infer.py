"""Read a model's architecture off the shapes of a state dict in vitkit's names."""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from ..models.config import stem_stride


def infer_config(
    sd: dict[str, torch.Tensor], path: str, img_size: Any = None, wanted_img_size: Any = None
) -> dict[str, Any]:
    """The ViTConfig fields the tensors determine.

    Everything but the head count is in the shapes: width, depth, MLP size, patch size, channels, token grid,
    class token, pooling, pre-logits, classes, qkv bias, hybrid stem depths and width. The caller supplies
    `heads`. The grid is `img_size`'s when the file stores one (a mismatch is an error), else `wanted_img_size`'s
    when the stored rows fit it (a non-square file loaded at its own size), else square.
    """

    def need(key: str) -> torch.Tensor:
        if key not in sd:
            raise ValueError(
                f"{path}: key {key!r} is missing; cannot infer the architecture (found keys such as {sorted(sd)[:6]})"
            )
        return sd[key]

    proj = need("patch_embed.proj.weight")  # (D, C_in, p, p)
    out: dict[str, Any] = {"width": proj.shape[0], "patch_size": proj.shape[-1]}
    blocks = {int(m[1]) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks:
        raise ValueError(f"{path}: no transformer blocks (keys `blocks.N.*`) found")
    out["depth"] = max(blocks) + 1
    if len(blocks) != out["depth"]:  # a damaged file, or a key name off by a digit: not a model of that depth
        gaps = sorted(set(range(out["depth"])) - blocks)
        raise ValueError(
            f"{path}: blocks {gaps[:5]}{' ...' if len(gaps) > 5 else ''} are missing; the file has "
            f"{len(blocks)} blocks numbered up to {max(blocks)}"
        )
    out["mlp_dim"] = need("blocks.0.mlp.fc1.weight").shape[0]
    out["qkv_bias"] = "blocks.0.attn.qkv.bias" in sd
    out["class_token"] = "cls_token" in sd
    out.update(_infer_stem(sd, proj))
    stride = out["patch_size"] * stem_stride(out.get("hybrid"))

    if "pos_embed" in sd:
        out["pos_embed"] = "learn"
        n = sd["pos_embed"].shape[1] - int(out["class_token"])
        wanted = _pair(wanted_img_size)
        if img_size is None and wanted is not None and (wanted[0] // stride) * (wanted[1] // stride) == n:
            img_size = wanted
        if img_size is not None:
            grid = (img_size[0] // stride, img_size[1] // stride)
            if grid[0] * grid[1] != n:
                raise ValueError(
                    f"{path}: pos_embed holds {n} grid positions, not the {grid[0]}x{grid[1]} grid "
                    f"of img_size {tuple(img_size)}"
                )
        else:
            side = math.isqrt(n)
            if side * side != n:
                raise ValueError(f"{path}: pos_embed holds {n} grid positions, not a square grid; pass img_size")
            grid = (side, side)
        out["img_size"] = (grid[0] * stride, grid[1] * stride)
    else:
        out["pos_embed"] = "sincos"

    if "fc_norm.weight" in sd:
        out.update(pool="gap", fc_norm=True)
    elif not out["class_token"]:
        out.update(pool="gap", fc_norm=False)
    out["representation_size"] = sd["pre_logits.fc.weight"].shape[0] if "pre_logits.fc.weight" in sd else None
    out["num_classes"] = sd["head.weight"].shape[0] if "head.weight" in sd else 0
    return out


def _infer_stem(sd: dict[str, torch.Tensor], proj: torch.Tensor) -> dict[str, Any]:
    if "patch_embed.backbone.stem.conv.weight" not in sd:
        return {"in_chans": proj.shape[1], "hybrid": None}
    stem = sd["patch_embed.backbone.stem.conv.weight"]  # (width, C_in, 7, 7)
    depths = []
    for s in range(8):
        units = {int(m[1]) for k in sd if (m := re.match(rf"patch_embed\.backbone\.stages\.{s}\.blocks\.(\d+)\.", k))}
        if not units:
            break
        depths.append(max(units) + 1)
    return {"in_chans": stem.shape[1], "hybrid": tuple(depths), "stem_width": stem.shape[0]}


def _pair(size: Any) -> tuple[int, int] | None:
    if size is None:
        return None
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
