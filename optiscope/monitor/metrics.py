"""The monitor's metrics: names (part of the public contract), what each is computed from, and
how the global value is aggregated.

On a sampled step the monitor fills one row of per-tensor sums (`Col`) per parameter tensor on
the device: the `Stat` columns a fused kernel produces, and the monitor's own columns (drift on
the coordinate sample). One host transfer later, every metric is a formula over those sums, and
the global value is the same formula over the column totals (or the maximum), so global norms
are exact, not averages of per-tensor norms.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np

from optiscope.kernels.ranges import (EXP_MAX, EXP_MIN, HIST_BINS, RANGE_BLOCK, RANGE_QUANTITIES,
                                      RANGE_SHARES)
from optiscope.kernels.stats import NUM_STATS, Stat

__all__ = ["Col", "NUM_COLS", "ROW_COLS", "Metric", "TENSOR_METRICS", "STEP_METRICS",
           "MONITOR_SERIES", "RANGE_QUANTITIES", "RANGE_SHARES", "EXP_MIN", "EXP_MAX",
           "HIST_BINS", "range_cols", "derive", "derive_all"]


class Col(enum.IntEnum):
    """Columns of the monitor's per-tensor sums: the `Stat` columns, then the monitor's own."""

    GRAD_SQ = Stat.GRAD_SQ
    GRAD_ABSMAX = Stat.GRAD_ABSMAX
    GRAD_NONFINITE = Stat.GRAD_NONFINITE
    PARAM_SQ_BEFORE = Stat.PARAM_SQ_BEFORE
    PARAM_SQ_AFTER = Stat.PARAM_SQ_AFTER
    UPDATE_SQ = Stat.UPDATE_SQ
    MOMENT1_SQ = Stat.MOMENT1_SQ
    MOMENT2_SQ = Stat.MOMENT2_SQ
    QUANT_ERROR_SQ = Stat.QUANT_ERROR_SQ
    QUANT_INPUT_SQ = Stat.QUANT_INPUT_SQ
    TOPK_KEPT_SQ = Stat.TOPK_KEPT_SQ
    TOPK_TOTAL_SQ = Stat.TOPK_TOTAL_SQ
    GRAD_DIAG = Stat.GRAD_DIAG
    GRAD_DIAG_ORIGINAL = Stat.GRAD_DIAG_ORIGINAL
    DRIFT_DIFF_SQ = NUM_STATS      # Σ (v_t − v_p)² over the sample, scaled to the tensor
    DRIFT_PREV_SQ = NUM_STATS + 1  # Σ v_p²
    FREEZE_DIFF_SQ = NUM_STATS + 2  # Σ (v_t − v_T)²
    FREEZE_REF_SQ = NUM_STATS + 3   # Σ v_T²
    # monitor/compression.py: requantization error of compressed moments, on the sample
    M_REQUANT_ERR_SQ = NUM_STATS + 4   # Σ (m_t − (β1·m_{t−1} + (1 − β1)·g))²
    M_REQUANT_REF_SQ = NUM_STATS + 5   # Σ (β1·m_{t−1} + (1 − β1)·g)²
    V_REQUANT_ERR_SQ = NUM_STATS + 6   # the same for v, with g² and β2
    V_REQUANT_REF_SQ = NUM_STATS + 7
    # monitor/compression.py: probes of uncompressed moments, Σ (x − Q(x))² on sampled blocks
    PROBE_INT8_M_SQ = NUM_STATS + 8
    PROBE_INT4_M_SQ = NUM_STATS + 9
    PROBE_M_REF_SQ = NUM_STATS + 10    # Σ m² on the same blocks
    PROBE_INT8_V_SQ = NUM_STATS + 11
    PROBE_INT4_V_SQ = NUM_STATS + 12
    PROBE_INT4_V_RANK1_SQ = NUM_STATS + 13
    PROBE_V_REF_SQ = NUM_STATS + 14    # Σ v² on the same blocks


NUM_COLS = len(Col)
MAX_COLS = (Col.GRAD_ABSMAX,)

# Dynamic range (monitor/ranges.py). After the `Col` columns, one block per quantity of
# `RANGE_QUANTITIES` (kernels/ranges.py: the layout a kernel fills): the entries counted, the
# entries each low-precision cast flushes to zero or overflows, and a histogram of log2|x| in
# fixed bins, all counts scaled to the tensor (they add across DDP/FSDP shards).
ROW_COLS = NUM_COLS + len(RANGE_QUANTITIES) * RANGE_BLOCK  # the width of the per-tensor rows


def range_cols(quantity: str) -> tuple[int, slice, slice]:
    """(entries column, share columns, histogram columns) of ``quantity`` in the rows."""
    first = NUM_COLS + RANGE_QUANTITIES.index(quantity) * RANGE_BLOCK
    return (first, slice(first + 1, first + 1 + len(RANGE_SHARES)),
            slice(first + 1 + len(RANGE_SHARES), first + RANGE_BLOCK))


_RANGE_NAMES = {"grad": "g", "update": "θ⁺ − θ⁻", "moment2": "v"}


@dataclass(frozen=True)
class Metric:
    """A per-tensor metric and its global aggregate.

    Attributes:
        name: the metric's name in the run log, the dashboards and `RunHistory.series`.
        formula: ``"sqrt"`` √a, ``"max"`` a, ``"sum"`` a, ``"sqrt_ratio"`` √(a/b), ``"ratio"`` a/b,
            over the columns ``cols`` (a, or a and b); ``"mean"``: a per tensor, and the mean
            over the tensors as the global (for per-tensor shares that are not sums).
        cols: the columns the formula reads.
        description: one line for dashboards and ``--help``.
        partial: some stepped tensors may have no value (no moment in their state, no previous
            sample yet): those are left out of the global. Otherwise every stepped tensor has a
            value, and a NaN in one (a NaN gradient) makes the global NaN too.
    """

    name: str
    formula: str
    cols: tuple[Col, ...]
    description: str
    partial: bool = False


TENSOR_METRICS: tuple[Metric, ...] = (
    Metric("grad_norm", "sqrt", (Col.GRAD_SQ,), "‖g‖₂ of the step's gradient, before any clipping"),
    Metric("grad_max", "max", (Col.GRAD_ABSMAX,), "max |g| (inf when any entry is non-finite)"),
    Metric("nonfinite_grads", "sum", (Col.GRAD_NONFINITE,), "non-finite entries of g"),
    Metric("weight_norm", "sqrt", (Col.PARAM_SQ_AFTER,), "‖θ‖₂ after the step"),
    Metric("update_norm", "sqrt", (Col.UPDATE_SQ,), "‖θ⁺ − θ⁻‖₂"),
    Metric("update_ratio", "sqrt_ratio", (Col.UPDATE_SQ, Col.PARAM_SQ_BEFORE),
           "‖θ⁺ − θ⁻‖ / ‖θ⁻‖"),
    Metric("moment1_norm", "sqrt", (Col.MOMENT1_SQ,), "‖m‖₂, the first moment", partial=True),
    Metric("moment2_norm", "sqrt", (Col.MOMENT2_SQ,), "‖v‖₂, the second moment", partial=True),
    Metric("moment2_drift", "sqrt_ratio", (Col.DRIFT_DIFF_SQ, Col.DRIFT_PREV_SQ),
           "‖v_t − v_p‖ / ‖v_p‖ since the previous sampled step", partial=True),
    Metric("moment2_drift_since_freeze", "sqrt_ratio", (Col.FREEZE_DIFF_SQ, Col.FREEZE_REF_SQ),
           "‖v_t − v_T‖ / ‖v_T‖ since the freeze step T", partial=True),
    Metric("quant_error", "sqrt_ratio", (Col.QUANT_ERROR_SQ, Col.QUANT_INPUT_SQ),
           "‖x − Q⁻¹(Q(x))‖ / ‖x‖ of the optimizer's own compression", partial=True),
    *(Metric(name, "sqrt_ratio", cols, text, partial=True) for name, cols, text in (
        ("moment1_quant_error", (Col.M_REQUANT_ERR_SQ, Col.M_REQUANT_REF_SQ),
         "‖m_t − (β1·m_{t−1} + (1−β1)·g)‖ / ‖β1·m_{t−1} + (1−β1)·g‖: what storing the "
         "compressed m rounds off in one step"),
        ("moment2_quant_error", (Col.V_REQUANT_ERR_SQ, Col.V_REQUANT_REF_SQ),
         "‖v_t − (β2·v_{t−1} + (1−β2)·g²)‖ / ‖β2·v_{t−1} + (1−β2)·g²‖: what storing the "
         "compressed v rounds off in one step"),
        ("probe_int8_m", (Col.PROBE_INT8_M_SQ, Col.PROBE_M_REF_SQ),
         "‖m − Q(m)‖ / ‖m‖, Q: 8-bit dynamic code, absmax per 256 (bitsandbytes, torchao)"),
        ("probe_int8_v", (Col.PROBE_INT8_V_SQ, Col.PROBE_V_REF_SQ),
         "‖v − Q(v)‖ / ‖v‖, Q: unsigned 8-bit dynamic code, absmax per 256"),
        ("probe_int4_m", (Col.PROBE_INT4_M_SQ, Col.PROBE_M_REF_SQ),
         "‖m − Q(m)‖ / ‖m‖, Q: 4-bit dynamic code, absmax per 128 (torchao's AdamW4bit)"),
        ("probe_int4_v", (Col.PROBE_INT4_V_SQ, Col.PROBE_V_REF_SQ),
         "‖v − Q(v)‖ / ‖v‖, Q: 4-bit linear code with zero, absmax per 128 (the zero-point "
         "problem)"),
        ("probe_int4_v_rank1", (Col.PROBE_INT4_V_RANK1_SQ, Col.PROBE_V_REF_SQ),
         "‖v − Q(v)‖ / ‖v‖, Q: 4-bit linear code without zero, rank-1 normalisation "
         "(Li et al. 2023)"))),
    Metric("topk_coverage", "ratio", (Col.TOPK_KEPT_SQ, Col.TOPK_TOTAL_SQ),
           "‖T_k(x)‖² / ‖x‖², the share of squared mass a blockwise top-k keeps"),
    Metric("grad_diagonality", "mean", (Col.GRAD_DIAG,),
           "share of ‖GGᵀ‖²_F on its diagonal, in the basis the optimizer rotates g into",
           partial=True),
    Metric("grad_diagonality_original", "mean", (Col.GRAD_DIAG_ORIGINAL,),
           "share of ‖GGᵀ‖²_F on its diagonal, in the parameter's own basis", partial=True),
) + tuple(
    Metric(f"{q}_{fmt}_{what}", "ratio", (range_cols(q)[1].start + j, range_cols(q)[0]),
           f"share of the entries of {_RANGE_NAMES[q]} a cast to {fmt} "
           f"{'flushes to zero' if what == 'underflow' else 'overflows (inf, or saturation)'}",
           partial=True)
    for q in RANGE_QUANTITIES for j, (fmt, what) in enumerate(RANGE_SHARES))

# Global metrics of a sampled step that are not formulas over the per-tensor sums.
STEP_METRICS: dict[str, str] = {
    "clip_coef": "the factor gradient clipping multiplied g by this step (1: none; see "
                 "optiscope/monitor/clipping.py); grad_norm, grad_max and nonfinite_grads are "
                 "from before clipping",
}


# Every series the monitor records itself: `OptimizerMonitor.log_scalar` refuses these names, so a
# user scalar never replaces one. None contains "/": a prefixed name ("trainer/grad_norm") is
# always free for a user scalar.
MONITOR_SERIES: frozenset[str] = frozenset({m.name for m in TENSOR_METRICS} | {
    "state_bytes", "cuda_memory_allocated", "lr", "skipped_steps"} | set(STEP_METRICS))


def derive(rows: np.ndarray, metric: Metric) -> tuple[np.ndarray, float]:
    """A metric's per-tensor values and its global value, from the float64 sums ``rows``.

    Args:
        rows: ``[n_tensors, NUM_COLS]`` of the tensors the step updated; NaN in a column nobody
            computed, or a computed NaN.
        metric: which metric.

    Returns:
        (per-tensor values ``[n_tensors]``, global value). For a `Metric.partial` metric a NaN
        per-tensor value means "no value" and is left out of the global.
    """
    a = rows[:, metric.cols[0]]
    b = rows[:, metric.cols[1]] if len(metric.cols) > 1 else None
    total, biggest = (np.nansum, np.nanmax) if metric.partial else (np.sum, np.max)
    if not len(a) or np.isnan(a).all():
        return a, float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):
        if metric.formula == "sqrt":
            return np.sqrt(a), float(np.sqrt(total(a)))
        if metric.formula == "max":
            return a, float(biggest(a))
        if metric.formula == "sum":
            return a, float(total(a))
        if metric.formula == "mean":
            return a, float((np.nanmean if metric.partial else np.mean)(a))
        use = ~(np.isnan(a) | np.isnan(b)) if metric.partial else np.ones(len(a), dtype=bool)
        total_a, total_b = float(a[use].sum()), float(b[use].sum())
        glob = total_a / total_b if total_b > 0 else float("nan")
        if metric.formula == "sqrt_ratio":
            return np.sqrt(a / b), float(np.sqrt(glob))
        if metric.formula == "ratio":
            return a / b, glob
    raise ValueError(f"unknown formula {metric.formula!r}")


class _Plan:
    """The columns and formulas of a tuple of metrics, as arrays (made once per tuple)."""

    def __init__(self, metrics: tuple[Metric, ...]):
        unknown = [m.formula for m in metrics if m.formula not in _FORMULAS]
        if unknown:
            raise ValueError(f"unknown formula {unknown[0]!r}")
        self.formulas = [m.formula for m in metrics]
        self.partial = [m.partial for m in metrics]
        self.a = np.array([m.cols[0] for m in metrics], dtype=np.intp)
        self.b = np.array([m.cols[-1] for m in metrics], dtype=np.intp)  # = a unless a ratio
        self.partial_rows = np.array(self.partial, dtype=bool)[:, None]
        self.any_partial = any(self.partial)
        self.ratio_rows = np.array([f in ("ratio", "sqrt_ratio") for f in self.formulas])[:, None]
        self.any_ratio = bool(self.ratio_rows.any())
        self.root_rows = np.array([f in ("sqrt", "sqrt_ratio") for f in self.formulas])[:, None]
        self.any_max = "max" in self.formulas
        self.any_mean = "mean" in self.formulas
        self.gapped = [f in ("ratio", "sqrt_ratio") and m.partial
                       for f, m in zip(self.formulas, metrics)]


_FORMULAS = ("sqrt", "max", "sum", "mean", "sqrt_ratio", "ratio")
_plans: dict[tuple, _Plan] = {}
_last_plan: tuple = ((), None)  # the last (metrics, plan): found by identity, not by hashing


def _sqrt(x: float) -> float:
    """np.sqrt of a float (both are IEEE's correctly rounded square root): NaN below 0."""
    return math.sqrt(x) if x >= 0 else math.nan


def derive_all(rows: np.ndarray, metrics: tuple[Metric, ...]
               ) -> tuple[np.ndarray, np.ndarray, list[bool]]:
    """`derive` of several metrics at once, with the same float64 results to the last bit.

    Returns:
        ``[len(metrics), 1 + n_tensors]``: each metric's global value, then its per-tensor
        values (one contiguous row per metric); ``[len(metrics), n_tensors]``: where a
        per-tensor value is NaN; and per metric, whether it has one.

    Each metric's column is gathered as one contiguous row of ``rows.T``, so a sum over it is
    numpy's pairwise sum over the same values in the same order as `derive`'s (a sum over
    axis 0 of ``rows`` would add row after row: other roundings); the global values are then a
    few float operations per metric, in Python (IEEE's, as numpy's). A partial ratio with a
    missing term for some tensors sums a compacted array there (another pairwise grouping):
    those metrics go through `derive` itself. About 15 numpy calls when no value is NaN: on a
    sampled step this code meets cold caches, where each call costs several microseconds.
    """
    n, k = rows.shape[0], len(metrics)
    out = np.empty((k, n + 1))
    if n == 0 or k == 0:
        out[:, 0] = np.nan
        return out, np.zeros((k, n), dtype=bool), [False] * k
    global _last_plan
    last_metrics, plan = _last_plan
    if last_metrics is not metrics:
        plan = _plans.get(metrics)
        if plan is None:
            plan = _plans.setdefault(metrics, _Plan(metrics))
        _last_plan = (metrics, plan)
    a = rows.T[plan.a]  # [k, n], C-contiguous
    per = out[:, 1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        totals = a.sum(axis=1).tolist()  # "sum", and the numerator of the others
        nan_a = all_nan = None
        if any(t != t for t in totals):  # a NaN: nansum where partial (NaN -> 0 keeps the
            nan_a = np.isnan(a)          # pairwise order of np.nansum), and all-NaN columns
            all_nan = nan_a.all(axis=1).tolist()
            if plan.any_partial:
                totals = np.where(nan_a & plan.partial_rows, 0.0, a).sum(axis=1).tolist()
        if plan.any_ratio:  # a / b; a / 1 (exactly a) for the rest
            b = np.where(plan.ratio_rows, rows.T[plan.b], 1.0)
            np.divide(a, b, out=per)
            totals_b = b.sum(axis=1).tolist()
        else:
            per[...] = a
        if plan.any_max:
            biggest = np.maximum.reduce(a, axis=1).tolist()
            if plan.any_partial and nan_a is not None:
                nan_biggest = np.fmax.reduce(a, axis=1).tolist()
        if plan.any_mean:
            counts = (~nan_a).sum(axis=1).tolist() if nan_a is not None else [n] * k
        np.sqrt(per, out=per, where=plan.root_rows)
    glob = []
    for j, (formula, partial) in enumerate(zip(plan.formulas, plan.partial)):
        t = totals[j]
        if all_nan is not None and all_nan[j]:
            glob.append(math.nan)
        elif formula == "sqrt":
            glob.append(_sqrt(t))
        elif formula == "sum":
            glob.append(t)
        elif formula == "max":
            glob.append(nan_biggest[j] if partial and nan_a is not None else biggest[j])
        elif formula == "mean":
            glob.append(t / (counts[j] if partial else n))
        else:
            r = t / totals_b[j] if totals_b[j] > 0 else math.nan
            glob.append(_sqrt(r) if formula == "sqrt_ratio" else r)
    out[:, 0] = glob
    missing = np.isnan(per)
    has_missing = missing.any(axis=1).tolist()
    if any(has_missing):  # a NaN in ``a``, or in a ratio's ``b``
        if all_nan is None:
            all_nan = np.isnan(a).all(axis=1).tolist()
        for j in range(k):
            if all_nan[j]:  # `derive`: the column as it is, no global
                per[j] = a[j]
            elif has_missing[j] and plan.gapped[j]:  # a missing term (or 0/0): `derive`'s sum
                per[j], out[j, 0] = derive(rows, metrics[j])
    return out, missing, has_missing
