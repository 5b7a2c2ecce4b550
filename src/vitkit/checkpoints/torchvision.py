"""(being written)"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import Checkpoint


def matches(keys: set[str]) -> bool:
    return False


def from_tensors(tensors: dict[str, torch.Tensor], path: Path) -> Checkpoint:
    raise NotImplementedError


def read(path: Path) -> Checkpoint:
    raise NotImplementedError


def write(model, path: Path) -> None:
    raise NotImplementedError
