"""Healthy bands: when a dashboard colours a value as fine, worth a look, or bad.

One table shared by the terminal dashboard and the HTML report, so both say the same thing. The
bands are rules of thumb for Adam-family training, stated here so a user can read (and argue
with) them; they colour numbers, they do not raise alerts (`optiscope.monitor.alerts` does that).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Band", "BANDS", "health"]


@dataclass(frozen=True)
class Band:
    """``ok`` inside ``[lo, hi]``; ``warn`` inside ``[warn_lo, warn_hi]``; ``bad`` outside.

    None leaves a side open. NaN is always ``bad``; +inf is ``bad`` unless ``inf_is_undefined``
    (a ratio over a zero norm: the update ratio of a zero-initialised bias at its first step).
    """

    lo: float | None
    hi: float | None
    warn_lo: float | None
    warn_hi: float | None
    why: str
    inf_is_undefined: bool = False


BANDS: dict[str, Band] = {
    # Adam's per-step relative update sits near lr; 1e-3 is the classic healthy figure.
    "update_ratio": Band(1e-5, 1e-2, 1e-7, 1e-1,
                         "‖Δθ‖/‖θ‖ near 1e-3 is healthy; above 1e-2 the layer is being rewritten, "
                         "below 1e-5 it has stalled", inf_is_undefined=True),
    # Relative change of v between two samples: small means 1-bit Adam could freeze it.
    "moment2_drift": Band(None, 0.1, None, 0.5,
                          "v moving under 10% between samples is stable; above 50% it is still "
                          "adapting"),
    "moment2_drift_since_freeze": Band(None, 0.1, None, 0.3,
                                       "a frozen v would be off by this fraction"),
    # MicroAdam keeps ~1% of entries: coverage is the share of gradient energy they carry.
    "topk_coverage": Band(0.5, None, 0.2, None,
                          "the kept top-k entries carry this share of ‖x‖²; under 20% most of the "
                          "gradient goes to error feedback"),
    "quant_error": Band(None, 0.1, None, 0.3,
                        "relative error of the optimizer's own compression"),
    # A compressed optimizer's stored moment against the exact step from the same state.
    "moment1_quant_error": Band(None, 0.1, None, 0.3,
                                "relative error that storing the compressed m adds in one step"),
    "moment2_quant_error": Band(None, 0.1, None, 0.3,
                                "relative error that storing the compressed v adds in one step"),
    "nonfinite_grads": Band(None, 0, None, 0, "any inf/NaN entry is bad"),
}


def health(metric: str, value: float) -> str:
    """``"ok"``, ``"warn"``, ``"bad"``, or ``"none"`` for a metric without a band."""
    band = BANDS.get(metric)
    if value == math.inf and band is not None and band.inf_is_undefined:
        return "none"
    if not math.isfinite(value):
        return "bad"
    if band is None:
        return "none"

    def inside(lo, hi):
        return (lo is None or value >= lo) and (hi is None or value <= hi)

    if inside(band.lo, band.hi):
        return "ok"
    if inside(band.warn_lo, band.warn_hi):
        return "warn"
    return "bad"
