"""The images a run could not read: gathered from every batch and evaluation into the run's `skipped.tsv`, and
the two checks that stop a run whose data cannot be read instead of letting it train on nothing.

- The first FIRST_TRIES images a process tries are all unreadable: the path is wrong, the files are not images, or
  the disk is broken. This fires within the first few batches, with no pre-scan of a big dataset.
- An epoch ends with a class of which not one image could be read, although the epoch held some: the model could
  never learn it. Checked on every epoch this process saw from its first step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..data import Batch, Source, epoch_order, read_skipped_tsv, skipped_tsv
from .state import write_atomic

FIRST_TRIES = 64


class SkippedImages:
    """Where each unreadable image is and why, in this run (a resumed run starts from the file it left).

    Args:
        path: the run's skipped.tsv (one `where<TAB>reason` line per image, sorted).
        source: the training images, for the class checks.
        batch_size, seed: the run's global batch and seed, which fix each epoch's images.
        step, steps_per_epoch: where this process starts; the epoch it starts in is checked only if it starts at
            the epoch's beginning.
    """

    def __init__(self, path: Path, source: Source, batch_size: int, seed: int, step: int, steps_per_epoch: int):
        self.path, self.source, self.batch_size, self.seed = path, source, batch_size, seed
        self.spe = steps_per_epoch
        self.found = read_skipped_tsv(path) if path.is_file() else {}
        self.tried = self.readable = 0
        self.per_class = np.zeros(len(source.classes), dtype=np.int64)  # readable images per class, this epoch
        self.whole_epoch = step % steps_per_epoch == 0

    def __len__(self) -> int:
        return len(self.found)

    def record(self, skipped: list[tuple[str, str]]) -> None:
        """Add (where, reason) pairs, e.g. an evaluation's."""
        self.found.update(skipped)

    def train_batch(self, batch: Batch, main: bool) -> None:
        """Add a training batch's skips; stop when the first FIRST_TRIES images tried were all unreadable."""
        self.record(batch.skipped)
        self.tried += len(batch.labels) + len(batch.skipped)
        self.readable += len(batch.labels)
        self.per_class += np.bincount(batch.labels.numpy(), minlength=len(self.per_class))
        if self.readable == 0 and self.tried >= FIRST_TRIES:
            if main:
                _write(self.path, self.found)
            where, reason = batch.skipped[0]
            raise ValueError(
                f"{self.source.name}: none of the first {self.tried} training images could be read (for example "
                f"{where}: {reason}); is this the right dataset? All skipped images are listed in {self.path}"
            )

    def end_epoch(self, step: int, main: bool) -> None:
        """After the epoch's last step: refuse a class that had images in the epoch but not one readable."""
        epoch = step // self.spe - 1
        counts = torch.from_numpy(self.per_class.copy())
        self.per_class[:] = 0
        whole, self.whole_epoch = self.whole_epoch, True
        if dist.is_initialized():  # every rank saw its own slice of each batch
            dist.all_reduce(counts)
        if not whole:
            return
        order = epoch_order(len(self.source), self.seed, epoch, shuffle=True)[: self.spe * self.batch_size]
        planned = np.bincount(self.source.labels[order], minlength=len(self.per_class))
        empty = [c for c in range(len(planned)) if planned[c] and not counts[c]]
        if empty:
            if main:
                _write(self.path, self.found)
            names = ", ".join(repr(self.source.classes[c]) for c in empty[:5]) + (" ..." if len(empty) > 5 else "")
            raise ValueError(
                f"{self.source.name}: not one image of class {names} could be read in epoch {epoch} "
                f"({int(planned[empty[0]])} tried); fix or remove them. The skipped images are listed in {self.path}"
            )

    def write(self, main: bool) -> None:
        """Write skipped.tsv (rank 0), with every rank's skips; all ranks call this at the same step."""
        found = self.found
        if dist.is_initialized():
            parts: list[dict[str, str]] = [{}] * dist.get_world_size()
            dist.all_gather_object(parts, found)
            found = {k: v for part in parts for k, v in part.items()}
        if main:
            _write(self.path, found)


def _write(path: Path, found: dict[str, str]) -> None:
    if found:
        write_atomic(path, skipped_tsv(found.items()).encode())
