"""``x.reshape(-1)[index]`` of many tensors in one Triton launch per dtype pair (`gather`).

The monitor keeps a fixed coordinate sample of each large tensor (θ before and after a foreign
optimizer's step, v for drift) and gathers the sampled blocks for the top-k probe. As torch ops
that is an ``index_select`` and a conversion per tensor: at GPT-2 small's structure, 150 of the
monitor's ops per sampled step, each a launch on a GPU. Here the gathered entries of every tensor
go into one float32 buffer, over a chunk map of the index lengths (`kernels.launch`): row 0 of
the address table holds the tensors, row 1 their index tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from optiscope.kernels.chunked import program_chunk, role_ptr
from optiscope.kernels.launch import (NUM_WARPS, address_table, chunk_map, densify,
                                     launch_groups, plain_on, tl_dtype)

__all__ = ["gather", "applies"]

# Samples are a few hundred to 65,536 entries per tensor: one block per program.
BLOCK = 1024
_INDEX = {torch.int32: tl.int32, torch.int64: tl.int64}


@triton.jit
def _gather_kernel(addr_ptr, n_tensors, count_ptr, chunk_tensor_ptr, chunk_first_ptr, out_ptr,
                   offset_ptr, X_DTYPE: tl.constexpr, I_DTYPE: tl.constexpr,
                   ROW: tl.constexpr, BLOCK: tl.constexpr):
    pid, t, start = program_chunk(chunk_tensor_ptr, chunk_first_ptr, BLOCK)
    count = tl.load(count_ptr + t)
    x_ptr = role_ptr(addr_ptr, n_tensors, t, 0, X_DTYPE)
    i_ptr = role_ptr(addr_ptr, n_tensors, t, 1, I_DTYPE)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < count
    if ROW == 1:  # entries
        index = tl.load(i_ptr + offs, mask=mask, other=0).to(tl.int64)
    else:  # rows of ROW entries: entry c of the row the index names
        row = tl.load(i_ptr + offs // ROW, mask=mask, other=0).to(tl.int64)
        index = row * ROW + offs % ROW
    x = tl.load(x_ptr + index, mask=mask, other=0.0)
    tl.store(out_ptr + tl.load(offset_ptr + t) + offs, x.to(tl.float32), mask=mask)


def applies(tensors: list[Tensor], indices: list[Tensor],
            devices: tuple[str, ...] = ("cuda",)) -> bool:
    """True when `gather` takes these: plain floating tensors and int32/int64 indices, all on one
    device of a type in ``devices`` (by default CUDA; on a CPU the C gather is one call a
    tensor without a launch, and the interpreter is slow)."""
    return (len(tensors) == len(indices) and plain_on(tensors, devices)
            and all(i.device == tensors[0].device and i.dtype in _INDEX and i.dim() == 1
                    for i in indices))


def gather(tensors: list[Tensor], indices: list[Tensor], row: int = 1) -> Tensor:
    """float32 concatenation of ``tensors[i].reshape(-1)[indices[i]]`` over ``i`` (the caller
    splits it by the index lengths); with ``row`` > 1, of the rows ``indices[i]`` of
    ``tensors[i].reshape(-1, row)`` instead (the top-k probe's sampled blocks). Indices must lie
    in range: they are not checked (the monitor draws them from the tensors' sizes). One launch
    per (dtype, index dtype)."""
    device = tensors[0].device
    counts = [i.numel() * row for i in indices]
    out = torch.empty(sum(counts), dtype=torch.float32, device=device)
    starts = [0]
    for c in counts[:-1]:
        starts.append(starts[-1] + c)
    keys = [(t.dtype, i.dtype) for t, i in zip(tensors, indices)]
    for (dtype, idtype), where in launch_groups(keys).items():
        group = [tensors[k].detach() for k in where]
        index = [indices[k].contiguous() for k in where]
        # the indices are of the row-major order: a tensor laid out otherwise is read from a
        # contiguous copy, as reshape(-1) would make
        (group, index), _ = densify([group, index], writable=[False, False], row_major=True)
        cmap = chunk_map(tuple(counts[k] for k in where), BLOCK, device)
        offsets = torch.tensor([starts[k] for k in where], dtype=torch.int64).to(
            device, non_blocking=True)
        _gather_kernel[(cmap.n_chunks,)](
            address_table([group, index], len(group), device), len(group), cmap.numels,
            cmap.chunk_tensor, cmap.chunk_first, out, offsets, X_DTYPE=tl_dtype(dtype),
            I_DTYPE=_INDEX[idtype], ROW=row, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out
