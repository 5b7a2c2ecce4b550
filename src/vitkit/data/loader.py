"""Batches of uint8 images from a Source: decoded on worker processes, cropped per sample, and the same for any
number of workers, any number of ranks and any resume point.

Three rules make that so:
- the epoch's order is a permutation seeded by (seed, epoch), cut into global batches;
- rank r of `world` takes the r-th contiguous slice of each global batch, so the ranks together see exactly the
  single-process batch;
- each sample's random crop comes from a generator seeded by (seed, epoch, index), so it does not depend on
  which worker, which position or which rank decodes it.
Cropping happens here because it needs the full-resolution image; flips, RandAugment, mixup and erasing run
batched on the device (`vitkit.data.augment`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from vitkit.data.images import UnreadableImage
from vitkit.data.sources import Source
from vitkit.preprocess import Preprocess, resize_crop


@dataclass
class Batch:
    images: torch.Tensor  # (B, C, H, W) uint8
    labels: torch.Tensor  # (B,) int64
    indices: torch.Tensor  # (B,) int64, indices into the source
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (where, reason) of images left out
    epoch: int = 0  # the epoch it belongs to


def steps_per_epoch(n: int, batch_size: int, drop_last: bool) -> int:
    """Global batches in an epoch of n images."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; expected >= 1")
    return n // batch_size if drop_last else -(-n // batch_size)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The order of the epoch's images: a permutation seeded by (seed, epoch), or 0..n-1. int64 (n,)."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)


