"""The report's view of one run: what each metric is called and how it is drawn, the run's derived
facts (tensors in model order, state bytes, the freeze verdict, the compression-readiness
verdicts), and small text formats.

Every section (`sections`, `compare`) and figure helper (`figures`) reads a run through
`ReportRun`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from optiscope.monitor.analysis import freeze_verdict
from optiscope.monitor.history import RunHistory
from optiscope.monitor.metrics import MONITOR_SERIES, TENSOR_METRICS
from optiscope.monitor.readiness import FREEZE_MIN_TAIL, readiness

DESCRIPTION = {m.name: m.description for m in TENSOR_METRICS}


@dataclass(frozen=True)
class Show:
    """How the report shows a metric: its label, whether on a log scale, and what a heatmap
    cell keeps (the bin's maximum, or its minimum where a dip is the event)."""

    label: str
    log: bool = True
    reduce: str = "max"


SHOW = {
    "grad_norm": Show("gradient norm ‖g‖"),
    "grad_max": Show("largest gradient entry max|g|"),
    "nonfinite_grads": Show("non-finite gradient entries", log=False),
    "weight_norm": Show("weight norm ‖θ‖"),
    "update_norm": Show("update norm ‖Δθ‖"),
    "update_ratio": Show("update ratio ‖Δθ‖/‖θ‖"),
    "moment1_norm": Show("first moment ‖m‖"),
    "moment2_norm": Show("second moment ‖v‖"),
    "moment2_drift": Show("second-moment drift ‖v_t − v_p‖/‖v_p‖"),
    "moment2_drift_since_freeze": Show("drift since the freeze step ‖v_t − v_T‖/‖v_T‖"),
    "quant_error": Show("quantization error ‖x − Q⁻¹(Q(x))‖/‖x‖"),
    "moment1_quant_error": Show("requantization error of m, one step"),
    "moment2_quant_error": Show("requantization error of v, one step"),
    "probe_int8_m": Show("8-bit probe of m ‖m − Q(m)‖/‖m‖"),
    "probe_int8_v": Show("8-bit probe of v ‖v − Q(v)‖/‖v‖"),
    "probe_int4_m": Show("4-bit probe of m ‖m − Q(m)‖/‖m‖"),
    "probe_int4_v": Show("4-bit probe of v, linear code with zero"),
    "probe_int4_v_rank1": Show("4-bit probe of v, rank-1 normalised"),
    "topk_coverage": Show("top-k coverage ‖T_k(x)‖²/‖x‖²", log=False, reduce="min"),
    "grad_diagonality": Show("diagonality of G̃G̃ᵀ in the optimizer's basis", log=False,
                             reduce="min"),
    "grad_diagonality_original": Show("diagonality of GGᵀ in the original basis", log=False,
                                      reduce="min"),
    "skipped_steps": Show("steps skipped (GradScaler)", log=False),
    "state_bytes": Show("optimizer state bytes", log=False),
    "cuda_memory_allocated": Show("CUDA memory allocated", log=False),
    "lr": Show("learning rate"),
}
# The requantization error of compressed state, then the int8/int4 probes of uncompressed state:
# the quantization section shows them.
QUANT_METRICS = ("moment1_quant_error", "moment2_quant_error", "probe_int8_m", "probe_int8_v",
                 "probe_int4_m", "probe_int4_v", "probe_int4_v_rank1")
# Global metrics of the trends section, and the per-tensor metrics of the heatmap section; drift,
# quantization and coverage have sections of their own.
TREND_METRICS = ("grad_norm", "grad_max", "weight_norm", "update_norm", "update_ratio",
                 "moment1_norm", "moment2_norm", "moment2_drift", "grad_diagonality",
                 "grad_diagonality_original", "nonfinite_grads", "skipped_steps")
LAYER_METRICS = ("grad_norm", "grad_max", "weight_norm", "update_norm", "update_ratio",
                 "moment1_norm", "moment2_norm", "grad_diagonality", "nonfinite_grads")
# Metrics shown only when something happened: a flat zero line says nothing.
ONLY_IF_NONZERO = ("nonfinite_grads", "skipped_steps")
MONITOR_METRICS = set(SHOW) | set(DESCRIPTION) | MONITOR_SERIES
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#17becf", "#7f7f7f", "#bcbd22")
# fp32 AdamW keeps exp_avg and exp_avg_sq (4 bytes each per parameter) and one 4-byte step
# counter per tensor: the yardstick of the memory section.
ADAMW_BYTES_PER_PARAM = 8
ADAMW_STEP_BYTES = 4
# The share of a run that must follow a freeze step for the report to call it one.
MIN_TAIL = FREEZE_MIN_TAIL


@dataclass(frozen=True)
class Options:
    bins: int        # line bins: two points each
    columns: int        # heatmap columns


class ReportRun:
    """One run, and what several sections derive from it."""

    def __init__(self, name: str, history: RunHistory, index: int, freeze_tol: float):
        self.name = name
        self.history = history
        self.meta = history.meta
        self.index = index
        self.prefix = f"r{index + 1}-"
        self.color = PALETTE[index % len(PALETTE)]
        self.metrics = history.metrics()
        self.verdict = freeze_verdict(history, freeze_tol, min_tail=MIN_TAIL)
        self.readiness = readiness(history, freeze=self.verdict)
        params = self.meta.get("params") or []
        self.numel = {p["name"]: int(p["numel"]) for p in params if "name" in p and "numel" in p}
        self.n_params = int(self.meta.get("n_params") or sum(self.numel.values()))
        order = [p["name"] for p in params if "name" in p]
        scopes = (history.scopes("state_bytes") if "state_bytes" in self.metrics else [])
        recorded = [s for s in scopes if s != "global" and not s.startswith("key/")]
        named = set(order)
        self.tensors = order + [s for s in recorded if s not in named]
        self.state_bytes = self.last("state_bytes")
        self.user_scalars = [m for m in self.metrics if m not in MONITOR_METRICS
                             and history.scopes(m) == ["global"]]
        self.user_scalars.sort(key=lambda m: (m != "loss", m))

    def has(self, metric: str, scope: str = "global") -> bool:
        return metric in self.metrics and scope in self.history.scopes(metric)

    def series(self, metric: str, scope: str = "global") -> tuple[np.ndarray, np.ndarray]:
        if not self.has(metric, scope):
            return np.zeros(0, np.int64), np.zeros(0)
        return self.history.series(metric, scope)

    def last(self, metric: str, scope: str = "global") -> float | None:
        values = self.series(metric, scope)[1]
        return float(values[-1]) if len(values) else None

    def skipped(self, metric: str) -> str | None:
        return (self.meta.get("skipped_metrics") or {}).get(metric)

    def adamw_bytes(self) -> int:
        """State bytes fp32 AdamW would keep for this model."""
        tensors = len(self.numel) or len(self.tensors)
        return ADAMW_BYTES_PER_PARAM * self.n_params + ADAMW_STEP_BYTES * tensors

    def loss(self) -> tuple[float | None, float | None]:
        """(last, smallest finite) of the run's ``loss``."""
        values = self.series("loss")[1]
        if not len(values):
            return None, None
        finite = values[np.isfinite(values)]
        return float(values[-1]), float(finite.min()) if len(finite) else None


def worth_showing(run: ReportRun, metric: str) -> bool:
    values = run.series(metric)[1]
    if not len(values):
        return False
    if metric in ONLY_IF_NONZERO:
        return bool((values != 0).any())
    return True


def bytes_per_param(nbytes: float, n_params: int) -> str:
    return f"{nbytes / n_params:.3g} B" if n_params else "—"


def hyperparameter(v) -> str:
    """A hyperparameter value, compactly."""
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(hyperparameter(x) for x in v)
    return str(v)

