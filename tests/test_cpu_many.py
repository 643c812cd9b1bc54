"""The C sums over many small float32 tensors (`optiscope.kernels.cpu_many`) against float64
oracles computed here, and the checks that keep anything but a plain tensor from them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from optiscope.kernels import cpu_many

pytestmark = pytest.mark.skipif(not cpu_many.available(), reason="no C compiler here")


def _tensors(rng):
    sizes = [1, 5, 31, 4095, 4096, 4097, 10_000, 0, 65_536]
    ts = [torch.from_numpy(rng.standard_normal(n).astype(np.float32)) for n in sizes]
    ts[3][7] = math.inf
    ts[6][3] = math.nan
    ts[5][:] = 2.0  # all equal
    return ts


def test_gradient_sums_match_float64():
    ts = _tensors(np.random.default_rng(0))
    numels = [t.numel() for t in ts]
    out = cpu_many.grad_sums(cpu_many.f32_addresses(ts, numels), np.array(numels))
    for t, (sq, absmax, bad) in zip(ts, out):
        x = t.double().numpy()
        finite = np.isfinite(x)
        want = (x * x).sum()
        assert bad == (~finite).sum()
        assert (math.isnan(sq) and math.isnan(want)) or sq == pytest.approx(want, rel=1e-6)
        assert absmax == (np.abs(x[finite]).max() if finite.any() else 0.0)


def test_square_sums_and_samples_match():
    rng = np.random.default_rng(1)
    ts = [torch.from_numpy(rng.standard_normal(n).astype(np.float32)) for n in (3, 4096, 9000)]
    numels = [t.numel() for t in ts]
    addresses = cpu_many.f32_addresses(ts, numels)
    sq = cpu_many.sq_sums(addresses, np.array(numels))
    for t, s in zip(ts, sq):
        assert s == pytest.approx(float(t.double().square().sum()), rel=1e-6)
    index = [np.sort(rng.choice(n, size=min(n, 50), replace=False)).astype(np.int32)
             for n in numels]
    got = cpu_many.take(addresses, np.concatenate(index),
                        np.array([len(i) for i in index], dtype=np.int64))
    assert np.array_equal(got, np.concatenate([t.numpy()[i] for t, i in zip(ts, index)]))


@pytest.mark.parametrize("values", ["normal", "ties", "inf", "nan"])
def test_topk_rows_match_a_sort(values):
    rng = np.random.default_rng(2)
    for trial in range(400):
        n = int(rng.integers(1, 700))
        # k up to n/8 takes the heap, above it quickselect
        k = int(rng.integers(1, n + 1)) if trial % 2 else int(rng.integers(1, n // 8 + 2))
        x = (rng.choice([0.0, 1.0, -1.0, 2.0, 3.5], size=n) if values == "ties"
             else rng.standard_normal(n)).astype(np.float32)
        if values == "inf":
            x[rng.integers(n)] = -np.inf
        if values == "nan":
            x[rng.integers(n)] = np.nan
        t = torch.from_numpy(x)
        zero = np.zeros(1, dtype=np.int64)
        kept, total = cpu_many.topk(cpu_many.f32_addresses([t], [n]), zero, zero,
                                    np.array([n]), np.array([k]), np.empty(n))
        squares = np.sort(x.astype(np.float64) ** 2)[::-1]
        if values == "nan":
            assert math.isnan(kept[0]) and math.isnan(total[0])
            continue
        assert kept[0] == pytest.approx(squares[:k].sum(), rel=1e-12)
        assert total[0] == pytest.approx(squares.sum(), rel=1e-12)


def test_rows_of_several_tensors_at_offsets():
    rng = np.random.default_rng(3)
    ts = [torch.from_numpy(rng.standard_normal(n).astype(np.float32)) for n in (300, 1000)]
    rows = [(0, 0, 100, 5), (0, 100, 200, 3), (1, 37, 900, 40)]
    of, starts, lengths, ks = (np.array(c, dtype=np.int64) for c in zip(*rows))
    kept, total = cpu_many.topk(cpu_many.f32_addresses(ts, [300, 1000]), of, starts, lengths,
                                ks, np.empty(900))
    for (j, start, length, k), a, b in zip(rows, kept, total):
        sq = np.sort(ts[j].double().numpy()[start:start + length] ** 2)[::-1]
        assert a == pytest.approx(sq[:k].sum(), rel=1e-12)
        assert b == pytest.approx(sq.sum(), rel=1e-12)


class _Subclass(torch.Tensor):
    pass


@pytest.mark.parametrize("case", ["subclass", "float64", "bf16", "strided", "length", "list"])
def test_only_plain_contiguous_float32_tensors_of_their_length_get_an_address(case):
    good = torch.zeros(8)
    bad = {"subclass": torch.zeros(8).as_subclass(_Subclass),
           "float64": torch.zeros(8, dtype=torch.float64),
           "bf16": torch.zeros(8, dtype=torch.bfloat16),
           "strided": torch.zeros(16)[::2],
           "length": torch.zeros(7),
           "list": [0.0] * 8}[case]
    assert cpu_many.f32_addresses([good, good], [8, 8]) is not None
    if case == "list":
        assert cpu_many.AddressCache([8, 8])([good, bad]) is None
    else:
        assert cpu_many.f32_addresses([good, bad], [8, 8]) is None


def test_the_address_cache_checks_again_when_an_address_changes():
    p = torch.nn.Parameter(torch.zeros(8))
    cache = cpu_many.AddressCache([8])
    assert cache([p]) is not None
    p.data = torch.zeros(8, dtype=torch.float64)  # a new storage: checked, refused
    assert cache([p]) is None
    p.data = torch.ones(8)
    assert cache([p])[0] == p.data_ptr()


def test_topk_falls_back_when_the_threshold_passes_fewer_than_k():
    """Every 8th entry large: the threshold from those entries lets only them through (20 < k),
    so the heap over every entry runs; the result is still the sort's."""
    n, k = 4096, 41
    x = np.full(n, 0.01, dtype=np.float32)
    x[0:160:8] = 5.0
    x[1] = 3.0
    zero = np.zeros(1, dtype=np.int64)
    kept, total = cpu_many.topk(cpu_many.f32_addresses([torch.from_numpy(x)], [n]), zero, zero,
                                np.array([n]), np.array([k]), np.empty(n))
    squares = np.sort(x.astype(np.float64) ** 2)[::-1]
    assert kept[0] == pytest.approx(squares[:k].sum(), rel=1e-12)
    assert total[0] == pytest.approx(squares.sum(), rel=1e-12)


