"""Property-based fuzzing of every reader of outside files (the targets are in fuzz_targets.py).

Each reader either reads the input or raises an error it documents; any other exception, or a call that runs
past fuzz_targets.TIME_LIMIT seconds of CPU, fails the test with the smallest input Hypothesis finds. The suite
runs a fixed, derandomised 50 inputs per reader; `benchmarks/fuzz.py --examples N` runs many more.
"""

import logging

import pytest
from fuzz_targets import TARGETS
from hypothesis import HealthCheck, given, settings

EXAMPLES = 50


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's and torch's notes on the damaged files
@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.name)
def test_reader_returns_or_raises_a_documented_error(target, caplog):
    caplog.set_level(logging.ERROR, logger="vitkit")  # the readers' notes about numerics are not the point here
    target.warm_up()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(data=target.inputs())
    def reads_or_refuses(data: bytes) -> None:
        target.check(data)

    reads_or_refuses()
