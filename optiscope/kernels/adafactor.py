"""Triton kernels for Adafactor: four launches per launch group, statistics in the same passes.

The maths is in `optiscope.optimizers.adafactor.Adafactor`. Two quantities couple every element of
a tensor and force the passes apart: the column means of G = g² + eps1 (a factored update needs
all rows of its matrix before any element can be preconditioned) and RMS(U) (the clip needs the
whole unclipped update before any element is written). Hence, for all tensors of a launch group
at once:

1. ``_row_col_sums_kernel`` (factored tensors; one program per tile of `ROW_TILE` whole rows of
   one matrix): reads g; finishes the row EMA of its rows in place, since it owns them; writes the
   column sums of its tile to scratch and the sum of its new row statistics (for mean(R)).
2. ``_col_finalize_kernel`` (factored; one program per `COL_BLOCK` columns of one matrix): adds
   the tiles' column sums in tile order, finishes the column EMA, and writes mean(R) per matrix.
3. ``_update_rms_kernel`` (every tensor, flat chunks as Adam): reads g (and θ), updates a
   non-factored second moment in place, writes per-chunk Σ U², Σ θ² and the gradient and
   second-moment statistics.
4. ``_apply_kernel`` (every tensor, flat chunks): reads g, θ (and the first moment), recomputes
   U, scales and clips it with the per-tensor sums of pass 3, writes θ (and the first moment),
   and the statistics of what it stored; with the range counts (`request_ranges`), those of g,
   θ⁺ − θ⁻ and v̂ too, from its registers (Adam's `_range_add`: kernels/ranges.py's layout).

Per-chunk partial sums are reduced per tensor with ``torch.segment_reduce``, which adds in a fixed
order: no float atomics anywhere, so a rerun gives bit-identical parameters and statistics.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from optiscope.kernels.adam import RANGE_OUT, _range_add, _range_flush
from optiscope.kernels.chunked import grad_sums, load, program_chunk, role_ptr, store
from optiscope.kernels.launch import (BLOCK, CHUNK, NUM_WARPS, chunk_map, densify,
                                     launch_addresses, tl_dtype, write_back)
from optiscope.kernels.ranges import kernel_counters, range_cuts, store_levels
from optiscope.kernels.stats import Stat, StatsRows

__all__ = ["adafactor_step", "ROW_TILE", "COL_BLOCK"]

# Pass 1 tiles are ROW_TILE rows × COL_TILE columns, swept along the row. Owning whole rows makes
# the row sums final inside one program, so only columns need scratch: C floats per row tile,
# numel / ROW_TILE for tall matrices (1.6 % of an fp32 matrix) but numel / R for matrices of
# R < ROW_TILE rows (a third of a 3×3 convolution kernel). The sizes are a first guess, not tuned
# on a GPU: 2048 elements per iteration, twice Adam's BLOCK, as pass 1 only reads.
ROW_TILE = 64
COL_TILE = 32
# Pass 2: columns per program, and tile sums loaded per iteration when averaging the rows. A
# 50257×4096 embedding has 786 row tiles: 32 programs each add 786 vectors of 128 floats.
COL_BLOCK = 128
TILE_BLOCK = 128

# Rows of the per-tensor metadata table (int64 [_N_FIELDS, T]).
_NUMEL = tl.constexpr(0)
_FACTORED = tl.constexpr(1)
_ROWS = tl.constexpr(2)          # R: rows of each matrix (shape[-2])
_COLS = tl.constexpr(3)          # C: columns (shape[-1])
_TILES = tl.constexpr(4)         # row tiles per matrix
_CBLOCKS = tl.constexpr(5)       # column blocks per matrix
_FIRST_TILE = tl.constexpr(6)    # first pass-1 program of the tensor (and its tile sums)
_FIRST_CBLOCK = tl.constexpr(7)  # first pass-2 program of the tensor
_COLPART = tl.constexpr(8)       # offset of the tensor's column sums in the scratch
_BATCH = tl.constexpr(9)         # offset of the tensor's matrices in mean(R)
_N_FIELDS = 10

# Rows of the address table (int64 [5, T]).
_P = tl.constexpr(0)    # θ
_G = tl.constexpr(1)    # g
_V = tl.constexpr(2)    # exp_avg_sq_row (factored) or exp_avg_sq (not factored), float32
_COL = tl.constexpr(3)  # exp_avg_sq_col (factored only), float32
_M = tl.constexpr(4)    # exp_avg (with beta1 only), float32

# Columns of the pass-3 partial rows; the first two are needed by pass 4, the rest only for stats.
_U_SQ, _P_SQ, _G_SQ, _G_MAX, _G_BAD, _V_SQ = (tl.constexpr(i) for i in range(6))
# Columns of the pass-4 partial rows.
_P1_SQ, _D_SQ, _M_SQ = (tl.constexpr(i) for i in range(3))


@triton.jit
def _matrix_program(meta_ptr, n_tensors, program_tensor_ptr, FIRST: tl.constexpr,
                    PER_MATRIX: tl.constexpr):
    """Passes 1 and 2: this program's id, its tensor t, the shape R × C and row tiles of the
    tensor's matrices, the matrix b it works on and its index among that matrix's programs
    (metadata rows ``FIRST``: the tensor's first program, ``PER_MATRIX``: programs per matrix)."""
    pid = tl.program_id(0)
    t = tl.load(program_tensor_ptr + pid)
    R = tl.load(meta_ptr + _ROWS * n_tensors + t)
    C = tl.load(meta_ptr + _COLS * n_tensors + t)
    tiles = tl.load(meta_ptr + _TILES * n_tensors + t)
    per_matrix = tl.load(meta_ptr + PER_MATRIX * n_tensors + t)
    local = pid - tl.load(meta_ptr + FIRST * n_tensors + t)
    b = local // per_matrix
    return pid, t, R, C, tiles, b, local - b * per_matrix


@triton.jit
def _row_col_sums_kernel(
    addr_ptr, meta_ptr, n_tensors, tile_tensor_ptr, colpart_ptr, tilesum_ptr,
    beta2t, one_minus_beta2t, eps1,
    G_DTYPE: tl.constexpr, ROW_TILE: tl.constexpr, COL_TILE: tl.constexpr,
):
    pid, t, R, C, tiles, b, k = _matrix_program(meta_ptr, n_tensors, tile_tensor_ptr,
                                                _FIRST_TILE, _TILES)
    g_ptr = role_ptr(addr_ptr, n_tensors, t, _G, G_DTYPE)
    row_ptr = role_ptr(addr_ptr, n_tensors, t, _V, tl.float32)
    colpart = colpart_ptr + tl.load(meta_ptr + _COLPART * n_tensors + t) + (b * tiles + k) * C

    rows = k * ROW_TILE + tl.arange(0, ROW_TILE)
    row_mask = rows < R
    grow = b * R + rows  # rows of all matrices of the tensor, i.e. the index into exp_avg_sq_row
    row_acc = tl.zeros([ROW_TILE], dtype=tl.float32)
    for c0 in range(0, C, COL_TILE):
        cols = c0 + tl.arange(0, COL_TILE)
        col_mask = cols < C
        mask = row_mask[:, None] & col_mask[None, :]
        g = tl.load(g_ptr + grow[:, None] * C + cols[None, :], mask=mask, other=0.0)
        g = g.to(tl.float32)
        sq = tl.where(mask, g * g + eps1, 0.0)  # masked lanes would add eps1
        row_acc += tl.sum(sq, axis=1)
        tl.store(colpart + cols, tl.sum(sq, axis=0), mask=col_mask)

    row = tl.load(row_ptr + grow, mask=row_mask, other=0.0)
    row = beta2t * row + one_minus_beta2t * (row_acc / C.to(tl.float32))
    tl.store(row_ptr + grow, row, mask=row_mask)
    tl.store(tilesum_ptr + pid, tl.sum(tl.where(row_mask, row, 0.0), axis=0))


@triton.jit
def _col_finalize_kernel(
    addr_ptr, meta_ptr, n_tensors, cblock_tensor_ptr, colpart_ptr, tilesum_ptr, rowmean_ptr,
    beta2t, one_minus_beta2t,
    COL_BLOCK: tl.constexpr, TILE_BLOCK: tl.constexpr,
):
    pid, t, R, C, tiles, b, j = _matrix_program(meta_ptr, n_tensors, cblock_tensor_ptr,
                                                _FIRST_CBLOCK, _CBLOCKS)
    col_ptr = role_ptr(addr_ptr, n_tensors, t, _COL, tl.float32)
    part = colpart_ptr + tl.load(meta_ptr + _COLPART * n_tensors + t) + b * tiles * C

    cols = j * COL_BLOCK + tl.arange(0, COL_BLOCK)
    col_mask = cols < C
    acc = tl.zeros([COL_BLOCK], dtype=tl.float32)
    for k in range(0, tiles):  # tile order: the same sum on every run
        acc += tl.load(part + k * C + cols, mask=col_mask, other=0.0)
    col = tl.load(col_ptr + b * C + cols, mask=col_mask, other=0.0)
    col = beta2t * col + one_minus_beta2t * (acc / R.to(tl.float32))
    tl.store(col_ptr + b * C + cols, col, mask=col_mask)

    if j == 0:  # one program per matrix also finishes mean(R) from the row tiles' sums
        first = tl.load(meta_ptr + _FIRST_TILE * n_tensors + t) + b * tiles
        sums = tl.zeros([TILE_BLOCK], dtype=tl.float32)
        for k0 in range(0, tiles, TILE_BLOCK):
            ks = k0 + tl.arange(0, TILE_BLOCK)
            sums += tl.load(tilesum_ptr + first + ks, mask=ks < tiles, other=0.0)
        batch = tl.load(meta_ptr + _BATCH * n_tensors + t) + b
        tl.store(rowmean_ptr + batch, tl.sum(sums, axis=0) / R.to(tl.float32))


@triton.jit
def _preconditioned(g, base, mask, factored, v_ptr, col_ptr, rowmean_ptr, R, C, batch,
                    beta2t, one_minus_beta2t, eps1, UPDATE_V: tl.constexpr, BLOCK: tl.constexpr,
                    MASKED: tl.constexpr):
    """U = g / √v̂ and v̂ for the block of BLOCK entries from ``base``; with UPDATE_V, first the
    EMA of a non-factored v̂."""
    offs = base + tl.arange(0, BLOCK)
    if factored:
        # Row and matrix of every entry. One int64 division per block finds the first entry's
        # row; within the block the column offset stays below C + BLOCK and the row offset below
        # R + BLOCK, so the per-entry divisions are int32 (an int64 division is a software
        # routine several times longer) and exact.
        # (max(·, 1): a matrix with no entries has every lane masked, but must not divide by 0.)
        C = tl.maximum(C, 1)
        R = tl.maximum(R, 1)
        row0 = base // C
        b0 = row0 // R
        C32 = C.to(tl.int32)
        R32 = R.to(tl.int32)
        rel = (base - row0 * C).to(tl.int32) + tl.arange(0, BLOCK)
        q = rel // C32
        col_index = rel - q * C32
        b = b0 + ((row0 - b0 * R).to(tl.int32) + q) // R32
        grow = row0 + q
        row = tl.load(v_ptr + grow, mask=mask, other=1.0)
        mean = tl.load(rowmean_ptr + batch + b, mask=mask, other=1.0)
        col = tl.load(col_ptr + b * C + col_index, mask=mask, other=1.0)
        ratio = row / mean
        u = (tl.rsqrt(ratio) * tl.rsqrt(col)) * g
        v = ratio * col
    else:
        v = load(v_ptr, offs, mask, MASKED, 1.0)
        if UPDATE_V:
            v = beta2t * v + one_minus_beta2t * (g * g + eps1)
            store(v_ptr, offs, v, mask, MASKED)
        u = tl.rsqrt(v) * g
    return u, v


@triton.jit
def _chunk_tensor(addr_ptr, meta_ptr, n_tensors, chunk_tensor_ptr, chunk_first_ptr,
                  P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, CHUNK: tl.constexpr):
    """Passes 3 and 4: this program's chunk, its tensor's metadata and the pointers both read."""
    pid, t, start = program_chunk(chunk_tensor_ptr, chunk_first_ptr, CHUNK)
    numel = tl.load(meta_ptr + _NUMEL * n_tensors + t)
    factored = tl.load(meta_ptr + _FACTORED * n_tensors + t) != 0
    R = tl.load(meta_ptr + _ROWS * n_tensors + t)
    C = tl.load(meta_ptr + _COLS * n_tensors + t)
    batch = tl.load(meta_ptr + _BATCH * n_tensors + t)
    p_ptr = role_ptr(addr_ptr, n_tensors, t, _P, P_DTYPE)
    g_ptr = role_ptr(addr_ptr, n_tensors, t, _G, G_DTYPE)
    v_ptr = role_ptr(addr_ptr, n_tensors, t, _V, tl.float32)
    col_ptr = role_ptr(addr_ptr, n_tensors, t, _COL, tl.float32)
    return pid, t, start, numel, factored, R, C, batch, p_ptr, g_ptr, v_ptr, col_ptr


@triton.jit
def _rms_chunk(p_ptr, g_ptr, v_ptr, col_ptr, rowmean_ptr, start, numel, factored, R, C, batch,
               beta2t, one_minus_beta2t, eps1, READ_PARAM: tl.constexpr,
               WITH_STATS: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
               MASKED: tl.constexpr):
    """Pass 3 over one chunk: its [BLOCK] accumulators of Σ U² and Σ θ² (which the update uses),
    and its statistics, reduced to scalars block by block (four more [BLOCK] accumulators would
    cost 4·BLOCK/threads registers per thread)."""
    u_sq = tl.zeros([BLOCK], dtype=tl.float32)
    p_sq = tl.zeros([BLOCK], dtype=tl.float32)
    g_sq = 0.0
    g_max = 0.0
    g_bad = 0.0
    v_sq = 0.0
    for i in range(0, CHUNK, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        mask = offs < numel
        g = load(g_ptr, offs, mask, MASKED, 0.0)
        u, v = _preconditioned(g, start + i, mask, factored, v_ptr, col_ptr, rowmean_ptr, R, C,
                               batch, beta2t, one_minus_beta2t, eps1, True, BLOCK, MASKED)
        # where, not multiplication by the mask: with eps1 = 0 a masked lane holds 0·∞.
        u_sq += tl.where(mask, u * u, 0.0)
        if READ_PARAM:
            p = load(p_ptr, offs, mask, MASKED, 0.0)
            p_sq += p * p
        if WITH_STATS:
            g_sq, g_max, g_bad = grad_sums(g, mask, g_sq, g_max, g_bad, MASKED)
            v_sq += tl.sum(tl.where(mask, v * v, 0.0), axis=0)
    return u_sq, p_sq, g_sq, g_max, g_bad, v_sq


@triton.jit
def _update_rms_kernel(
    addr_ptr, meta_ptr, n_tensors, chunk_tensor_ptr, chunk_first_ptr, rowmean_ptr, partial_ptr,
    beta2t, one_minus_beta2t, eps1,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, READ_PARAM: tl.constexpr,
    WITH_STATS: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
    NCOLS: tl.constexpr,
):
    pid, t, start, numel, factored, R, C, batch, p_ptr, g_ptr, v_ptr, col_ptr = _chunk_tensor(
        addr_ptr, meta_ptr, n_tensors, chunk_tensor_ptr, chunk_first_ptr, P_DTYPE, G_DTYPE, CHUNK)
    if ALIGNED:  # the launcher checked every address % 16 == 0: whole chunks load 16 bytes
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        if start + CHUNK <= numel:
            u_sq, p_sq, g_sq, g_max, g_bad, v_sq = _rms_chunk(
                p_ptr, g_ptr, v_ptr, col_ptr, rowmean_ptr, start, numel, factored, R, C, batch,
                beta2t, one_minus_beta2t, eps1, READ_PARAM, WITH_STATS, BLOCK, CHUNK, False)
        else:  # the tensor's last chunk
            u_sq, p_sq, g_sq, g_max, g_bad, v_sq = _rms_chunk(
                p_ptr, g_ptr, v_ptr, col_ptr, rowmean_ptr, start, numel, factored, R, C, batch,
                beta2t, one_minus_beta2t, eps1, READ_PARAM, WITH_STATS, BLOCK, CHUNK, True)
    else:  # a view at an unaligned offset: element-wise loads, every block masked
        u_sq, p_sq, g_sq, g_max, g_bad, v_sq = _rms_chunk(
            p_ptr, g_ptr, v_ptr, col_ptr, rowmean_ptr, start, numel, factored, R, C, batch,
            beta2t, one_minus_beta2t, eps1, READ_PARAM, WITH_STATS, BLOCK, CHUNK, True)

    row = partial_ptr + pid * NCOLS
    tl.store(row + _U_SQ, tl.sum(u_sq, axis=0))
    tl.store(row + _P_SQ, tl.sum(p_sq, axis=0))
    if WITH_STATS:
        tl.store(row + _G_SQ, g_sq)
        tl.store(row + _G_MAX, g_max)
        tl.store(row + _G_BAD, g_bad)
        tl.store(row + _V_SQ, v_sq)


@triton.jit
def _ranges_start():
    """Zero counts of g, θ⁺ − θ⁻ and v̂ (each a field and a level histogram, `_range_add`),
    and no padding lanes yet."""
    fields = tl.zeros([256], dtype=tl.int32)
    levels = tl.zeros([16], dtype=tl.int32)
    return fields, levels, fields, levels, fields, levels, 0


@triton.jit
def _ranges_end(range_ptr, hist_g, above_g, hist_d, above_d, hist_v, above_v, pad,
                NCUTS: tl.constexpr):
    """A chunk's counts of the three, added to its tensor's (`_range_flush`)."""
    for q in tl.static_range(3):
        hist = hist_g if q == 0 else (hist_d if q == 1 else hist_v)
        above = above_g if q == 0 else (above_d if q == 1 else above_v)
        _range_flush(range_ptr + q * RANGE_OUT, hist, above, pad, NCUTS)


@triton.jit
def _apply_chunk(p_ptr, g_ptr, v_ptr, col_ptr, m_ptr, rowmean_ptr, start, numel, factored, R, C,
                 batch, clip, lr_t, beta1, one_minus_beta1, weight_decay, range_ptr, cuts_ptr,
                 P_DTYPE: tl.constexpr, HAS_BETA1: tl.constexpr, HAS_WD: tl.constexpr,
                 WITH_STATS: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
                 MASKED: tl.constexpr, WITH_RANGES: tl.constexpr, NCUTS: tl.constexpr):
    """Pass 4 over one chunk: the update, and its [BLOCK] accumulators of the statistics (as
    many registers as per-block reductions here, and fewer instructions); with WITH_RANGES, the
    chunk's range counts, added to the tensor's at the end."""
    p1_sq = tl.zeros([BLOCK], dtype=tl.float32)
    d_sq = tl.zeros([BLOCK], dtype=tl.float32)
    m_sq = tl.zeros([BLOCK], dtype=tl.float32)
    if WITH_RANGES:
        hist_g, above_g, hist_d, above_d, hist_v, above_v, pad = _ranges_start()
    for i in range(0, CHUNK, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        mask = offs < numel
        g = load(g_ptr, offs, mask, MASKED, 0.0)
        u, v = _preconditioned(g, start + i, mask, factored, v_ptr, col_ptr, rowmean_ptr, R, C,
                               batch, 0.0, 0.0, 0.0, False, BLOCK, MASKED)
        u = (u / clip) * lr_t
        if HAS_BETA1:
            m = load(m_ptr, offs, mask, MASKED, 0.0)
            m = beta1 * m + one_minus_beta1 * u
            store(m_ptr, offs, m, mask, MASKED)
            u = m
        p0 = load(p_ptr, offs, mask, MASKED, 0.0)
        p = p0
        if HAS_WD:
            p = p - (weight_decay * lr_t) * p
        p_out = (p - u).to(P_DTYPE)
        store(p_ptr, offs, p_out, mask, MASKED)
        if WITH_STATS:
            # Statistics of what was stored: θ after rounding to its dtype.
            p1 = tl.where(mask, p_out.to(tl.float32), 0.0)
            d = p1 - p0
            p1_sq += p1 * p1
            d_sq += d * d
            if HAS_BETA1:
                m_sq += tl.where(mask, m * m, 0.0)
            if WITH_RANGES:  # masked lanes: g = θ⁺ − θ⁻ = 0, v̂ read as 1 and set to 0; taken off
                hist_g, above_g = _range_add(g, hist_g, above_g, cuts_ptr, NCUTS)
                hist_d, above_d = _range_add(d, hist_d, above_d, cuts_ptr, NCUTS)
                hist_v, above_v = _range_add(tl.where(mask, v, 0.0), hist_v, above_v, cuts_ptr,
                                             NCUTS)
                if MASKED:
                    pad += tl.sum(tl.where(mask, 0, 1), axis=0)
    if WITH_RANGES:
        _ranges_end(range_ptr, hist_g, above_g, hist_d, above_d, hist_v, above_v, pad, NCUTS)
    return p1_sq, d_sq, m_sq


@triton.jit
def _apply_kernel(
    addr_ptr, meta_ptr, n_tensors, chunk_tensor_ptr, chunk_first_ptr, rowmean_ptr, sums_ptr,
    partial_ptr, rho, eps2, clip_threshold, beta1, one_minus_beta1, weight_decay,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, SCALE_PARAMETER: tl.constexpr,
    HAS_BETA1: tl.constexpr, HAS_WD: tl.constexpr, WITH_STATS: tl.constexpr,
    ALIGNED: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr, SUMS_NCOLS: tl.constexpr,
    NCOLS: tl.constexpr, ranges_ptr, cuts_ptr, WITH_RANGES: tl.constexpr, NCUTS: tl.constexpr,
):
    pid, t, start, numel, factored, R, C, batch, p_ptr, g_ptr, v_ptr, col_ptr = _chunk_tensor(
        addr_ptr, meta_ptr, n_tensors, chunk_tensor_ptr, chunk_first_ptr, P_DTYPE, G_DTYPE, CHUNK)
    m_ptr = role_ptr(addr_ptr, n_tensors, t, _M, tl.float32)
    range_ptr = ranges_ptr + t * (3 * RANGE_OUT)  # this tensor's counts (WITH_RANGES)

    # η_t and the clip, from the per-tensor sums of pass 3 (two loads per program).
    sqrt_numel = tl.sqrt(numel.to(tl.float32))
    if SCALE_PARAMETER:
        p_rms = tl.sqrt(tl.load(sums_ptr + t * SUMS_NCOLS + _P_SQ)) / sqrt_numel
        lr_t = tl.maximum(p_rms, eps2) * rho
    else:
        lr_t = rho
    u_rms = tl.sqrt(tl.load(sums_ptr + t * SUMS_NCOLS + _U_SQ)) / sqrt_numel
    clip = tl.maximum(u_rms / clip_threshold, 1.0)

    if ALIGNED:  # the launcher checked every address % 16 == 0: whole chunks load 16 bytes
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        if HAS_BETA1:
            m_ptr = tl.multiple_of(m_ptr, 16)
        if start + CHUNK <= numel:
            p1_sq, d_sq, m_sq = _apply_chunk(
                p_ptr, g_ptr, v_ptr, col_ptr, m_ptr, rowmean_ptr, start, numel, factored, R, C,
                batch, clip, lr_t, beta1, one_minus_beta1, weight_decay, range_ptr, cuts_ptr,
                P_DTYPE, HAS_BETA1, HAS_WD, WITH_STATS, BLOCK, CHUNK, False, WITH_RANGES, NCUTS)
        else:  # the tensor's last chunk
            p1_sq, d_sq, m_sq = _apply_chunk(
                p_ptr, g_ptr, v_ptr, col_ptr, m_ptr, rowmean_ptr, start, numel, factored, R, C,
                batch, clip, lr_t, beta1, one_minus_beta1, weight_decay, range_ptr, cuts_ptr,
                P_DTYPE, HAS_BETA1, HAS_WD, WITH_STATS, BLOCK, CHUNK, True, WITH_RANGES, NCUTS)
    else:  # a view at an unaligned offset: element-wise loads, every block masked
        p1_sq, d_sq, m_sq = _apply_chunk(
            p_ptr, g_ptr, v_ptr, col_ptr, m_ptr, rowmean_ptr, start, numel, factored, R, C,
            batch, clip, lr_t, beta1, one_minus_beta1, weight_decay, range_ptr, cuts_ptr,
            P_DTYPE, HAS_BETA1, HAS_WD, WITH_STATS, BLOCK, CHUNK, True, WITH_RANGES, NCUTS)

    if WITH_STATS:
        row = partial_ptr + pid * NCOLS
        tl.store(row + _P1_SQ, tl.sum(p1_sq, axis=0))
        tl.store(row + _D_SQ, tl.sum(d_sq, axis=0))
        tl.store(row + _M_SQ, tl.sum(m_sq, axis=0))


@dataclass(frozen=True)
class _Layout:
    """Where every program of passes 1 and 2 works, and the scratch they need.

    Attributes:
        meta: int64 ``[_N_FIELDS, T]``, the per-tensor metadata (see the ``_NUMEL``... rows).
        tile_tensor: int32, the tensor of each pass-1 program (row tile).
        cblock_tensor: int32, the tensor of each pass-2 program (column block).
        colpart_numel: floats of column-sum scratch.
        n_batches: matrices over all factored tensors, the length of mean(R).
    """

    meta: Tensor
    tile_tensor: Tensor
    cblock_tensor: Tensor
    colpart_numel: int
    n_batches: int


@functools.lru_cache(maxsize=128)
def _layout(shapes: tuple[tuple[int, ...], ...], device: torch.device) -> _Layout:
    """The layout of tensors with these shapes; cached, since shapes do not change between steps."""
    fields = [[0] * len(shapes) for _ in range(_N_FIELDS)]
    tile_counts, cblock_counts = [], []
    n_tiles = n_cblocks = colpart = n_batches = 0
    for i, shape in enumerate(shapes):
        factored = len(shape) >= 2
        R, C = (shape[-2], shape[-1]) if factored else (1, 1)
        B = math.prod(shape[:-2]) if factored else 0
        tiles, cblocks = -(-R // ROW_TILE), -(-C // COL_BLOCK)
        column = (math.prod(shape), int(factored), R, C, tiles, cblocks, n_tiles, n_cblocks,
                  colpart, n_batches)
        for f, value in enumerate(column):
            fields[f][i] = value
        tile_counts.append(B * tiles)
        cblock_counts.append(B * cblocks)
        n_tiles += B * tiles
        n_cblocks += B * cblocks
        colpart += B * tiles * C
        n_batches += B

    def owners(counts):
        return torch.repeat_interleave(torch.arange(len(shapes), dtype=torch.int32),
                                       torch.tensor(counts, dtype=torch.int64)).to(device)

    return _Layout(meta=torch.tensor(fields, dtype=torch.int64).to(device),
                   tile_tensor=owners(tile_counts), cblock_tensor=owners(cblock_counts),
                   colpart_numel=colpart, n_batches=n_batches)


def adafactor_step(
    params: list[Tensor], grads: list[Tensor], row_vars: list[Tensor | None],
    col_vars: list[Tensor | None], exp_avg_sqs: list[Tensor | None],
    exp_avgs: list[Tensor] | None, *, rho: float, beta2t: float, eps1: float, eps2: float,
    clip_threshold: float, beta1: float | None, weight_decay: float, scale_parameter: bool,
    stats: StatsRows | None,
) -> None:
    """One Adafactor step over tensors that share device, dtypes and step count: four launches.

    Args:
        params, grads: the tensors, one entry per parameter.
        row_vars, col_vars: float32 row and column statistics of factored tensors, else None.
        exp_avg_sqs: float32 second moments of non-factored tensors, else None.
        exp_avgs: float32 first moments when ``beta1`` is set, else None.
        rho: ρ_t, the step size before parameter scaling.
        beta2t: β̂2 of this step.
        eps1, eps2, clip_threshold, beta1, weight_decay, scale_parameter: hyperparameters.
        stats: where to write the statistics rows, or None to skip them; with ``stats.ranges``,
            also the range counts of g, θ⁺ − θ⁻ and v̂, in pass 4.
    """
    if not params:
        return
    # Python ints (lr=1, weight_decay=0) would turn the kernels' float arguments into integers.
    rho, beta2t, eps1, eps2 = float(rho), float(beta2t), float(eps1), float(eps2)
    clip_threshold, weight_decay = float(clip_threshold), float(weight_decay)
    device = params[0].device
    n = len(params)
    second = [r if r is not None else v for r, v in zip(row_vars, exp_avg_sqs)]
    # row-major: the row and column statistics index rows, so a shared dense layout is not enough
    roles, pairs = densify([params, grads, second, col_vars, exp_avgs],
                           writable=[True, False, True, True, True], row_major=True)
    addresses, is_aligned = launch_addresses(roles, n, device)
    layout = _layout(tuple(tuple(p.shape) for p in params), device)
    cmap = chunk_map(tuple(map(Tensor.numel, params)), CHUNK, device)
    p_dtype, g_dtype = tl_dtype(params[0].dtype), tl_dtype(grads[0].dtype)
    f32 = dict(dtype=torch.float32, device=device)

    # Passes 1 and 2: only when the launch group holds factored tensors.
    rowmean = torch.empty(max(layout.n_batches, 1), **f32)
    n_tiles, n_cblocks = layout.tile_tensor.numel(), layout.cblock_tensor.numel()
    colpart = torch.empty(max(layout.colpart_numel, 1), **f32)
    tilesum = torch.empty(max(n_tiles, 1), **f32)
    if n_tiles:
        _row_col_sums_kernel[(n_tiles,)](
            addresses, layout.meta, n, layout.tile_tensor, colpart, tilesum,
            beta2t, 1.0 - beta2t, eps1,
            G_DTYPE=g_dtype, ROW_TILE=ROW_TILE, COL_TILE=COL_TILE, num_warps=NUM_WARPS)
    if n_cblocks:  # also for a matrix without rows: its column means are NaN, as torch's
        _col_finalize_kernel[(n_cblocks,)](
            addresses, layout.meta, n, layout.cblock_tensor, colpart, tilesum, rowmean,
            beta2t, 1.0 - beta2t, COL_BLOCK=COL_BLOCK, TILE_BLOCK=TILE_BLOCK,
            num_warps=NUM_WARPS)

    # Pass 3, then its per-tensor sums: Σ U² for the clip, Σ θ² for RMS(θ), the statistics.
    ncols3 = 6 if stats is not None else 2
    partial3 = torch.empty((cmap.n_chunks, ncols3), **f32)
    _update_rms_kernel[(cmap.n_chunks,)](
        addresses, layout.meta, n, cmap.chunk_tensor, cmap.chunk_first, rowmean, partial3,
        beta2t, 1.0 - beta2t, eps1,
        P_DTYPE=p_dtype, G_DTYPE=g_dtype, READ_PARAM=scale_parameter or stats is not None,
        WITH_STATS=stats is not None, ALIGNED=is_aligned, BLOCK=BLOCK, CHUNK=CHUNK, NCOLS=ncols3,
        num_warps=NUM_WARPS)
    sums3 = torch.segment_reduce(partial3, "sum", lengths=cmap.counts, axis=0)

    # Pass 4.
    partial4 = torch.empty((cmap.n_chunks, 3), **f32) if stats is not None else partial3
    has_beta1 = beta1 is not None
    with_ranges = stats is not None and stats.ranges is not None
    # without them, any pointer: not touched
    cuts, ranges = kernel_counters(n, device) if with_ranges else (partial3, partial3)
    _apply_kernel[(cmap.n_chunks,)](
        addresses, layout.meta, n, cmap.chunk_tensor, cmap.chunk_first, rowmean, sums3,
        partial4, rho, eps2, clip_threshold, beta1 if has_beta1 else 0.0,
        1.0 - beta1 if has_beta1 else 0.0, weight_decay,
        P_DTYPE=p_dtype, G_DTYPE=g_dtype, SCALE_PARAMETER=scale_parameter, HAS_BETA1=has_beta1,
        HAS_WD=weight_decay != 0, WITH_STATS=stats is not None, ALIGNED=is_aligned,
        # with the range counts, half blocks, as Adam's kernel (its histograms' registers)
        BLOCK=BLOCK // 2 if with_ranges else BLOCK, CHUNK=CHUNK, SUMS_NCOLS=ncols3, NCOLS=3,
        ranges_ptr=ranges, cuts_ptr=cuts, WITH_RANGES=with_ranges, NCUTS=len(range_cuts()),
        num_warps=NUM_WARPS)
    write_back(pairs)
    if with_ranges:
        store_levels(stats.ranges, stats.row_index(), ranges)

    if stats is not None:
        sums4 = torch.segment_reduce(partial4, "sum", lengths=cmap.counts, axis=0)
        columns = {
            Stat.GRAD_SQ: sums3[:, _G_SQ.value],
            Stat.GRAD_ABSMAX: torch.segment_reduce(partial3[:, _G_MAX.value].contiguous(), "max",
                                                   lengths=cmap.counts),
            Stat.GRAD_NONFINITE: sums3[:, _G_BAD.value],
            Stat.PARAM_SQ_BEFORE: sums3[:, _P_SQ.value],
            Stat.PARAM_SQ_AFTER: sums4[:, _P1_SQ.value],
            Stat.UPDATE_SQ: sums4[:, _D_SQ.value],
            Stat.MOMENT2_SQ: sums3[:, _V_SQ.value],
        }
        if has_beta1:
            columns[Stat.MOMENT1_SQ] = sums4[:, _M_SQ.value]
        stats.write(columns)
