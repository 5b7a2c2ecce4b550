"""Stop cleanly on SIGINT and SIGTERM (what clusters send before preemption): save, then exit.

The handler only sets a flag; the loop checks it at the end of each optimizer step, writes the `last`
checkpoint and returns. A second signal stops at once (the last checkpoint written is still intact).
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignal:
    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def requested(self) -> bool:
        """Whether any rank received a signal: ranks stop at the same step, so their checkpoints agree."""
        flag = self.received is not None
        if dist.is_initialized():
            t = torch.tensor([int(flag)])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag
