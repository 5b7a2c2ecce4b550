"""Decode one image file into an 8-bit "RGB" or "L" PIL image, or say clearly why it cannot be.

Datasets scraped from the web hold every kind of file: 16-bit PNGs, CMYK JPEGs, palette GIFs with transparency,
phone photos rotated by an EXIF tag, truncated downloads, HTML error pages saved as .jpg. `decode` turns each of
them into the same thing, or raises `UnreadableImage` so the loader can skip the file and report it.

Conversion rules (a model sees 8-bit pixels; these say how wider pixels get there):
- transparency (alpha, a palette or colour-key tRNS) is composited onto black: out = round(value * alpha / 255).
  Black rather than white because it is what a model sees for padding and for zero-filled crops. (A colour key
  on a 16-bit image is not applied.)
- "I;16" (16-bit): v / 257, rounded, so 65535 -> 255 and an 8-bit image widened by 257 comes back exactly.
- "I" (32-bit int): Pillow's mode for PGM/PPM files with maxval > 255, which it rescales to 0..65535, so it is
  read as 16-bit too: v / 257, rounded and clipped to [0, 255].
- "F" (32-bit float): when every finite value lies in [0, 1] the image is taken as [0, 1] and scaled by 255;
  otherwise values are taken as 0..255 and clipped. NaN becomes 0.
- every other mode (1, L, P, RGB, CMYK, YCbCr, LAB, HSV ...) goes through Pillow's own `convert`.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_EXIF_ORIENTATION = 0x0112
_SWAPS_AXES = (5, 6, 7, 8)  # EXIF orientations that rotate by 90 or 270 degrees
_MAGIC = (
    (b"\x89PNG", "PNG"),
    (b"\xff\xd8", "JPEG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"RIFF", "WebP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


class UnreadableImage(ValueError):
    """An image file that cannot be decoded: `where` names it, `reason` says why."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason

    def __reduce__(self):  # picklable across loader worker processes despite the two-argument constructor
        return type(self), (self.where, self.reason)


def skipped_tsv(skipped: Iterable[tuple[str, str]]) -> str:
    """The text of a skipped.tsv: one `where<TAB>reason` line per unreadable image, sorted (tabs and line breaks
    inside either become spaces)."""
    clean = sorted({(_one_line(w), _one_line(r)) for w, r in skipped})
    return "".join(f"{w}\t{r}\n" for w, r in clean)


def read_skipped_tsv(path: str | Path) -> dict[str, str]:
    """A skipped.tsv as {where: reason}."""
    lines = (line.partition("\t") for line in Path(path).read_text().splitlines())
    return {where: reason for where, _, reason in lines if where}


def _one_line(text: str) -> str:
    return text.replace("\t", " ").replace("\r", " ").replace("\n", " ")


