"""Training augmentation, batched on the device, after the loader has produced uint8 crops.

    uint8 (B,C,H,W) -> horizontal flip -> RandAugment -> normalise -> random erasing -> mixup / cutmix
                    -> float32 (B,C,H,W) and soft targets (B,K)

Each step works on the whole batch at once: per-sample choices are masks and per-sample parameters, never a
Python loop over samples (RandAugment loops over its 14 op types, each applied to the samples that drew it).
All randomness comes from the `generator` the caller passes, so a seed and a batch give bit-identical output.

The RandAugment ops (Cubuk et al. 2020) follow torchvision's `RandAugment`, with the magnitude on the paper's
0-10 scale (torchvision's bin 30 is our 10) and PIL's arithmetic: they run on pixel values held as floats in
[0, 255] and every op floors or rounds back to whole levels exactly where PIL does, so each op matches its PIL
counterpart (see tests/test_augment.py). Geometric ops sample the nearest pixel with PIL's convention (pixel
centres at +0.5, coordinates floored) and fill uncovered pixels with grey 128: timm fills with the ImageNet mean
(124, 116, 104), torchvision with black; a neutral grey suits any dataset.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # only for the annotation: vitkit.train imports vitkit.data, which may import this module
    from vitkit.train.config import AugmentConfig

FILL = 128.0  # the value geometric ops give pixels that come from outside the image
Tensor = torch.Tensor


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Pixels on the 0-255 scale (uint8, or floats holding levels) -> float32 `(x / 255 - mean) / std`."""
    c = images.shape[1]
    if len(mean) not in (1, c) or len(std) not in (1, c):
        raise ValueError(f"normalize: mean {tuple(mean)} and std {tuple(std)} need 1 or {c} values for {c} channels")
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    return (images.float() / 255 - m) / s


def soft_targets(labels: Tensor, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """(B,) class indices -> (B,K) float32 targets: 1 - s + s/K on the true class and s/K elsewhere.

    The cross-entropy against these targets equals `F.cross_entropy(..., label_smoothing=s)`.
    """
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32, device=labels.device)
    return targets.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing + off)


class DeviceAugment:
    """The device half of the training augmentation in `AugmentConfig` (cropping runs on the loader workers).

    Args:
        cfg: the augmentation config; `hflip`, `randaugment_*`, `erasing`, `mixup`, `cutmix`, `mix_prob` and
            `label_smoothing` are used here.
        mean, std: per-channel normalisation of pixels scaled to [0, 1].
        num_classes: K, the width of the targets.
    """

    def __init__(self, cfg: AugmentConfig, mean: Sequence[float], std: Sequence[float], num_classes: int):
        for name in ("hflip", "erasing", "mix_prob", "label_smoothing"):
            if not 0 <= getattr(cfg, name) <= 1:
                raise ValueError(f"augment.{name}={getattr(cfg, name)}; expected a probability in [0, 1]")
        if cfg.randaugment_ops < 0 or not 0 <= cfg.randaugment_magnitude <= 10:
            raise ValueError(
                f"augment.randaugment_ops={cfg.randaugment_ops}, augment.randaugment_magnitude="
                f"{cfg.randaugment_magnitude}; expected ops >= 0 and a magnitude in [0, 10]"
            )
        if cfg.mixup < 0 or cfg.cutmix < 0:
            raise ValueError(f"augment.mixup={cfg.mixup}, augment.cutmix={cfg.cutmix}; expected alphas >= 0 (0: off)")
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes}; expected >= 1")
        self.cfg, self.mean, self.std, self.num_classes = cfg, tuple(mean), tuple(std), num_classes

    def __call__(self, images: Tensor, labels: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """uint8 (B,C,H,W) images and (B,) labels -> normalised float32 (B,C,H,W) and (B,K) soft targets."""
        cfg = self.cfg
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"DeviceAugment: expected uint8 (B,C,H,W) images, got {images.dtype} {tuple(images.shape)}"
            )
        x = images.float()
        targets = soft_targets(labels.to(images.device), self.num_classes, cfg.label_smoothing)
        if x.shape[0] == 0:
            return normalize(x, self.mean, self.std), targets
        if cfg.hflip > 0:
            x = random_hflip(x, cfg.hflip, generator)
        if cfg.randaugment_ops > 0:
            x = rand_augment(x, cfg.randaugment_ops, cfg.randaugment_magnitude, generator)
        x = normalize(x, self.mean, self.std)
        if cfg.erasing > 0:
            x = random_erase(x, cfg.erasing, generator)
        if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.mix_prob > 0:
            x, targets = mix_batch(x, targets, cfg.mixup, cfg.cutmix, cfg.mix_prob, generator)
        return x, targets


# ---- batch-level steps ----------------------------------------------------------------------------------------


def _rand(generator: torch.Generator, *shape: int) -> Tensor:
    # Drawn on the generator's own device (a CUDA generator draws on the GPU), moved by the caller if needed.
    return torch.rand(shape, generator=generator, device=generator.device)


def random_hflip(x: Tensor, prob: float, generator: torch.Generator) -> Tensor:
    """Mirror each image left-right with probability `prob`."""
    flip = (_rand(generator, x.shape[0]) < prob).to(x.device)
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def random_erase(
    x: Tensor,
    prob: float,
    generator: torch.Generator,
    area: tuple[float, float] = (0.02, 1 / 3),
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    attempts: int = 10,
) -> Tensor:
    """timm's `RandomErasing(mode="pixel", max_count=1)`, batched: with probability `prob` an image gets one
    rectangle of standard-normal noise (the images are already normalised).

    As timm, a rectangle draws its area fraction uniformly from `area` and its aspect log-uniformly from `aspect`,
    rounds its sides to whole pixels and is kept if it fits strictly inside the image; the first of `attempts`
    draws that fits is used and an image whose draws all fail is left alone.
    """
    b, _, h, w = x.shape
    target = (area[0] + (area[1] - area[0]) * _rand(generator, b, attempts)) * (h * w)
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    ratio = torch.exp(log_lo + (log_hi - log_lo) * _rand(generator, b, attempts))
    eh, ew = (target * ratio).sqrt().round(), (target / ratio).sqrt().round()  # (B, attempts)
    fits = (eh < h) & (ew < w)
    first = fits.int().argmax(1, keepdim=True)  # the first attempt that fits (0 when none does)
    eh, ew = eh.gather(1, first).squeeze(1), ew.gather(1, first).squeeze(1)
    erase = (_rand(generator, b) < prob) & fits.any(1)
    top = (_rand(generator, b) * (h - eh + 1)).floor().clamp(max=h - eh)  # uniform in 0..h - eh, as randint
    left = (_rand(generator, b) * (w - ew + 1)).floor().clamp(max=w - ew)
    noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
    rows = torch.arange(h, device=generator.device)
    cols = torch.arange(w, device=generator.device)
    in_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None])  # (B,H)
    in_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])  # (B,W)
    box = erase[:, None, None] & in_rows[:, :, None] & in_cols[:, None, :]  # (B,H,W)
    return torch.where(box[:, None].to(x.device), noise.to(x.device), x)


