"""Large tensors without page faults: glibc keeps freed memory for the next step.

glibc's malloc serves every allocation above its mmap threshold (32 MiB at most; a ViT-S/16 MLP activation at
batch 32 is 38 MiB) with a fresh `mmap` and gives it back with `munmap` when it is freed. Each training step
allocates the same large tensors again, so the kernel faults in and zeroes every one of their pages every step:
on the 2-core machine we develop on that is a quarter of a ViT-S/16 or ViT-B/16 fp32 training step. After
`keep_freed_memory()` glibc serves them from its heap and keeps freed memory for reuse. The price: the process
holds on to its peak memory until it exits (the peak itself grows by 5-10%).

`vitkit.train.train`, the benchmark's step functions and the `vitkit` command (for every subcommand: eval,
predict, serve, analyze...) call it; it changes nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
_M_MMAP_MAX = -4
_KEEP = 2**31 - 1  # the largest trim threshold mallopt takes: free memory at the top of the heap stays


def keep_freed_memory() -> bool:
    """Tell glibc to serve large allocations from its heap (no mmap) and not to return freed memory to the
    system. Process-wide and lasting; calling it again changes nothing. True where it took effect (Linux with
    glibc), False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already uses
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; musl and other C libraries without these options return 0.
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _KEEP) == 1
