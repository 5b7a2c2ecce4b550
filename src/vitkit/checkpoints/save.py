"""Write a model in any format vitkit writes, and convert between formats."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..models import VisionTransformer
from . import hf, jax_npz, native, timm
from .load import load_pretrained

WRITERS = {"vitkit": native.write, "npz": jax_npz.write, "hf": hf.write, "timm": timm.write}


def save_pretrained(model: VisionTransformer, path: str | Path, to: str = "vitkit", overwrite: bool = False) -> Path:
    """Save `model` as `to` ("vitkit", "npz" official layout, "hf" directory, "timm" .pth/.safetensors).

    Raises:
        FileExistsError: `path` exists and `overwrite` is False; nothing is touched.
    """
    path = _check_target(path, to, overwrite)
    WRITERS[to](model, path)
    return path


def _check_target(path: str | Path, to: str, overwrite: bool) -> Path:
    if to not in WRITERS:
        raise ValueError(f"unknown output format {to!r}; expected one of {sorted(WRITERS)}")
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; refusing to overwrite it (pass overwrite=True / --overwrite)")
    return path


def convert(src: str | Path, dst: str | Path, to: str = "vitkit", overwrite: bool = False, **overrides: Any) -> Path:
    """Read any supported checkpoint and write it as `to`; the preprocessing of the source is recorded."""
    _check_target(dst, to, overwrite)  # before any work
    return save_pretrained(load_pretrained(src, **overrides), dst, to=to, overwrite=overwrite)