def mix_batch(
    x: Tensor, targets: Tensor, mixup: float, cutmix: float, prob: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """timm's `Mixup(mode="batch")`: with probability `prob` mix the batch with itself reversed.

    With both alphas > 0 the batch picks cutmix or mixup with probability 1/2; lam ~ Beta(alpha, alpha). Cutmix
    pastes the partner's box (clipped to the image) and sets lam to the exact fraction of the image kept. The
    targets mix with the same lam, so smoothed targets give timm's `mixup_target` (smooth, then mix).

    torch samples Beta only from the global generator, so the batch-level draws come from a numpy generator
    seeded with an integer drawn from `generator` (one device sync per batch).
    """
    seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device).item())
    rng = np.random.default_rng(seed)
    if rng.random() >= prob:
        return x, targets
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    lam = float(rng.beta(alpha, alpha))
    if use_cutmix:
        h, w = x.shape[-2:]
        cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x.flip(0)[:, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        x = x * lam + x.flip(0) * (1 - lam)
    return x, targets * lam + targets.flip(0) * (1 - lam)


# ---- RandAugment --------------------------------------------------------------------------------------------------
# Every op takes float pixels (B,C,H,W) holding whole levels in [0, 255] and returns the same; a parameter is a
# number or a (B,) tensor, one value per image.


def _per_image(value: float | Tensor, x: Tensor) -> Tensor:
    """A number or (B,) values -> (B,1,1,1) float32 on x's device."""
    v = torch.as_tensor(value, dtype=torch.float32, device=x.device)
    return v.expand(x.shape[0]).reshape(-1, 1, 1, 1)


def _apply_lut(x: Tensor, lut: Tensor) -> Tensor:
    """Map each pixel through its image's and channel's table: lut (B,C,256)."""
    b, c, h, w = x.shape
    return lut.float().gather(2, x.long().view(b, c, h * w)).view(b, c, h, w)


def grayscale(x: Tensor) -> Tensor:
    """(B,C,H,W) -> (B,1,H,W) luminance with PIL's `convert("L")` fixed-point rounding (a 1-channel image is
    its own luminance)."""
    if x.shape[1] == 1:
        return x
    if x.shape[1] != 3:
        raise ValueError(f"grayscale: expected 1 or 3 channels, got {x.shape[1]}")
    r, g, b = x.unbind(1)
    # (R*19595 + G*38470 + B*7471 + 2^15) >> 16, as PIL's Convert.c; every term is an integer below 2^24, exact
    # in float32.
    return torch.floor((r * 19595 + g * 38470 + b * 7471 + 32768) / 65536).unsqueeze(1)


def _blend(x: Tensor, degenerate: Tensor, factor: float | Tensor) -> Tensor:
    # PIL's Image.blend as ImageEnhance uses it: degenerate + factor * (image - degenerate), clipped and truncated.
    return (degenerate + _per_image(factor, x) * (x - degenerate)).clamp(0, 255).floor()


def brightness(x: Tensor, factor: float | Tensor) -> Tensor:
    """PIL `ImageEnhance.Brightness`: blend with black."""
    return _blend(x, torch.zeros_like(x), factor)


def color(x: Tensor, factor: float | Tensor) -> Tensor:
    """PIL `ImageEnhance.Color`: blend with the image's luminance (the identity on 1-channel images, as PIL)."""
    return _blend(x, grayscale(x), factor)


def contrast(x: Tensor, factor: float | Tensor) -> Tensor:
    """PIL `ImageEnhance.Contrast`: blend with the image's mean luminance, rounded to a level."""
    mean = grayscale(x).double().mean((1, 2, 3), keepdim=True)
    return _blend(x, torch.floor(mean + 0.5).float(), factor)


def sharpness(x: Tensor, factor: float | Tensor) -> Tensor:
    """PIL `ImageEnhance.Sharpness`: blend with the image under PIL's SMOOTH filter, whose border stays as is."""
    c, h, w = x.shape[1:]
    kernel = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]], device=x.device) / 13
    smooth = F.conv2d(x, kernel.expand(c, 1, 3, 3), padding=1, groups=c).round()
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    inner = ((rows > 0) & (rows < h - 1))[:, None] & ((cols > 0) & (cols < w - 1))  # (H,W)
    return _blend(x, torch.where(inner, smooth, x), factor)


def solarize(x: Tensor, threshold: float | Tensor) -> Tensor:
    """PIL `ImageOps.solarize`: invert the levels at or above `threshold`."""
    return torch.where(x >= _per_image(threshold, x), 255 - x, x)


def posterize(x: Tensor, bits: int | Tensor) -> Tensor:
    """PIL `ImageOps.posterize`: keep the top `bits` (1-8) bits of each level."""
    step = 2 ** (8 - _per_image(bits, x))
    return torch.floor(x / step) * step


