"""Top-k predictions for image files, folders and globs, with the model's own preprocessing."""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from .models import VisionTransformer

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


@dataclass
class Prediction:
    path: str
    labels: list[str]  # best first
    probs: list[float]
    error: str | None = None  # why the image could not be read; labels/probs are empty then


def expand_images(items: list[str]) -> list[Path]:
    """Files, folders (searched recursively for images) and glob patterns -> sorted image paths."""
    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            paths += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
        elif p.exists():
            paths.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            if not matches:
                raise FileNotFoundError(f"{item}: no such file, folder or matching glob")
            paths += [m for m in matches if m.is_file()]
    return paths


def class_names(model: VisionTransformer, class_index: str | Path | None = None) -> list[str]:
    """Names for the model's outputs: an ImageNet-style class-index JSON ({"0": ["n01440764", "tench"]} or
    {"0": "tench"}) when given, else the names stored with the model, else class_0, class_1, ..."""
    n = model.cfg.num_classes
    if class_index is not None:
        index = json.loads(Path(class_index).read_text())
        names = [index[str(i)] for i in range(len(index))]
        names = [v[-1] if isinstance(v, list) else str(v) for v in names]
        if len(names) != n:
            raise ValueError(f"{class_index}: {len(names)} class names, but the model has {n} outputs")
        return names
    return list(model.classes) if model.classes else [f"class_{i}" for i in range(n)]


@torch.no_grad()
def predict(
    model: VisionTransformer, paths: list[Path], topk: int = 5, names: list[str] | None = None, batch_size: int = 32
) -> list[Prediction]:
    """Run `model` on each image; unreadable files get a Prediction with `error` set instead of stopping."""
    if model.cfg.num_classes == 0:
        raise ValueError("the model has no classification head (num_classes=0); nothing to predict")
    names = names or class_names(model)
    k = min(topk, model.cfg.num_classes)
    results: list[Prediction] = []
    batch, batch_paths = [], []

    def flush() -> None:
        if not batch:
            return
        probs = model(torch.stack(batch)).float().softmax(dim=-1)
        top = probs.topk(k, dim=-1)
        for path, p, i in zip(batch_paths, top.values.tolist(), top.indices.tolist(), strict=True):
            results.append(Prediction(str(path), [names[j] for j in i], p))
        batch.clear()
        batch_paths.clear()

    model.eval()
    for path in paths:
        try:
            with Image.open(path) as image:
                batch.append(model.preprocess(image))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            flush()  # keep results in input order
            results.append(Prediction(str(path), [], [], error=f"{type(e).__name__}: {e}"))
            continue
        batch_paths.append(path)
        if len(batch) == batch_size:
            flush()
    flush()
    return results