@pytest.mark.parametrize("amsgrad, maximize, decoupled", [(False, False, True), (True, True, False)])
def test_adam_over_many_tensors_is_the_one_tensor_kernel_bit_for_bit(amsgrad, maximize, decoupled):
    """The many-tensor entry against `cpu.adam_f32` called per tensor (the slow reference):
    tensors of 0 to 10,000 entries (several blocks), each at its own step count, with the
    statistics and the range counts."""
    from optiscope.kernels import cpu

    rng = np.random.default_rng(3)
    sizes = [1, 0, 31, 4096, 4097, 10_000, 7]
    steps = [1, 2, 5, 1, 9, 3, 2]
    kwargs = dict(lr=3e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.05,
                  decoupled=decoupled, maximize=maximize)

    def state():
        return [[torch.empty(n).copy_(torch.from_numpy((rng.standard_normal(n) * s)
                                                       .astype(np.float32)))
                 for n in sizes] for s in (1.0, 0.1, 0.01, 1e-4, 1e-4)]

    one = state()
    for v, w in zip(one[3], one[4]):
        v.abs_()
        torch.maximum(w.abs(), v, out=w)
    many = [[t.clone() for t in role] for role in one]
    vmax = (lambda r: r[4] if amsgrad else None)
    blocks_one = cpu.BlockSums(sizes, cpu.ADAM_STATS)
    blocks_many = cpu.BlockSums(sizes, cpu.ADAM_STATS)
    ranges_one, ranges_many = cpu.range_buffer(len(sizes)), cpu.range_buffer(len(sizes))
    for i in range(len(sizes)):
        cpu.adam_f32(*(r[i] for r in one[:4]), vmax(one)[i] if amsgrad else None,
                     step=steps[i], stats=blocks_one, index=i, ranges=ranges_one[i], **kwargs)
    counters = [torch.tensor(float(s - 1)) for s in steps]  # incremented by the call
    assert cpu_many.adam_f32_many(*many[:4], vmax(many), counters, stats=blocks_many,
                                  ranges=ranges_many, **kwargs)
    assert [c.item() for c in counters] == steps
    for role_one, role_many in zip(one, many):
        for a, b in zip(role_one, role_many):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    assert np.array_equal(blocks_one.array, blocks_many.array, equal_nan=True)
    assert np.array_equal(ranges_one, ranges_many)
    assert ranges_many[5, 0, :cpu.RANGE_FIELDS].sum() == 10_000  # each entry of g in one field


