"""Dynamic range of g, θ⁺ − θ⁻ and v on a sampled step: log2 histograms and low-precision shares.

For each quantity the monitor counts, on the concatenated coordinate samples of all stepped
tensors (a handful of ops whatever the number of tensors, no host synchronisation):

* a histogram of log2|x| in the fixed bins of `optiscope.monitor.metrics` (``EXP_MIN``,
  ``EXP_MAX``: zero, below, one bin per binary exponent, above, non-finite), found exactly from
  the float's exponent (``frexp``), not from a rounded log;
* the entries a cast to bf16, fp16, fp8 e4m3 (``float8_e4m3fn``) or fp8 e5m2 would flush to zero
  (nonzero → 0) or overflow, by exact comparison with the thresholds round-to-nearest-even
  implies: a nonzero |x| at most half the format's smallest subnormal becomes 0 (the tie goes to
  the even 0); a finite |x| at or above the midpoint between the largest finite value and the
  next power step becomes inf (fp16 65520, e5m2 61440). e4m3fn has no inf and torch's cast
  saturates (1e30 and even inf become 448): there an overflow is an |x| above 464, which the
  cast returns as ±448 with more than half an ulp of error.

Counts are scaled by each tensor's sample scale (numel / sampled entries), so that they add
across tensors and DDP/FSDP shards, and are written into the per-tensor rows (`range_cols`);
a sample covering the whole tensor gives exact counts.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from optiscope.monitor.metrics import (EXP_MAX, EXP_MIN, HIST_BINS, RANGE_QUANTITIES,
                                        RANGE_SHARES, range_cols)

__all__ = ["FORMAT_LIMITS", "RangeProbe", "range_counts", "write_counts", "bin_edges",
           "histograms_of"]

# (largest |x| that becomes 0, smallest |x| that overflows) of a cast from float32
FORMAT_LIMITS: dict[str, tuple[float, float]] = {
    "bf16": (2.0 ** -134, 255.5 * 2.0 ** 120),
    "fp16": (2.0 ** -25, 65520.0),
    "fp8e4m3": (2.0 ** -10, float.fromhex("0x1.d00002p+8")),  # the next float32 above 464
    "fp8e5m2": (2.0 ** -17, 61440.0),
}


def bin_edges() -> list[float]:
    """The exponents that bound the histogram's bins 2..HIST_BINS-3: EXP_MIN, ..., EXP_MAX
    (bin 0: zeros, 1: below 2^EXP_MIN, HIST_BINS-2: finite at or above 2^EXP_MAX, last:
    non-finite)."""
    return [float(e) for e in range(EXP_MIN, EXP_MAX + 1)]


def range_counts(x: Tensor, lengths: Tensor, scale: Tensor) -> Tensor:
    """The counts of one quantity for each tensor of a concatenated sample.

    Args:
        x: the sampled entries of every tensor, concatenated (float32).
        lengths: int64 ``[n]``, entries of each tensor in ``x``.
        scale: ``[n]``, each tensor's numel / sampled entries.

    Returns:
        float64 ``[n, 1 + len(RANGE_SHARES) + HIST_BINS]``: entries, share counts, histogram,
        in the order of `range_cols`' block.
    """
    n = lengths.numel()
    device = x.device
    x = x.to(torch.float32)
    seg = torch.repeat_interleave(torch.arange(n, device=device), lengths, output_size=x.numel())
    a = x.abs()
    finite = a <= torch.finfo(torch.float32).max
    exponent = torch.frexp(a).exponent - 1  # |x| in [2^e, 2^(e+1)): exact, unlike log2
    index = torch.clamp(exponent - (EXP_MIN - 2), 1, HIST_BINS - 2)
    index = torch.where(a == 0, 0, torch.where(finite, index, HIST_BINS - 1))
    # index_add_, not bincount: bincount reads the largest index back to the host
    hist = torch.zeros(n * HIST_BINS, dtype=torch.float64, device=device)
    hist.index_add_(0, seg * HIST_BINS + index, torch.ones_like(a, dtype=torch.float64))
    masks = []
    for fmt, what in RANGE_SHARES:
        under, over = FORMAT_LIMITS[fmt]
        masks.append((a > 0) & (a <= under) if what == "underflow" else finite & (a >= over))
    shares = torch.zeros(n, len(RANGE_SHARES), dtype=torch.float64, device=device)
    shares.index_add_(0, seg, torch.stack(masks, dim=1).to(torch.float64))
    counts = torch.cat([lengths.to(torch.float64)[:, None], shares, hist.view(n, HIST_BINS)], 1)
    return counts * scale.to(device, torch.float64)[:, None]


def write_counts(rows: Tensor, where: Tensor, quantity: str, counts: Tensor) -> None:
    """Puts `range_counts`' result for the tensors ``where`` into their rows."""
    first, _, hist = range_cols(quantity)
    rows[where, first:hist.stop] = counts.to(rows.device, rows.dtype)


