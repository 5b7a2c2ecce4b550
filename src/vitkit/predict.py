"""Top-k predictions for image files, folders and globs, with the model's own preprocessing; annotated copies.

`model` is a `VisionTransformer` or an exported graph on onnxruntime (`vitkit.onnx_model.OnnxModel`): both carry
`cfg`, `preprocess` and `classes`, and map a batch of images to logits.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import ImageDraw, ImageFont

from .data.images import UnreadableImage, decode
from .evaluate import autocast, class_scores, inference_model
from .models import VisionTransformer

if TYPE_CHECKING:
    from .onnx_model import OnnxModel

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


def class_names(model: VisionTransformer | OnnxModel, class_index: str | Path | None = None) -> list[str]:
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
    model: VisionTransformer | OnnxModel,
    paths: list[Path],
    topk: int = 5,
    names: list[str] | None = None,
    batch_size: int = 32,
    precision: str = "fp32",
    flip: bool = False,
) -> list[Prediction]:
    """Run `model` on each image; an unreadable file gets a Prediction with `error` (why) instead of stopping.

    precision: "fp32", "bf16" (autocast) or "int8" (`vitkit.models.quantize`), as `vitkit eval --precision`
        takes them; a torch model only.
    flip: average the probabilities of each image and its mirror image (`vitkit.evaluate.class_scores`).
    """
    if model.cfg.num_classes == 0:
        raise ValueError("the model has no classification head (num_classes=0); nothing to predict")
    if precision != "fp32" and not isinstance(model, VisionTransformer):
        raise ValueError(
            f"precision {precision!r} needs a torch model; an ONNX graph runs in the types it was exported in"
        )
    amp = autocast("cpu", precision)
    names = names or class_names(model)
    model = inference_model(model, "cpu", precision) if isinstance(model, VisionTransformer) else model.eval()
    k = min(topk, model.cfg.num_classes)
    results: list[Prediction] = []
    batch, batch_paths = [], []

    def flush() -> None:
        if not batch:
            return
        with amp:
            probs = class_scores(model, torch.stack(batch), flip).softmax(dim=-1)
        top = probs.topk(k, dim=-1)
        for path, p, i in zip(batch_paths, top.values.tolist(), top.indices.tolist(), strict=True):
            results.append(Prediction(str(path), [names[j] for j in i], p))
        batch.clear()
        batch_paths.clear()

    channels = 1 if model.cfg.in_chans == 1 else 3
    for path in paths:
        try:  # any mode, EXIF rotation, bombs and broken files, exactly as training and evaluation read them
            batch.append(model.preprocess(decode(Path(path), str(path), channels)))
        except UnreadableImage as e:
            flush()  # keep results in input order
            results.append(Prediction(str(path), [], [], error=e.reason))
            continue
        batch_paths.append(path)
        if len(batch) == batch_size:
            flush()
    flush()
    return results


def annotated_paths(paths: list[Path], out_dir: str | Path, overwrite: bool = False) -> list[Path]:
    """Where `annotate` writes each input's copy: out_dir/<the input's name>, with _1, _2 ... before the suffix
    when names repeat.

    Raises:
        FileExistsError: a target exists and `overwrite` is False, or a target is one of the inputs (originals
            are never written, whatever `overwrite` says). Nothing is written then.
    """
    out_dir = Path(out_dir)
    used: set[str] = set()
    targets = []
    for path in paths:
        name, n = path.name, 0
        while name.lower() in used:  # case-insensitive: the names must differ on every file system
            n += 1
            name = f"{path.stem}_{n}{path.suffix}"
        used.add(name.lower())
        targets.append(out_dir / name)
    inputs = {p.resolve() for p in paths}
    originals = [t for t in targets if t.resolve() in inputs]
    if originals:
        raise FileExistsError(f"{originals[0]} is one of the input images; annotate into another folder")
    existing = [t for t in targets if t.exists()]
    if existing and not overwrite:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise FileExistsError(f"{existing[0]}{more} exist; refusing to overwrite (pass --overwrite)")
    return targets


def annotate(image_path: str | Path, prediction: Prediction, out_path: str | Path) -> Path:
    """Write a copy of the image with its top-1 label and probability drawn on a filled box in the top-left
    corner. The copy is upright (EXIF orientation applied) and in the format `out_path`'s suffix names."""
    if not prediction.labels:
        raise ValueError(f"{image_path}: no prediction to draw ({prediction.error or 'no labels'})")
    out_path = Path(out_path)
    image = decode(Path(image_path), str(image_path))
    text = f"{prediction.labels[0]}  {prediction.probs[0]:.1%}"
    size = max(10, round(min(image.size) / 16))  # legible on thumbnails and on camera photos alike
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed-size bitmap font
        font = ImageFont.load_default()
    draw = ImageDraw.Draw(image)
    pad = max(2, size // 4)
    _, _, right, bottom = draw.textbbox((pad, pad), text, font=font)
    draw.rectangle((0, 0, right + pad, bottom + pad), fill=(0, 0, 0))
    draw.text((pad, pad), text, fill=(255, 255, 255), font=font)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    quality = {"quality": 95} if out_path.suffix.lower() in {".jpg", ".jpeg", ".webp"} else {}
    image.save(out_path, **quality)
    return out_path
