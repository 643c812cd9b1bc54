"""The host side of a step, made list-wise: step counters advanced in one C call, launch groups
without a key per tensor, address tables cached by their addresses, densify's no-copy case, and
the optimizer's gathering. Oracles: the tensors' own data_ptr, values and torch.optim."""

from __future__ import annotations

import pytest
import torch

from helpers import TOLERANCES, assert_close
from optiscope.kernels import cpu_many, launch
from optiscope.optimizers import AdamW
from optiscope.optimizers._base import advance_steps

FP32 = TOLERANCES[torch.float32]


def _counters(values):
    return [torch.tensor(float(v), dtype=torch.float32) for v in values]


def test_advance_steps_adds_one_to_each_counter_in_one_c_call(monkeypatch):
    if not cpu_many.available():
        pytest.skip("optiscope's C kernels are not built here")
    steps = _counters([0, 4, 4, 9])
    monkeypatch.setattr(torch, "_foreach_add_", None)  # the C call must not fall back
    assert advance_steps(steps) == [1, 5, 5, 10]
    assert [s.item() for s in steps] == [1.0, 5.0, 5.0, 10.0]
    assert all(s.dtype == torch.float32 and s.dim() == 0 for s in steps)


@pytest.mark.parametrize("odd", ["float64", "shaped", "subclass"])
def test_advance_steps_falls_back_to_torch_for_a_counter_the_c_call_may_not_write(odd):
    # the C call writes a float32 through each address: anything else goes through torch
    steps = _counters([2, 7])
    if odd == "float64":
        steps.append(torch.tensor(3.0, dtype=torch.float64))
    elif odd == "shaped":
        steps.append(torch.tensor([3.0]))
    else:
        steps.append(torch.tensor(3.0).as_subclass(_Marked))
    dtype = steps[2].dtype
    assert advance_steps(steps) == [3, 8, 4]
    assert steps[2].dtype == dtype and float(steps[2].reshape(())) == 4.0
    assert [s.item() for s in steps[:2]] == [3.0, 8.0]


class _Marked(torch.Tensor):
    pass


def test_launch_addresses_are_the_tensors_addresses_and_cached_by_them():
    a, b = torch.zeros(8), torch.zeros(32)
    g1, g2 = torch.zeros(8), torch.zeros(32)
    roles = [[a, b], [g1, g2], None, [a, None]]
    table, aligned = launch.launch_addresses(roles, 2, torch.device("cpu"))
    expected = [[a.data_ptr(), b.data_ptr()], [g1.data_ptr(), g2.data_ptr()], [0, 0],
                [a.data_ptr(), 0]]
    assert table.tolist() == expected and table.dtype == torch.int64
    assert aligned == all(p % 16 == 0 for row in expected for p in row)
    again, _ = launch.launch_addresses([[a, b], [g1, g2], None, [a, None]], 2,
                                       torch.device("cpu"))
    assert again is table  # same addresses: the table already made
    g3 = torch.zeros(8)  # a re-allocated gradient elsewhere: a new table
    other, _ = launch.launch_addresses([[a, b], [g3, g2], None, [a, None]], 2,
                                       torch.device("cpu"))
    assert other is not table and other[1, 0].item() == g3.data_ptr()


def test_launch_addresses_say_unaligned_for_a_view_at_an_odd_offset():
    base = torch.zeros(64)
    assert base.data_ptr() % 16 == 0
    _, aligned = launch.launch_addresses([[base[:32]], [base[32:]]], 1, torch.device("cpu"))
    assert aligned
    _, aligned = launch.launch_addresses([[base[1:33]], [base[32:]]], 1, torch.device("cpu"))
    assert not aligned  # 4 bytes past a 16-byte boundary


def test_launch_address_cache_stays_bounded():
    keep = [torch.zeros(4) for _ in range(3 * launch._TABLES_KEPT)]
    for t in keep:
        launch.launch_addresses([[t]], 1, torch.device("cpu"))
    assert len(launch._TABLES) <= launch._TABLES_KEPT


