"""kernels/gather.py: the sampled entries of many tensors in one launch, run here on CPU tensors
under the Triton interpreter. Oracle: torch's own indexing of the same tensors."""

from __future__ import annotations

import pytest
import torch

from conftest import requires_triton

pytestmark = requires_triton


def _check(tensors, indices):
    from optiscope.kernels.gather import gather

    got = gather(tensors, indices)
    want = torch.cat([t.reshape(-1)[i.long()].float() for t, i in zip(tensors, indices)])
    assert got.dtype == torch.float32 and torch.equal(got, want)


def _index(numel, count, dtype=torch.int32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(numel, generator=g)[:count].sort().values.to(dtype)


def test_many_tensors_dtypes_and_index_types_keep_their_order():
    ts = [torch.randn(5000), torch.randn(300, 7).bfloat16(), torch.randn(70_000),
          torch.randn(17).half(), torch.randn(9000).double(), torch.randn(2500)]
    idx = [_index(5000, 1500), _index(2100, 2100, torch.int64), _index(70_000, 1025),
           _index(17, 1), _index(9000, 3000, torch.int64), _index(2500, 0)]
    _check(ts, idx)


def test_views_are_read_in_row_major_order():
    base = torch.randn(64, 129)
    odd = torch.randn(10_001)[1:]
    _check([base.t(), base[:, ::2], odd, base[3]],
           [_index(64 * 129, 700), _index(64 * 65, 300), _index(10_000, 1024), _index(129, 5)])


def test_non_finite_values_are_copied_as_they_are():
    x = torch.randn(4000)
    x[[1, 2, 3]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    from optiscope.kernels.gather import gather

    got = gather([x], [torch.arange(6, dtype=torch.int32)])
    assert torch.equal(got[1:4].isnan(), torch.tensor([True, False, False]))
    assert got[2] == float("inf") and got[3] == -float("inf")


def test_rows_of_a_block_length():
    from optiscope.kernels.gather import gather

    ts = [torch.randn(64 * 8 + 5), torch.randn(32 * 8).bfloat16()]  # a partial last row unread
    blocks = [torch.tensor([0, 3, 63], dtype=torch.int64), torch.tensor([31, 2], dtype=torch.int32)]
    got = gather(ts, blocks, row=8)
    want = torch.cat([t.reshape(-1)[: (t.numel() // 8) * 8].view(-1, 8)[b.long()].reshape(-1)
                      .float() for t, b in zip(ts, blocks)])
    assert torch.equal(got, want)


@pytest.mark.gpu
def test_compiled_on_cuda_tensors():
    ts = [torch.randn(5000), torch.randn(300, 7).bfloat16(), torch.randn(70_000).t()]
    idx = [_index(5000, 1500), _index(2100, 2100, torch.int64), _index(70_000, 1025)]
    _check([t.cuda() for t in ts], [i.cuda() for i in idx])
