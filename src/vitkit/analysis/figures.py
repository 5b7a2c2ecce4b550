"""The pictures of the analyses, drawn as in the paper (Fig. 6, Fig. 7), with matplotlib on an Agg canvas.

Large grids (every head of every layer, a 24 x 24 grid of 24 x 24 similarity maps) are drawn as one mosaic image
rather than hundreds of axes, so a figure takes well under a second whatever the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..plots import _figure, _save

PAIRS_PER_ROW = 3  # (picture, overlay) pairs per row of the rollout figure
FILTERS_PER_ROW = 7  # as the paper's 4 x 7 panel of 28 components


def mosaic(tiles: np.ndarray, pad: int = 1) -> np.ndarray:
    """(R, C, h, w) tiles -> (R * (h + pad) - pad, C * (w + pad) - pad) image with NaN gutters."""
    R, C, h, w = tiles.shape
    out = np.full((R * (h + pad) - pad, C * (w + pad) - pad), np.nan)
    for r in range(R):
        for c in range(C):
            out[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = tiles[r, c]
    return out


def _tile_ticks(ax, axis: str, count: int, size: int, pad: int, labels: Sequence[object]) -> None:
    centres = [i * (size + pad) + (size - 1) / 2 for i in range(count)]
    (ax.set_xticks if axis == "x" else ax.set_yticks)(centres, [str(v) for v in labels])


def upsample(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(gh, gw) map -> (h, w) bilinear, as the paper's maps are upsampled to the image."""
    image = Image.fromarray(np.asarray(heatmap, dtype=np.float32))  # mode "F"
    return np.asarray(image.resize((size[1], size[0]), Image.Resampling.BILINEAR))


