"""The quantization probes' blocks of many small tensors in a fixed number of ops.

`CompressionProbes` quantizes 256-entry blocks of m and v as 8- and 4-bit optimizers would. For
each tensor that took an index_select of its blocks, and for v's rank-1 normaliser (Li et al.:
min(row max, column max) of each entry) two amax of the whole tensor: GPT-2's 148 tensors cost
about 300 ops per sampled step. Here the small tensors (up to `FLAT_MAX` entries, as the flat
path takes them) are laid end to end once per step (`flatten`), their probed blocks are one
gather with an index made once, and every tensor's row and column maxima are two
``scatter_reduce`` calls over the same concatenation. Larger tensors keep the per-tensor path:
a concatenation would copy them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from optiscope.monitor.flat import FLAT_MAX, flat_eligible, flatten

__all__ = ["ProbeLayout", "takes"]


def takes(t) -> bool:
    """A moment the layout takes: a plain floating tensor of up to `FLAT_MAX` entries."""
    return flat_eligible(t) and t.is_floating_point() and t.numel() <= FLAT_MAX


class ProbeLayout:
    """The index tensors of one set of tensors' probed blocks.

    Args:
        tensors: the moments (their shapes and sizes; the values are read at each call).
        indices: each tensor's probed 256-entry blocks (None: all of them).
        block: the block length (256).
        device: where the index tensors live.
    """

    def __init__(self, tensors: list[Tensor], indices: list, block: int, device):
        gather, rows, cols, counts = [], [], [], []
        offset = row0 = col0 = 0
        for t, index in zip(tensors, indices):
            n = t.numel()
            blocks = (torch.arange(n // block, device=device) if index is None
                      else index.to(device, torch.int64))
            counts.append(blocks.numel())
            gather.append((blocks[:, None] * block
                           + torch.arange(block, device=device)).reshape(-1) + offset)
            entries = torch.arange(n, device=device)
            if t.dim() >= 2:  # its rows and columns, as `reshape(shape[0], -1)` has them
                width = n // t.shape[0]
                rows.append(row0 + torch.div(entries, width, rounding_mode="floor"))
                cols.append(col0 + entries % width)
                row0, col0 = row0 + t.shape[0], col0 + width
            else:  # a vector: its maximum for every entry (one row, one column)
                rows.append(torch.full((n,), row0, device=device))
                cols.append(torch.full((n,), col0, device=device))
                row0, col0 = row0 + 1, col0 + 1
            offset += n
        self.shapes = [(t.shape, t.dtype) for t in tensors]
        self.gather = torch.cat(gather)
        self.counts = counts
        row, col = torch.cat(rows), torch.cat(cols)
        self.row_of, self.col_of = row, col  # every entry's row and column
        self.probe_row, self.probe_col = row[self.gather], col[self.gather]
        self.n_rows, self.n_cols = row0, col0
        self.block = block

    def fits(self, tensors: list[Tensor]) -> bool:
        return [(t.shape, t.dtype) for t in tensors] == self.shapes

    def blocks(self, flat: Tensor) -> Tensor:
        """``[blocks, block]`` float64: the probed blocks of `flatten` of the tensors."""
        return flat.index_select(0, self.gather).to(torch.float64).view(-1, self.block)

    def buffers(self) -> list[Tensor]:
        """The index tensors it keeps (for the monitor's memory figure)."""
        return [self.gather, self.row_of, self.col_of, self.probe_row, self.probe_col]

    def rank1(self, flat: Tensor) -> Tensor:
        """min(row max, column max) of each probed entry (float64, the blocks' shape)."""
        x = flat.to(torch.float64)
        top_row = torch.zeros(self.n_rows, dtype=x.dtype, device=x.device).scatter_reduce_(
            0, self.row_of, x, "amax", include_self=False)
        top_col = torch.zeros(self.n_cols, dtype=x.dtype, device=x.device).scatter_reduce_(
            0, self.col_of, x, "amax", include_self=False)
        return torch.minimum(top_row[self.probe_row], top_col[self.probe_col]).view(-1, self.block)


def flat_values(tensors: list[Tensor]) -> Tensor:
    """The tensors' entries end to end (one ``cat``)."""
    return flatten([t.detach() for t in tensors])
