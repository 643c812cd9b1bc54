"""``request_ranges`` on the bundled optimizers other than Adam: the counts of g, θ⁺ − θ⁻ and v
a step takes of every entry (in its kernel's pass, or by an extra pass where the step is torch
ops) against whole-tensor oracles, and the step unchanged by counting, bit for bit.

Oracles: `range_counts` of whole tensors the test holds itself (the gradient it sets, θ before
and after the step, v recomputed by the test from the optimizer's state with plain torch ops),
and, for the monitor, `torch.histc` of log2|x| in test_ranges.py's `oracle_histogram`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from optiscope import OptimizerMonitor
from optiscope.kernels import cpu
from optiscope.kernels.ranges import RANGE_QUANTITIES, range_counts
from optiscope.optimizers import AdaDiag, AdafacDiag, Adafactor, MicroAdam, OneBitAdam
from optiscope.optimizers.microadam import bias_factors, window_weights

from test_ranges import oracle_histogram, oracle_share, wide_gradient


def hard_gradient(n: int, gen: torch.Generator, dtype=torch.float32,
                  special: bool = True) -> torch.Tensor:
    """Normal entries with zeros, subnormals and, past 10 entries and if ``special``, ±inf and
    NaN."""
    g = torch.randn(n, generator=gen) * 1e-3
    g[: n // 7] *= 1e-30  # subnormal and tiny
    g[torch.randperm(n, generator=gen)[: n // 20]] = 0.0
    if n > 10 and special:
        g[3:9] = torch.tensor([0.0, math.inf, 7e4, -1e-40, math.nan, -math.inf])
    return g.to(dtype)


def whole(x: torch.Tensor) -> torch.Tensor:
    """The oracle: `range_counts` of every entry of ``x``, as float32."""
    x = x.detach().reshape(-1).float()
    return range_counts(x, torch.tensor([x.numel()]), torch.ones(1))[0]


@pytest.mark.parametrize("path", ["c", "torch"])
def test_whole_counts_match_histc_and_range_counts(path, monkeypatch):
    """`whole_counts` (the extra pass of steps made of torch ops), in C and in torch ops: tensors
    of 0 to 2^20 + 5 entries (two torch chunks, C pieces on both threads), with zeros,
    subnormals, ±inf and NaN, float32 and bf16, against `range_counts` and, for the histogram,
    torch.histc of log2|x|."""
    from optiscope.kernels.whole_ranges import whole_counts
    if path == "c" and cpu.kernel() is None:
        pytest.skip("the C kernel is not available here (no compiler)")
    if path == "torch":
        monkeypatch.setattr(cpu, "kernel", lambda: None)
    gen = torch.Generator().manual_seed(5)
    xs = [torch.zeros(0), hard_gradient(1, gen), hard_gradient(100, gen),
          hard_gradient(100_000, gen).view(250, 400).t(),  # not contiguous
          hard_gradient((1 << 20) + 5, gen), hard_gradient(5000, gen, torch.bfloat16)]
    got = whole_counts(xs)
    for i, x in enumerate(xs):
        assert torch.equal(got[i], whole(x)), x.numel()
        np.testing.assert_array_equal(got[i, -len(oracle_histogram(x)):].numpy(),
                                      oracle_histogram(x))


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


def same_bits(a, b) -> bool:
    if not isinstance(a, torch.Tensor):  # a number the optimizer keeps in its state
        return a == b
    if a.is_floating_point():
        a, b = a.float().nan_to_num(7.0), b.float().nan_to_num(7.0)
    return torch.equal(a, b)


def check_counts(make, shapes, v_of, *, dtype=torch.float32, grad_dtype=torch.float32,
                 seed=3, special: bool = True) -> None:
    """Three runs of two steps from the same θ and gradients: with statistics and range counts
    on the second step, with statistics only, with neither. The counts equal the oracle's for
    g, θ⁺ − θ⁻ and v (``v_of(opt, p)``: v after the step, from the state), and θ and the state
    are the same bits in all three runs."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(shape, generator=gen).to(dtype) for shape in shapes]
    # ±inf and NaN in every other tensor: where they are, Adafactor's whole tensor turns NaN
    grads = [[hard_gradient(math.prod(shape), gen, grad_dtype, special and i % 2 == 0).view(shape)
              for i, shape in enumerate(shapes)] for _ in range(2)]
    runs = []
    for stats, ranges in ((True, True), (True, False), (False, False)):
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        opt = make(ps)
        run_steps(opt, ps, grads[:1], stats=False, ranges=False)
        before = [p.detach().clone() for p in ps]
        got = run_steps(opt, ps, grads[1:], stats=stats, ranges=ranges)
        runs.append((opt, ps, before, got))
    (opt, ps, before, got), *others = runs
    assert got.ranges is not None and got.ranges.shape[:2] == (len(shapes), 3)
    for i, p in enumerate(ps):
        for q, x in enumerate((p.grad, p.detach().float() - before[i].float(), v_of(opt, p))):
            assert torch.equal(got.ranges[i, q], whole(x)), (shapes[i], RANGE_QUANTITIES[q])
    for other, other_ps, _, _ in others:
        for p, o in zip(ps, other_ps):
            assert same_bits(p.detach(), o.detach())
            for key, value in opt.state[p].items():
                assert same_bits(value, other.state[o][key]), key


