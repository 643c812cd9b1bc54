"""Triton kernel for MicroAdam: the whole step in one launch for many tensors, statistics included.

The maths is in `optiscope.optimizers.microadam.MicroAdam`; its torch backend is the reference
twin, and for the same inputs this kernel stores the same bits (under the interpreter; on a GPU
the compiler may fuse a multiply and an add that torch rounds separately).

A program owns one top-k block of one tensor at a time (a persistent loop over the blocks of all
tensors) and does, with the block's accumulator a in registers from start to end:

1. a = g + Q⁻¹(e): the block's 4-bit codes and its buckets' bounds (buckets nest in blocks).
2. Top-k of |a| by bisection on the bits of |a| (for non-negative floats their int32 bit
   patterns order like the values): 31 counting passes find the k-th largest pattern T; the
   entries above T are kept, and of those equal to T the lowest-indexed ones, which is the torch
   backend's tie rule. A cumulative sum gives each kept entry its column, in index order, and
   the block's kept indices (int16) and values (bf16) go into the window's row for this step.
3. The residual a − a[I]: per-bucket min and max (bf16), 4-bit codes, packed two per byte.
4. S1 = Σ_r β1^age·V_r and S2 = Σ_r β2^age·V_r² over the window's m rows, scattered row by row
   into a per-program float32 scratch of two blocks (the rows' indices are distinct within a
   row, so a row scatters without atomics; rows are added in order, as the torch backend does).
5. θ ← θ(1 − ηλ) − η·m̂/(√v̂ + ε) over the block, and the block's statistics.

With the range counts (`request_ranges`), each block's g, θ⁺ − θ⁻ and v̂ are counted at the
block's end, the last two from registers and g read again from cache (Adam's `_range_add`,
`_range_flush`: kernels/ranges.py's layout), and added to the tensor's counts with atomics.

So the accumulator never reaches global memory: per parameter the step reads g, θ, half a byte
of codes and the block's window rows, and writes θ, the codes and one window row. bf16 values
are rounded to nearest-even with integer arithmetic and stored as their int16 bit patterns,
which the interpreter (whose float32 → bf16 conversion truncates) and a GPU do alike.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from optiscope.kernels.adam import RANGE_OUT, _range_add, _range_flush
from optiscope.kernels.blocks import blocks
from optiscope.kernels.cpu import MICROADAM_STATS
from optiscope.kernels.launch import address_table, chunk_map, densify, tl_dtype, write_back
from optiscope.kernels.ranges import kernel_counters, range_cuts, store_levels
from optiscope.kernels.stats import Stat, StatsRows, reduce_partials

__all__ = ["microadam_step", "max_programs", "RESIDENT_PER_SM"]

NUM_WARPS = 8  # a 4096-entry block is 16 float32 registers per thread at 8 warps
assert Stat.TOPK_TOTAL_SQ == MICROADAM_STATS - 1  # columns 0..11: up to the top-k sums

# Rows of the per-tensor metadata table (int64 [_N_FIELDS, T]).
_NUMEL = tl.constexpr(0)
_FIRST = tl.constexpr(1)    # the tensor's first block in the launch
_K_FULL = tl.constexpr(2)   # entries kept per full block
_K_TAIL = tl.constexpr(3)   # entries kept in the partial last block
_K = tl.constexpr(4)        # the length of a window row (Σ k_b)
_N_FIELDS = 5

# Rows of the address table (int64 [7, T]).
_P, _G, _ERR, _LO, _HI, _I, _V = (tl.constexpr(i) for i in range(7))


@triton.jit
def _bf16_bits(x):
    """float32 → the bit pattern of the nearest bf16 (ties to even), as int32 (low 16 bits)."""
    b = x.to(tl.int32, bitcast=True)
    return (b + 0x7FFF + ((b >> 16) & 1)) >> 16


@triton.jit
def _from_bf16_bits(b):
    """The bit pattern of a bf16 (int16 or int32) → its float32 value."""
    return (b.to(tl.int32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _microadam_kernel(
    addr_ptr, meta_ptr, n_tensors, task_tensor_ptr, n_tasks, scratch_ptr, partial_ptr,
    w1_ptr, w2_ptr, m, slot, c1, c2, eps, lr, decay,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, HAS_WD: tl.constexpr,
    WITH_STATS: tl.constexpr, BLOCK: tl.constexpr, QBS: tl.constexpr, N_Q: tl.constexpr,
    HALF: tl.constexpr, KPAD: tl.constexpr, NCOLS: tl.constexpr,
    ranges_ptr, cuts_ptr, WITH_RANGES: tl.constexpr, NCUTS: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    kofs = tl.arange(0, KPAD)
    qofs = tl.arange(0, N_Q)
    bofs = tl.arange(0, HALF)
    s1_ptr = scratch_ptr + pid.to(tl.int64) * (2 * BLOCK)
    s2_ptr = s1_ptr + BLOCK
    for task in range(pid, n_tasks, tl.num_programs(0)):
        t = tl.load(task_tensor_ptr + task)
        numel = tl.load(meta_ptr + _NUMEL * n_tensors + t)
        b = task - tl.load(meta_ptr + _FIRST * n_tensors + t)
        start = b.to(tl.int64) * BLOCK
        length = tl.minimum(numel - start, BLOCK)
        k_full = tl.load(meta_ptr + _K_FULL * n_tensors + t)
        kb = tl.where(length == BLOCK, k_full, tl.load(meta_ptr + _K_TAIL * n_tensors + t))
        row0 = b * k_full  # the block's first column in a window row
        k_row = tl.load(meta_ptr + _K * n_tensors + t)
        p_ptr = tl.load(addr_ptr + _P * n_tensors + t).to(tl.pointer_type(P_DTYPE))
        g_ptr = tl.load(addr_ptr + _G * n_tensors + t).to(tl.pointer_type(G_DTYPE))
        err_ptr = tl.load(addr_ptr + _ERR * n_tensors + t).to(tl.pointer_type(tl.uint8))
        lo_ptr = tl.load(addr_ptr + _LO * n_tensors + t).to(tl.pointer_type(tl.int16))
        hi_ptr = tl.load(addr_ptr + _HI * n_tensors + t).to(tl.pointer_type(tl.int16))
        i_ptr = tl.load(addr_ptr + _I * n_tensors + t).to(tl.pointer_type(tl.int16))
        v_ptr = tl.load(addr_ptr + _V * n_tensors + t).to(tl.pointer_type(tl.int16))
        mask = offs < length
        # Each pointer moved to the block's start once, so that the entries' offsets stay the
        # int32 `offs`: 64-bit offsets `start + offs` of 16 entries a thread held 32 registers
        # for the whole block, and took Triton 3.3 and 3.6 past 255 with the range counts
        # (python -m optiscope.kernels.inspect --only microadam)
        p_ptr += start
        g_ptr += start
        err_ptr += start // 2
        lo_ptr += start // QBS
        hi_ptr += start // QBS
        out = partial_ptr + task * NCOLS  # the block's statistics row
        range_ptr = ranges_ptr + t * (3 * RANGE_OUT)  # the tensor's counts (WITH_RANGES)

        # 1. a = g + Q⁻¹(e_t); block starts are even, so even offsets are high nibbles
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if WITH_STATS:  # each statistic as soon as its inputs exist: none stays live to the end
            finite = tl.abs(g) < float("inf")  # false for ±inf and NaN
            tl.store(out + 0, tl.sum(g * g, axis=0))
            tl.store(out + 1, tl.max(tl.where(finite, tl.abs(g), float("inf")), axis=0))
            tl.store(out + 2, tl.sum(tl.where(finite | ~mask, 0.0, 1.0), axis=0))
        byte = tl.load(err_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
        code = tl.where(offs % 2 == 0, byte >> 4, byte & 15).to(tl.float32)
        lo = _from_bf16_bits(tl.load(lo_ptr + offs // QBS, mask=mask, other=0))
        hi = _from_bf16_bits(tl.load(hi_ptr + offs // QBS, mask=mask, other=0))
        a = g + (code * tl.div_rn(hi - lo, 15.0) + lo)

        # 2. top-k: T = the largest bit pattern with at least kb entries at or above it
        bits = tl.where(mask, tl.abs(a).to(tl.int32, bitcast=True), -1)
        threshold = 0
        for i in tl.static_range(31):
            candidate = threshold | (1 << (30 - i))
            count = tl.sum((bits >= candidate).to(tl.int32), axis=0)
            threshold = tl.where(count >= kb, candidate, threshold)
        above = bits > threshold
        tied = (bits == threshold).to(tl.int32)
        tied_before = tl.cumsum(tied, axis=0) - tied
        keep = above | ((tied != 0) & (tied_before < kb - tl.sum(above.to(tl.int32), axis=0)))
        kept = keep.to(tl.int32)
        column = tl.cumsum(kept, axis=0) - kept  # int32, from the block's first column on
        cell = slot * k_row + row0  # the block's first column in this step's window row
        tl.store(i_ptr + cell + column, offs.to(tl.int16), mask=keep)
        tl.store(v_ptr + cell + column, _bf16_bits(a).to(tl.int16), mask=keep)
        if WITH_STATS:
            tl.store(out + 10, tl.sum(tl.where(keep, a * a, 0.0), axis=0))
            tl.store(out + 11, tl.sum(a * a, axis=0))

        # 3. the residual, quantized into the next error feedback
        r = tl.where(keep, 0.0, a)
        qmask = qofs * QBS < length  # buckets past the tensor's end hold no entries
        q_lo = tl.min(tl.reshape(tl.where(mask, r, float("inf")), [N_Q, QBS]), axis=1)
        q_hi = tl.max(tl.reshape(tl.where(mask, r, float("-inf")), [N_Q, QBS]), axis=1)
        q_lo_bits = _bf16_bits(tl.where(qmask, q_lo, 0.0))
        q_hi_bits = _bf16_bits(tl.where(qmask, q_hi, 0.0))
        tl.store(lo_ptr + qofs, q_lo_bits.to(tl.int16), mask=qmask)
        tl.store(hi_ptr + qofs, q_hi_bits.to(tl.int16), mask=qmask)
        q_lo = _from_bf16_bits(q_lo_bits)
        scale = tl.div_rn(_from_bf16_bits(q_hi_bits) - q_lo, 15.0)
        lo_e = tl.reshape(tl.broadcast_to(q_lo[:, None], [N_Q, QBS]), [BLOCK])
        scale_e = tl.reshape(tl.broadcast_to(scale[:, None], [N_Q, QBS]), [BLOCK])
        # u = 0 (a constant bucket) stores code 0; codes past the bf16-rounded bounds are
        # clamped (16 would overflow into the neighbouring nibble)
        q = tl.floor(tl.div_rn(r - lo_e, tl.where(scale_e == 0, 1.0, scale_e)) + 0.5)
        q = tl.where((scale_e == 0) | (q != q) | ~mask, 0.0, q)
        q = tl.minimum(tl.maximum(q, 0.0), 15.0)
        nibbles = tl.split(tl.reshape(q.to(tl.int32), [HALF, 2]))
        packed = (nibbles[0] * 16 + nibbles[1]).to(tl.uint8)
        tl.store(err_ptr + bofs, packed, mask=bofs * 2 < length)
        if WITH_STATS:
            err = tl.where(mask, r - (q * scale_e + lo_e), 0.0)
            tl.store(out + 8, tl.sum(err * err, axis=0))
            tl.store(out + 9, tl.sum(r * r, axis=0))

        # 4. the window's sums, row by row in row order, in the program's scratch
        tl.debug_barrier()  # this block's new row is in memory for every thread
        tl.store(s1_ptr + offs, tl.zeros([BLOCK], dtype=tl.float32))
        tl.store(s2_ptr + offs, tl.zeros([BLOCK], dtype=tl.float32))
        tl.debug_barrier()
        kmask = kofs < kb
        for rr in range(0, m):
            where = tl.load(i_ptr + rr * k_row + row0 + kofs, mask=kmask, other=0).to(tl.int32)
            v = _from_bf16_bits(tl.load(v_ptr + rr * k_row + row0 + kofs, mask=kmask, other=0))
            w1 = tl.load(w1_ptr + rr)
            w2 = tl.load(w2_ptr + rr)
            s1 = tl.load(s1_ptr + where, mask=kmask, other=0.0)
            tl.store(s1_ptr + where, s1 + v * w1, mask=kmask)
            s2 = tl.load(s2_ptr + where, mask=kmask, other=0.0)
            tl.store(s2_ptr + where, s2 + (v * v) * w2, mask=kmask)
            tl.debug_barrier()
        s1 = tl.load(s1_ptr + offs, mask=mask, other=0.0)
        s2 = tl.load(s2_ptr + offs, mask=mask, other=0.0)
        tl.debug_barrier()  # the scratch is free for the next block

        # 5. decoupled weight decay and the update; u = 0 outside the window (S1 = 0)
        m_hat = c1 * s1
        v_hat = c2 * s2
        denominator = tl.where(s1 == 0, 1.0, tl.sqrt_rn(v_hat) + eps)  # no 0/0 when eps = 0
        u = tl.where(s1 == 0, 0.0, tl.div_rn(m_hat, denominator))
        p0 = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        p = p0
        if HAS_WD:
            p = p * decay
        p_out = (p - lr * u).to(P_DTYPE)
        tl.store(p_ptr + offs, p_out, mask=mask)

        if WITH_STATS:
            p1 = tl.where(mask, p_out.to(tl.float32), 0.0)
            d = p1 - p0
            tl.store(out + 3, tl.sum(p0 * p0, axis=0))
            tl.store(out + 4, tl.sum(p1 * p1, axis=0))
            tl.store(out + 5, tl.sum(d * d, axis=0))
            tl.store(out + 6, tl.sum(m_hat * m_hat, axis=0))
            tl.store(out + 7, tl.sum(v_hat * v_hat, axis=0))
            if WITH_RANGES:
                # lanes past the tensor's end hold g = θ⁺ − θ⁻ = v̂ = 0: taken off. g is read
                # again (from cache) here: counted where it is first read, its counts' registers
                # made the kernel spill (python -m optiscope.kernels.inspect --only microadam)
                g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                hist, levels = _range_add(g, tl.zeros([256], dtype=tl.int32),
                                          tl.zeros([16], dtype=tl.int32), cuts_ptr, NCUTS)
                _range_flush(range_ptr, hist, levels, BLOCK - length, NCUTS)
                hist, levels = _range_add(d, tl.zeros([256], dtype=tl.int32),
                                          tl.zeros([16], dtype=tl.int32), cuts_ptr, NCUTS)
                _range_flush(range_ptr + RANGE_OUT, hist, levels, BLOCK - length, NCUTS)
                hist, levels = _range_add(v_hat, tl.zeros([256], dtype=tl.int32),
                                          tl.zeros([16], dtype=tl.int32), cuts_ptr, NCUTS)
                _range_flush(range_ptr + 2 * RANGE_OUT, hist, levels, BLOCK - length,
                             NCUTS)


# Blocks of `_microadam_kernel` resident per SM at the default 4096-entry block: it holds 224-242
# registers per thread at 8 warps on sm_80 and sm_90 with Triton 3.9, 255 with the range counts
# and on 3.3-3.6 (`python -m optiscope.kernels.inspect`), so one block fills the register file;
# more programs than that would run in waves, each with its own scratch (16 warps, tried for the
# range counts, spilled more: 120-208 B at 128 registers). tests/test_kernels_compile.py checks
# this against the compiled kernel.
RESIDENT_PER_SM = 1


def max_programs(device: torch.device, tasks: int) -> int:
    """Programs of one launch: each loops over blocks and owns a scratch of two blocks, so on a
    GPU as many as are resident at once (`RESIDENT_PER_SM` per SM) rather than one per block;
    under the interpreter, one per block."""
    if device.type != "cuda":
        return max(1, tasks)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(tasks, RESIDENT_PER_SM * sms))


@functools.lru_cache(maxsize=128)
def _meta(numels: tuple[int, ...], size: int, k_init: float, device: torch.device) -> Tensor:
    fields = [[0] * len(numels) for _ in range(_N_FIELDS)]
    first = 0
    for i, n in enumerate(numels):
        layout = blocks(n, size, k_init)
        for f, value in enumerate((n, first, layout.k_full, layout.k_tail, layout.k)):
            fields[f][i] = value
        first += max(1, layout.count)  # as `chunk_map` counts: an empty tensor has one block
    return torch.tensor(fields, dtype=torch.int64).to(device)


def microadam_step(
    params: list[Tensor], grads: list[Tensor], errors: list[Tensor], min_vals: list[Tensor],
    max_vals: list[Tensor], indices: list[Tensor], values: list[Tensor], *, slot: int,
    w1: Tensor, w2: Tensor, c1: float, c2: float, lr: float, eps: float, weight_decay: float,
    k_init: float, quant_block_size: int, topk_block_size: int, stats: StatsRows | None,
) -> None:
    """One MicroAdam step over tensors that share device and dtypes: one launch.

    Args:
        params, grads: the tensors, one entry per parameter; gradients are only read.
        errors, min_vals, max_vals, indices, values: the state (``error``, ``min_vals``,
            ``max_vals``, ``I``, ``V``), one entry per parameter.
        slot: the window row this step writes, (t − 1) mod m.
        w1, w2: float32 ``[m]``, β1 and β2 to the age of each window row.
        c1, c2: the bias-correction factors (1 − β)/(1 − β^t).
        lr, eps, weight_decay, k_init, quant_block_size, topk_block_size: hyperparameters.
        stats: where to write the statistics rows (`Stat` columns 0..11), or None to skip them;
            with ``stats.ranges``, also the range counts of g, θ⁺ − θ⁻ and v̂, in the pass.
    """
    if not params:
        return
    device = params[0].device
    n = len(params)
    (params, grads), pairs = densify([params, grads], writable=[True, False], row_major=True)
    numels = tuple(p.numel() for p in params)
    cmap = chunk_map(numels, topk_block_size, device)
    programs = max_programs(device, cmap.n_chunks)
    scratch = torch.empty(programs * 2 * topk_block_size, dtype=torch.float32, device=device)
    addresses = address_table([params, grads, errors, min_vals, max_vals, indices, values], n,
                              device)
    partials = (torch.empty((cmap.n_chunks, MICROADAM_STATS), dtype=torch.float32, device=device)
                if stats is not None else scratch)  # any pointer: not touched without stats
    k_full = blocks(topk_block_size, topk_block_size, k_init).k_full
    with_ranges = stats is not None and stats.ranges is not None
    # without them, any pointer: not touched
    cuts, ranges = kernel_counters(n, device) if with_ranges else (scratch, scratch)
    _microadam_kernel[(programs,)](
        addresses, _meta(numels, topk_block_size, float(k_init), device), n, cmap.chunk_tensor,
        cmap.n_chunks, scratch, partials, w1.to(device), w2.to(device), indices[0].shape[0],
        slot, *(float(x) for x in (c1, c2, eps, lr, 1.0 - lr * weight_decay)),
        P_DTYPE=tl_dtype(params[0].dtype), G_DTYPE=tl_dtype(grads[0].dtype),
        HAS_WD=weight_decay != 0, WITH_STATS=stats is not None, BLOCK=topk_block_size,
        QBS=quant_block_size, N_Q=topk_block_size // quant_block_size,
        HALF=topk_block_size // 2, KPAD=triton.next_power_of_2(k_full), NCOLS=MICROADAM_STATS,
        ranges_ptr=ranges, cuts_ptr=cuts, WITH_RANGES=with_ranges, NCUTS=len(range_cuts()),
        num_warps=NUM_WARPS,
    )
    write_back(pairs)
    if stats is not None:
        reduce_partials(partials, cmap.counts, stats, MICROADAM_STATS)
    if with_ranges:
        store_levels(stats.ranges, stats.row_index(), ranges)
