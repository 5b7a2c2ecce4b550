"""Training and fine-tuning: config, optimizer and schedule, the loop, checkpoints, distributed helpers."""

from .config import RunConfig, load_config
from .loop import run_config, train

__all__ = ["RunConfig", "load_config", "run_config", "train"]
