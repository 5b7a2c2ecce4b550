"""Where training metrics go: JSON lines in the run directory, TensorBoard when installed, and the terminal."""

from __future__ import annotations

import json
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from tqdm import tqdm


class MetricsLog:
    """Appends records ({"kind": "train" | "eval", "step": ..., ...}) to metrics.jsonl.

    `progress` chooses the terminal output: "bar" (a tqdm bar with images/s, ETA, loss and lr; where stderr is
    not a terminal, as in a log file, one plain line per record instead), "json" (each record as one JSON line on
    stdout, for programs) or "none".
    """

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, progress: str = "bar"):
        self.path = run_dir / "metrics.jsonl"
        self.progress = progress
        self.total_steps, self.start_step, self.start_time = total_steps, start_step, time.perf_counter()
        on_terminal = progress == "bar" and sys.stderr.isatty()
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True) if on_terminal else None
        self.lines = progress == "bar" and not on_terminal
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
        elif self.lines and record["kind"] == "train":
            print(
                f"step {record['step']}/{self.total_steps} (epoch {record['epoch']:.2f}): loss {record['loss']:.4f}, "
                f"lr {record['lr']:.2e}, {record['images_per_s']:.0f} images/s, ETA {self._eta(record['step'])}",
                file=sys.stderr, flush=True,
            )  # fmt: skip
        elif self.bar is not None or self.lines:
            self.message(
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
            print(text, file=sys.stderr, flush=True)

    def _eta(self, step: int) -> str:
        """The time left at the pace since this process started (h:mm:ss), or ? before a step is done."""
        done = step - self.start_step
        if done <= 0:
            return "?"
        left = (time.perf_counter() - self.start_time) / done * (self.total_steps - step)
        return str(timedelta(seconds=round(left)))

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
