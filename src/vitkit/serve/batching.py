"""Dynamic batching: requests that arrive together, or while the model is busy, run as one batch.

One worker thread owns the model. It takes the first waiting item, then gathers more for at most `max_wait_ms`
or until it has `max_batch`, and runs them in one call. Under light load a request waits at most `max_wait_ms`;
under heavy load the batches fill up and throughput follows the model's batched speed. A thread rather than an
asyncio task, so that the model's forward pass never blocks the event loop that accepts uploads, and so that the
queue's timed `get` (which cannot lose an item, unlike a cancelled `asyncio.wait_for` before Python 3.12) does
the waiting.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")
_STOP = object()


class Overloaded(RuntimeError):
    """The queue is full: the caller should answer 503 and let the client retry."""


@dataclass
class BatchStats:
    """What the worker has done since it started."""

    requests: int = 0  # items answered (with a result or an error)
    batches: int = 0  # calls of the batch function
    largest_batch: int = 0
    failed_batches: int = 0  # calls that raised; their items got the error

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class DynamicBatcher(Generic[Item, Result]):
    """Runs `run_batch` on batches of submitted items in one worker thread.

    Args:
        run_batch: maps a list of items to a list of results of the same length, in the same order.
        max_batch: most items per call (1 turns batching off).
        max_wait_ms: how long the worker waits for more items after the first one of a batch.
        max_queue: most items waiting; `submit` raises `Overloaded` beyond it.
    """

    def __init__(
        self,
        run_batch: Callable[[list[Item]], Sequence[Result]],
        max_batch: int = 8,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch}; expected 1 or more")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms={max_wait_ms}; expected 0 or more")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.stats = BatchStats()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="vitkit-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Let the worker finish the batch it is running, answer the rest with an error, and end."""
        if self._thread is not None:
            self._queue.put(_STOP)  # blocks only while the queue is full, which the worker is draining
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def submit(self, item: Item) -> Future[Result]:
        """Queue one item; the future gets its result, or the exception its batch raised.

        Raises:
            Overloaded: `max_queue` items are already waiting.
            RuntimeError: the worker is not running.
        """
        if not self.alive:
            raise RuntimeError("the batch worker is not running")
        future: Future[Result] = Future()
        try:
            self._queue.put_nowait((item, future))
        except queue.Full:
            raise Overloaded(f"{self._queue.maxsize} requests are already waiting; try again shortly") from None
        return future

    def _work(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            batch = [first]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                remaining = deadline - time.monotonic()
                try:  # after the deadline, still take what is already waiting
                    entry = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if entry is _STOP:
                    stopping = True
                    break
                batch.append(entry)
            self._run(batch)
        self._drain()

    def _run(self, batch: list[tuple[Item, Future[Result]]]) -> None:
        # A client that went away cancelled its future; it is not computed.
        batch = [(item, future) for item, future in batch if future.set_running_or_notify_cancel()]
        if not batch:
            return
        failed = False
        try:
            results = self.run_batch([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
        except Exception as e:  # one bad batch fails its own requests, never the worker
            failed = True
            for _, future in batch:
                future.set_exception(e)
        else:
            for (_, future), result in zip(batch, results, strict=True):
                future.set_result(result)
        with self._lock:
            self.stats.requests += len(batch)
            self.stats.batches += 1
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
            self.stats.failed_batches += failed

    def _drain(self) -> None:
        while True:
            try:
                entry = self._queue.get_nowait()
            except queue.Empty:
                return
            if entry is not _STOP and entry[1].set_running_or_notify_cancel():
                entry[1].set_exception(RuntimeError("the server is shutting down"))
