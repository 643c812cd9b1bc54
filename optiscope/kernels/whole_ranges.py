"""The range counts of whole tensors (`whole_counts`), for the steps made of torch ops, which have
no pass of their own to count in: an extra pass over each tensor.

In C (cpu_kernels.c's ``optiscope_range_count_f32``, the counting of the kernels' own passes) for
float32 CPU tensors, else in torch ops (`kernels.ranges.counts_of`), in `range_counts`' layout.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch
from torch import Tensor

from optiscope.kernels import cpu
from optiscope.kernels.ranges import RANGE_BLOCK, counts_of, range_cuts, range_levels

__all__ = ["whole_counts"]

_CUTS = np.array(range_cuts(), dtype=np.int32)


def _c_counts(x: Tensor) -> Tensor | None:
    """``[256 + len(range_cuts())]`` int64 counts of a plain float32 CPU tensor in C, or None
    when the C kernel is not available or ``x`` is not such a tensor."""
    lib = cpu.kernel()
    if lib is None or not cpu.is_plain(x, torch.float32):
        return None
    f = lib.optiscope_range_count_f32
    f.restype = None  # declared here, beside its only caller
    f.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    out = np.zeros(256 + len(_CUTS), dtype=np.uint64)
    f(x.data_ptr(), x.numel(), _CUTS.ctypes.data, out.ctypes.data, torch.get_num_threads())
    return torch.from_numpy(out.astype(np.int64))


def whole_counts(tensors: list[Tensor]) -> Tensor:
    """`range_counts` of every entry of each tensor: float64 ``[len(tensors), RANGE_BLOCK]`` on
    the CPU. An extra pass over each tensor (see the module)."""
    out = []
    for x in tensors:
        flat = x.detach().reshape(-1)
        counts = _c_counts(flat)
        if counts is None:
            counts = counts_of(flat).cpu()
        out.append(range_levels(counts[None, :256], counts[None, 256:])[0])
    return torch.stack(out) if out else torch.zeros(0, RANGE_BLOCK, dtype=torch.float64)
