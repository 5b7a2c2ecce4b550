"""Run a file written by `vitkit export` with onnxruntime, behind the same small interface as the PyTorch model
(`cfg`, `preprocess`, `classes`, `eval()`, `model(images) -> logits`), so that `vitkit.predict` serves both."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .export import read_onnx_record
from .models import ViTConfig
from .preprocess import Preprocess


class OnnxModel:
    """An exported vitkit model on onnxruntime's CPU execution provider.

    Attributes:
        cfg: the ViTConfig the graph was exported from (dynamic_img_size=True when its height and width are
            dynamic).
        preprocess: the preprocessing recorded at export, the same record as the PyTorch model's.
        classes: class names, or None.
        export: the export settings (opset, input and output names, dynamic axes, exporter).
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        """Open `path`.

        Args:
            path: an .onnx file written by `vitkit export`.
            threads: onnxruntime intra-op threads; None lets onnxruntime choose (one per core).

        Raises:
            FileNotFoundError: no such file.
            ValueError: `path` is a directory, or the file has no vitkit record in its metadata.
            ImportError: onnxruntime is not installed.
        """
        try:
            import onnxruntime as ort
        except ImportError:
            raise ImportError(
                "--backend onnx needs onnxruntime: pip install -c constraints.txt 'vitkit[onnx]'"
            ) from None
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no such file (expected an .onnx file written by `vitkit export`)")
        if not self.path.is_file():
            raise ValueError(f"{self.path} is a directory; expected an .onnx file written by `vitkit export`")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        record = read_onnx_record(self.path, self.session.get_modelmeta().custom_metadata_map)
        try:
            self.cfg = ViTConfig.from_dict(record["config"])
            self.preprocess = Preprocess.from_dict(record["preprocess"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{self.path}: the vitkit record in the ONNX metadata is malformed ({e})") from None
        self.classes: list[str] | None = record.get("classes")
        self.export: dict = record["onnx"]
        self.input_name = self.session.get_inputs()[0].name

    def eval(self) -> OnnxModel:
        return self  # a graph has no training mode; here so callers treat both backends alike

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float32 images -> (B, num_classes) float32 logits, on the CPU."""
        x = np.ascontiguousarray(images.detach().cpu().float().numpy())
        (logits,) = self.session.run(None, {self.input_name: x})
        return torch.from_numpy(logits)
