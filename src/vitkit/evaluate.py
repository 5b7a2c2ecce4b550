"""Accuracy, loss and the confusion matrix of a classifier on a dataset, and the report that shows them."""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .models import VisionTransformer
from .models.kernels import onednn_matmul
from .models.quantize import quantize_int8

log = logging.getLogger("vitkit")


@dataclass
class EvalResult:
    """What an evaluation found.

    Attributes:
        top1, top5: fractions of images whose class is the first / among the first min(5, K) predictions.
        loss: mean cross-entropy.
        count: images evaluated.
        classes: class names, in the order of the model's outputs.
        confusion: (K, K) counts; rows are the true class, columns the predicted one.
        per_class: top-1 accuracy of each class; None for a class with no images.
        skipped: (where, reason) of each unreadable image left out.
    """

    top1: float
    top5: float
    loss: float
    count: int
    classes: list[str]
    confusion: np.ndarray
    per_class: list[float | None]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def support(self) -> list[int]:
        """Images of each true class."""
        return self.confusion.sum(axis=1).tolist()

    def to_dict(self) -> dict[str, Any]:
        """The metrics as JSON-ready values (the confusion matrix is left to `write_report`'s CSV)."""
        return {
            "top1": self.top1,
            "top5": self.top5,
            "loss": self.loss,
            "count": self.count,
            "per_class": dict(zip(self.classes, self.per_class, strict=True)),
            "skipped": [{"where": where, "reason": reason} for where, reason in self.skipped],
        }


