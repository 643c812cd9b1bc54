"""The fixed random coordinate sample on which statistics that need a copy are computed.

Drift compares v with v from an earlier step, and a foreign optimizer's update norm compares θ
with θ before the step: both need a copy of a large tensor. The monitor keeps that copy only at a
fixed, uniformly random subset of coordinates per tensor, so its own memory stays a small,
stated fraction of the model's: by default 1/512 of each tensor's entries (at least 16, at most
65,536), 8 bytes per sampled entry (an int32 index and a float32 value), i.e. 0.4% of fp32 or
0.8% of bf16 parameter bytes. Tensors smaller than their sample are used whole: exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from optiscope.kernels import cpu

__all__ = ["AUTO_FRACTION", "AUTO_MIN", "AUTO_MAX", "sample_count", "CoordinateSample"]

AUTO_FRACTION = 1 / 512
AUTO_MIN = 16
AUTO_MAX = 65_536


def sample_count(numel: int, sample_size: int | None) -> int:
    """Coordinates sampled from a tensor of ``numel`` entries (``numel`` means exact).

    Args:
        numel: the tensor's size.
        sample_size: at most this many per tensor, or None for the automatic budget.
    """
    if sample_size is not None:
        return min(numel, sample_size)
    return min(numel, max(AUTO_MIN, min(AUTO_MAX, math.ceil(numel * AUTO_FRACTION))))


@dataclass
class CoordinateSample:
    """A fixed subset of a tensor's flat coordinates.

    Attributes:
        numel: the tensor's size.
        index: sorted flat coordinates on the tensor's device, or None when the sample is the
            whole tensor (no index is stored then).
    """

    numel: int
    index: Tensor | None

    @classmethod
    def draw(cls, numel: int, count: int, device: torch.device, generator: torch.Generator
             ) -> "CoordinateSample":
        """A uniformly random subset of ``count`` of ``numel`` coordinates (all when equal)."""
        if count >= numel:
            return cls(numel, None)
        if count * 4 > numel:
            chosen = torch.randperm(numel, generator=generator)[:count]
        else:  # randperm of a 10^8-entry tensor would cost 800 MB; draw, dedupe, top up
            chosen = torch.empty(0, dtype=torch.int64)
            while chosen.numel() < count:
                extra = torch.randint(numel, (count - chosen.numel() + count // 8 + 8,),
                                      generator=generator)
                chosen = torch.unique(torch.cat([chosen, extra]))
            chosen = chosen[torch.randperm(chosen.numel(), generator=generator)[:count]]
        dtype = torch.int32 if numel < 2**31 else torch.int64
        return cls(numel, chosen.sort().values.to(dtype).to(device))

    @property
    def count(self) -> int:
        return self.numel if self.index is None else self.index.numel()

    @property
    def scale(self) -> float:
        """numel / count: turns a sum over the sample into an estimate of the full sum."""
        return self.numel / max(self.count, 1)

    def take(self, tensor: Tensor) -> Tensor:
        """The sampled entries of ``tensor`` as float32 (a copy when the sample is the whole)."""
        flat = tensor.detach().reshape(-1)
        if self.index is None:
            return flat.to(torch.float32, copy=True)
        return cpu.take_f32(flat, self.index)

    def nbytes(self) -> int:
        return 0 if self.index is None else self.index.numel() * self.index.element_size()
