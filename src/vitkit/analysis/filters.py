"""Principal components of the patch-embedding filters (paper Fig. 7 left).

The patch embedding is a linear map of each P x P x C pixel patch, i.e. D filters of P x P x C values; their
top principal components resemble "plausible basis functions for a low-dimensional representation of the fine
structure within each patch" (paper section 4.5).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..models import VisionTransformer

log = logging.getLogger("vitkit")


def principal_components(samples: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA of the rows of `samples`, by SVD of the centred matrix.

    Signs are made deterministic: each component's entry of largest magnitude is positive.

    Args:
        samples: (n, k) one sample per row.
        count: components wanted, at most min(n, k).

    Returns:
        ((count, k) float64 unit components, strongest first; (count,) fraction of the variance each explains).
    """
    n, k = samples.shape
    if not 1 <= count <= min(n, k):
        raise ValueError(f"count={count}: {n} samples of {k} values have at most {min(n, k)} principal components")
    x = samples.double()
    x = x - x.mean(dim=0, keepdim=True)
    _, s, vt = torch.linalg.svd(x, full_matrices=False)  # vt: (min(n, k), k)
    components = vt[:count]
    biggest = components.abs().argmax(dim=1, keepdim=True)
    components = components * components.gather(1, biggest).sign()
    variance = s**2
    return components, variance[:count] / variance.sum().clamp_min(torch.finfo(torch.float64).tiny)


def stem_name(model: VisionTransformer) -> str:
    hybrid = model.cfg.hybrid
    if hybrid is None:
        return "no stem"
    stages = ",".join(map(str, hybrid)) if hybrid else "root block only"
    return f"ResNet v2 stem ({stages}; stride {model.cfg.stem_stride})"


def patch_filters(model: VisionTransformer) -> torch.Tensor:
    """(D, P, P, C) filters of the patch embedding (`patch_embed.proj.weight` is (D, C, P, P)).

    Raises:
        ValueError: the model is a hybrid, whose patch embedding reads the stem's feature map, not pixels.
    """
    cfg = model.cfg
    if cfg.hybrid is not None:
        name = cfg.name or "this model"
        raise ValueError(
            f"{name} is a hybrid: its patch embedding projects the {stem_name(model)} feature map "
            f"({cfg.stem_channels} channels, {cfg.patch_size}x{cfg.patch_size}), so it has no pixel-patch filters "
            "to analyse; use a plain ViT"
        )
    return model.patch_embed.proj.weight.detach().permute(0, 2, 3, 1)


@torch.no_grad()
def filter_components(model: VisionTransformer, count: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Top principal components of the patch-embedding filters, as patches.

    Args:
        model: a plain (non-hybrid) ViT.
        count: components wanted; capped at what the filters have (min(D, P * P * C)).

    Returns:
        ((count, P, P, C) float64 unit components, strongest first; (count,) explained-variance ratios).
    """
    filters = patch_filters(model)  # (D, P, P, C)
    D, P, _, C = filters.shape
    available = min(D, P * P * C)
    if count > available:
        log.info("%d filters of %dx%dx%d values have %d components; showing those", D, P, P, C, available)
        count = available
    components, ratio = principal_components(filters.reshape(D, P * P * C), count)
    return components.reshape(count, P, P, C).cpu().numpy(), ratio.cpu().numpy()