def test_adam_over_many_tensors_refuses_what_it_cannot_read():
    """Anything but plain contiguous float32 tensors of the parameter's length: False, nothing
    written (the caller steps them one by one)."""
    p = [torch.ones(8), torch.ones(6)]
    good = [torch.ones(8), torch.ones(6)]
    kwargs = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True,
                  maximize=False)
    strided = torch.ones(12)[::2]
    counters = [torch.tensor(0.0), torch.tensor(0.0)]
    for grads in ([torch.ones(8), strided], [torch.ones(8), torch.ones(6, dtype=torch.float64)],
                  [torch.ones(8), torch.ones(5)], [torch.ones(8)]):
        assert not cpu_many.adam_f32_many(p, grads, good, good, None, counters, **kwargs)
    # step counters that are not float32 CPU scalars
    for steps in ([torch.tensor(0.0), torch.tensor(0, dtype=torch.int64)], [torch.tensor(0.0)],
                  [torch.tensor(0.0), torch.zeros(2)]):
        assert not cpu_many.adam_f32_many(p, good, good, good, None, steps, **kwargs)
    assert all(torch.equal(x, torch.ones_like(x)) for x in p)
    assert [c.item() for c in counters] == [0.0, 0.0]


def test_a_kept_arrays_address_is_its_own_and_forgotten_with_it():
    a = cpu_many.kept(np.arange(5, dtype=np.int64))
    key = id(a)
    assert cpu_many._ptr(a) == a.ctypes.data
    b = np.arange(5, dtype=np.int64)  # not kept: computed each time
    assert cpu_many._ptr(b) == b.ctypes.data
    del a
    assert key not in cpu_many._KEPT


def test_the_rows_functions_write_float64_oracles_where_the_monitor_reads():
    """`rows_grad`, `rows_topk`, `rows_grad_topk`, `rows_sq`, `rows_sample_sums` into rows
    of a matrix (other rows and columns untouched), against numpy float64."""
    rng = np.random.default_rng(5)
    ts = [torch.from_numpy(rng.standard_normal(n).astype(np.float32)) for n in (3, 300, 5000)]
    ts[1][4] = math.inf
    numels = np.array([t.numel() for t in ts], dtype=np.int64)
    addresses = cpu_many.f32_addresses(ts, numels.tolist())
    where = np.array([4, 0, 2], dtype=np.int64)
    # top-k rows: the whole of tensors 0 and 1; tensor 2 as a full block of 4096 and its tail
    of = np.array([0, 1, 2, 2], dtype=np.int64)
    starts = np.array([0, 0, 0, 4096], dtype=np.int64)
    lengths = np.array([3, 300, 4096, 904], dtype=np.int64)
    ks = np.array([1, 3, 41, 10], dtype=np.int64)
    scales = np.array([1.0, 2.0, 0.5])
    scratch = np.empty(4096)

    def squares(x):
        return np.sort(x.astype(np.float64) ** 2)[::-1]

    for fused in (False, True):
        m = np.full((6, 8), -7.0)
        out = cpu_many.Rows(m, where)
        if fused:
            cpu_many.rows_grad_topk(addresses, numels, 0.5, of, starts, lengths, ks, scratch,
                                    scales, out, np.array([0, 1, 2, 3, 4], dtype=np.int64))
        else:
            cpu_many.rows_grad(addresses, numels, 0.5, out, 0, 1, 2)
            cpu_many.rows_topk(addresses, of, starts, lengths, ks, scratch, scales, out, 3, 4)
        for k, t in enumerate(ts):
            x = t.double().numpy()
            row = m[where[k]]
            finite = np.isfinite(x)
            assert row[2] == (~finite).sum()
            assert row[1] == (math.inf if (~finite).any() else np.abs(x).max() * 0.5)
            if finite.all():
                assert row[0] == pytest.approx((x * x).sum() * 0.25, rel=1e-6)
                kept = sum(squares(x[s:s + n])[:kk].sum()
                           for r, (s, n, kk) in enumerate(zip(starts, lengths, ks)) if of[r] == k)
                assert row[3] == pytest.approx(kept * scales[k], rel=1e-12)
                assert row[4] == pytest.approx((x * x).sum() * scales[k], rel=1e-12)
            assert (row[5:] == -7.0).all()
        assert (m[[1, 3, 5]] == -7.0).all()
    m = np.full((6, 8), -7.0)
    out = cpu_many.Rows(m, where)
    cpu_many.rows_sq(addresses, numels, out, 6)
    counts = np.array([2, 3, 1], dtype=np.int64)
    a = rng.standard_normal(6).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    cpu_many.rows_sample_sums(a, b, counts, scales, out, 0, 1)
    bounds = np.cumsum([0, *counts])
    for k, t in enumerate(ts):
        x = t.double().numpy()
        if np.isfinite(x).all():
            assert m[where[k], 6] == pytest.approx((x * x).sum(), rel=1e-6)
        sa = a[bounds[k]:bounds[k + 1]].astype(np.float64)
        sb = b[bounds[k]:bounds[k + 1]].astype(np.float64)
        assert m[where[k], 0] == pytest.approx(((sa - sb) ** 2).sum() * scales[k], rel=1e-14)
        assert m[where[k], 1] == pytest.approx((sb ** 2).sum() * scales[k], rel=1e-14)
    with pytest.raises(ValueError, match="outside"):
        cpu_many.rows_sq(addresses, numels, out, 8)
    with pytest.raises(ValueError, match="rows must be int64"):
        cpu_many.Rows(m, np.array([6], dtype=np.int64))


