"""The statistics a fused optimizer step can report, and their torch reference computations.

A step that is asked for statistics writes one row of `NUM_STATS` float32 values per parameter
tensor into a small device buffer (`StatsRows`): no extra pass over tensors the step already
reads, and no host synchronisation. The monitor turns the sums into its metrics (monitor/metrics.py)
(``grad_norm = sqrt(GRAD_SQ)``, ``update_ratio = sqrt(UPDATE_SQ / PARAM_SQ_BEFORE)``, ...).

Columns are shared by every optimizer; each optimizer declares the subset it fills
(``stat_columns``), and the others stay NaN.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from optiscope.kernels import cpu

__all__ = ["Stat", "NUM_STATS", "MAX_REDUCED", "StatsRows", "StepStats", "torch_grad_stats",
           "torch_sq_norms", "sq_sum", "SUM_ROW"]


class Stat(enum.IntEnum):
    """Column of a statistics row. Sums are over the entries of one tensor."""

    GRAD_SQ = 0          # Σ g²  (g: the gradient the step consumes)
    GRAD_ABSMAX = 1      # max |g|; +inf when any entry of g is non-finite
    GRAD_NONFINITE = 2   # number of non-finite entries of g
    PARAM_SQ_BEFORE = 3  # Σ θ⁻²
    PARAM_SQ_AFTER = 4   # Σ θ⁺²
    UPDATE_SQ = 5        # Σ (θ⁺ − θ⁻)²
    MOMENT1_SQ = 6       # Σ m²  (first moment as the optimizer defines it)
    MOMENT2_SQ = 7       # Σ v²  (second moment; reconstructed for factored/windowed optimizers)
    QUANT_ERROR_SQ = 8   # Σ (x − Q⁻¹(Q(x)))²  for the optimizer's own compression of x
    QUANT_INPUT_SQ = 9   # Σ x²  of that same x
    TOPK_KEPT_SQ = 10    # Σ T_k(x)²  mass kept by a blockwise top-k of x
    TOPK_TOTAL_SQ = 11   # Σ x²  of that same x
    GRAD_DIAG = 12            # diagonal share of g's second moment in the optimizer's basis
    GRAD_DIAG_ORIGINAL = 13   # the same share in the parameter's own basis


NUM_STATS = len(Stat)
# Every other column is a sum (the non-finite count too), so partial rows add up; the two
# diagonality shares are ratios of whole matrices, produced only by optimizers that refuse
# sharded parameters (AdaDiag), so no partial rows of them exist.
MAX_REDUCED = frozenset({Stat.GRAD_ABSMAX})


@dataclass
class StatsRows:
    """Where one functional step writes its statistics.

    Attributes:
        values: float32 tensor ``[n_rows, NUM_STATS]`` on the parameters' device.
        rows: ``rows[i]`` is the row of ``values`` that belongs to the i-th tensor of the step.
    """

    values: Tensor
    rows: list[int]
    # float64 [n_rows, 3, RANGE_BLOCK] (kernels/ranges.py) when the step was asked to count the
    # dynamic range of g, θ⁺ − θ⁻ and v in its pass (`request_ranges`); NaN rows it did not count
    ranges: Tensor | None = None

    def subset(self, indices: list[int]) -> "StatsRows":
        """The rows of the tensors ``indices`` of this step, for a launch over a subset of them."""
        return StatsRows(self.values, [self.rows[i] for i in indices], self.ranges)

    def row_index(self) -> Tensor:
        """``rows`` as an int32 tensor on the buffer's device (for kernels and index_put)."""
        return torch.tensor(self.rows, dtype=torch.int32).to(self.values.device, non_blocking=True)

    def write_table(self, table: np.ndarray, stats: tuple[Stat, ...]) -> None:
        """Writes ``table[i, k]`` (float64, one row per tensor) to ``values[rows[i], stats[k]]``:
        one numpy assignment on the CPU."""
        if self.values.device.type != "cpu":
            self.write({stat: torch.from_numpy(table[:, k]) for k, stat in enumerate(stats)})
            return
        where = np.array(self.rows, dtype=np.int64)[:, None]
        self.values.numpy()[where, [int(s) for s in stats]] = table

    def write(self, columns: dict[Stat, Tensor]) -> None:
        """Writes whole columns: ``columns[stat][i]`` goes to ``values[rows[i], stat]``."""
        if not columns:
            return
        if self.values.device.type == "cpu":  # numpy on the same memory: no torch op per column
            values, rows = self.values.numpy(), np.array(self.rows, dtype=np.int64)
            for stat, column in columns.items():
                values[rows, int(stat)] = np.asarray(column)
            return
        index = self.row_index().long()
        for stat, column in columns.items():
            self.values[index, int(stat)] = column.to(self.values.dtype)


