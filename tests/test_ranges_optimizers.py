"""``request_ranges`` on the bundled optimizers other than Adam: the counts of g, θ⁺ − θ⁻ and v
a step takes of every entry (in its kernel's pass, or by an extra pass where the step is torch
ops) against whole-tensor oracles, and the step unchanged by counting, bit for bit.

Oracles: `range_counts` of whole tensors the test holds itself (the gradient it sets, θ before
and after the step, v recomputed by the test from the optimizer's state with plain torch ops),
and, for the monitor, `torch.histc` of log2|x| in test_ranges.py's `oracle_histogram`.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from optiscope import OptimizerMonitor
from optiscope.kernels import cpu
from optiscope.kernels.ranges import RANGE_QUANTITIES, range_counts
from optiscope.optimizers import MicroAdam
from optiscope.optimizers.microadam import bias_factors, window_weights

from test_ranges import oracle_histogram, oracle_share, wide_gradient


def hard_gradient(n: int, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """Normal entries with zeros, subnormals and, past 10 entries, ±inf and NaN."""
    g = torch.randn(n, generator=gen) * 1e-3
    g[: n // 7] *= 1e-30  # subnormal and tiny
    g[torch.randperm(n, generator=gen)[: n // 20]] = 0.0
    if n > 10:
        g[3:9] = torch.tensor([0.0, math.inf, 7e4, -1e-40, math.nan, -math.inf])
    return g.to(dtype)


def whole(x: torch.Tensor) -> torch.Tensor:
    """The oracle: `range_counts` of every entry of ``x``, as float32."""
    x = x.detach().reshape(-1).float()
    return range_counts(x, torch.tensor([x.numel()]), torch.ones(1))[0]


def microadam_v(opt: MicroAdam, p: torch.Tensor) -> torch.Tensor:
    """v̂ = c2 · Σ_r β2^age(r) · V_r² scattered to the window's coordinates, row by row in row
    order (the step's order of additions), from the state alone."""
    group = opt.param_groups[0]
    state = opt.state[p]
    t = int(state["step"].item())
    indices, values = state["I"].long(), state["V"].float()
    m, k_row = indices.shape
    block, k_full = group["topk_block_size"], math.ceil(group["k_init"] * group["topk_block_size"])
    d = p.numel()
    # a row's columns: k_full per full block, then the tail's
    starts = torch.tensor([min(c // k_full, d // block) * block for c in range(k_row)],
                          dtype=torch.long)
    w2 = window_weights(t, m, *group["betas"])[1]
    s2 = torch.zeros(d)
    for r in range(m):
        s2.index_add_(0, starts + indices[r], (values[r] * values[r]) * w2[r])
    return bias_factors(t, *group["betas"])[1] * s2


def run_steps(opt, params, grads, *, stats: bool, ranges: bool):
    """Two steps with the given gradients; the last step's stats."""
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone().to(p.dtype)
        if stats:
            opt.request_stats()
        if ranges:
            opt.request_ranges()
        opt.step()
    return opt.last_stats


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_floating_point():
        a, b = a.float().nan_to_num(7.0), b.float().nan_to_num(7.0)
    return torch.equal(a, b)


MICROADAM_PATHS = ["c-kernel", "torch-ops", "torch-ops-bf16", "triton"]


@pytest.mark.parametrize("path", MICROADAM_PATHS)
def test_microadam_counts_every_entry(path, monkeypatch):
    """Tensors of 1, 100, 4096, 5000 and 100,000 entries (a partial block, one block, a tail,
    blocks on both threads): the counts equal the oracle's for g, θ⁺ − θ⁻ and v̂, and θ and
    the state are those of a step without counts, and of one without statistics, bit for bit."""
    dtype = torch.bfloat16 if path == "torch-ops-bf16" else torch.float32
    backend = "triton" if path == "triton" else "torch"
    if path == "c-kernel" and cpu.kernel() is None:
        pytest.skip("the C kernel is not available here (no compiler)")
    if path.startswith("torch-ops"):
        monkeypatch.setattr(cpu, "kernel", lambda: None)
    sizes = [1, 100, 4096, 5000] + ([100_000] if path != "triton" else [9000])
    gen = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen).to(dtype)) for n in sizes]
    grads = [[hard_gradient(n, gen) for n in sizes] for _ in range(2)]
    if dtype == torch.bfloat16:  # bf16 keeps no float32 subnormal: the oracle reads p.grad
        grads = [[g.to(dtype) for g in gs] for gs in grads]
    runs = []
    for stats, ranges in ((True, True), (True, False), (False, False)):
        ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt = MicroAdam(ps, lr=1e-3, weight_decay=0.01, m=3, k_init=0.05,
                        topk_block_size=1024, quant_block_size=256, backend=backend)
        before = None
        if stats and ranges:  # the second step's θ before, for the oracle
            run_steps(opt, ps, grads[:1], stats=False, ranges=False)
            before = [p.detach().clone() for p in ps]
            got = run_steps(opt, ps, grads[1:], stats=True, ranges=True)
        else:
            run_steps(opt, ps, grads, stats=stats, ranges=False)
        runs.append((opt, ps, before))
    (opt, ps, before), *others = runs
    assert got.ranges is not None and got.ranges.shape == (len(sizes), 3, got.ranges.shape[2])
    for i, p in enumerate(ps):
        g = p.grad
        for q, x in enumerate((g, p.detach().float() - before[i].float(), microadam_v(opt, p))):
            assert torch.equal(got.ranges[i, q], whole(x)), (sizes[i], RANGE_QUANTITIES[q])
    for other, other_ps, _ in others:
        for p, o in zip(ps, other_ps):
            assert same_bits(p.detach(), o.detach())
            for key, value in opt.state[p].items():
                assert same_bits(value, other.state[o][key]), key
