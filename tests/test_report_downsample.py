"""The report's downsampling (`optiscope.dashboards.downsample`) against brute force: every
bucket's extremes kept, non-finite values kept visible, copies returned, bad arguments refused."""

from __future__ import annotations

import math

import numpy as np
import pytest

from optiscope.dashboards.downsample import downsample_2d, minmax_downsample


def _buckets(n: int, buckets: int) -> list[slice]:
    """The reference bucketing: equal runs of consecutive samples."""
    edges = [int(x) for x in np.linspace(0, n, buckets + 1)]
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


@pytest.mark.parametrize("n,buckets", [(1, 1), (7, 2), (4097, 100), (10_007, 250)])
def test_minmax_downsample_keeps_every_bucket_extreme(n, buckets):
    rng = np.random.default_rng(n)
    steps = np.arange(1, n + 1) * 3
    values = rng.standard_normal(n)
    if n > 100:
        values[[17, n // 2, n - 5]] = [80.0, -60.0, 1e6]  # spikes, both ways
    out_steps, out_values = minmax_downsample(steps, values, buckets)
    if n <= 2 * buckets:
        np.testing.assert_array_equal(out_steps, steps)
        np.testing.assert_array_equal(out_values, values)
        return
    assert len(out_steps) <= 2 * buckets + 2
    assert np.all(np.diff(out_steps) > 0), "in step order, no repeats"
    kept = dict(zip(out_steps.tolist(), out_values.tolist()))
    for b in _buckets(n, buckets):
        lo, hi = b.start + int(np.argmin(values[b])), b.start + int(np.argmax(values[b]))
        assert kept.get(int(steps[lo])) == values[lo], f"minimum of bucket {b} lost"
        assert kept.get(int(steps[hi])) == values[hi], f"maximum of bucket {b} lost"
    if n > 100:
        assert {int(steps[i]) for i in (17, n // 2, n - 5)} <= kept.keys(), "a spike was lost"
    assert {int(steps[0]), int(steps[-1])} <= kept.keys(), "the run's range is kept"


def test_minmax_downsample_keeps_non_finite_values_visible():
    n = 1000
    values = np.linspace(1.0, 2.0, n)
    values[[100, 101, 102, 503]] = [np.nan, np.nan, np.inf, -np.inf]
    values[700:760] = np.nan  # a whole bucket of NaN
    steps, out = minmax_downsample(np.arange(n), values, 20)
    assert len(steps) <= 3 * 20 + 2
    got = dict(zip(steps.tolist(), out.tolist()))
    assert math.isnan(got[100]), "the first NaN of its bucket"
    assert 101 not in got, "one non-finite sample per bucket is enough to show it"
    assert got[503] == -np.inf
    assert any(700 <= s < 760 for s in got), "the all-NaN bucket is not skipped"
    finite = out[np.isfinite(out)]
    assert finite.min() == 1.0 and finite.max() == 2.0


def test_minmax_downsample_returns_copies_and_checks_its_arguments():
    steps, values = np.arange(5), np.ones(5)
    out_steps, _ = minmax_downsample(steps, values, 10)
    out_steps[0] = 99
    assert steps[0] == 0
    with pytest.raises(ValueError, match=r"bins must be an integer >= 1, got 0"):
        minmax_downsample(steps, values, 0)
    with pytest.raises(ValueError, match=r"shapes \(5,\) and \(4,\)"):
        minmax_downsample(steps, values[:4], 2)


@pytest.mark.parametrize("reduce", ["max", "min"])
@pytest.mark.parametrize("n,buckets", [(1, 3), (7, 7), (7, 3), (1001, 40)])
def test_downsample_2d_against_brute_force(reduce, n, buckets):
    rng = np.random.default_rng(n + buckets)
    layers = 5
    steps = np.arange(n) * 10 + 1
    values = np.exp(rng.standard_normal((layers, n)))
    present = rng.random((layers, n)) > 0.1
    values[rng.random((layers, n)) < 0.02] = np.nan
    values[0, n // 2] = np.inf
    out = downsample_2d(steps, values, buckets, reduce=reduce, present=present)
    spans = _buckets(n, min(buckets, n))
    assert out.cells.shape == out.nonfinite.shape == (layers, len(spans))
    for j, b in enumerate(spans):
        assert out.start[j] == steps[b.start] and out.stop[j] == steps[b.stop - 1]
        for i in range(layers):
            v, p = values[i, b], present[i, b]
            good = v[p & np.isfinite(v)]
            expected = (good.max() if reduce == "max" else good.min()) if len(good) else np.nan
            np.testing.assert_equal(out.cells[i, j], expected, err_msg=f"cell ({i}, {j})")
            assert out.nonfinite[i, j] == bool((p & ~np.isfinite(v)).any()), f"flag ({i}, {j})"


def test_downsample_2d_edge_cases_and_errors():
    empty = downsample_2d(np.zeros(0, np.int64), np.zeros((3, 0)), 10)
    assert empty.cells.shape == (3, 0) and len(empty.start) == 0
    spike = np.ones((2, 1000))
    spike[1, 321] = 50.0
    out = downsample_2d(np.arange(1000), spike, 10)
    assert out.cells[1].max() == 50.0 and out.cells[0].max() == 1.0, "a cell keeps its spike"
    with pytest.raises(ValueError, match="reduce must be 'max' or 'min', got 'mean'"):
        downsample_2d(np.arange(3), np.ones((1, 3)), 2, reduce="mean")
    with pytest.raises(ValueError, match=r"values must be \[layers, n\] for n = len\(steps\) = 3"):
        downsample_2d(np.arange(3), np.ones((1, 4)), 2)
    with pytest.raises(ValueError, match="present must have the shape of values"):
        downsample_2d(np.arange(3), np.ones((1, 3)), 2, present=np.ones((1, 2), bool))