class RangeProbe:
    """The collector's hook: concatenates this step's samples and counts them.

    Args:
        on: the collector's cache of small host lists as device tensors (lengths, scales, rows).
    """

    def __init__(self, on):
        self._on = on
        self._counts: list[tuple[list[int], str, Tensor]] = []
        self._before: list[Tensor] | None = None

    def _add(self, quantity: str, where: list[int], values: list[Tensor], scales: list[float]):
        if not values:
            return
        device = values[0].device
        counts = range_counts(torch.cat(values), self._on([v.numel() for v in values], device),
                              self._on([float(s) for s in scales], device))
        self._counts.append((where, quantity, counts))

    def begin(self, active: list[int], samples: list, grads: list[Tensor], params: list[Tensor],
              grad_scale: Tensor | None, before: list[Tensor] | None) -> None:
        """Before the step: the gradients' counts, and θ at the samples (``before`` when the
        collector took them already). Sparse gradients are left out."""
        self._counts = []
        keep = [j for j, g in enumerate(grads) if not g.is_sparse]
        values = [samples[j].take(grads[j]) for j in keep]
        if grad_scale is not None and values:  # a fused step's gradients are still scaled
            inv = 1.0 / grad_scale.detach().to(values[0].device, torch.float32).reshape(())
            values = [v * inv for v in values]
        self._add("grad", [active[j] for j in keep], values, [samples[j].scale for j in keep])
        self._before = before if before else [s.take(p) for s, p in zip(samples, params)]

    def end(self, rows: Tensor, active: list[int], samples: list, params: list[Tensor],
            after: list[Tensor] | None = None) -> None:
        """After the step: the updates' counts; then every count goes into ``rows``."""
        if self._before is not None:
            after = after if after is not None else [s.take(p) for s, p in zip(samples, params)]
            self._add("update", active, [a - b for a, b in zip(after, self._before)],
                      [s.scale for s in samples])
            self._before = None
        for where, quantity, counts in self._counts:
            write_counts(rows, self._on(where, rows.device), quantity, counts)
        self._counts = []

    def moment2(self, rows: Tensor, where: list[int], v: Tensor, lengths: list[int],
                scales: list[float]) -> None:
        """v at the samples, already concatenated by the collector."""
        if not where:
            return
        counts = range_counts(v, self._on(lengths, v.device),
                              self._on([float(s) for s in scales], v.device))
        write_counts(rows, self._on(where, rows.device), "moment2", counts)


def histograms_of(rows, scopes: list[str]) -> dict:
    """The histograms of one decoded sample: ``{quantity: (scopes, counts)}``, counts a float64
    ``[n, HIST_BINS]`` array of whole numbers (scaled counts rounded), for the tensors whose
    row has them (``rows``: the host rows of the stepped tensors, ``scopes`` their names)."""
    out = {}
    for quantity in RANGE_QUANTITIES:
        block = rows[:, range_cols(quantity)[2]]
        have = ~np.isnan(block).any(axis=1)
        if have.any():
            out[quantity] = ([s for s, h in zip(scopes, have) if h], np.rint(block[have]))
    return out
