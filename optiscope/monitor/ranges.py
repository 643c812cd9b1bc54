"""Dynamic range of g, θ⁺ − θ⁻ and v on a sampled step: log2 histograms and low-precision shares.

The counts (kernels/ranges.py: layout, bins, thresholds, the torch reference) are taken on the
concatenated coordinate samples of all stepped tensors (a handful of ops whatever the number of
tensors, no host synchronisation), scaled by each tensor's sample scale (numel / sampled
entries) so that they add across tensors and DDP/FSDP shards, and written into the per-tensor
rows (`range_cols`); a sample covering the whole tensor gives exact counts. With
``range_probes="exact"`` a bundled optimizer that counts every entry replaces them
(`StepStats.ranges`, `RangeProbe.exact`): in its kernel's pass where it has one (Adam/AdamW's C
and Triton kernels, MicroAdam's, Adafactor's Triton update), by a pass of its own elsewhere
(docs/optimizers.md has the table).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from optiscope.kernels.ranges import FORMAT_LIMITS, RANGE_QUANTITIES, range_counts
from optiscope.monitor.metrics import range_cols

__all__ = ["FORMAT_LIMITS", "RangeProbe", "range_counts", "write_counts", "histograms_of"]


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

    def add(self, quantity: str, where: list[int], x: Tensor, lengths: list[int],
            scales: list[float]) -> None:
        """Counts ``x``, the concatenated samples of the tensors ``where`` (after `begin`, before
        `end`, which writes every count of the step)."""
        counts = range_counts(x, self._on(lengths, x.device),
                              self._on([float(s) for s in scales], x.device))
        self._counts.append((where, quantity, counts))

    def begin(self, active: list[int], samples: list, grads: list[Tensor], params: list[Tensor],
              grad_scale: Tensor | None, before: list[Tensor] | None) -> None:
        """Before the step: the gradients' counts, and θ at the samples (``before`` when the
        collector took them already). Sparse gradients are left out."""
        self._counts = []
        keep = [j for j, g in enumerate(grads) if not g.is_sparse]
        values = [samples[j].take(grads[j]) for j in keep]
        if values:
            x = torch.cat(values)
            if grad_scale is not None:  # a fused step's gradients are still scaled
                x = x / grad_scale.detach().to(x.device, torch.float32).reshape(())
            self.add("grad", [active[j] for j in keep], x, [v.numel() for v in values],
                      [samples[j].scale for j in keep])
        self._before = before if before else [s.take(p) for s, p in zip(samples, params)]

    def end(self, rows: Tensor, active: list[int], samples: list, params: list[Tensor],
            after: list[Tensor] | None = None) -> None:
        """After the step: the updates' counts; then every count goes into ``rows``."""
        if self._before:
            after = after if after is not None else [s.take(p) for s, p in zip(samples, params)]
            self.add("update", active, torch.cat(after) - torch.cat(self._before),
                      [a.numel() for a in after], [s.scale for s in samples])
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


    def exact(self, rows: Tensor, where: Tensor, ranges: Tensor) -> None:
        """Replaces the sample's counts by an optimizer's whole-tensor counts (``ranges``:
        `StepStats.ranges`, the stats' tensors at rows ``where``), for the tensors it counted."""
        counted = ~torch.isnan(ranges[:, 0, 0])
        if not counted.any():
            return
        at = where.to(ranges.device)[counted]
        for q, quantity in enumerate(RANGE_QUANTITIES):
            write_counts(rows, at.to(rows.device), quantity, ranges[counted, q])


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