@pytest.mark.parametrize("path", ["c-kernel", "torch-ops", "torch-ops-bf16", "triton"])
def test_microadam_counts_every_entry(path, monkeypatch):
    """Tensors of 1, 100, 4096, 5000 and 100,000 entries (a partial block, whole blocks, a
    tail, blocks on both threads); the Triton kernel under the interpreter."""
    if path == "c-kernel" and cpu.kernel() is None:
        pytest.skip("the C kernel is not available here (no compiler)")
    if path.startswith("torch-ops"):
        monkeypatch.setattr(cpu, "kernel", lambda: None)
    dtype = torch.bfloat16 if path == "torch-ops-bf16" else torch.float32
    sizes = [1, 100, 4096, 5000] + ([100_000] if path != "triton" else [9000])
    check_counts(lambda ps: MicroAdam(ps, lr=1e-3, weight_decay=0.01, m=3, k_init=0.05,
                                      topk_block_size=1024, quant_block_size=256,
                                      backend="triton" if path == "triton" else "torch"),
                 [(n,) for n in sizes], microadam_v, dtype=dtype, grad_dtype=dtype)


def adafactor_v(opt, p: torch.Tensor) -> torch.Tensor:
    """v̂ from the state: R_i / mean(R) · C_j of each matrix, or the full v."""
    state = opt.state[p]
    if "exp_avg_sq_row" not in state:
        return state["exp_avg_sq"]
    row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
    return (row / row.mean(dim=-1, keepdim=True)).unsqueeze(-1) * col.unsqueeze(-2)


ADAFACTOR_SHAPES = [(1,), (100,), (64, 48), (3, 20, 30), (250, 400)]


@pytest.mark.parametrize("beta1", [None, 0.9])
def test_adafactor_counts_every_entry_by_an_extra_pass(beta1):
    """The torch backend (an extra pass): full and factored v̂, a batch of matrices, 100,000
    entries, float32 and bf16 parameters."""
    for dtype in (torch.float32, torch.bfloat16):
        check_counts(lambda ps: Adafactor(ps, beta1=beta1, weight_decay=0.01, backend="torch"),
                     ADAFACTOR_SHAPES, adafactor_v, dtype=dtype)


def test_adafactor_triton_counts_every_entry_in_its_pass():
    """The Triton kernels (under the interpreter): pass 4 counts, for full and factored v̂, a
    batch of matrices, masked last chunks."""
    shapes = [(1,), (100,), (64, 48), (3, 20, 30), (70, 150)]
    check_counts(lambda ps: Adafactor(ps, beta1=0.9, weight_decay=0.01, backend="triton"),
                 shapes, adafactor_v)


@pytest.mark.parametrize("freeze_step", [1, 5])
def test_onebit_adam_counts_every_entry_by_an_extra_pass(freeze_step):
    """1-bit Adam's steps are torch ops: an extra pass, on a warmup step (freeze_step 5) and on
    a compressed one with v frozen (freeze_step 1)."""
    check_counts(lambda ps: OneBitAdam(ps, lr=1e-3, weight_decay=0.01, freeze_step=freeze_step,
                                       backend="torch"),
                 [(1,), (100,), (64, 48), (100_000,)], lambda opt, p: opt.state[p]["exp_avg_sq"])


