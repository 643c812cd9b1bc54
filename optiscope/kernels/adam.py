"""Triton kernel for Adam and AdamW: one launch for many tensors, statistics in the same pass.

Per element, in float32 whatever the storage dtype (the order of torch.optim's single-tensor Adam):

    g ← −g if maximize;  θ ← θ(1 − lr·wd) (AdamW)  or  g ← g + wd·θ (Adam)
    m ← β1·m + (1 − β1)·g;  v ← β2·v + (1 − β2)·g²;  v̄ ← max(v̄, v) if amsgrad
    θ ← θ − (lr / bc1) · m / (√v̄ / √bc2 + ε)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from optiscope.kernels.chunked import grad_sums, load, program_chunk, role_ptr, store
from optiscope.kernels.cpu import ADAM_STATS  # fills Stat columns 0..7
from optiscope.kernels.launch import (BLOCK, CHUNK, NUM_WARPS, chunk_map, densify,
                                     launch_addresses, tl_dtype, write_back)
from optiscope.kernels.ranges import range_cuts, range_levels
from optiscope.kernels.stats import Stat, StatsRows, reduce_partials

__all__ = ["adam_step"]

assert Stat.MOMENT2_SQ == ADAM_STATS - 1
# per quantity: the exponent fields, then the threshold counts
RANGE_OUT = tl.constexpr(256 + len(range_cuts()))


@triton.jit
def _range_add(x, hist, levels, cuts_ptr, NCUTS: tl.constexpr):
    """Adds one block of a quantity to its range counts (kernels/ranges.py: `range_cuts`,
    `range_levels`): the histogram of |x|'s biased float32 exponent, and that of its level, the
    number of thresholds its |x| bits exceed (one histogram, not a reduction per threshold:
    those cost the misaligned variant 40 registers)."""
    bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    hist += tl.histogram(bits >> 23, 256)
    level = tl.zeros_like(bits)
    for j in tl.static_range(NCUTS):
        level += (bits > tl.load(cuts_ptr + j)).to(tl.int32)
    levels += tl.histogram(level, 16)
    return hist, levels


@triton.jit
def _range_flush(out_ptr, hist, levels, pad, NCUTS: tl.constexpr):
    """Adds a chunk's counts to its tensor's (int64, atomics on the nonzero ones only: a trained
    tensor fills a few dozen fields): the fields, then per threshold the entries above it (the C
    kernel's layout). ``pad`` masked lanes were counted as zeros in field 0 (and level 0)."""
    fields = tl.arange(0, 256)
    hist -= tl.where(fields == 0, pad, 0)
    tl.atomic_add(out_ptr + fields, hist.to(tl.int64), mask=hist != 0)
    lanes = tl.arange(0, 16)
    above = tl.sum(levels, axis=0) - tl.cumsum(levels, axis=0)  # above threshold j: level > j
    tl.atomic_add(out_ptr + 256 + lanes, above.to(tl.int64), mask=(lanes < NCUTS) & (above != 0))


@triton.jit
def _adam_chunk(
    p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, start, numel,
    decay, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, step_size,
    bc2_sqrt, range_ptr, cuts_ptr,
    P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
    HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
    WITH_STATS: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr, MASKED: tl.constexpr,
    WITH_RANGES: tl.constexpr, NCUTS: tl.constexpr,
):
    """The update of one chunk, and its eight statistics sums (zeros without WITH_STATS).

    Unmasked (MASKED false, the chunk lies inside its tensor), the loads of an aligned tensor
    vectorise. Each block's sums are reduced to scalars at once: eight [BLOCK] accumulators
    would hold 8·BLOCK/threads registers per thread for the whole loop.
    """
    g_sq = 0.0
    g_max = 0.0
    g_bad = 0.0
    p0_sq = 0.0
    p1_sq = 0.0
    d_sq = 0.0
    m_sq = 0.0
    v_sq = 0.0
    if WITH_RANGES:  # the range counts of g, θ⁺ − θ⁻ and v over the chunk (`_range_add`)
        hist_g = tl.zeros([256], dtype=tl.int32)
        hist_d = tl.zeros([256], dtype=tl.int32)
        hist_v = tl.zeros([256], dtype=tl.int32)
        above_g = tl.zeros([16], dtype=tl.int32)
        above_d = tl.zeros([16], dtype=tl.int32)
        above_v = tl.zeros([16], dtype=tl.int32)
        pad = 0
    for i in range(0, CHUNK, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        mask = offs < numel
        g = load(g_ptr, offs, mask, MASKED, 0.0)
        p0 = load(p_ptr, offs, mask, MASKED, 0.0)
        m = load(m_ptr, offs, mask, MASKED, 0.0)
        v = load(v_ptr, offs, mask, MASKED, 0.0)
        if WITH_STATS:
            g_sq, g_max, g_bad = grad_sums(g, mask, g_sq, g_max, g_bad, MASKED)
            p0_sq += tl.sum(p0 * p0, axis=0)
        if MAXIMIZE:
            g = -g
        p = p0
        if HAS_WD:
            if DECOUPLED:
                p = p * decay
            else:
                # one rounding, as a contracting compiler makes of g + wd·θ; the unfused form
                # left Adam's L2-decay statistics variant an 8-byte stack frame on Triton 3.6
                g = tl.fma(p, weight_decay, g)
        m = beta1 * m + one_minus_beta1 * g
        v = beta2 * v + one_minus_beta2 * (g * g)
        if AMSGRAD:
            vmax = tl.maximum(load(vmax_ptr, offs, mask, MASKED, 0.0), v)
            store(vmax_ptr, offs, vmax.to(S_DTYPE), mask, MASKED)
            denom = tl.sqrt(vmax) / bc2_sqrt + eps
        else:
            denom = tl.sqrt(v) / bc2_sqrt + eps
        p = p - step_size * (m / denom)
        p_out = p.to(P_DTYPE)
        m_out = m.to(S_DTYPE)
        v_out = v.to(S_DTYPE)
        store(p_ptr, offs, p_out, mask, MASKED)
        store(m_ptr, offs, m_out, mask, MASKED)
        store(v_ptr, offs, v_out, mask, MASKED)
        if WITH_STATS:
            # Statistics of what was stored, so they describe the tensors the user sees; masked
            # lanes compute 0/0 when eps = 0, hence the where.
            p1 = p_out.to(tl.float32)
            if MASKED:
                p1 = tl.where(mask, p1, 0.0)
            d = p1 - p0
            p1_sq += tl.sum(p1 * p1, axis=0)
            d_sq += tl.sum(d * d, axis=0)
            m1 = m_out.to(tl.float32)  # masked lanes hold m = v = 0 already
            v1 = v_out.to(tl.float32)
            m_sq += tl.sum(m1 * m1, axis=0)
            v_sq += tl.sum(v1 * v1, axis=0)
            if WITH_RANGES:  # masked lanes hold g = 0, d = 0, v = 0: field 0, taken off below
                g_raw = load(g_ptr, offs, mask, MASKED, 0.0)
                hist_g, above_g = _range_add(g_raw, hist_g, above_g, cuts_ptr, NCUTS)
                hist_d, above_d = _range_add(d, hist_d, above_d, cuts_ptr, NCUTS)
                hist_v, above_v = _range_add(v1, hist_v, above_v, cuts_ptr, NCUTS)
                if MASKED:
                    pad += tl.sum(tl.where(mask, 0, 1), axis=0)
    if WITH_RANGES:
        _range_flush(range_ptr, hist_g, above_g, pad, NCUTS)
        _range_flush(range_ptr + RANGE_OUT, hist_d, above_d, pad, NCUTS)
        _range_flush(range_ptr + 2 * RANGE_OUT, hist_v, above_v, pad, NCUTS)
    return g_sq, g_max, g_bad, p0_sq, p1_sq, d_sq, m_sq, v_sq


@triton.jit
def _adam_kernel(
    addr_ptr, n_tensors, numel_ptr, chunk_tensor_ptr, chunk_first_ptr, partial_ptr,
    decay, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, step_size,
    bc2_sqrt, ranges_ptr, cuts_ptr,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
    HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
    WITH_STATS: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
    NCOLS: tl.constexpr, WITH_RANGES: tl.constexpr = False, NCUTS: tl.constexpr = 9,
):
    pid, t, start = program_chunk(chunk_tensor_ptr, chunk_first_ptr, CHUNK)
    range_ptr = ranges_ptr + t * (3 * RANGE_OUT)  # this tensor's counts (WITH_RANGES)
    numel = tl.load(numel_ptr + t)
    # ALIGNED: the launcher checked every address % 16 == 0: whole chunks load 16 bytes at a time
    p_ptr = role_ptr(addr_ptr, n_tensors, t, 0, P_DTYPE, ALIGNED)
    g_ptr = role_ptr(addr_ptr, n_tensors, t, 1, G_DTYPE, ALIGNED)
    m_ptr = role_ptr(addr_ptr, n_tensors, t, 2, S_DTYPE, ALIGNED)
    v_ptr = role_ptr(addr_ptr, n_tensors, t, 3, S_DTYPE, ALIGNED)
    vmax_ptr = role_ptr(addr_ptr, n_tensors, t, 4, S_DTYPE, ALIGNED and AMSGRAD)
    if ALIGNED:
        if start + CHUNK <= numel:
            g_sq, g_max, g_bad, p0_sq, p1_sq, d_sq, m_sq, v_sq = _adam_chunk(
                p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, start, numel, decay, beta1, one_minus_beta1,
                beta2, one_minus_beta2, eps, weight_decay, step_size, bc2_sqrt, range_ptr, cuts_ptr,
                P_DTYPE, S_DTYPE,
                HAS_WD, DECOUPLED, AMSGRAD, MAXIMIZE, WITH_STATS, BLOCK, CHUNK, False,
                WITH_RANGES, NCUTS)
        else:  # the tensor's last chunk
            g_sq, g_max, g_bad, p0_sq, p1_sq, d_sq, m_sq, v_sq = _adam_chunk(
                p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, start, numel, decay, beta1, one_minus_beta1,
                beta2, one_minus_beta2, eps, weight_decay, step_size, bc2_sqrt, range_ptr, cuts_ptr,
                P_DTYPE, S_DTYPE,
                HAS_WD, DECOUPLED, AMSGRAD, MAXIMIZE, WITH_STATS, BLOCK, CHUNK, True,
                WITH_RANGES, NCUTS)
    else:  # a view at an unaligned offset: element-wise loads, every block masked
        g_sq, g_max, g_bad, p0_sq, p1_sq, d_sq, m_sq, v_sq = _adam_chunk(
            p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, start, numel, decay, beta1, one_minus_beta1,
            beta2, one_minus_beta2, eps, weight_decay, step_size, bc2_sqrt, range_ptr, cuts_ptr,
            P_DTYPE, S_DTYPE,
            HAS_WD, DECOUPLED, AMSGRAD, MAXIMIZE, WITH_STATS, BLOCK, CHUNK, True,
            WITH_RANGES, NCUTS)

    if WITH_STATS:
        row = partial_ptr + pid * NCOLS
        tl.store(row + 0, g_sq)
        tl.store(row + 1, g_max)
        tl.store(row + 2, g_bad)
        tl.store(row + 3, p0_sq)
        tl.store(row + 4, p1_sq)
        tl.store(row + 5, d_sq)
        tl.store(row + 6, m_sq)
        tl.store(row + 7, v_sq)


def adam_step(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor] | None, *, step: int, lr: float, beta1: float, beta2: float,
    eps: float, weight_decay: float, decoupled_weight_decay: bool, maximize: bool,
    stats: StatsRows | None,
) -> None:
    """One Adam/AdamW step over tensors that share device, dtypes and step count: one launch.

    Args:
        params, grads, exp_avgs, exp_avg_sqs: the tensors, one entry per parameter.
        max_exp_avg_sqs: the amsgrad maxima, or None without amsgrad.
        step: the step count after this step (1 on the first step), for bias correction.
        lr, beta1, beta2, eps, weight_decay: hyperparameters of the parameters' group.
        decoupled_weight_decay: AdamW's θ(1 − lr·wd) instead of Adam's g + wd·θ.
        maximize: ascend instead of descend.
        stats: where to write the statistics rows, or None to skip them.
    """
    if not params:
        return
    device = params[0].device
    roles, pairs = densify([params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs],
                           writable=[True, False, True, True, True])
    n = len(params)
    cmap = chunk_map(tuple(map(Tensor.numel, roles[0])), CHUNK, device)
    addresses, is_aligned = launch_addresses(roles, n, device)
    partials = (torch.empty((cmap.n_chunks, ADAM_STATS), dtype=torch.float32, device=device)
                if stats is not None else addresses)  # any pointer: not touched without stats
    with_ranges = stats is not None and stats.ranges is not None
    if with_ranges:  # every entry's dynamic range, in the pass (`_range_add`)
        cuts = torch.tensor(range_cuts(), dtype=torch.int32, device=device)
        ranges = torch.zeros((n, 3, RANGE_OUT.value), dtype=torch.int64, device=device)
    else:
        cuts = ranges = addresses  # any pointer: not touched
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    # Every scalar the kernel needs is computed here, in float64, and passed rounded once to
    # float32, as torch.optim's scalars are: computed in the kernel, 1 - β2 would be float32's
    # 1 - fl(0.999), 1.3e-5 of itself away from fl(0.001), and v with it.
    _adam_kernel[(cmap.n_chunks,)](
        addresses, n, cmap.numels, cmap.chunk_tensor, cmap.chunk_first, partials,
        1.0 - lr * weight_decay, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, weight_decay,
        lr / bc1, bc2 ** 0.5, ranges, cuts,
        P_DTYPE=tl_dtype(params[0].dtype), G_DTYPE=tl_dtype(grads[0].dtype),
        S_DTYPE=tl_dtype(exp_avgs[0].dtype),
        HAS_WD=weight_decay != 0, DECOUPLED=decoupled_weight_decay,
        AMSGRAD=max_exp_avg_sqs is not None, MAXIMIZE=maximize, WITH_STATS=stats is not None,
        # with the range counts, half blocks: their histograms took the misaligned variant to
        # 140-151 registers at 1024 (python -m optiscope.kernels.inspect --only adamw)
        ALIGNED=is_aligned, BLOCK=BLOCK // 2 if with_ranges else BLOCK, CHUNK=CHUNK,
        NCOLS=ADAM_STATS,
        WITH_RANGES=with_ranges, NCUTS=len(range_cuts()), num_warps=NUM_WARPS,
    )
    write_back(pairs)
    if stats is not None:
        reduce_partials(partials, cmap.counts, stats, ADAM_STATS)
    if with_ranges:
        where = stats.row_index().long().to(stats.ranges.device)
        for q in range(3):
            stats.ranges[where, q] = range_levels(ranges[:, q, :256], ranges[:, q, 256:]).to(
                stats.ranges.device)
