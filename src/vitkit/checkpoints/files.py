"""Safe readers for the containers checkpoints come in. Nothing here can run code from a file."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

# Keys under which training scripts nest the weights, tried in this order.
_WRAPPERS = ("state_dict", "model", "module", "model_state", "params")


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and the header metadata of a .safetensors file, in one read."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e


def read_torch(path: Path) -> dict[str, torch.Tensor]:
    """A PyTorch state dict (.pth/.pt/.bin), loaded with weights_only=True so that no pickled code can run."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path}: refused to load: the pickle holds more than tensors (weights_only=True failed: "
            f"{str(e).splitlines()[0]}). vitkit never unpickles arbitrary objects; re-save the state dict "
            "with torch.save(model.state_dict()) or as safetensors"
        ) from e
    except Exception as e:  # torch.load fails on damaged files with anything from EOFError to IndexError
        raise ValueError(f"{path}: not a readable PyTorch file, truncated or corrupt? ({type(e).__name__}: {e})") from e
    return flatten_state_dict(obj, path)


def flatten_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Unwrap {"model": {...}}-style nesting and a DataParallel `module.` prefix."""
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise ValueError(f"{path}: no tensors found; top-level keys: {sorted(obj)[:10]}")
        obj = inner
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """A flat .npz of arrays, with allow_pickle=False."""
    try:
        with np.load(str(path), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # zipfile fails on damaged files with anything from NotImplementedError to RuntimeError
        raise ValueError(f"{path}: not a readable .npz file, truncated or corrupt? ({type(e).__name__}: {e})") from e


JSON_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list"}
JSON_NAMES[dict] = "an object"


def read_json(path: Path, types: dict[str, tuple[type, ...]] | None = None) -> dict[str, Any]:
    """A JSON object from a file; `types` gives the JSON types allowed for the keys the caller reads."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    for key, kinds in (types or {}).items():
        value = obj.get(key)
        if key in obj and not (isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))):
            names = " or ".join("null" if k is type(None) else JSON_NAMES.get(k, k.__name__) for k in kinds)
            raise ValueError(f"{path}: {key}={value!r}; expected {names}")
    return obj


def to_torch(array: np.ndarray) -> torch.Tensor:
    """A numpy array (bfloat16 arrays arrive as void-typed |V2 from .npz) as a float32 torch tensor."""
    if array.dtype.kind == "V" and array.dtype.itemsize == 2:  # bfloat16 saved by JAX: upper half of a float32
        return torch.from_numpy((array.view(np.uint16).astype(np.uint32) << 16).view(np.float32))
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.astype(np.float32))
    return torch.from_numpy(np.ascontiguousarray(array)).float()
