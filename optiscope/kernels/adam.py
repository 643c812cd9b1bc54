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

from optiscope.kernels.launch import BLOCK, CHUNK, NUM_WARPS, address_table, chunk_map, densify, tl_dtype, write_back
from optiscope.kernels.stats import Stat, StatsRows, reduce_partials

__all__ = ["adam_step"]

ADAM_STATS = 8  # fills Stat columns 0..7: gradient, parameter, update and moment sums
assert Stat.MOMENT2_SQ == ADAM_STATS - 1


@triton.jit
def _adam_kernel(
    addr_ptr, n_tensors, numel_ptr, chunk_tensor_ptr, chunk_first_ptr, partial_ptr,
    lr, beta1, beta2, eps, weight_decay, step_size, bc2_sqrt,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
    HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
    WITH_STATS: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr, NCOLS: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor_ptr + pid)
    numel = tl.load(numel_ptr + t)
    start = (pid - tl.load(chunk_first_ptr + t)).to(tl.int64) * CHUNK
    p_ptr = tl.load(addr_ptr + t).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(addr_ptr + n_tensors + t).to(tl.pointer_type(G_DTYPE))
    m_ptr = tl.load(addr_ptr + 2 * n_tensors + t).to(tl.pointer_type(S_DTYPE))
    v_ptr = tl.load(addr_ptr + 3 * n_tensors + t).to(tl.pointer_type(S_DTYPE))
    vmax_ptr = tl.load(addr_ptr + 4 * n_tensors + t).to(tl.pointer_type(S_DTYPE))

    g_sq = tl.zeros([BLOCK], dtype=tl.float32)
    g_max = tl.zeros([BLOCK], dtype=tl.float32)
    g_bad = tl.zeros([BLOCK], dtype=tl.float32)
    p0_sq = tl.zeros([BLOCK], dtype=tl.float32)
    p1_sq = tl.zeros([BLOCK], dtype=tl.float32)
    d_sq = tl.zeros([BLOCK], dtype=tl.float32)
    m_sq = tl.zeros([BLOCK], dtype=tl.float32)
    v_sq = tl.zeros([BLOCK], dtype=tl.float32)

    for i in range(0, CHUNK, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        mask = offs < numel
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        p0 = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if WITH_STATS:
            finite = tl.abs(g) < float("inf")  # false for ±inf and NaN
            g_sq += g * g
            g_max = tl.maximum(g_max, tl.where(finite, tl.abs(g), float("inf")))
            g_bad += tl.where(finite | ~mask, 0.0, 1.0)
            p0_sq += p0 * p0
        if MAXIMIZE:
            g = -g
        p = p0
        if HAS_WD:
            if DECOUPLED:
                p = p * (1.0 - lr * weight_decay)
            else:
                g = g + weight_decay * p
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * (g * g)
        if AMSGRAD:
            vmax = tl.maximum(tl.load(vmax_ptr + offs, mask=mask, other=0.0).to(tl.float32), v)
            tl.store(vmax_ptr + offs, vmax.to(S_DTYPE), mask=mask)
            denom = tl.sqrt(vmax) / bc2_sqrt + eps
        else:
            denom = tl.sqrt(v) / bc2_sqrt + eps
        p = p - step_size * (m / denom)
        p_out = p.to(P_DTYPE)
        m_out = m.to(S_DTYPE)
        v_out = v.to(S_DTYPE)
        tl.store(p_ptr + offs, p_out, mask=mask)
        tl.store(m_ptr + offs, m_out, mask=mask)
        tl.store(v_ptr + offs, v_out, mask=mask)
        if WITH_STATS:
            # Statistics of what was stored, so they describe the tensors the user sees; masked
            # lanes compute 0/0 when eps = 0, hence the where.
            p1 = tl.where(mask, p_out.to(tl.float32), 0.0)
            d = p1 - p0
            p1_sq += p1 * p1
            d_sq += d * d
            m1 = m_out.to(tl.float32)  # masked lanes hold m = v = 0 already
            v1 = v_out.to(tl.float32)
            m_sq += m1 * m1
            v_sq += v1 * v1

    if WITH_STATS:
        row = partial_ptr + pid * NCOLS
        tl.store(row + 0, tl.sum(g_sq, axis=0))
        tl.store(row + 1, tl.max(g_max, axis=0))
        tl.store(row + 2, tl.sum(g_bad, axis=0))
        tl.store(row + 3, tl.sum(p0_sq, axis=0))
        tl.store(row + 4, tl.sum(p1_sq, axis=0))
        tl.store(row + 5, tl.sum(d_sq, axis=0))
        tl.store(row + 6, tl.sum(m_sq, axis=0))
        tl.store(row + 7, tl.sum(v_sq, axis=0))


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
    cmap = chunk_map(tuple(p.numel() for p in params), CHUNK, device)
    addresses = address_table(roles, n, device)
    partials = (torch.empty((cmap.n_chunks, ADAM_STATS), dtype=torch.float32, device=device)
                if stats is not None else addresses)  # any pointer: not touched without stats
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    _adam_kernel[(cmap.n_chunks,)](
        addresses, n, cmap.numels, cmap.chunk_tensor, cmap.chunk_first, partials,
        lr, beta1, beta2, eps, weight_decay, lr / bc1, bc2 ** 0.5,
        P_DTYPE=tl_dtype(params[0].dtype), G_DTYPE=tl_dtype(grads[0].dtype),
        S_DTYPE=tl_dtype(exp_avgs[0].dtype),
        HAS_WD=weight_decay != 0, DECOUPLED=decoupled_weight_decay,
        AMSGRAD=max_exp_avg_sqs is not None, MAXIMIZE=maximize, WITH_STATS=stats is not None,
        BLOCK=BLOCK, CHUNK=CHUNK, NCOLS=ADAM_STATS, num_warps=NUM_WARPS,
    )
    write_back(pairs)
    if stats is not None:
        reduce_partials(partials, cmap.counts, stats, ADAM_STATS)
