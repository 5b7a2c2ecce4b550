"""The preprocessing record that travels with the weights, and the image -> tensor step it describes.

Every source format has its own evaluation preprocessing (REFERENCE.md section 2). vitkit records it when a
checkpoint is converted and stores it beside the weights, so evaluation, prediction, export and serving all
build their input the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)  # (x - 127.5) / 127.5, the official and AugReg normalisation

Resize = Literal["squash", "shorter"]


@dataclass
class Preprocess:
    """How to turn an image into the model's input.

    Attributes:
        img_size: (height, width) of the input.
        mean, std: per-channel normalisation of pixels scaled to [0, 1].
        resize: "squash" resizes straight to img_size (official code, Hugging Face); "shorter" resizes the
            shorter side to size / crop_pct and then takes the centre crop (timm, torchvision, MindSpore).
        crop_pct: fraction of the resized image kept by the centre crop (1.0: no crop).
        interpolation: "bilinear" or "bicubic".
    """

    img_size: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = HALF
    std: tuple[float, ...] = HALF
    resize: Resize = "squash"
    crop_pct: float = 1.0
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"

    def __post_init__(self) -> None:
        self.img_size = tuple(int(s) for s in self.img_size)
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        if self.resize not in ("squash", "shorter"):
            raise ValueError(f"Preprocess.resize={self.resize!r}; expected 'squash' or 'shorter'")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"Preprocess.interpolation={self.interpolation!r}; expected 'bilinear' or 'bicubic'")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"Preprocess.crop_pct={self.crop_pct}; expected a fraction in (0, 1]")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(img_size=list(self.img_size), mean=list(self.mean), std=list(self.std))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown preprocessing field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def resized(self, img_size: tuple[int, int]) -> Preprocess:
        return dataclasses.replace(self, img_size=tuple(img_size))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """A PIL image -> (C, H, W) float32 normalised tensor."""
        return normalize(resize_crop(image, self), self)


def source_preprocess(source: str, img_size: tuple[int, int], in_chans: int = 3) -> Preprocess:
    """The evaluation preprocessing each checkpoint source uses (REFERENCE.md section 2)."""
    square_224 = max(img_size) <= 224
    if source in ("official-npz", "big_vision", "vitkit") or source == "hf":
        prep = Preprocess(img_size)
    elif source == "timm":
        prep = Preprocess(img_size, resize="shorter", crop_pct=0.9 if square_224 else 1.0, interpolation="bicubic")
    elif source == "torchvision":  # resize 256, centre crop 224
        prep = Preprocess(img_size, IMAGENET_MEAN, IMAGENET_STD, "shorter", 224 / 256, "bilinear")
    elif source == "mindspore":
        prep = Preprocess(img_size, IMAGENET_MEAN, IMAGENET_STD, "shorter", 0.875, "bicubic")
    else:
        raise ValueError(f"no preprocessing known for source {source!r}")
    if in_chans != len(prep.mean):  # grey or multispectral inputs: one mean/std repeated per channel
        prep = dataclasses.replace(prep, mean=(prep.mean[0],) * in_chans, std=(prep.std[0],) * in_chans)
    return prep


_PIL_FILTER = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def resize_crop(image: Image.Image, prep: Preprocess) -> Image.Image:
    """Resize (and centre-crop) a PIL image to prep.img_size, converting it to RGB or L as the model needs."""
    mode = "L" if len(prep.mean) == 1 else "RGB"
    if image.mode != mode:
        image = image.convert(mode)
    resized, box = crop_box(prep, image.size)
    image = image.resize(resized, _PIL_FILTER[prep.interpolation])
    return image if prep.resize == "squash" else image.crop(box)


def crop_box(prep: Preprocess, size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Where the model's input comes from in an image of `size` (width, height): the (width, height) the image
    is resized to, and the box (left, top, right, bottom) of the resized image that is kept."""
    h, w = prep.img_size
    if prep.resize == "squash":
        return (w, h), (0, 0, w, h)
    # Shorter side to size / crop_pct (the target aspect kept), then the centre crop of exactly (h, w).
    scale = max(h / size[1], w / size[0]) / prep.crop_pct
    new_w, new_h = max(w, round(size[0] * scale)), max(h, round(size[1] * scale))
    left, top = (new_w - w) // 2, (new_h - h) // 2
    return (new_w, new_h), (left, top, left + w, top + h)


def normalize(image: Image.Image, prep: Preprocess) -> torch.Tensor:
    """uint8 PIL image -> (C, H, W) float32, (x / 255 - mean) / std."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
    mean = torch.tensor(prep.mean).view(-1, 1, 1)
    std = torch.tensor(prep.std).view(-1, 1, 1)
    return (x - mean) / std
