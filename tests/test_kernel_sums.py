"""kernels/sums.py: Σx², max |x| and the non-finite count of many tensors in one launch, run
here on CPU tensors under the Triton interpreter. Oracle: float64 torch on the same entries."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import requires_triton

pytestmark = requires_triton


def _oracle(t: torch.Tensor) -> list[float]:
    x = t.detach().reshape(-1).double()
    finite = torch.isfinite(x)
    bad = int((~finite).sum())
    top = math.inf if bad else (float(x.abs().max()) if x.numel() else 0.0)
    return [float(x.square().sum()), top, float(bad)]


def _check(tensors):
    from optiscope.kernels.sums import tensor_sums

    columns = tensor_sums(tensors)
    assert all(c.dtype == torch.float64 and c.shape == (len(tensors),) for c in columns)
    got = torch.stack(list(columns), dim=1)
    for i, t in enumerate(tensors):
        want = _oracle(t)
        sq, top, bad = got[i].tolist()
        assert bad == want[2], f"tensor {i}: {bad} non-finite, expected {want[2]}"
        assert top == want[1], f"tensor {i}: max |x| {top}, expected {want[1]}"
        if math.isfinite(want[0]):
            # float64 sums of float64 squares, in another order: a few ulp of float64
            assert sq == pytest.approx(want[0], rel=1e-12, abs=0.0), f"tensor {i}"
        else:
            assert not math.isfinite(sq), f"tensor {i}: Σx² {sq}, expected {want[0]}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sizes_around_the_chunk_and_the_block(dtype):
    sizes = [0, 1, 7, 1023, 1024, 4095, 4096, 4097, 3 * 4096 + 5]
    _check([torch.randn(n).to(dtype) for n in sizes])


def test_mixed_dtypes_in_one_call_keep_their_order():
    ts = [torch.randn(5000), torch.randn(300).bfloat16(), torch.randn(4096).double(),
          torch.randn(17).half(), torch.randn(9000)]
    _check(ts)


def test_non_finite_entries_are_counted_and_make_the_maximum_infinite():
    a = torch.randn(10_000)
    a[[3, 4096, 9999]] = torch.tensor([math.nan, math.inf, -math.inf])
    b = torch.randn(5000)
    b[4100] = math.nan  # in the tail chunk
    _check([a, b, torch.randn(100)])


def test_squares_beyond_float32_range_stay_finite():
    x = torch.full((5000,), 1e20)  # x² = 1e40 overflows float32, not float64
    _check([x])


def test_views_misaligned_strided_and_transposed():
    base = torch.randn(64, 129)
    odd = torch.randn(10_001)[1:]  # data_ptr at 4 bytes past an allocation: not 16-aligned
    assert odd.data_ptr() % 16 != 0
    _check([base.t(), base[:, ::2], odd, base[3]])


@pytest.mark.gpu
def test_compiled_on_cuda_tensors():
    """The compiled kernel (benchmarks/gpu_check.sh runs the `gpu` tests): the sizes, dtypes,
    non-finite entries and views above, on CUDA tensors."""
    x = torch.randn(10_000)
    x[[3, 4096]] = torch.tensor([math.nan, math.inf])
    base = torch.randn(64, 129)
    tensors = [torch.randn(n) for n in (0, 1, 4097, 3 * 4096 + 5)] + [
        torch.randn(5000).bfloat16(), torch.randn(300).half(), x, torch.full((5000,), 1e20),
        base.t(), base[:, ::2]]
    _check([t.cuda() for t in tensors])
