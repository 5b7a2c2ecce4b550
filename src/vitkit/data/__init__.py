"""Datasets: image sources for every layout vitkit reads, robust decoding, and deterministic batches."""

from vitkit.data.images import UnreadableImage, decode, read_skipped_tsv, skipped_tsv
from vitkit.data.loader import Batch, batches, epoch_order, steps_per_epoch
from vitkit.data.sources import ArrayImages, ImageFiles, Source, TarShards, open_source

__all__ = [
    "ArrayImages",
    "Batch",
    "ImageFiles",
    "Source",
    "TarShards",
    "UnreadableImage",
    "batches",
    "decode",
    "epoch_order",
    "open_source",
    "read_skipped_tsv",
    "skipped_tsv",
    "steps_per_epoch",
]
