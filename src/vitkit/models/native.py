"""vitkit's native CPU attention (`attention.cpp`): compiled on first use by the system's C++ compiler into a cache
folder, loaded through ctypes, and `None` where it cannot be built or loaded (then PyTorch's kernels run; a
warning says why, once).

The library is built with -march=native, so the cache key holds the CPU's feature flags: a cache folder shared by
different machines keeps one build per kind of CPU. `VITKIT_CACHE` moves the folder (default
`$XDG_CACHE_HOME/vitkit`, else `~/.cache/vitkit`); `CXX` names the compiler (default g++).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger("vitkit")

SOURCE = Path(__file__).with_name("attention.cpp")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")


def cache_dir() -> Path:
    if os.environ.get("VITKIT_CACHE"):
        return Path(os.environ["VITKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vitkit"


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _build(compiler: str, path: Path) -> None:
    """Compiles SOURCE to `path`, atomically: concurrent processes each build and the last rename wins."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE)], check=True, capture_output=True, text=True)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled attention library, built if needed; None (with a warning) where that fails."""
    compiler = os.environ.get("CXX", "g++")
    key = hashlib.sha256(
        b"\0".join(
            [
                SOURCE.read_bytes(),
                " ".join([compiler, *FLAGS]).encode(),
                platform.machine().encode(),
                _cpu_features().encode(),
            ]
        )
    ).hexdigest()[:16]
    path = cache_dir() / f"attention-{key}.so"
    try:
        if not path.exists():
            _build(compiler, path)
        lib = ctypes.CDLL(str(path))
    except subprocess.CalledProcessError as e:
        log.warning(
            "vitkit: %s could not compile %s, so PyTorch's attention runs instead:\n%s",
            compiler,
            SOURCE,
            e.stderr.strip()[-2000:],
        )
        return None
    except OSError as e:  # no compiler, an unwritable cache folder, a library that does not load
        log.warning("vitkit: the native attention kernel is unavailable (%s), so PyTorch's attention runs instead", e)
        return None
    shape = [ctypes.c_void_p, ctypes.c_void_p, *[ctypes.c_long] * 4, ctypes.c_float]  # data, strides, B, H, T, d, scale
    for fn in (lib.vitkit_attention_forward, lib.vitkit_attention_backward):
        fn.argtypes, fn.restype = [*shape, ctypes.c_void_p, ctypes.c_int], None  # stats, threads
    lib.vitkit_attention_forward_bf16.argtypes, lib.vitkit_attention_forward_bf16.restype = [*shape, ctypes.c_int], None
    return lib
