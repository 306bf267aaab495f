"""The pure parts of the peer bench's open-loop load generator: its schedule and its percentile."""

import math

from bench.peer.loadgen import percentile, schedule


def test_schedule_is_fixed_and_evenly_spaced() -> None:
    s = schedule(200, 2)
    assert len(s) == 400
    assert s[0] == 0 and math.isclose(s[1], 0.005) and math.isclose(s[-1], 399 / 200)


def test_percentile_nearest_rank() -> None:
    values = [float(i) for i in range(1, 101)]
    assert percentile(values, 0.50) == 51.0
    assert percentile(values, 0.99) == 100.0
    assert math.isnan(percentile([], 0.5))
