"""Numbers and byte counts as people read them: one spelling everywhere optiscope prints them.

The monitor's analysis (`optiscope.monitor.analysis`) writes its verdicts with these, and every
dashboard (terminal, HTML report, PNG) shows byte counts with `format_bytes`, so a state size reads
the same in each. Imports nothing from optiscope.
"""

from __future__ import annotations

import math

__all__ = ["format_bytes", "format_number"]

_UNITS = ("KiB", "MiB", "GiB", "TiB")


def format_number(x: float) -> str:
    """Four significant digits, in e-notation (``1.234e+05``) outside [1e-3, 1e5); ``NaN``,
    ``inf``, ``−inf``."""
    x = float(x)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "inf" if x > 0 else "−inf"
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
        return f"{x:.3e}"
    return f"{x:.4g}"


def format_bytes(n: float) -> str:
    """Binary units with one decimal: ``123 B``, ``28.8 KiB``, ``1.5 GiB`` (TiB at most)."""
    n = float(n)
    if not math.isfinite(n):
        return f"{n} B"
    if abs(n) < 1024:
        return f"{n:.0f} B"
    exponent = min(int(math.log(abs(n), 1024)), len(_UNITS))
    value = n / 1024 ** exponent
    if abs(value) >= 1023.95 and exponent < len(_UNITS):  # 1023.96 KiB would print as 1024.0 KiB
        value, exponent = value / 1024, exponent + 1
    return f"{value:.1f} {_UNITS[exponent - 1]}"