def rollout_figure(
    pictures: Sequence[np.ndarray], maps: np.ndarray, out_png: str | Path, titles: Sequence[str] = (), title: str = ""
) -> Path:
    """Each image beside its attention map overlaid on it (paper Fig. 6); each map scaled to its own maximum.

    Args:
        pictures: uint8 (h, w, 3) or (h, w) images, any size each.
        maps: (B, gh, gw) attention over the token grid, stretched onto each picture.
    """
    n = len(pictures)
    cols = min(n, PAIRS_PER_ROW)
    rows = math.ceil(n / cols)
    fig = _figure((3.2 * 2 * cols, 3.4 * rows))
    axes = np.asarray(fig.subplots(rows, 2 * cols, squeeze=False))
    for ax in axes.flat:
        ax.axis("off")
    for i, (picture, heatmap) in enumerate(zip(pictures, maps, strict=True)):
        left, right = axes[i // cols, 2 * (i % cols)], axes[i // cols, 2 * (i % cols) + 1]
        cmap = "gray" if picture.ndim == 2 else None
        left.imshow(picture, cmap=cmap)
        right.imshow(picture, cmap=cmap)
        overlay = upsample(heatmap / max(float(heatmap.max()), 1e-12), picture.shape[:2])
        right.imshow(overlay, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
        if i < len(titles):
            left.set_title(titles[i], fontsize=8)
        right.set_title("attention rollout", fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, out_png)


def heads_figure(heads: np.ndarray, layers: Sequence[int], out_png: str | Path, title: str = "") -> Path:
    """Raw attention maps of one image: heads down, layers across; each map scaled to its own maximum.

    Args:
        heads: (layers, heads, gh, gw).
        layers: layer index of each row of `heads` (shown 1-based, as the paper counts depth).
    """
    L, H, gh, gw = heads.shape
    scaled = heads / np.maximum(heads.max(axis=(2, 3), keepdims=True), 1e-12)
    image = mosaic(scaled.transpose(1, 0, 2, 3))  # (H, L) tiles
    fig = _figure((max(4.0, 0.9 * L + 1.5), max(3.0, 0.9 * H * gh / gw + 1.0)))
    ax = fig.subplots()
    ax.imshow(image, cmap="inferno", vmin=0.0, vmax=1.0, interpolation="nearest")
    _tile_ticks(ax, "x", L, gw, 1, [i + 1 for i in layers])
    _tile_ticks(ax, "y", H, gh, 1, range(1, H + 1))
    ax.tick_params(length=0, labelsize=7)
    ax.set(xlabel="layer", ylabel="head")
    ax.set_title(title or "attention of the pooled output, per head", fontsize=9)
    return _save(fig, out_png)


def distance_figure(distances: np.ndarray, out_png: str | Path, title: str = "") -> Path:
    """Mean attention distance per head against depth (paper Fig. 7 right): one dot per head per layer.

    Args:
        distances: (layers, heads) in pixels.
    """
    L, H = distances.shape
    fig = _figure((6.0, 4.5))
    ax = fig.subplots()
    depth = np.arange(1, L + 1)
    for h in range(H):
        ax.scatter(depth, distances[:, h], s=14, alpha=0.8, label=f"head {h + 1}")
    if H <= 16:
        ax.legend(fontsize=6, ncol=2, loc="lower right")
    ax.set(xlabel="network depth (layer)", ylabel="mean attention distance (pixels)")
    ax.set_xlim(0.5, L + 0.5)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.set_title(title or "mean attention distance", fontsize=9)
    return _save(fig, out_png)


def posembed_figure(similarity: np.ndarray, out_png: str | Path, title: str = "") -> Path:
    """The grid of grids (paper Fig. 7 centre): tile (i, j) is position (i, j)'s cosine similarity to all positions.

    Args:
        similarity: (gh, gw, gh, gw).
    """
    gh, gw = similarity.shape[:2]
    image = mosaic(similarity)
    aspect = image.shape[0] / image.shape[1]
    side = 7.0  # inches of the longer side of the mosaic
    fig = _figure((side * min(1.0, 1.0 / aspect) + 1.2, side * min(1.0, aspect) + 0.6))
    ax = fig.subplots()
    shown = ax.imshow(image, cmap="viridis", vmin=-1.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(shown, ax=ax, shrink=0.8, label="cosine similarity")
    step = max(1, math.ceil(max(gh, gw) / 12))  # at most about a dozen labels per axis
    ax.set_xticks([c * (gw + 1) + (gw - 1) / 2 for c in range(0, gw, step)], [str(c + 1) for c in range(0, gw, step)])
    ax.set_yticks([r * (gh + 1) + (gh - 1) / 2 for r in range(0, gh, step)], [str(r + 1) for r in range(0, gh, step)])
    ax.tick_params(length=0, labelsize=7)
    ax.set(xlabel="input patch column", ylabel="input patch row")
    ax.set_title(title or f"position embedding similarity ({gh}x{gw} grid)", fontsize=9)
    return _save(fig, out_png)


def filters_figure(components: np.ndarray, ratios: np.ndarray, out_png: str | Path, title: str = "") -> Path:
    """Principal components of the patch-embedding filters as patches (paper Fig. 7 left), each scaled to [0, 1]
    on its own; RGB for 3 channels, grey for 1 (and for other counts, the mean over channels).

    Args:
        components: (count, P, P, C).
        ratios: (count,) explained-variance fractions, shown over each patch.
    """
    n = len(components)
    lo = components.min(axis=(1, 2, 3), keepdims=True)
    hi = components.max(axis=(1, 2, 3), keepdims=True)
    patches = (components - lo) / np.maximum(hi - lo, 1e-12)
    cols = min(n, FILTERS_PER_ROW)
    rows = math.ceil(n / cols)
    fig = _figure((1.3 * cols + 0.4, 1.45 * rows + 0.6))
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False))
    for ax in axes.flat:
        ax.axis("off")
    for i, (patch, ratio) in enumerate(zip(patches, ratios, strict=True)):
        ax = axes[i // cols, i % cols]
        if patch.shape[-1] == 3:
            ax.imshow(patch, interpolation="nearest")
        else:
            ax.imshow(patch.mean(axis=-1), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"{i + 1}: {ratio:.1%}", fontsize=7)
    fig.suptitle(title or "RGB embedding filters (first principal components)", fontsize=9)
    return _save(fig, out_png)