class Meter:
    """Counts top-1/top-5 hits, summed loss and the confusion matrix over batches of logits.

    Everything is a sum of counters, so the result over several ranks is exact once `all_reduce` has summed them;
    top-1 hits are the confusion matrix's trace and the count is its total.
    """

    def __init__(self, num_classes: int, device: str | torch.device = "cpu"):
        self.num_classes = num_classes
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        self.top5_hits = torch.zeros((), dtype=torch.int64, device=device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch: logits (B, K) (or log-probabilities), labels (B,) class indices."""
        k = self.num_classes
        logits, labels = logits.detach().float(), labels.to(self.confusion.device)
        self.loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        top = logits.topk(min(5, k), dim=-1).indices  # (B, min(5, K)); column 0 is the top-1 prediction
        self.top5_hits += (top == labels[:, None]).any(dim=-1).sum()
        self.confusion += torch.bincount(labels * k + top[:, 0], minlength=k * k).view(k, k)

    def all_reduce(self) -> None:
        """Sum the counters over all ranks when a process group is running; nothing otherwise."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        for counter in (self.confusion, self.top5_hits, self.loss_sum):
            dist.all_reduce(counter)

    def result(self, classes: list[str], skipped: list[tuple[str, str]] | None = None) -> EvalResult:
        confusion = self.confusion.cpu().numpy()
        count = int(confusion.sum())
        if count == 0:
            raise ValueError("no images were evaluated")
        support = confusion.sum(axis=1)
        hits = np.diag(confusion)
        return EvalResult(
            top1=float(hits.sum() / count),
            top5=float(self.top5_hits.item() / count),
            loss=float(self.loss_sum.item() / count),
            count=count,
            classes=list(classes),
            confusion=confusion,
            per_class=[float(h / n) if n else None for h, n in zip(hits, support, strict=True)],
            skipped=list(skipped or []),
        )


def autocast(device: str | torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass: fp32 (none), bf16 (CPU and GPU) or fp16 (GPU); none for int8, which
    is in the model (`inference_model`). bf16 on a CPU that does not compute it natively runs, with a warning
    (once) that it is slow there."""
    device_type = torch.device(device).type
    if precision in ("fp32", "int8"):
        return contextlib.nullcontext()
    if precision == "bf16":
        if device_type == "cpu" and not onednn_matmul(torch.bfloat16):
            _warn_slow_bf16()
        return torch.autocast(device_type, dtype=torch.bfloat16)
    if precision == "fp16":
        if device_type != "cuda":
            raise ValueError(f"precision fp16 needs a CUDA device, not {device!r}; use bf16 or fp32")
        return torch.autocast(device_type, dtype=torch.float16)
    raise ValueError(f"precision {precision!r}; expected fp32, bf16, fp16 or int8")


def auto_precision(device: str | torch.device) -> str:
    """What `train.precision=auto` runs on `device`: bf16 where it is computed natively (a GPU that has it; a CPU
    with avx512_bf16 or AMX), else fp16 on a GPU and fp32 on a CPU, where bf16 is emulated (12x slower than fp32 for
    the cifar10 recipe on a Zen 3 with AVX2; on AVX-512 without bf16 instructions oneDNN widens to fp32 inside)."""
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return "bf16"
    return "fp32"


def inference_model(model: VisionTransformer, device: str | torch.device, precision: str) -> VisionTransformer:
    """The module that runs `model` at `precision`: the model itself in eval mode on `device`, or for int8 its
    int8 copy (`vitkit.models.quantize`; CPU only), run without autocast."""
    if precision != "int8":
        return model.eval().to(device)
    if torch.device(device).type != "cpu":
        raise ValueError(f"precision int8 runs on CPU, not on {device!r}; use bf16 or fp16 there")
    return quantize_int8(model)


@functools.cache
def _warn_slow_bf16() -> None:
    # Without AVX-512 oneDNN refuses bf16 and PyTorch's fallback kernels are far slower than fp32: on a Zen 3
    # (AVX2) the cifar10 recipe's training step ran 12x slower in bf16 (17.7 against 208 images/s).
    log.warning(
        "vitkit: this CPU has no native bf16 (oneDNN needs AVX-512 for it), so bf16 runs about 10x slower than fp32 "
        "here; use fp32 (--precision fp32; for training --set train.precision=fp32, or auto to choose by the device)"
    )


def class_scores(model: Any, images: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """fp32 class scores (B, K) of a normalised batch (B, C, H, W): the logits, or with `flip` the log of the mean
    of the probabilities of each image and of its mirror image (left-right test-time augmentation, twice the
    compute; for classes without handedness, not for digits or text). Softmax turns either into probabilities."""
    logits = model(images).float()
    if not flip:
        return logits
    both = torch.stack([logits, model(images.flip(-1)).float()]).log_softmax(dim=-1)
    return torch.logsumexp(both, dim=0) - math.log(2)


@torch.no_grad()
def evaluate(
    model: VisionTransformer,
    source: Any,
    *,
    batch_size: int = 128,
    workers: int = 0,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    flip: bool = False,
    rank: int = 0,
    world: int = 1,
) -> EvalResult:
    """Top-1/top-5 accuracy, loss and confusion matrix of `model` on `source`, inputs made by the model's own
    evaluation preprocessing (`model.preprocess`).

    Args:
        model: a classifier whose outputs are the source's classes, in the source's order.
        source: a `vitkit.data` source (`vitkit.data.open_source`).
        batch_size: images per step over all ranks; with world > 1 each rank evaluates its slice and the
            counters are summed, so every rank returns the same result.
        workers: decoding processes (0: decode in this process).
        device: where the model runs.
        precision: "fp32", "bf16" (autocast), "fp16" (autocast, CUDA only) or "int8" (the dense layers of the
            blocks in int8, `vitkit.models.quantize`; CPU only).
        flip: average the probabilities of each image and its mirror image (`class_scores`).
        rank, world: this process and the number of processes sharing the evaluation.
    """
    from .data import batches
    from .data.augment import normalize

    k = model.cfg.num_classes
    classes = list(source.classes)
    if len(classes) != k:
        raise ValueError(f"{source.name}: {len(classes)} classes, but the model has {k} outputs")
    unlabelled = int((np.asarray(source.labels) < 0).sum())
    if unlabelled:
        raise ValueError(f"{source.name}: {unlabelled} unlabelled image(s) (label -1); evaluation needs labels")
    if model.classes and list(model.classes) != classes:
        log.warning("%s: the class names differ from the model's; outputs are read in the source's order", source.name)
    prep = model.preprocess
    model = inference_model(model, device, precision)
    meter = Meter(k, device)
    skipped: list[tuple[str, str]] = []
    for batch in batches(
        source,
        batch_size=batch_size,
        img_size=prep.img_size,
        channels=model.cfg.in_chans,
        train=False,
        preprocess=prep,
        rank=rank,
        world=world,
        workers=workers,
    ):
        skipped += batch.skipped
        if len(batch.labels) == 0:
            continue
        images = torch.as_tensor(batch.images).to(device, non_blocking=True)
        with autocast(device, precision):
            scores = class_scores(model, normalize(images, prep.mean, prep.std), flip)
        meter.update(scores, torch.as_tensor(batch.labels))
    meter.all_reduce()
    if world > 1 and dist.is_available() and dist.is_initialized():
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, skipped)
        skipped = [s for part in gathered for s in part]
    if int(meter.confusion.sum()) == 0 and skipped:
        where, reason = skipped[0]
        raise ValueError(f"{source.name}: not one of its {len(skipped)} images could be read (e.g. {where}: {reason})")
    return meter.result(classes, skipped)


REPORT = ("metrics.json", "confusion.csv", "confusion.png", "skipped.tsv")


def check_report_dir(out_dir: str | Path, overwrite: bool = False) -> None:
    """Refuse, before any work, a folder that already holds a report, unless `overwrite`.

    Raises:
        FileExistsError: naming the first file that would be replaced.
    """
    existing = [Path(out_dir) / name for name in REPORT if (Path(out_dir) / name).exists()]
    if existing and not overwrite:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise FileExistsError(f"{existing[0]}{more} exist; refusing to overwrite (pass --overwrite)")


def write_report(result: EvalResult, out_dir: str | Path) -> list[Path]:
    """Write metrics.json, confusion.csv (header: predicted class names; first column: true class),
    confusion.png and, when images were skipped, skipped.tsv (where, tab, reason) into `out_dir` (created when
    missing; existing report files are replaced, see `check_report_dir`). Returns the paths written."""
    from .data import skipped_tsv
    from .plots import confusion_png

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "skipped.tsv").unlink(missing_ok=True)  # a replaced report keeps no stale list
    metrics = out_dir / "metrics.json"
    metrics.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    table = out_dir / "confusion.csv"
    with table.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true \\ predicted", *result.classes])
        for name, row in zip(result.classes, result.confusion.tolist(), strict=True):
            w.writerow([name, *row])
    title = f"top-1 {result.top1:.2%} on {result.count} images"
    figure = confusion_png(result.confusion, result.classes, out_dir / "confusion.png", title=title)
    written = [metrics, table, figure]
    if result.skipped:
        written.append(out_dir / "skipped.tsv")
        written[-1].write_text(skipped_tsv(result.skipped))
    return written


def summary(result: EvalResult, max_rows: int = 30) -> str:
    """The human-readable report: accuracy, loss, a per-class table (the weakest classes when there are many)."""
    lines = [
        f"top-1  {result.top1:8.2%}",
        f"top-5  {result.top5:8.2%}" + ("" if len(result.classes) >= 5 else f"  (top-{len(result.classes)})"),
        f"loss   {result.loss:8.4f}",
        f"images {result.count:8d}",
    ]
    rows = list(zip(result.classes, result.per_class, result.support, strict=True))
    if len(rows) > max_rows:
        rows = sorted(rows, key=lambda r: math.inf if r[1] is None else r[1])[:max_rows]
        lines.append(f"the {max_rows} weakest of {len(result.classes)} classes:")
    width = max(len("class"), *(len(name) for name, _, _ in rows))
    lines.append(f"  {'class':<{width}}  {'top-1':>8}  {'images':>6}")
    for name, acc, n in rows:
        lines.append(f"  {name:<{width}}  {'-' if acc is None else f'{acc:.2%}':>8}  {n:>6}")
    lines.append(f"skipped {len(result.skipped)} unreadable image(s)")
    for where, reason in result.skipped[:5]:
        lines.append(f"  {where}: {reason}")
    return "\n".join(lines)
