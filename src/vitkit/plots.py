"""Figures of a run: training curves from the metrics log, and the confusion matrix of an evaluation.

matplotlib is an optional extra (`pip install vitkit[plot]`); it is imported inside the functions, and figures
are drawn on their own Agg canvas rather than through pyplot, so nothing global (backend, open figures) changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .train.metrics import read_metrics

DPI = 120
CURVES_SIZE = (15.0, 4.5)  # inches: three panels side by side
MAX_ANNOTATED = 20  # classes up to which the confusion matrix shows counts and class names


def require_matplotlib() -> None:
    """Raise a clear ImportError when matplotlib is missing (checked before long work that ends in a figure)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ImportError(f"plotting needs matplotlib ({e}); install it with `pip install vitkit[plot]`") from e


def _figure(size: tuple[float, float]) -> Any:
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def training_curves(metrics: str | Path | list[dict[str, Any]], out_png: str | Path) -> Path:
    """Loss (train and val) and val accuracy against epochs, and the learning rate against steps.

    Args:
        metrics: the training loop's JSON-lines log, or its records: `{"kind": "train", "step", "epoch", "loss",
            "lr", ...}` and `{"kind": "eval", "step", "epoch", "loss", "top1", "top5", ...}`. Other kinds are
            ignored; a kind with no records yet leaves its curves out.
        out_png: where to write the figure.

    Returns:
        out_png.
    """
    from_file = isinstance(metrics, (str, Path))
    source = str(metrics) if from_file else "the metrics"
    records = read_metrics(metrics) if from_file else metrics
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train and not evals:
        raise ValueError(f"{source}: no train or eval records to plot")

    def column(rows: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
        pairs = [(r[x], r[y]) for r in rows if r.get(x) is not None and r.get(y) is not None]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    fig = _figure(CURVES_SIZE)
    loss_ax, acc_ax, lr_ax = fig.subplots(1, 3)
    if train:
        loss_ax.plot(*column(train, "epoch", "loss"), lw=0.8, alpha=0.8, label="train")
    if evals:
        loss_ax.plot(*column(evals, "epoch", "loss"), "o-", ms=3, label="val")
    loss_ax.set(title="loss", xlabel="epoch", ylabel="cross-entropy")
    loss_ax.legend()

    if evals:
        for key, label in (("top1", "val top-1"), ("top5", "val top-5")):
            x, y = column(evals, "epoch", key)
            if x:
                acc_ax.plot(x, [100 * v for v in y], "o-", ms=3, label=label)
        acc_ax.legend()
    else:
        acc_ax.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=acc_ax.transAxes)
    acc_ax.set(title="validation accuracy", xlabel="epoch", ylabel="accuracy (%)")

    x, y = column(train, "step", "lr")
    if x:
        lr_ax.plot(x, y, lw=1.0)
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    else:
        lr_ax.text(0.5, 0.5, "no learning rate logged", ha="center", va="center", transform=lr_ax.transAxes)
    lr_ax.set(title="learning rate", xlabel="step", ylabel="lr")

    for ax in (loss_ax, acc_ax, lr_ax):
        ax.grid(alpha=0.3)
    run = Path(source).resolve().parent.name if from_file else ""  # runs/<name>/metrics.jsonl
    fig.suptitle(f"training curves: {run}" if run else "training curves")
    return _save(fig, out_png)


def confusion_size(num_classes: int) -> tuple[float, float]:
    """Figure size in inches: room for names and counts up to MAX_ANNOTATED classes, a fixed square beyond."""
    if num_classes <= MAX_ANNOTATED:
        side = max(5.0, 2.5 + 0.45 * num_classes)
        return side + 1.0, side  # the extra inch holds the colorbar
    return 11.0, 10.0


def confusion_png(confusion: np.ndarray, classes: list[str], out_png: str | Path, title: str = "") -> Path:
    """A row-normalised heatmap of a confusion matrix (rows: true class, columns: predicted).

    Up to MAX_ANNOTATED classes each cell shows its count and the axes name the classes; beyond that (ImageNet's
    1000) the colours alone are drawn.

    Returns:
        out_png.
    """
    confusion = np.asarray(confusion)
    k = len(classes)
    if confusion.shape != (k, k):
        raise ValueError(f"confusion matrix of shape {confusion.shape}, but {k} class names")
    totals = confusion.sum(axis=1, keepdims=True)
    rates = confusion / np.maximum(totals, 1)  # a class with no samples is an empty row, not NaN

    fig = _figure(confusion_size(k))
    ax = fig.subplots()
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the true class")
    if k <= MAX_ANNOTATED:
        ax.set_xticks(range(k), classes, rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(k), classes)
        for i in range(k):
            for j in range(k):
                if confusion[i, j]:
                    colour = "white" if rates[i, j] > 0.5 else "black"
                    ax.text(j, i, str(confusion[i, j]), ha="center", va="center", color=colour, fontsize=8)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set(xlabel="predicted", ylabel="true")
    ax.set_title(title or f"confusion matrix ({k} classes, {int(confusion.sum())} images)")
    return _save(fig, out_png)


def _save(fig: Any, out_png: str | Path) -> Path:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=DPI)
    return out_png
