"""Triton kernel for 1-bit Adam's compressed all-reduce: packing sign bits, 8 per byte.

The reference twin is `optiscope.optimizers.onebit_comm.pack_signs` (torch ops); both write, for
every 8 entries, one byte whose most significant bit is the first entry's, 1 where x >= 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["pack_signs_triton"]

# Bytes per program: 1024 bytes read 32 KiB of float32, a tile that keeps the loads coalesced.
BLOCK_BYTES = 1024


@triton.jit
def _pack_signs_kernel(x_ptr, out_ptr, n_bytes, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    byte = pid * BLOCK + tl.arange(0, BLOCK)
    bit = tl.arange(0, 8)
    mask = byte < n_bytes
    # A [BLOCK, 8] tile: row i holds the 8 entries that make byte i, read contiguously.
    x = tl.load(x_ptr + byte[:, None] * 8 + bit[None, :], mask=mask[:, None], other=0.0)
    weight = (1 << (7 - bit)).to(tl.int32)
    value = tl.sum((x >= 0).to(tl.int32) * weight[None, :], axis=1)
    tl.store(out_ptr + byte, value.to(tl.uint8), mask=mask)


def pack_signs_triton(x: Tensor) -> Tensor:
    """`optiscope.optimizers.onebit_comm.pack_signs` in one launch (``x.numel()`` a multiple of 8)."""
    if x.numel() % 8:
        raise ValueError(f"pack_signs_triton: the number of entries must be a multiple of 8, got "
                         f"{x.numel()}; zero-pad the tensor first")
    flat = x.reshape(-1).contiguous()
    out = torch.empty(flat.numel() // 8, dtype=torch.uint8, device=x.device)
    if out.numel():
        grid = (triton.cdiv(out.numel(), BLOCK_BYTES),)
        _pack_signs_kernel[grid](flat, out, out.numel(), BLOCK=BLOCK_BYTES)
    return out