@pytest.mark.parametrize("make, v_of", [
    (lambda ps: AdaDiag(ps, lr=1e-3, weight_decay=0.01, update_proj_gap=1, backend="torch"),
     lambda opt, p: opt.state[p]["exp_avg_sq"]),
    (lambda ps: AdafacDiag(ps, lr=1e-3, beta1=0.9, update_proj_gap=1, backend="torch"),
     adafactor_v),
], ids=["adadiag", "adafacdiag"])
def test_adadiag_counts_every_entry(make, v_of):
    """Matrices, rotated: an extra pass over the real g, θ⁺ − θ⁻ and v in the rotated basis;
    vectors, stepped by the diagonal method itself: as that method counts (Adam's C kernel in
    its pass, Adafactor's torch ops by an extra pass). No ±inf or NaN: the bases' SVD needs
    finite gradients."""
    if cpu.kernel() is None:
        pytest.skip("the C kernel is not available here (no compiler): AdaDiag's vectors go "
                    "through torch's fused Adam, which does not count")
    check_counts(make, [(1,), (100,), (64, 48), (3, 20, 30), (250, 400)], v_of, special=False)


@pytest.mark.parametrize("make, v_of", [
    (lambda ps: MicroAdam(ps, lr=1e-2, weight_decay=0.1, k_init=0.1), microadam_v),
    (lambda ps: MicroAdam(ps, lr=1e-2, k_init=0.1, backend="triton"), microadam_v),
    (lambda ps: Adafactor(ps, beta1=0.9, weight_decay=0.1), adafactor_v),
    (lambda ps: Adafactor(ps, backend="triton"), adafactor_v),
    (lambda ps: OneBitAdam(ps, lr=1e-2, freeze_step=2), lambda o, p: o.state[p]["exp_avg_sq"]),
    (lambda ps: AdaDiag(ps, lr=1e-2, update_proj_gap=2), lambda o, p: o.state[p]["exp_avg_sq"]),
], ids=["microadam", "microadam-triton", "adafactor", "adafactor-triton", "onebit", "adadiag"])
def test_monitor_exact_ranges_match_whole_tensors(make, v_of, tmp_path):
    """range_probes="exact" with a sample of 8 entries per tensor (of up to 384): the
    histograms and shares the monitor records are the whole tensors', which a sample's scaled
    counts are not."""
    from test_ranges import Recorder

    if cpu.kernel() is None:
        pytest.skip("the C kernel is not available here (no compiler)")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 16), torch.nn.Linear(16, 5))
    opt = make(list(model.parameters()))
    mon = OptimizerMonitor(opt, model=model, every=2, sample_size=8, log_dir=tmp_path,
                           console=False, tensorboard=False, report=False, strict=True,
                           range_probes="exact")
    rec = Recorder(model, opt)
    gen = torch.Generator().manual_seed(0)
    # AdaDiag's bases come from an SVD of the gradient: no magnitudes beyond float32's squares
    lowest = -60 if isinstance(opt, AdaDiag) else -150
    for _ in range(3):
        for p in model.parameters():
            g = wide_gradient(p.shape, gen)
            p.grad = torch.where(g.abs() < 2.0 ** lowest, 0.0, g) if lowest > -150 else g
        opt.step()
    mon.close()
    h = mon.history
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    for step in (1, 3):
        tensors = {"grad": rec.grads[step],
                   "update": {n: rec.after[step][n].float() - rec.before[step][n].float()
                              for n in names}}
        if step == 3:  # v as it is after the last step
            tensors["moment2"] = {n: v_of(opt, params[n]) for n in names}
        for q, by_name in tensors.items():
            for name in names:
                steps, counts = h.histograms(q, name)
                np.testing.assert_array_equal(counts[list(steps).index(step)],
                                              oracle_histogram(by_name[name]),
                                              err_msg=f"{q} {name} step {step}")
            whole_q = torch.cat([by_name[n].flatten().float() for n in names])
            for fmt, what in (("fp16", "underflow"), ("fp8e4m3", "overflow")):
                steps, values = h.series(f"{q}_{fmt}_{what}")
                assert values[list(steps).index(step)] == pytest.approx(
                    oracle_share(whole_q, fmt, what), abs=1e-12), (q, fmt, what, step)