@pytest.mark.parametrize("refs", ["none", "one", "two", "self"])
def test_sum_take_and_compare_in_one_walk(refs):
    """`rows_sq_take` against numpy float64 (Σx², the sampled entries, the drift sums of the
    sample against earlier ones; a reference that is the sample itself gives 0 and its own Σx²)
    and bit for bit against `rows_sq`, `take` and `rows_sample_sums` called one by one."""
    rng = np.random.default_rng(11)
    ts = [torch.from_numpy(rng.standard_normal(n).astype(np.float32)) for n in (3, 300, 5000)]
    numels = np.array([t.numel() for t in ts], dtype=np.int64)
    addresses = cpu_many.f32_addresses(ts, numels.tolist())
    where = np.array([4, 0, 2], dtype=np.int64)
    parts = [np.array([2, 0], dtype=np.int32), np.array([299, 5, 17], dtype=np.int32),
             np.arange(0, 5000, 500, dtype=np.int32)]
    index = np.concatenate(parts)
    counts = np.array([len(p) for p in parts], dtype=np.int64)
    scales = np.array([1.5, 100.0, 500.0])
    total = len(index)
    ref1 = rng.standard_normal(total).astype(np.float32) if refs != "none" else None
    ref2 = rng.standard_normal(total).astype(np.float32) if refs == "two" else None
    sample = np.empty(total, dtype=np.float32)
    if refs == "self":
        ref2 = sample
    m = np.full((6, 8), -7.0)
    got = cpu_many.rows_sq_take(addresses, numels, cpu_many.Rows(m, where), 7, index, counts,
                                scales, ref1, (0, 1), ref2, (2, 3), sample)
    assert got is sample
    bounds = np.cumsum([0, *counts])
    for k, t in enumerate(ts):
        x = t.double().numpy()
        row = m[where[k]]
        assert row[7] == pytest.approx((x * x).sum(), rel=1e-6)
        taken = sample[bounds[k]:bounds[k + 1]]
        assert (taken == t.numpy()[parts[k]]).all()
        s = taken.astype(np.float64)
        for ref, (cd, cr) in ((ref1, (0, 1)), (ref2, (2, 3))):
            if ref is None:
                assert row[cd] == -7.0 and row[cr] == -7.0
                continue
            r = ref[bounds[k]:bounds[k + 1]].astype(np.float64)
            assert row[cd] == pytest.approx(((s - r) ** 2).sum() * scales[k], rel=1e-14)
            assert row[cr] == pytest.approx((r ** 2).sum() * scales[k], rel=1e-14)
        if refs == "self":
            assert row[2] == 0.0 and row[3] == pytest.approx((s * s).sum() * scales[k], rel=1e-14)
        assert (row[4:7] == -7.0).all()
    assert (m[[1, 3, 5]] == -7.0).all()

    # the separate calls, to the bit
    one = np.full((6, 8), -7.0)
    out = cpu_many.Rows(one, where)
    cpu_many.rows_sq(addresses, numels, out, 7)
    taken = cpu_many.take(addresses, index, counts)
    if ref1 is not None:
        cpu_many.rows_sample_sums(taken, ref1, counts, scales, out, 0, 1)
    if ref2 is not None:
        cpu_many.rows_sample_sums(taken, taken if refs == "self" else ref2, counts, scales, out,
                                  2, 3)
    assert (taken == sample).all()
    np.testing.assert_array_equal(one, m)