def test_densify_copies_nothing_when_every_tensor_is_contiguous():
    p, g = torch.zeros(3, 4), torch.zeros(3, 4)
    roles, pairs = launch.densify([[p], [g], None])
    assert pairs == [] and roles[0][0] is p and roles[1][0] is g and roles[2] is None
    t = torch.zeros(4, 3).t()  # a transposed parameter with a contiguous gradient: copied
    roles, pairs = launch.densify([[t], [torch.zeros(3, 4)]])
    assert roles[0][0].is_contiguous() and len(pairs) == 1 and pairs[0][0] is t


def test_densify_with_absent_entries_copies_only_the_column_that_needs_it():
    # Adafactor's roles: a factored tensor has no full second moment, a vector no row means
    p, v = torch.zeros(6), torch.zeros(6)
    w = torch.zeros(4, 3).t()  # transposed: row-major kernels need a copy
    rows, cols = torch.zeros(3), torch.zeros(4)
    roles, pairs = launch.densify([[p, w], [torch.zeros(6), torch.zeros(3, 4)], [v, rows],
                                   [None, cols]], row_major=True)
    assert [len(pairs), pairs[0][0] is w] == [1, True]
    assert roles[0][0] is p and roles[0][1].is_contiguous() and roles[3][0] is None
    roles, pairs = launch.densify([[p], [v], [None]], row_major=True)
    assert pairs == [] and roles[2] == [None]


def test_uniform_groups_is_one_group_only_when_every_column_is_uniform():
    assert launch.uniform_groups([[torch.float32] * 3, [5, 5, 5]], 3) == {
        (torch.float32, 5): [0, 1, 2]}
    assert launch.uniform_groups([[torch.float32] * 3, [5, 6, 5]], 3) is None
    assert launch.launch_groups([(torch.float32, 5), (torch.float32, 6), (torch.float32, 5)]) == {
        (torch.float32, 5): [0, 2], (torch.float32, 6): [1]}


def test_local_all_keeps_a_plain_list_and_unwraps_otherwise():
    plain = [torch.zeros(2), torch.nn.Parameter(torch.zeros(3))]
    assert launch.local_all(plain) is plain

    class Sharded(torch.Tensor):
        def to_local(self):
            return torch.ones(1)
    mixed = [torch.zeros(2), torch.zeros(2).as_subclass(Sharded), None]
    out = launch.local_all(mixed)
    assert out[0] is mixed[0] and torch.equal(out[1], torch.ones(1)) and out[2] is None
    with_none = [torch.zeros(2), None]
    assert launch.local_all(with_none) is with_none


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_split_launch_groups_match_torch_optim(backend, monkeypatch):
    """Tensors at different step counts in one group (one had no gradient on the first step)
    launch apart; each matches torch.optim.AdamW's trajectory."""
    launches = []
    if backend == "triton":
        from optiscope.kernels import adam as kernels

        real = kernels.adam_step
        monkeypatch.setattr(kernels, "adam_step",
                            lambda params, *a, step, **k: launches.append((len(params), step))
                            or real(params, *a, step=step, **k))
    torch.manual_seed(3)
    shapes = [(5, 7), (300,), (4097,)]
    ours_p = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref_p = [torch.nn.Parameter(p.detach().clone()) for p in ours_p]
    ours = AdamW(ours_p, lr=1e-2, weight_decay=0.1, backend=backend)
    ref = torch.optim.AdamW(ref_p, lr=1e-2, weight_decay=0.1, foreach=False)
    for step in range(4):
        for i, (a, b) in enumerate(zip(ours_p, ref_p)):
            g = torch.randn(shapes[i]) if step > 0 or i != 1 else None
            a.grad = g
            b.grad = None if g is None else g.clone()
        ours.step()
        ref.step()
        for i, (a, b) in enumerate(zip(ours_p, ref_p)):
            assert_close(a, b, **FP32, what=f"step {step} param {i}")
    counts = [ours.state[p]["step"].item() for p in ours_p]
    assert counts == [ref.state[p]["step"].item() for p in ref_p] == [4.0, 3.0, 4.0]
    if backend == "triton":  # one launch, then two groups (steps k and k - 1) on every step
        assert launches == [(2, 1), (2, 2), (1, 1), (2, 3), (1, 2), (2, 4), (1, 3)]