def decode(
    source: Path | bytes,
    where: str,
    channels: int = 3,
    draft: tuple[int, int] | None = None,
    max_pixels: int = 64_000_000,
) -> Image.Image:
    """Read an image file fully into memory as mode "RGB" (channels=3) or "L" (channels=1).

    Args:
        source: a file path or the file's bytes.
        where: how to name the file in errors (a path, "shard.tar:member", ...).
        channels: 3 or 1.
        draft: (width, height) the caller needs at least; JPEGs then decode downscaled by 2, 4 or 8 (Pillow's
            `Image.draft`) while staying at least this large. Other formats ignore it.
        max_pixels: images whose header claims more pixels are refused before any pixel is decoded. Pillow's own
            decompression-bomb limit (2 * Image.MAX_IMAGE_PIXELS) still applies above it.

    Raises:
        UnreadableImage: the file is missing, empty, truncated, not an image, too large or of zero size.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels={channels}; expected 1 or 3")
    if isinstance(source, bytes | bytearray):
        if not source:
            raise UnreadableImage(where, "empty file (0 bytes)")
        fp = io.BytesIO(source)
    else:
        try:
            if Path(source).stat().st_size == 0:
                raise UnreadableImage(where, "empty file (0 bytes)")
        except OSError as e:
            raise UnreadableImage(where, f"cannot read the file ({e.strerror or e})") from None
        fp = source
    try:
        with warnings.catch_warnings():
            # We apply our own, lower limit below; Pillow's warning between its two limits is noise here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp) as image:
                return _load(image, where, channels, draft, max_pixels)
    except UnreadableImage:
        raise
    except Image.DecompressionBombError as e:
        raise UnreadableImage(where, f"over Pillow's decompression-bomb limit: {e}") from None
    except Image.UnidentifiedImageError:
        raise UnreadableImage(where, f"not an image Pillow can read ({_sniff(source)})") from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, EOFError, zlib.error ...
        raise UnreadableImage(where, f"cannot decode ({type(e).__name__}: {e})") from None


def _load(image: Image.Image, where: str, channels: int, draft: tuple[int, int] | None, max_pixels: int) -> Image.Image:
    w, h = image.size
    if w == 0 or h == 0:
        raise UnreadableImage(where, f"image has zero size ({w}x{h})")
    if w * h > max_pixels:  # checked on the header, before any pixel is decoded or allocated
        raise UnreadableImage(where, f"image of {w}x{h} = {w * h} pixels is over the limit of {max_pixels} pixels")
    if draft is not None and image.format == "JPEG":
        dw, dh = draft
        if image.getexif().get(_EXIF_ORIENTATION) in _SWAPS_AXES:  # the draft size is in the stored orientation
            dw, dh = dh, dw
        image.draft(None, (max(1, dw), max(1, dh)))
    image.load()  # inside the caller's try: truncated files fail here, not later in a worker
    if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    return _to_8bit(image, "L" if channels == 1 else "RGB")


def _to_8bit(image: Image.Image, mode: str) -> Image.Image:
    """Any Pillow mode -> `mode` ("RGB" or "L"), by the rules in the module docstring."""
    if "transparency" in image.info and image.mode in ("1", "L", "P", "RGB"):
        image = image.convert("LA" if image.mode in ("1", "L") else "RGBA")
    if image.mode in _ALPHA_MODES:
        image = _on_black(image)
    elif image.mode.startswith("I;16") or image.mode == "I":
        x = np.asarray(image).astype(np.float64)
        image = Image.fromarray(np.clip(np.round(x / 257), 0, 255).astype(np.uint8))
    elif image.mode == "F":
        x = np.asarray(image, dtype=np.float64)
        finite = x[np.isfinite(x)]
        if finite.size and finite.min() >= 0 and finite.max() <= 1:
            x = x * 255
        x = np.nan_to_num(x, nan=0.0, posinf=255.0, neginf=0.0)
        image = Image.fromarray(np.clip(np.round(x), 0, 255).astype(np.uint8))
    elif image.mode not in ("1", "L", "P", "RGB"):  # CMYK, YCbCr, LAB, HSV, RGBX ...: Pillow knows their RGB
        image = image.convert("RGB")
    return image if image.mode == mode else image.convert(mode)


def _on_black(image: Image.Image) -> Image.Image:
    """Composite an image with alpha onto black: round(value * alpha / 255), per channel."""
    x = np.asarray(image.convert("LA" if image.mode in ("LA", "La") else "RGBA"), dtype=np.uint32)
    color, alpha = x[..., :-1], x[..., -1:]
    out = ((color * alpha + 127) // 255).astype(np.uint8)  # (H, W, C), rounded integer division
    return Image.fromarray(out[..., 0] if out.shape[-1] == 1 else out)


def _sniff(source: Path | bytes) -> str:
    """A short description of what a non-image file starts with, for the error message."""
    try:
        if isinstance(source, bytes | bytearray):
            head = bytes(source[:64])
        else:
            with Path(source).open("rb") as f:
                head = f.read(64)
    except OSError:
        return "unreadable"
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return f"a {name} file with a corrupt or unsupported header"
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<svg")) or b"<html" in text:
        return f"starts with {head[:20]!r}: an HTML/XML page, not an image"
    if head and all(32 <= c < 127 or c in (9, 10, 13) for c in head):
        return f"starts with {head[:20]!r}: a text file, not an image"
    return f"unknown format, starts with {head[:8].hex(' ')}"