def test_sum_and_take_refuse_samples_of_the_wrong_size():
    ts = [torch.ones(4)]
    addresses = cpu_many.f32_addresses(ts, [4])
    out = cpu_many.Rows(np.zeros((1, 4)), np.zeros(1, dtype=np.int64))
    index, counts = np.arange(2, dtype=np.int32), np.array([2], dtype=np.int64)
    with pytest.raises(TypeError, match="2 contiguous float32"):
        cpu_many.rows_sq_take(addresses, np.array([4]), out, 0, index, counts, np.ones(1),
                              np.zeros(3, dtype=np.float32), (1, 2))
    with pytest.raises(ValueError, match="counts"):
        cpu_many.rows_sq_take(addresses, np.array([4]), out, 0, index,
                              np.array([1], dtype=np.int64), np.ones(1))


def test_a_sample_set_refuses_what_the_c_walk_could_read_out_of_bounds():
    """An index past its tensor, counts that do not add up, or another number of addresses
    or rows than tensors: refused before any pointer is read."""
    numels = np.array([4, 2], dtype=np.int64)
    counts = np.array([2, 1], dtype=np.int64)
    scales = np.ones(2)
    with pytest.raises(ValueError, match="outside its tensor"):
        cpu_many.SampleSet(numels, np.array([0, 3, 2], dtype=np.int32), counts, scales)
    with pytest.raises(ValueError, match="counts"):
        cpu_many.SampleSet(numels, np.array([0, 3], dtype=np.int32), counts, scales)
    with pytest.raises(TypeError, match="int32 indices"):
        cpu_many.SampleSet(numels, np.array([0, 3, 1], dtype=np.int64), counts, scales)
    one = cpu_many.SampleSet(numels, np.array([0, 3, 1], dtype=np.int32), counts, scales)
    ts = [torch.arange(4.0), torch.arange(2.0)]
    addresses = cpu_many.f32_addresses(ts, [4, 2])
    rows = np.zeros((2, 3))
    with pytest.raises(ValueError, match="2 tensors, got 1 addresses"):
        one.sq_take(addresses[:1], cpu_many.Rows(rows, np.arange(2, dtype=np.int64)), 0)
    with pytest.raises(ValueError, match="and 1 rows"):
        one.sq_take(addresses, cpu_many.Rows(rows, np.arange(1, dtype=np.int64)), 0)
    sample = one.sq_take(addresses, cpu_many.Rows(rows, np.arange(2, dtype=np.int64)), 0)
    assert sample.tolist() == [0.0, 3.0, 1.0] and rows[:, 0].tolist() == [14.0, 1.0]


def test_the_rows_functions_refuse_other_counts_of_addresses_and_rows():
    ts = [torch.ones(3), torch.ones(5)]
    numels = np.array([3, 5], dtype=np.int64)
    addresses = cpu_many.f32_addresses(ts, [3, 5])
    m = np.zeros((2, 4))
    one_row = cpu_many.Rows(m, np.zeros(1, dtype=np.int64))
    with pytest.raises(ValueError, match="2 tensors, but 2 addresses, 1 rows"):
        cpu_many.rows_sq(addresses, numels, one_row, 0)
    with pytest.raises(ValueError, match="2 tensors, but 1 addresses"):
        cpu_many.rows_grad(addresses[:1], numels, None,
                           cpu_many.Rows(m, np.arange(2, dtype=np.int64)), 0, 1, 2)
    with pytest.raises(ValueError, match="rows_sample_sums: 2 tensors, but 2 scales and 1 rows"):
        cpu_many.rows_sample_sums(np.ones(8, dtype=np.float32), None,
                                  np.array([3, 5], dtype=np.int64), np.ones(2), one_row, 0)
    assert (m == 0).all()
