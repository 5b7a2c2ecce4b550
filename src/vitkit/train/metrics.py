"""Where training metrics go: JSON lines in the run directory, TensorBoard when installed, and the terminal."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm


class MetricsLog:
    """Appends records ({"kind": "train" | "eval", "step": ..., ...}) to metrics.jsonl.

    `progress` chooses the terminal output: "bar" (a tqdm bar with images/s, ETA, loss and lr), "json" (each
    record as one JSON line on stdout, for programs) or "none".
    """

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, progress: str = "bar"):
        self.path = run_dir / "metrics.jsonl"
        self.progress = progress
        self.bar = (
            tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True) if progress == "bar" else None
        )
        self.tb = _tensorboard(run_dir)

    def step(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record)
        with open(self.path, "a") as f:
            f.write(line + "\n")
        if self.progress == "json":
            print(line, flush=True)
        elif self.bar is not None and record["kind"] == "train":
            self.bar.set_postfix(
                loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", img_s=f"{record['images_per_s']:.0f}"
            )
        elif self.bar is not None:
            self.bar.write(
                f"eval @ step {record['step']} (epoch {record['epoch']:.2f}): top-1 {record['top1']:.2%}, "
                f"top-5 {record['top5']:.2%}, loss {record['loss']:.4f}"
            )
        if self.tb is not None:
            for key, value in record.items():
                if key not in ("kind", "step") and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        elif self.progress != "none":
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines metrics log. A cut-off last line (a run still writing) is left out."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such metrics file")
    lines = path.read_text().splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines):
                break
            raise ValueError(f"{path}:{n}: not a JSON record ({e})") from e
    return records


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))
