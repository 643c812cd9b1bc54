"""The run log's numbers as text in C (optiscope/kernels/cpu_format.c): byte for byte the text of
the Python writer, whose floats are Python's repr (the oracle), over every kind of double."""

from __future__ import annotations

import math

import numpy as np
import pytest

from optiscope.kernels import cpu
from optiscope.kernels.cpu_format import Formatter, formatter
from optiscope.monitor.runlog_writer import histogram_rows, values_json

pytestmark = pytest.mark.skipif(cpu.kernel() is None, reason="no C compiler: the run log "
                                "formats in Python")


@pytest.fixture(scope="module")
def text() -> Formatter:
    return formatter()


def assert_same_text(text: Formatter, values, what: str) -> None:
    values = np.asarray(values, dtype=np.float64)
    got, want = text.array(values).decode(), values_json(values)
    if got != want:
        wrong = [(x, g, w) for x, g, w in zip(values.tolist(), got[1:-1].split(","),
                                              want[1:-1].split(",")) if g != w]
        pytest.fail(f"{what}: {len(wrong)} of {values.size} values differ from repr, e.g. "
                    f"(value, C, Python) {wrong[:5]}")


def powers_of_two() -> np.ndarray:
    return np.ldexp(1.0, np.arange(-1074, 1024))


def test_random_bit_patterns_are_written_as_repr(text):
    """10^6 doubles drawn uniformly over their bits: every magnitude, subnormals, NaNs with
    payloads, both signs."""
    bits = np.random.default_rng(1).integers(0, 2**64, size=10**6, dtype=np.uint64,
                                             endpoint=False)
    assert_same_text(text, bits.view(np.float64), "random bits")


def test_values_a_monitor_writes_are_written_as_repr(text):
    rng = np.random.default_rng(2)
    n = 200_000
    cases = {
        "normal over 60 decades": rng.standard_normal(n) * 10.0 ** rng.uniform(-30, 30, n),
        "[0, 1)": rng.random(n),
        "float32 values": rng.standard_normal(n).astype(np.float32).astype(np.float64),
        "square roots": np.sqrt(rng.random(n) * 1e4),
        "ratios": rng.random(n) / (rng.random(n) + 1e-3),
        "near the notation switches": np.concatenate(
            [[np.nextafter(10.0 ** e, d) * s for e in (-5, -4, 15, 16, 17) for d in (0, np.inf)
              for s in (1, -1)], 10.0 ** rng.uniform(-5.5, -3.5, 1000),
             10.0 ** rng.uniform(15.5, 16.5, 1000)]),
    }
    for what, values in cases.items():
        assert_same_text(text, values, what)


def test_edges_are_written_as_repr(text):
    p2 = powers_of_two()
    big = 2.0**53
    edges = {
        "powers of two": np.concatenate([p2, -p2]),
        "neighbours of powers of two": np.concatenate([np.nextafter(p2, np.inf),
                                                       np.nextafter(p2, 0.0)]),
        "subnormals": np.arange(1, 100_001, dtype=np.uint64).view(np.float64),
        "random subnormals": np.random.default_rng(3).integers(
            1, 2**52, 100_000, dtype=np.uint64).view(np.float64),
        "2^53 and neighbours": [np.nextafter(big, np.inf), np.nextafter(big, 0), big, -big,
                                big + 2, big - 1, big - 2, -(big - 1), -(big + 2), 2.0**60,
                                1e16, 1e15, 9999999999999998.0, 1.5e16, -1e16, 1e300],
        "integral negatives": -np.arange(100_000, dtype=np.float64),
        "integral positives": np.arange(100_000, dtype=np.float64) * 7919.0,
        "specials": [0.0, -0.0, math.nan, -math.nan, math.inf, -math.inf, 5e-324, -5e-324,
                     2.2250738585072014e-308, 2.225073858507201e-308, 1.7976931348623157e308,
                     -1.7976931348623157e308, 1e-4, 1e-5, 0.0001, 0.1, 0.5, 1 / 3, -math.pi,
                     123456789.0, -123.0, 0.30000000000000004, 1e22, 1e23, 5e-310],
    }
    for what, values in edges.items():
        assert_same_text(text, values, what)


def test_the_longest_value_fits_its_room(text):
    longest = [-2.2250738585072014e-308, -1.7976931348623157e308, -2.225073858507201e-308]
    assert max(len(repr(x)) for x in longest) + 1 <= 25  # VALUE_BYTES: a value and its comma
    assert_same_text(text, longest * 1000, "longest")


def test_arrays_writes_each_piece_as_its_own_array(text):
    rng = np.random.default_rng(4)
    sizes = [0, 1, 149, 3, 0, 1645]
    values = rng.standard_normal(sum(sizes)) * 10.0 ** rng.uniform(-10, 10, sum(sizes))
    pieces = text.arrays(values, np.array(sizes))
    starts = np.cumsum([0, *sizes[:-1]])
    assert [p.decode() for p in pieces] == \
           [values_json(values[a:a + n]) for a, n in zip(starts, sizes)]
    with pytest.raises(ValueError, match="add up to the 1798 values"):
        text.arrays(values, np.array([1, 2]))


def test_histogram_rows_are_written_as_the_python_writer_does(text):
    rng = np.random.default_rng(5)
    counts = np.rint(rng.exponential(1e6, (40, 148)) * (rng.random((40, 148)) < 0.3))
    counts[3] = 0.0                   # a row of zeros: []
    counts[4] = 0.0
    counts[4, 147] = 1.0              # only the last bin
    counts[5, 0] = 2.0**62            # a large count
    counts[6, 10] = -0.0
    assert text.histograms(counts).decode() == histogram_rows(counts)
    assert text.histograms(np.zeros((0, 148))).decode() == histogram_rows(np.zeros((0, 148)))
    with pytest.raises(ValueError, match="finite"):
        text.histograms(np.full((1, 3), math.nan))
