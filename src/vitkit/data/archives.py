"""Dataset files read safely: CIFAR's pickled batches (an unpickler that can only rebuild numpy arrays) and
MNIST's IDX files. Both raise ValueError naming the file for anything else."""

from __future__ import annotations

import codecs
import gzip
import pickle
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    if encoding not in ("latin1", "latin-1"):
        raise ValueError(f"refused _codecs.encode(..., {encoding!r})")
    return codecs.encode(text, encoding)


def _numpy_globals() -> dict[tuple[str, str], object]:
    """What a pickled numpy array needs, found from numpy itself so both numpy.core and numpy._core work."""
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,  # protocol-2 pickles write bytes as _codecs.encode(str, "latin1")
        ("builtins", "bytearray"): bytearray,
        ("__builtin__", "bytearray"): bytearray,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = np.zeros(1).__reduce__()[0]
        allowed[(f"{core}.multiarray", "scalar")] = np.float64(0).__reduce__()[0]
        allowed[(f"{core}.numeric", "_frombuffer")] = np.zeros(1).__reduce_ex__(5)[0]
    return allowed


class _RefusedPickle(ValueError):
    pass


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, lists, dicts and strings, and refuses every other global: a pickle can run any
    code it names, so a file posing as a CIFAR batch must not get to name any."""

    def __init__(self, file: BinaryIO, where: str) -> None:
        super().__init__(file, encoding="latin1")  # latin1: how numpy arrays pickled by Python 2 decode
        self.where, self.allowed = where, _numpy_globals()

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.allowed:
            raise _RefusedPickle(
                f"{self.where}: refused to unpickle {module}.{name}; a CIFAR batch holds only numpy "
                "arrays, lists and strings, so this file is not one (or has been tampered with)"
            )
        return self.allowed[(module, name)]


def read_cifar_pickle(path: Path) -> dict[str, object]:
    """A CIFAR python batch or meta file as a dict with text keys, unpickled without running any code."""
    try:
        with path.open("rb") as f:
            obj = _CifarUnpickler(f, str(path)).load()
    except _RefusedPickle:
        raise
    except Exception as e:
        raise ValueError(f"{path}: not a CIFAR python batch ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict, found {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or raw): 0x00 0x00, a dtype code, ndim, ndim big-endian uint32 dims, the data."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # a corrupt .gz raises zlib.error from inside gzip
        raise ValueError(f"{path}: cannot read ({e})") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (starts with {raw[:4].hex(' ')}; expected 00 00 <type> <ndim>)")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: IDX header of {ndim} dims is cut short")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: {len(raw)} bytes, but its header ({dtype} {dims}) needs {expected}")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims)
