"""The top-k blocks of MicroAdam's flattened tensors: how many entries each block keeps.

Shared by the Triton kernel (`optiscope.kernels.microadam`, which sizes its launch from them) and
the optimizer (`optiscope.optimizers.microadam`, which sizes its window and runs the torch
backend); kept apart from the kernel so that the optimizer does not need Triton to import it.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Blocks", "blocks"]


class Blocks(NamedTuple):
    """The top-k blocks of one flattened tensor: ``n_full`` blocks of ``size`` entries keeping
    ``k_full`` each, then a partial block of ``tail`` entries keeping ``k_tail`` (0 when none)."""

    size: int
    n_full: int
    k_full: int
    tail: int
    k_tail: int

    @property
    def k(self) -> int:
        """Entries kept per step: the length of a row of ``I`` and ``V``."""
        return self.n_full * self.k_full + self.k_tail

    @property
    def count(self) -> int:
        return self.n_full + (self.tail > 0)

    def column_starts(self, device: torch.device) -> Tensor:
        """int64 ``[k]``: the flat index where the block of each column of ``I`` starts."""
        return _column_starts(self, device)


@functools.lru_cache(maxsize=1024)
def blocks(numel: int, size: int, k_init: float) -> Blocks:
    """The top-k blocks of a tensor of ``numel`` entries (blocks of ``size``, density k_init)."""
    n_full, tail = divmod(numel, size)
    return Blocks(size, n_full, math.ceil(k_init * size), tail,
                  math.ceil(k_init * tail) if tail else 0)


@functools.lru_cache(maxsize=256)
def _column_starts(layout: Blocks, device: torch.device) -> Tensor:
    starts = torch.arange(layout.count, dtype=torch.int64) * layout.size
    counts = torch.tensor([layout.k_full] * layout.n_full + ([layout.k_tail] if layout.tail else []),
                          dtype=torch.int64)
    return torch.repeat_interleave(starts, counts).to(device)
