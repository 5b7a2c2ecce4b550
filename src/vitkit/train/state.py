"""Training-state checkpoints: written atomically, read back with `weights_only=True` (no code runs on load)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename: a crash leaves the old file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power loss
    finally:
        os.close(dir_fd)


def save_state(path: Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    write_atomic(path, buf.getvalue())


REQUIRED = ("step", "best_top1", "model", "optimizer", "scaler", "config")


def load_state(path: Path) -> dict[str, Any]:
    """A training state written by `save_state`; ValueError naming the file for anything else."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which, never unpickle arbitrary objects
        raise ValueError(f"{path}: not a readable vitkit training state ({type(e).__name__}: {e})") from e
    missing = [k for k in REQUIRED if not isinstance(state, dict) or k not in state]
    if missing:
        found = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: not a vitkit training state; missing {missing} (found {found})")
    return state
