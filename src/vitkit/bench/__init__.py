"""Speed and memory: `vitkit bench` as importable functions.

- `peak.matmul_peak`: the machine's measured matrix-multiply peak, the yardstick of achieved FLOP/s.
- `peers.build_peer`: Hugging Face's, timm's or torchvision's ViT with the same config as a vitkit model.
- `throughput.measure` / `compare`: images/s and GFLOP/s of inference or training steps, vitkit and peers
  measured alternately in one run.
- `memory.peak_memory` / `max_batch`: peak memory of a step, and the largest batch that fits a budget.
- `data.pipeline_speed` / `training_data_wait`: the input pipeline on its own, and the share of a real training
  run spent waiting for data.

Nothing here imports a peer's library until that peer is asked for.
"""

from ..sizes import parse_size
from .data import DataWait, PipelineSpeed, pipeline_speed, training_data_wait
from .memory import MemoryFit, max_batch, peak_memory
from .peak import Peak, matmul_peak
from .peers import PEERS, build_peer, load_model
from .throughput import Throughput, compare, flops_per_image, make_step, measure

__all__ = [
    "PEERS",
    "DataWait",
    "MemoryFit",
    "Peak",
    "PipelineSpeed",
    "Throughput",
    "build_peer",
    "compare",
    "flops_per_image",
    "load_model",
    "make_step",
    "matmul_peak",
    "max_batch",
    "measure",
    "parse_size",
    "peak_memory",
    "pipeline_speed",
    "training_data_wait",
]
