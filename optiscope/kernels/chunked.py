"""Triton device functions shared by the chunked kernels (Adam's, Adafactor's passes 3 and 4).

Those kernels run one program per chunk of `launch.CHUNK` elements of one tensor of a launch
group (`launch.chunk_map`), find the tensor's storage in an address table with one row per role
(`launch.address_table`), and load and store masked only where the chunk may run past its tensor.
The pieces here are inlined by Triton into each kernel: calling them costs nothing at run time.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["load", "store", "program_chunk", "role_ptr", "grad_sums"]


@triton.jit
def load(ptr, offs, mask, MASKED: tl.constexpr, other):
    """``ptr[offs]`` as float32; masked lanes read ``other``. Unmasked (the block lies inside
    its tensor) the loads of an aligned tensor vectorise."""
    if MASKED:
        x = tl.load(ptr + offs, mask=mask, other=other)
    else:
        x = tl.load(ptr + offs)
    return x.to(tl.float32)


@triton.jit
def store(ptr, offs, x, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offs, x, mask=mask)
    else:
        tl.store(ptr + offs, x)


@triton.jit
def program_chunk(chunk_tensor_ptr, chunk_first_ptr, CHUNK: tl.constexpr):
    """This program's place: its id, the index of its tensor, and the offset of its chunk in
    that tensor (int64: a tensor may hold more than 2³¹ elements)."""
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor_ptr + pid)
    start = (pid - tl.load(chunk_first_ptr + t)).to(tl.int64) * CHUNK
    return pid, t, start


@triton.jit
def role_ptr(addr_ptr, n_tensors, t, ROLE: tl.constexpr, DTYPE: tl.constexpr,
             ALIGNED: tl.constexpr = False):
    """Tensor ``t``'s data pointer in row ``ROLE`` of the address table, typed ``DTYPE``;
    declared a multiple of 16 bytes when ``ALIGNED`` (the launcher checked every address).

    The hint is given here, on the cast that makes the pointer: Triton 3.3-3.6 attach
    `tl.multiple_of` to the op that defines its operand, and a hint given in the caller lands on
    the call, which inlining drops (their loads then stay 32-bit; Triton 3.9 keeps it)."""
    ptr = tl.load(addr_ptr + ROLE * n_tensors + t).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def grad_sums(g, mask, g_sq, g_max, g_bad, MASKED: tl.constexpr):
    """Adds one block of the gradient to its statistics: Σg², max|g| over the finite entries and
    the count of non-finite ones (masked lanes hold 0 and count as finite)."""
    finite = tl.abs(g) < float("inf")  # false for ±inf and NaN
    g_sq += tl.sum(g * g, axis=0)
    g_max = tl.maximum(g_max, tl.max(tl.where(finite, tl.abs(g), float("inf")), axis=0))
    if MASKED:
        g_bad += tl.sum(tl.where(finite | ~mask, 0.0, 1.0), axis=0)
    else:
        g_bad += tl.sum(tl.where(finite, 0.0, 1.0), axis=0)
    return g_sq, g_max, g_bad
