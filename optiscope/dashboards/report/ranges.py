"""The report's dynamic-range section: step × binary-exponent heatmaps of g, θ⁺ − θ⁻ and v, with
the limits of bf16, fp16 and fp8 drawn across, and a table of the shares the casts would lose."""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go

from optiscope.dashboards.html import Page, esc, table
from optiscope.dashboards.report.figures import f4, i4, layout
from optiscope.dashboards.report.run import Options, ReportRun
from optiscope.monitor.history import RunHistory
from optiscope.monitor.metrics import EXP_MAX, EXP_MIN, RANGE_SHARES
from optiscope.monitor.ranges import FORMAT_LIMITS

__all__ = ["dynamic_range_section", "range_figure"]

TITLES = {"grad": "|g|, the gradient", "update": "|θ⁺ − θ⁻|, the update",
          "moment2": "v, the second moment"}
_LIMIT_COLORS = {"bf16": "#2ca02c", "fp16": "#1f77b4", "fp8e4m3": "#d62728", "fp8e5m2": "#ff7f0e"}


def range_figure(history: RunHistory, quantity: str, scope: str = "global",
                 columns: int = 400) -> go.Figure | None:
    """The heatmap of one quantity's log2 histograms for ``"global"`` or one tensor: x the step
    (sampled steps binned into at most ``columns`` columns, their counts added), y the binary
    exponent, colour log10 of the share of the column's entries. Zeros and non-finite entries
    are in the hover of each column. None when nothing nonzero was recorded."""
    steps, counts = history.histograms(quantity, scope)
    if not len(steps):
        return None
    groups = np.array_split(np.arange(len(steps)), min(columns, len(steps)))
    summed = np.array([counts[g].sum(axis=0) for g in groups])
    x = np.array([steps[g].mean() for g in groups])
    total = summed.sum(axis=1, keepdims=True)
    inner = summed[:, 1:-1]  # below, one row per exponent, above
    used = np.flatnonzero(inner.sum(axis=0))
    if not len(used):
        return None
    rows = slice(used[0], used[-1] + 1)
    y = np.arange(EXP_MIN - 1, EXP_MAX + 1)[rows]  # "below" drawn at EXP_MIN − 1, "above" at EXP_MAX
    with np.errstate(divide="ignore", invalid="ignore"):
        share = inner[:, rows] / np.where(total > 0, total, np.nan)
        z = np.where(share > 0, np.log10(share), np.nan).T
    zeros = (summed[:, 0] / np.maximum(total[:, 0], 1)).astype(np.float32)
    nonfinite = (summed[:, -1] / np.maximum(total[:, 0], 1)).astype(np.float32)
    custom = np.stack([np.broadcast_to(zeros, z.shape), np.broadcast_to(nonfinite, z.shape)], -1)
    fig = go.Figure(layout=layout(120 + 6 * len(y) + 200, "log2 |x| (binary exponent)", log=False))
    fig.update_layout(hovermode="closest")
    fig.add_trace(go.Heatmap(
        x=f4(x), y=i4(y), z=f4(z), customdata=custom, colorscale="Viridis",
        colorbar=dict(title=dict(text="share", side="right"), thickness=12,
                      tickvals=[-8, -6, -4, -2, 0], ticktext=["1e-8", "1e-6", "1e-4", "1%", "1"]),
        hovertemplate=("step ≈ %{x:.0f}<br>|x| in [2^%{y}, 2^(%{y}+1))<br>share %{z:.2f} "
                       "(log10)<br>zeros %{customdata[0]:.3g}, non-finite %{customdata[1]:.3g}"
                       "<extra></extra>")))
    lo, hi = float(y[0]) - 0.5, float(y[-1]) + 0.5
    for fmt, (under, over) in FORMAT_LIMITS.items():
        for what, edge in (("→ 0", math.log2(under)), ("overflow", math.log2(over))):
            if lo <= edge <= hi and not (fmt == "bf16" and what == "overflow"):
                fig.add_hline(y=edge, line=dict(color=_LIMIT_COLORS[fmt], dash="dot", width=1),
                              annotation_text=f"{fmt} {what}", annotation_font_size=10,
                              annotation_position="top left")
    return fig


def dynamic_range_section(page: Page, run: ReportRun, options: Options) -> None:
    """The section: one heatmap per quantity (all tensors together), then the shares table."""
    quantities = run.history.histogram_quantities()
    if not quantities:
        page.html('<p class="note">No log2 histograms in this run (its run log was written '
                  "by a version of optiscope that did not record them).</p>")
        return
    page.html("<p>Where the magnitudes of the gradient, the update and v lie, as binary "
              "exponents, sampled step by sampled step, over all tensors (a tensor's own: "
              "<code>optiscope.dashboards.report.ranges.range_figure(history, quantity, "
              "tensor)</code>). Dotted lines: below a format's \"→ 0\" line a cast flushes the "
              "entry to zero, above its overflow line it overflows (fp8 e4m3: saturates at "
              "448).</p>")
    for quantity in quantities:
        fig = range_figure(run.history, quantity, columns=options.columns)
        if fig is not None:
            page.figure(fig, f"{esc(TITLES.get(quantity, quantity))}: share of the entries in "
                             "each binary exponent (log10 colour).")
    rows = []
    for quantity in quantities:
        for fmt, what in RANGE_SHARES:
            steps, values = run.series(f"{quantity}_{fmt}_{what}")
            if len(values):
                rows.append([esc(quantity), esc(fmt), esc(what), f"{values[-1]:.3%}",
                             f"{np.nanmax(values):.3%}"])
    if rows:
        page.html(table(["quantity", "format", "lost as", "last sample", "worst sample"], rows,
                        numeric={3, 4}, caption="Shares of the entries a cast would flush to "
                        "zero (underflow) or overflow, over all tensors."))
