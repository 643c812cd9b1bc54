"""Decoding a sampled step with numpy: `derive_all` gives `derive`'s float64 values to the last bit,
and the scope lists handed on stay the same objects while the tensors stay."""

import numpy as np
import pytest
import torch

from optiscope import OptimizerMonitor
from optiscope.dashboards import Sink
from optiscope.monitor.history import RunHistory
from optiscope.monitor.metrics import ROW_COLS, TENSOR_METRICS, derive, derive_all


def _rows(rng, n):
    """Sums of many magnitudes, with whole columns, some entries and single entries NaN, and
    inf and signed zeros here and there."""
    rows = rng.random((n, ROW_COLS)) * 10.0 ** rng.integers(-5, 5, (1, ROW_COLS))
    for c in range(ROW_COLS):
        mode = rng.integers(0, 6)
        if mode == 1:
            rows[:, c] = np.nan
        elif mode == 2:
            rows[rng.random(n) < 0.3, c] = np.nan
        elif mode == 3 and n:
            rows[rng.integers(0, n), c] = np.nan
        elif mode == 4 and n:
            rows[rng.integers(0, n), c] = rng.choice([np.inf, 0.0, -0.0])
    return rows


@pytest.mark.parametrize("seed", range(4))
def test_derive_all_is_derive_to_the_last_bit(seed):
    rng = np.random.default_rng(seed)
    for trial in range(60):
        n = int(rng.choice([0, 1, 7, 8, 9, 127, 128, 129, 148, 300, 1000]))
        rows = _rows(rng, n)
        if trial % 9 == 0:
            rows[:] = np.nan
        metrics = TENSOR_METRICS if trial % 2 else tuple(
            TENSOR_METRICS[i] for i in rng.permutation(len(TENSOR_METRICS))[:6])
        out, missing, has_missing = derive_all(rows, metrics)
        assert out.shape == (len(metrics), n + 1)
        assert np.array_equal(missing, np.isnan(out[:, 1:]))
        assert has_missing == missing.any(axis=1).tolist()
        for j, metric in enumerate(metrics):
            per, glob = derive(rows, metric)
            # bit for bit: the same float64, NaN where NaN
            assert np.array_equal(out[j, 1:].view(np.int64)[~np.isnan(per)],
                                  per.view(np.int64)[~np.isnan(per)]), (metric.name, n)
            assert np.array_equal(np.isnan(out[j, 1:]), np.isnan(per)), (metric.name, n)
            assert np.array_equal([out[j, 0]], [glob], equal_nan=True), (metric.name, n)


def test_history_add_with_cached_columns_records_what_it_is_given():
    rng = np.random.default_rng(0)
    names = [f"t{i}" for i in range(30)]
    history, expected = RunHistory(), {}
    full = ["global", *names]
    for step in range(1, 40):
        scopes = full if step % 3 else ["global", *rng.choice(names, 10, replace=False)]
        values = rng.random(len(scopes))
        history.add(step, "m", scopes, values)
        for s, v in zip(scopes, values):
            expected.setdefault(s, []).append((step, v))
    for s, pairs in expected.items():
        steps, values = history.series("m", s)
        assert list(steps) == [p for p, _ in pairs]
        assert list(values) == [v for _, v in pairs]


def test_scope_lists_are_the_same_objects_from_sample_to_sample_and_never_change():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8)) for _ in range(5)]
    opt = torch.optim.AdamW(params, lr=1e-2)
    seen = []

    class Keep(Sink):
        def on_sample(self, step, time, values):
            seen.append({m: (s, list(s)) for m, (s, _) in values.items()})

    mon = OptimizerMonitor(opt, strict=True, console=False, tensorboard=False, report=False,
                           sinks=[Keep()])
    for step in range(1, 7):
        for j, p in enumerate(params):
            p.grad = None if (step == 4 and j == 2) else torch.randn(8)
        opt.step()
    mon.close()
    first, later = seen[1], seen[-1]  # the first sample has no drift yet
    for metric in ("grad_norm", "update_ratio", "moment2_drift", "state_bytes", "lr"):
        assert later[metric][0] is first[metric][0], metric
    assert len(seen[3]["grad_norm"][0]) == 5  # the step without param2's gradient
    for sample in seen:  # what a consumer kept is what it was given
        for metric, (scopes, copy) in sample.items():
            assert scopes == copy, metric
