"""Sizes in bytes as people write them (`16GiB`, `500MB`) and as memory is reported (`1.50 GiB`)."""

from __future__ import annotations

import re

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


def parse_size(text: str) -> int:
    """Bytes of a size people write: `16GiB`, `500MB`, `1.5 GiB`, `1073741824`."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]*)\s*", text)
    if m is None or m[2].lower() not in UNITS:
        raise ValueError(f"memory size {text!r}; expected a number and a unit, e.g. 16GiB, 500MB or 1073741824")
    return int(float(m[1]) * UNITS[m[2].lower()])


def format_size(n: float) -> str:
    """`1.50 GiB`, `512.0 MiB`: binary units, as memory is sold and reported."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}" if unit == "GiB" else f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"