@dataclass
class StepStats:
    """The statistics of the last step that was asked for them.

    Attributes:
        params: the parameter tensors the step updated, in row order.
        values: float32 ``[len(params), NUM_STATS]`` on the parameters' device; NaN in the
            columns the optimizer does not produce.
        produced: the columns the optimizer filled.
        step: the optimizer's step count after this step (the ``step`` state of its tensors).
        ranges: float64 ``[len(params), 3, RANGE_BLOCK]``: the dynamic-range counts of g,
            θ⁺ − θ⁻ and v over every entry (`optiscope.kernels.ranges` layout), when the step
            was asked for them; NaN rows for tensors it did not count.
    """

    params: list[Tensor]
    values: Tensor
    produced: frozenset[Stat]
    step: int
    ranges: Tensor | None = None  # `StatsRows.ranges`, when asked for (`request_ranges`)

    def column(self, stat: Stat) -> Tensor:
        """One column, a float32 vector with one entry per tensor."""
        return self.values[:, int(stat)]


# Σx² of a long float32 vector summed in one float32 reduction drifts: torch's CPU norm is off
# by 7e-4 (relative) at 10^7 entries. As rows of 4096 entries, added in float64, it is off by
# 1e-8 and no slower than the one reduction; rows of 2^18 entries drift to 3e-6.
SUM_ROW = 1 << 12


def sq_sum(x: Tensor) -> Tensor:
    """Σ x² of one tensor as a float64 0-d tensor, accurate to float32 round-off."""
    flat = x.detach().reshape(-1)
    wide = torch.promote_types(flat.dtype, torch.float32)  # float64 stays float64
    n_full = flat.numel() // SUM_ROW
    parts = []
    if n_full:
        rows = flat[: n_full * SUM_ROW].view(n_full, SUM_ROW)
        parts.append(torch.linalg.vector_norm(rows, dim=1, dtype=wide).double().square().sum())
    if flat.numel() > n_full * SUM_ROW:
        tail = flat[n_full * SUM_ROW:]
        parts.append(torch.linalg.vector_norm(tail, dtype=wide).double().square())
    return torch.stack(parts).sum() if parts else flat.new_zeros((), dtype=torch.float64)


def torch_sq_norms(tensors: list[Tensor]) -> Tensor:
    """Σ x² per tensor, whatever the tensors' dtype, as one float32 vector (float64 sums)."""
    if not tensors:
        return torch.zeros(0)
    if cpu.sums_apply(tensors):  # one pass per tensor, in C
        return cpu.sq_sums_f32(tensors).float()
    if all(t.numel() <= SUM_ROW and t.dtype != torch.float64 for t in tensors):  # one call
        norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
        return torch.stack(norms).double().square().float()
    return torch.stack([sq_sum(t) for t in tensors]).float()


def torch_grad_stats(grads: list[Tensor]) -> dict[Stat, Tensor]:
    """GRAD_SQ, GRAD_ABSMAX and GRAD_NONFINITE of each gradient, as torch ops.

    On CUDA nothing here synchronises. On a CPU the non-finite count (a pass of its own) runs
    only for tensors whose Σg² is not finite, since there a branch costs no synchronisation.
    """
    if cpu.sums_apply(grads):  # the three in one pass per tensor, in C
        sums = cpu.grad_sums_f32(grads).float()
        nonfinite = sums[:, 2]
        absmax = torch.where(nonfinite > 0, float("inf"), sums[:, 1])
        return {Stat.GRAD_SQ: sums[:, 0], Stat.GRAD_ABSMAX: absmax, Stat.GRAD_NONFINITE: nonfinite}
    sq = torch_sq_norms(grads)
    # aminmax, not the infinity norm: one vectorised pass on CPU, where the norm is far slower
    extremes = [torch.aminmax(g) if g.numel() else (g.new_zeros(()), g.new_zeros(())) for g in grads]
    absmax = torch.stack([torch.maximum(-lo, hi).float() for lo, hi in extremes])
    if grads[0].device.type == "cpu":
        suspect = (~torch.isfinite(sq)).nonzero().flatten().tolist()
        nonfinite = torch.zeros(len(grads))
        for i in suspect:
            nonfinite[i] = torch.count_nonzero(~torch.isfinite(grads[i]))
    else:
        nonfinite = torch.stack([torch.count_nonzero(~torch.isfinite(g)) for g in grads]).float()
    absmax = torch.where(nonfinite.to(absmax.device) > 0, float("inf"), absmax)
    return {Stat.GRAD_SQ: sq, Stat.GRAD_ABSMAX: absmax, Stat.GRAD_NONFINITE: nonfinite}


def reduce_partials(partials: Tensor, counts: Tensor, stats: StatsRows, ncols: int) -> None:
    """Reduces per-chunk partial rows of a multi-tensor launch into one row per tensor.

    Args:
        partials: float32 ``[n_chunks, ncols]``, the partial statistics of each chunk; the chunks
            of one tensor are consecutive.
        counts: int64 ``[n_tensors]``, chunks per tensor.
        stats: where the per-tensor rows go.
        ncols: how many leading `Stat` columns the kernel produced.
    """
    # segment_reduce adds in a fixed order: the same inputs give the same statistics, unlike
    # atomics, so a monitored run reproduces its own figures.
    rows = torch.segment_reduce(partials, "sum", lengths=counts, axis=0)
    col = int(Stat.GRAD_ABSMAX)
    if col < ncols:
        rows[:, col] = torch.segment_reduce(partials[:, col].contiguous(), "max", lengths=counts)
    index = stats.row_index().long()
    stats.values[index, :ncols] = rows.to(stats.values.dtype)  # float64 (optimizers/_base.py)