def batches(
    source: Source,
    *,
    batch_size: int,
    img_size: tuple[int, int],
    channels: int,
    train: bool,
    preprocess: Preprocess | None = None,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
    seed: int = 0,
    epoch: int = 0,
    start: int = 0,
    rank: int = 0,
    world: int = 1,
    workers: int = 0,
    drop_last: bool | None = None,
    epochs: int | None = 1,
    cache_bytes: int = 0,
) -> Iterator[Batch]:
    """This rank's batches for `epochs` epochs from `epoch` on (one by default; None: without end).

    Args:
        source: the images.
        batch_size: the global batch (all ranks together); must divide by `world`.
        img_size: (height, width) of the output.
        channels: 3 ("RGB") or 1 ("L"); sources of the other kind are converted.
        train: shuffle and take a RandomResizedCrop of each image; otherwise keep the order and resize (with
            `preprocess`'s resize and centre crop when given, else straight to img_size).
        crop_scale, crop_ratio: the crop's area fraction and aspect (width / height) ranges, as in torchvision.
        seed, epoch: seed the order and the crops; `epoch` is the first epoch.
        start: global batches of the first epoch to skip, to resume mid-epoch exactly.
        rank, world: this process's slice of each global batch.
        workers: decoding processes; 0 decodes here. The output does not depend on it.
        drop_last: leave out the last, partial global batch; defaults to `train`.
        epochs: epochs in one stream; the workers live across them, so no epoch waits for workers to start.
        cache_bytes: decoded images kept in memory, up to this many bytes of pixels per decoding process, so that
            later epochs of the stream crop them without reading or decoding the files again (0: none). The
            output does not depend on it.

    Yields:
        Batch per global step, with unreadable images left out and listed in `skipped` (a batch whose images
        were all unreadable is still yielded, with B = 0, so step counts stay aligned across ranks).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels={channels}; expected 1 or 3")
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank={rank}, world={world}: expected 0 <= rank < world")
    if batch_size < 1 or batch_size % world:
        raise ValueError(f"batch_size={batch_size} is not a positive multiple of world={world}")
    if start < 0 or workers < 0 or cache_bytes < 0:
        raise ValueError(f"start={start}, workers={workers}, cache_bytes={cache_bytes}: expected >= 0")
    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs={epochs}; expected >= 1 or None")
    drop_last = train if drop_last is None else drop_last
    n_steps = steps_per_epoch(len(source), batch_size, drop_last)
    if epochs is None and n_steps == 0:
        raise ValueError(f"{source.name}: {len(source)} images, fewer than one batch of {batch_size}")
    local = batch_size // world

    def plan() -> Iterator[tuple[int, list[int]]]:
        """(epoch, this rank's indices) per global step."""
        for e in itertools.count(epoch) if epochs is None else range(epoch, epoch + epochs):
            order = epoch_order(len(source), seed, e, shuffle=train)
            for step in range(start if e == epoch else 0, n_steps):
                global_batch = order[step * batch_size : (step + 1) * batch_size]
                yield e, global_batch[rank * local : (rank + 1) * local].tolist()

    img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    decoder = BatchDecoder(source, img_size, channels, train, preprocess, crop_scale, crop_ratio, seed, cache_bytes)
    return _run(decoder, plan(), workers)


def _run(decoder: BatchDecoder, plan: Iterator[tuple[int, list[int]]], workers: int) -> Iterator[Batch]:
    if workers == 0:
        for item in plan:
            yield decoder[item]
        return
    # A whole rank batch is one dataset item, so each worker decodes whole batches and returns one tensor.
    loader = torch.utils.data.DataLoader(
        decoder, batch_size=None, sampler=plan, num_workers=workers, worker_init_fn=_one_thread, collate_fn=_as_is
    )
    yield from loader


def _one_thread(worker_id: int) -> None:
    torch.set_num_threads(1)  # the workers are the parallelism; intra-op threads would only contend with them


def _as_is(batch: Batch) -> Batch:
    return batch


class BatchDecoder(torch.utils.data.Dataset):
    """Turns (epoch, source indices) into a Batch: decode (or take from the cache), crop or resize, stack."""

    def __init__(
        self,
        source: Source,
        img_size: tuple[int, int],
        channels: int,
        train: bool,
        preprocess: Preprocess | None,
        crop_scale: tuple[float, float],
        crop_ratio: tuple[float, float],
        seed: int,
        cache_bytes: int = 0,
    ) -> None:
        self.source, self.img_size, self.channels, self.train = source, img_size, channels, train
        if preprocess is not None:  # the output size and channels asked for here win over the record's
            if len(preprocess.mean) != channels:
                preprocess = dataclasses.replace(
                    preprocess, mean=preprocess.mean[:1] * channels, std=preprocess.std[:1] * channels
                )
            preprocess = preprocess.resized(img_size)
        self.preprocess, self.crop_scale, self.crop_ratio = preprocess, crop_scale, crop_ratio
        self.seed = seed
        self.cache_bytes, self._cache, self._cached_bytes = cache_bytes, {}, 0

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: tuple[int, Sequence[int]]) -> Batch:
        epoch, indices = item
        images, kept, skipped = [], [], []
        for i in indices:
            try:
                images.append(np.asarray(self.train_image(i, epoch) if self.train else self.eval_image(i)))
            except UnreadableImage as e:
                skipped.append((e.where, e.reason))
                continue
            kept.append(int(i))
        h, w = self.img_size
        x = np.stack(images) if images else np.empty((0, h, w, self.channels), np.uint8)
        x = x.reshape(len(images), h, w, self.channels)  # grey images come without the channel axis
        kept_t = torch.tensor(kept, dtype=torch.int64)
        labels = torch.from_numpy(self.source.labels[kept_t.numpy()].astype(np.int64))
        return Batch(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), labels, kept_t, skipped, epoch)

    def train_image(self, i: int, epoch: int) -> Image.Image:
        """RandomResizedCrop of image i, drawn from a generator seeded by (seed, epoch, i)."""
        h, w = self.img_size
        (s_min, _), (r_min, r_max) = self.crop_scale, self.crop_ratio
        # Decode JPEGs downscaled as long as every crop the ranges allow is still at least (h, w): a side of m
        # leaves a crop of width >= m * sqrt(s_min * r_min) and height >= m * sqrt(s_min / r_max).
        draft = None
        if s_min > 0:
            m = math.ceil(max(w / math.sqrt(s_min * r_min), h * math.sqrt(r_max / s_min)))
            draft = (m, m)
        image = self._load(i, draft)
        rng = np.random.default_rng([self.seed, epoch, int(i)])
        top, left, ch, cw = random_resized_crop_box(image.height, image.width, self.crop_scale, self.crop_ratio, rng)
        return image.resize((w, h), Image.Resampling.BILINEAR, box=(left, top, left + cw, top + ch))

    def eval_image(self, i: int) -> Image.Image:
        """Image i resized (and centre-cropped) as `preprocess` says, or resized straight to img_size."""
        h, w = self.img_size
        # Drafting keeps at least twice the needed size, so ordinary photos decode exactly as the reference
        # preprocessing decodes them and only much larger ones are downscaled on decode.
        crop_pct = self.preprocess.crop_pct if self.preprocess is not None else 1.0
        draft = (math.ceil(2 * w / crop_pct), math.ceil(2 * h / crop_pct))
        image = self._load(i, draft)
        if self.preprocess is None:
            return image.resize((w, h), Image.Resampling.BILINEAR)
        return resize_crop(image, self.preprocess)

    def _load(self, i: int, draft: tuple[int, int] | None) -> Image.Image:
        """Image i decoded (at least `draft` large, the same for every call of this decoder), from the cache when
        it is there; kept there while the cache has room."""
        image = self._cache.get(i)
        if image is None:
            image = self.source.load(i, self.channels, draft=draft)
            size = image.width * image.height * self.channels
            if self._cached_bytes + size <= self.cache_bytes:
                self._cache[i] = image
                self._cached_bytes += size
        return image


def random_resized_crop_box(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width): torchvision's RandomResizedCrop.get_params with numpy's generator.

    Up to 10 draws of an area fraction in `scale` and a log-uniform aspect (w / h) in `ratio`; the first that
    fits is used, otherwise the centre crop of the whole image at its aspect clamped into `ratio`.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        cw = round(math.sqrt(target_area * aspect))
        ch = round(math.sqrt(target_area / aspect))
        if 0 < cw <= width and 0 < ch <= height:
            top = int(rng.integers(0, height - ch + 1))
            left = int(rng.integers(0, width - cw + 1))
            return top, left, ch, cw
    in_ratio = width / height
    if in_ratio < min(ratio):
        cw, ch = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        cw, ch = round(height * max(ratio)), height
    else:
        cw, ch = width, height
    return (height - ch) // 2, (width - cw) // 2, ch, cw
