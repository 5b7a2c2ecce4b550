"""Fuzz every reader of outside files for longer than the test suite does (tests/test_fuzz.py tries 50 inputs
per reader). The readers, their seed files and the property are in tests/fuzz_targets.py.

    .venv/bin/python benchmarks/fuzz.py --examples 2000 [--seed 1] [--only json] [--no-shrink]

Prints, per reader, the inputs tried, the failures (an exception the reader does not document, or a call over
the CPU limit; Hypothesis shrinks each to a small input, which is printed) and the time. Exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fuzz_targets import TARGETS, Target
from hypothesis import HealthCheck, Phase, given, seed, settings


def fuzz(target: Target, examples: int, random_seed: int, shrink: bool = True) -> tuple[int, BaseException | None]:
    """(inputs tried, the failure or None) after `examples` inputs of one reader."""
    tried = 0

    @seed(random_seed)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate, Phase.shrink] if shrink else [Phase.generate],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(data=target.inputs())
    def reads_or_refuses(data: bytes) -> None:
        nonlocal tried
        tried += 1
        target.check(data)

    try:
        reads_or_refuses()
    except Exception as e:  # the shrunk failing input, as Hypothesis reports it
        return tried, e
    return tried, None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=1000, help="inputs per reader")
    parser.add_argument("--seed", type=int, default=0, help="Hypothesis seed")
    parser.add_argument("--only", default="", help="only readers whose name contains this text")
    parser.add_argument("--no-shrink", action="store_true", help="report a failing input as found, unshrunk")
    args = parser.parse_args()
    logging.getLogger("vitkit").setLevel(logging.ERROR)  # the readers' notes on numerics
    warnings.simplefilter("ignore")  # Pillow's warnings about corrupt EXIF and the like

    print(f"{'reader':<28} {'inputs':>7} {'failures':>8} {'time':>8}")
    total_inputs, failures, start = 0, [], time.perf_counter()
    for target in TARGETS:
        if args.only.lower() not in target.name.lower():
            continue
        target.warm_up()
        begun = time.perf_counter()
        tried, error = fuzz(target, args.examples, args.seed, shrink=not args.no_shrink)
        total_inputs += tried
        if error is not None:
            failures.append((target.name, error))
        print(f"{target.name:<28} {tried:>7} {int(error is not None):>8} {time.perf_counter() - begun:>7.1f}s")
    print(f"{'all':<28} {total_inputs:>7} {len(failures):>8} {time.perf_counter() - start:>7.1f}s")
    for name, error in failures:
        for e in getattr(error, "exceptions", [error]):  # Hypothesis groups distinct failures
            frame = traceback.extract_tb(e.__traceback__)[-1]
            notes = " ".join(getattr(e, "__notes__", []))
            print(f"\n{name}: {type(e).__name__}: {e}\n  at {frame.filename}:{frame.lineno}\n  {notes[:400]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
