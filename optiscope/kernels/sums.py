"""Σx², max |x| and the non-finite count of many tensors in one Triton launch (`tensor_sums`).

The monitor needs these three per tensor for the tensors a foreign optimizer steps (gradients,
parameters before and after, moments). As torch ops they cost a few launches per tensor: on the
first GPU run (NVIDIA H200, GPT-2 small's 148 tensors) the monitor's sampled step with
``torch.optim.AdamW(fused=True)`` took 33 ms against a 1 ms step, most of it per-tensor norms,
extrema and counts. ``torch._foreach_norm`` gives a norm per tensor in few launches, but not
the maximum over the finite entries nor the non-finite count, which need a pass each; hence
this kernel, all three in one pass, over the same chunk map and address table as the
optimizers' kernels (`kernels.launch`).

Per chunk of `launch.CHUNK` entries of one tensor: Σx² in float64 (a finite tensor's sum stays
finite) and the count of non-finite entries, which `tensor_sums` adds over the chunks of each
tensor in a fixed order (`torch.segment_reduce`), so the same tensors give the same sums; and
max |x| over the finite entries, or inf where the chunk has another, which each program folds
into its tensor's maximum with an atomic max: the maximum does not depend on the order, and the
host has nothing left to do per column (a `segment_reduce` of its own and a `where` for the
non-finite case were six of the nine torch ops a launch cost).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from optiscope.kernels.chunked import load, program_chunk, role_ptr
from optiscope.kernels.launch import (BLOCK, CHUNK, NUM_WARPS, chunk_map, densify,
                                     launch_addresses, launch_groups, plain_on, tl_dtype)

__all__ = ["tensor_sums", "applies", "TensorSums"]


class TensorSums(NamedTuple):
    """float64 ``[n]`` columns on the tensors' device, one entry per tensor."""

    sq: Tensor  # Σx² (inf or NaN when an entry is)
    absmax: Tensor  # max |x|: inf when an entry is not finite, 0 for an empty tensor
    nonfinite: Tensor  # the count of entries that are not finite


@triton.jit
def _chunk_sums(x_ptr, start, numel, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
                MASKED: tl.constexpr):
    sq = tl.zeros([BLOCK], dtype=tl.float64)
    top = tl.zeros([BLOCK], dtype=tl.float32)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    for i in range(0, CHUNK, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        mask = offs < numel
        x = load(x_ptr, offs, mask, MASKED, 0.0)
        x64 = x.to(tl.float64)
        sq += x64 * x64
        finite = tl.abs(x) < float("inf")  # false for ±inf and NaN; masked lanes hold 0
        top = tl.maximum(top, tl.where(finite, tl.abs(x), 0.0))
        bad += tl.where(finite, 0, 1)
    return tl.sum(sq, axis=0), tl.max(top, axis=0), tl.sum(bad, axis=0)


@triton.jit
def _sums_kernel(addr_ptr, n_tensors, numel_ptr, chunk_tensor_ptr, chunk_first_ptr, out_ptr,
                 top_ptr, X_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
                 CHUNK: tl.constexpr):
    pid, t, start = program_chunk(chunk_tensor_ptr, chunk_first_ptr, CHUNK)
    numel = tl.load(numel_ptr + t)
    x_ptr = role_ptr(addr_ptr, n_tensors, t, 0, X_DTYPE, ALIGNED)
    if ALIGNED:
        if start + CHUNK <= numel:
            sq, top, bad = _chunk_sums(x_ptr, start, numel, BLOCK, CHUNK, False)
        else:
            sq, top, bad = _chunk_sums(x_ptr, start, numel, BLOCK, CHUNK, True)
    else:
        sq, top, bad = _chunk_sums(x_ptr, start, numel, BLOCK, CHUNK, True)
    row = out_ptr + pid * 2
    tl.store(row, sq)
    tl.store(row + 1, bad.to(tl.float64))
    # max |x| >= 0: non-negative doubles order as their int64 bit patterns do, so an integer
    # atomic max of the bits is the float maximum (int64 atomics: every target Triton has)
    top = tl.where(bad > 0, float("inf"), top).to(tl.float64)
    tl.atomic_max(top_ptr + t, top.to(tl.int64, bitcast=True))


def applies(tensors: list[Tensor], devices: tuple[str, ...] = ("cuda",)) -> bool:
    """True when `tensor_sums` takes these: plain floating tensors, all on one device of a type
    in ``devices`` (by default CUDA: on a CPU the C kernels sum in one pass per tensor already,
    and the interpreter is slow)."""
    return plain_on(tensors, devices)


def tensor_sums(tensors: list[Tensor]) -> TensorSums:
    """Σx², max |x| and the non-finite count of each tensor (`TensorSums`), on the tensors'
    device. One launch per dtype, and with one dtype three torch ops (the chunks' buffer, the
    maxima's, one reduction); any device Triton runs on (tests run it on CPU tensors under the
    interpreter)."""
    device = tensors[0].device
    groups = launch_groups([t.dtype for t in tensors])
    out = None
    for dtype, index in groups.items():
        group = [tensors[i].detach() for i in index]
        (group,), _ = densify([group], writable=[False])  # read-only: nothing to write back
        cmap = chunk_map(tuple(map(Tensor.numel, group)), CHUNK, device)
        addresses, is_aligned = launch_addresses([group], len(group), device)
        partials = torch.empty((cmap.n_chunks, 2), dtype=torch.float64, device=device)
        top = torch.zeros(len(group), dtype=torch.int64, device=device)
        _sums_kernel[(cmap.n_chunks,)](
            addresses, len(group), cmap.numels, cmap.chunk_tensor, cmap.chunk_first, partials,
            top, X_DTYPE=tl_dtype(dtype), ALIGNED=is_aligned, BLOCK=BLOCK, CHUNK=CHUNK,
            num_warps=NUM_WARPS)
        sums = torch.segment_reduce(partials, "sum", lengths=cmap.counts, axis=0)
        got = TensorSums(sums[:, 0], top.view(torch.float64), sums[:, 1])
        if len(groups) == 1:  # the usual case: the rows are in order already
            return got
        if out is None:
            out = TensorSums(*(torch.zeros(len(tensors), dtype=torch.float64, device=device)
                               for _ in range(3)))
        where = torch.tensor(index, device=device)
        for column, part in zip(out, got):
            column[where] = part
    return out
