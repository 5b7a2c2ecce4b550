"""vitkit's own format: a directory with `model.safetensors` and `vitkit.json` (config, preprocessing, classes).

The JSON record is also stored in the safetensors header metadata under "vitkit", so the weight file alone is
self-describing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..models import VisionTransformer, ViTConfig
from ..preprocess import Preprocess
from .checkpoint import Checkpoint
from .files import read_json, read_safetensors

FORMAT_VERSION = 1
WEIGHTS, RECORD = "model.safetensors", "vitkit.json"
# Config fields the record fixes beyond what tensor shapes show.
STRUCTURE = ("heads", "img_size", "pool", "fc_norm", "class_token", "pos_embed", "hybrid")


def record_of(model: VisionTransformer) -> dict:
    return {
        "format": "vitkit",
        "version": FORMAT_VERSION,
        "config": model.cfg.to_dict(),
        "preprocess": model.preprocess.to_dict(),
        "classes": model.classes,
    }


def write(model: VisionTransformer, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    record = record_of(model)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path / WEIGHTS), metadata={"vitkit": json.dumps(record)})
    (path / RECORD).write_text(json.dumps(record, indent=2) + "\n")


def read(path: Path) -> Checkpoint:
    """A vitkit directory (its weight file alone is read by load.py through `from_record`)."""
    return from_record(read_safetensors(path / WEIGHTS)[0], read_json(path / RECORD), path, path / RECORD)


def header_record(text: str, path: Path) -> dict:
    """The record stored in a weight file's safetensors header."""
    try:
        record = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{path}: the 'vitkit' record in the safetensors header is not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}: the 'vitkit' record in the safetensors header is not a JSON object")
    return record


def from_record(tensors: dict[str, torch.Tensor], record: dict, path: Path, where: Path | None = None) -> Checkpoint:
    """A Checkpoint of `path` from its tensors and record; errors name `where` the record was read (default: path)."""
    where = where or path
    if record.get("format") != "vitkit" or record.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{where}: not a vitkit v{FORMAT_VERSION} record (format={record.get('format')!r}, "
            f"version={record.get('version')!r})"
        )
    try:
        cfg = ViTConfig.from_dict(record["config"])
        prep = Preprocess.from_dict(record["preprocess"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: vitkit record is incomplete or malformed ({e})") from e
    classes = record.get("classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise ValueError(f"{where}: vitkit record has classes={classes!r}; expected a list of names or null")
    fields = cfg.to_dict()
    fields["img_size"] = cfg.img_size
    fields["hybrid"] = cfg.hybrid
    # The record fixes the structure; numerics and regularisation are what the model was saved with, and a
    # user may change them.
    determined = {k: fields.pop(k) for k in STRUCTURE}
    return Checkpoint(
        tensors,
        "vitkit",
        str(path),
        determined=determined,
        defaults=fields,
        preprocess=prep,
        classes=classes,
    )