def autocontrast(x: Tensor) -> Tensor:
    """PIL `ImageOps.autocontrast`: stretch each channel to [0, 255], as PIL's table (float64, truncated)."""
    lo, hi = x.amin((2, 3)).double(), x.amax((2, 3)).double()  # (B,C)
    scale = 255 / (hi - lo).clamp(min=1)
    levels = torch.arange(256, dtype=torch.float64, device=x.device)
    lut = (levels * scale[..., None] - (lo * scale)[..., None]).trunc().clamp(0, 255)  # (B,C,256)
    return _apply_lut(x, torch.where((hi > lo)[..., None], lut, levels))


def equalize(x: Tensor) -> Tensor:
    """PIL `ImageOps.equalize`, exactly: per channel, level i -> (step // 2 + #pixels below i) // step with
    step = (#pixels - #pixels at the top level) // 255; the identity when step is 0."""
    b, c, h, w = x.shape
    levels = x.long().view(b * c, h * w) + 256 * torch.arange(b * c, device=x.device)[:, None]
    hist = torch.bincount(levels.flatten(), minlength=b * c * 256).view(b, c, 256)
    top = 255 - (hist.flip(-1) > 0).int().argmax(-1, keepdim=True)  # the highest level present
    step = (h * w - hist.gather(-1, top)) // 255  # (B,C,1)
    below = hist.cumsum(-1) - hist
    lut = ((step // 2 + below) // step.clamp(min=1)).clamp(max=255)
    return _apply_lut(x, torch.where(step > 0, lut, torch.arange(256, device=x.device)))


def affine(x: Tensor, matrix: Tensor, fill: float = FILL) -> Tensor:
    """Resample each image through its inverse map, nearest pixel, as PIL's `Image.transform(AFFINE, NEAREST)`.

    Args:
        x: (B,C,H,W) images.
        matrix: (B,2,3); output pixel centre (u, v) reads the input at matrix @ (u, v, 1), in pixels with pixel
            centres at +0.5.
        fill: the value of pixels that read outside the image.
    """
    b, c, h, w = x.shape
    v = (torch.arange(h, device=x.device, dtype=torch.float32) + 0.5).view(1, h, 1)
    u = (torch.arange(w, device=x.device, dtype=torch.float32) + 0.5).view(1, 1, w)
    m = matrix.to(x.device, torch.float32)[..., None, None]  # (B,2,3,1,1)
    # Multiply-adds, not a matmul: TF32 matmuls (when enabled) would move coordinates by a fraction of a pixel.
    src_x = (m[:, 0, 0] * u + m[:, 0, 1] * v + m[:, 0, 2]).floor().long()  # (B,H,W)
    src_y = (m[:, 1, 0] * u + m[:, 1, 1] * v + m[:, 1, 2]).floor().long()
    inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
    index = (src_y.clamp(0, h - 1) * w + src_x.clamp(0, w - 1)).view(b, 1, h * w).expand(b, c, h * w)
    out = x.reshape(b, c, h * w).gather(2, index).view(b, c, h, w)
    return torch.where(inside[:, None], out, fill)


def _matrix(x: Tensor, *rows: Sequence[float | Tensor]) -> Tensor:
    """Per-image (B,2,3) matrices from six entries, each a number or (B,) values."""
    n = x.shape[0]
    entries = [torch.as_tensor(e, dtype=torch.float32, device=x.device).expand(n) for row in rows for e in row]
    return torch.stack(entries, 1).view(n, 2, 3)


def rotate(x: Tensor, degrees: float | Tensor) -> Tensor:
    """PIL `Image.rotate`: counter-clockwise about the image centre."""
    a = -torch.as_tensor(degrees, dtype=torch.float32, device=x.device).expand(x.shape[0]).deg2rad()
    cos, sin = a.cos(), a.sin()
    cx, cy = x.shape[-1] / 2, x.shape[-2] / 2
    return affine(x, _matrix(x, (cos, sin, cx - cos * cx - sin * cy), (-sin, cos, cy + sin * cx - cos * cy)))


def shear_x(x: Tensor, factor: float | Tensor) -> Tensor:
    """Output (u, v) reads input (u + factor * v, v), as timm's PIL shear about the top-left corner."""
    return affine(x, _matrix(x, (1, factor, 0), (0, 1, 0)))


def shear_y(x: Tensor, factor: float | Tensor) -> Tensor:
    """Output (u, v) reads input (u, v + factor * u)."""
    return affine(x, _matrix(x, (1, 0, 0), (factor, 1, 0)))


def translate_x(x: Tensor, pixels: float | Tensor) -> Tensor:
    """Move the content right by `pixels` (whole pixels, as torchvision)."""
    return affine(x, _matrix(x, (1, 0, -torch.as_tensor(pixels)), (0, 1, 0)))


def translate_y(x: Tensor, pixels: float | Tensor) -> Tensor:
    """Move the content down by `pixels`."""
    return affine(x, _matrix(x, (1, 0, 0), (0, 1, -torch.as_tensor(pixels))))


# The ops of torchvision's RandAugment: name -> (op given the images and the magnitude m = M / 10 per image, signed).
# A signed op gets m with a random sign; arguments scale linearly with m up to torchvision's values at bin 30.
RANDAUGMENT_OPS: dict[str, tuple[Callable[[Tensor, Tensor], Tensor], bool]] = {
    "Identity": (lambda x, m: x, False),
    "ShearX": (lambda x, m: shear_x(x, 0.3 * m), True),
    "ShearY": (lambda x, m: shear_y(x, 0.3 * m), True),
    "TranslateX": (lambda x, m: translate_x(x, (150 / 331 * x.shape[-1] * m).trunc()), True),
    "TranslateY": (lambda x, m: translate_y(x, (150 / 331 * x.shape[-2] * m).trunc()), True),
    "Rotate": (lambda x, m: rotate(x, 30 * m), True),
    "Brightness": (lambda x, m: brightness(x, 1 + 0.9 * m), True),
    "Color": (lambda x, m: color(x, 1 + 0.9 * m), True),
    "Contrast": (lambda x, m: contrast(x, 1 + 0.9 * m), True),
    "Sharpness": (lambda x, m: sharpness(x, 1 + 0.9 * m), True),
    "Posterize": (lambda x, m: posterize(x, 8 - (4 * m).round()), False),
    "Solarize": (lambda x, m: solarize(x, 255 * (1 - m)), False),
    "AutoContrast": (lambda x, m: autocontrast(x), False),
    "Equalize": (lambda x, m: equalize(x), False),
}


def rand_augment(x: Tensor, num_ops: int, magnitude: float, generator: torch.Generator) -> Tensor:
    """RandAugment: each image goes through `num_ops` ops drawn uniformly with replacement, at `magnitude` (0-10).

    Args:
        x: (B,C,H,W) float pixels holding whole levels in [0, 255]; not modified.
        num_ops: N, the ops per image.
        magnitude: M on the 0-10 scale of the paper.
        generator: the source of every random choice.
    """
    x = x.clone()
    names = list(RANDAUGMENT_OPS)
    for _ in range(num_ops):
        op = torch.randint(len(names), (x.shape[0],), generator=generator, device=generator.device).to(x.device)
        sign = torch.randint(2, (x.shape[0],), generator=generator, device=generator.device).to(x.device) * 2 - 1
        m = magnitude / 10 * sign.float()
        counts = torch.bincount(op, minlength=len(names)).tolist()  # one device sync per layer
        for name, idx in zip(names, op.argsort(stable=True).split(counts), strict=True):
            fn, signed = RANDAUGMENT_OPS[name]
            if len(idx) and name != "Identity":
                x[idx] = fn(x[idx], m[idx] if signed else m[idx].abs())
    return x
