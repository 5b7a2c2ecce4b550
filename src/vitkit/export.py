"""ONNX export: a graph that takes any batch (and, when asked, any image size), with the preprocessing and the
class names stored in the file, so that `vitkit predict --backend onnx` and other runtimes build inputs the same
way as the PyTorch model.

Exporter choice. `torch.onnx.export(..., dynamo=True)` (torch.export, then onnxscript's ATen library), not the
TorchScript tracer (`dynamo=False`), because only the former gives a graph that is right at every size:
- the tracer has no ONNX translation of `_upsample_bicubic2d_aa`, the antialiased bicubic that timm-style
  models use when the token grid shrinks; the dynamo exporter writes it as Resize(cubic, antialias=1,
  cubic_coeff_a=-0.5, exclude_outside=1), which is PyTorch's kernel;
- torch.export refuses to bake a size silently: a Python branch on a dynamic size is an error or a guard at
  export time, where the tracer freezes it with a warning and the graph then fails (or, worse, runs) at another
  size. The sizes are declared as `stride * grid` so that the divisibility check in the patch embedding holds
  symbolically.
The model's own forward runs; only the position-embedding resampling takes its traced form
(`VisionTransformer._pos_embed_for_traced`), which gives the same numbers without branching on the size.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .checkpoints.native import record_of
from .models import VisionTransformer

INPUT, OUTPUT = "images", "logits"
METADATA_KEY = "vitkit"  # metadata_props key of the JSON record (config, preprocessing, classes, export)
MIN_OPSET = 18  # Resize's `antialias` attribute arrived in opset 18


def require_onnx() -> None:
    """Raise a clear ImportError when the `onnx` extra is not installed."""
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"ONNX export needs the 'onnx' extra ({e.name} is missing): pip install -c constraints.txt 'vitkit[onnx]'"
        ) from None


def export_onnx(
    model: VisionTransformer,
    path: str | Path,
    opset: int = MIN_OPSET,
    dynamic_size: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write `model` as an ONNX graph images (B, C, H, W) float32 -> logits (B, num_classes).

    The batch is always dynamic. With `dynamic_size`, so are height and width (any multiple of the token
    stride): the position embeddings are resampled inside the graph exactly as `dynamic_img_size=True` does in
    PyTorch. The file's metadata_props["vitkit"] holds a JSON record: the config (as exported), the
    preprocessing, the class names, and the export settings.

    Args:
        model: the model to export (not changed: a copy is exported, in eval mode, float32, on the CPU).
        path: the .onnx file to write.
        opset: ONNX opset, at least 18.
        dynamic_size: accept any input height and width, not only the model's img_size.
        overwrite: replace an existing file.

    Raises:
        FileExistsError: `path` exists and `overwrite` is False (checked before any work).
        ValueError: the opset is below 18.
        ImportError: onnx, onnxscript or onnxruntime is not installed.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; refusing to overwrite it (pass overwrite=True / --overwrite)")
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset}: expected {MIN_OPSET} or newer (Resize with antialias needs opset 18)")
    require_onnx()
    model = copy.deepcopy(model).float().cpu().eval()
    if dynamic_size:
        model.cfg = model.cfg.replace(dynamic_img_size=True)
    cfg = model.cfg
    # Batch 2, not 1: torch.export specialises a dimension whose example size is 1.
    example = torch.zeros(2, cfg.in_chans, *cfg.img_size)
    dims: dict[int, Any] = {0: torch.export.Dim("batch", min=1)}
    if dynamic_size:
        dims[2] = cfg.stride * torch.export.Dim("grid_h", min=1)
        dims[3] = cfg.stride * torch.export.Dim("grid_w", min=1)
    output = OUTPUT if cfg.num_classes else "features"
    with _quiet_exporter():
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT],
            output_names=[output],
            dynamic_shapes={"x": dims},
            verbose=False,
        )
    record = record_of(model)
    record["onnx"] = {
        "opset": opset,
        "input": INPUT,
        "output": output,
        "dynamic_batch": True,
        "dynamic_size": dynamic_size,
        "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
    }
    program.model.metadata_props[METADATA_KEY] = json.dumps(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path))  # weights inside the file, unless over protobuf's 2 GB (then beside it, path + ".data")
    return path


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's own chatter (optional torchvision ops it skips, its deprecation notices) says nothing about
    this model; errors still raise."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def read_onnx_record(path: str | Path, metadata: dict[str, str]) -> dict[str, Any]:
    """The vitkit record of an exported file, from its metadata_props.

    Raises:
        ValueError: the metadata has no vitkit record, or it is not JSON of the expected form.
    """
    if METADATA_KEY not in metadata:
        raise ValueError(
            f"{path}: no {METADATA_KEY!r} entry in the ONNX metadata_props (found {sorted(metadata)}); "
            "export the model with `vitkit export`"
        )
    try:
        record = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: metadata_props[{METADATA_KEY!r}] is not JSON ({e})") from None
    missing = [k for k in ("config", "preprocess", "onnx") if k not in record]
    if missing:
        raise ValueError(f"{path}: metadata_props[{METADATA_KEY!r}] lacks {missing}")
    return record
