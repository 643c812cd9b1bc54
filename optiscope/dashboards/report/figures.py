"""The report's plotly figures: one plot or a grid against step, a downsampled line with its
non-finite values marked, a metric's healthy band, and the tensor × step heatmap."""

from __future__ import annotations

import math
import warnings

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from optiscope.dashboards.bands import BANDS
from optiscope.dashboards.downsample import downsample_2d, minmax_downsample
from optiscope.dashboards.html import Page, esc
from optiscope.dashboards.report.run import DESCRIPTION, SHOW, Options, ReportRun, Show

NONFINITE = dict(symbol="x", color="#b42318", size=9, line=dict(width=2, color="#b42318"))
# A heatmap of more tensors than this would be taller than a laptop screen three times over.
MAX_HEATMAP_ROWS = 160


def layout(height: int, ytitle: str | None, *, log: bool, left: int = 70) -> go.Layout:
    """One plot against step; the y axis on a log scale when ``log``, else its type by data."""
    return go.Layout(height=height, margin=dict(l=left, r=20, t=30, b=45), hovermode="x unified",
                     xaxis=dict(title="step"), template="none",
                     yaxis=dict(title=ytitle, type="log" if log else "-"),
                     legend=dict(orientation="h", y=1.02, x=0, yanchor="bottom"))


def grid(n: int, titles: list[str], *, height_per_row: int = 260,
          legend: bool = False) -> go.Figure:
    """A grid of ``n`` small plots against step, two a row (one when ``n`` is 1), with a legend
    above the first row's titles when ``legend``."""
    cols = 1 if n == 1 else 2
    rows = max(1, math.ceil(n / cols))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[esc(t) for t in titles],
                        vertical_spacing=min(0.3 / rows, 0.12),
                        horizontal_spacing=0.09)
    top, bottom = (70 if legend else 40), 40
    height = 60 + height_per_row * rows + (30 if legend else 0)
    fig.update_layout(height=height, margin=dict(l=70, r=20, t=top, b=bottom),
                      hovermode="x unified", template="none", showlegend=legend,
                      legend=dict(orientation="h", x=0, yanchor="bottom",
                                  y=1 + 28 / (height - top - bottom)))
    fig.update_annotations(font_size=13)
    for col in range(1, cols + 1):  # under the lowest plot of each column
        fig.update_xaxes(title_text="step", col=col, row=rows if (rows - 1) * cols + col <= n
                         else rows - 1)
    return fig


def line(fig: go.Figure, run: ReportRun, metric: str, scope: str, options: Options, *,
          name: str, row: int | None = None, col: int | None = None, color: str | None = None,
          legend: bool = True) -> None:
    """Adds one downsampled series, and a ✕ at its non-finite values."""
    steps, values = minmax_downsample(*run.series(metric, scope), options.bins)
    if not len(steps):
        return
    where = dict(row=row, col=col) if row is not None else {}
    finite = np.isfinite(values)
    fig.add_trace(go.Scatter(x=i4(steps), y=f4(np.where(finite, values, np.nan)),
                             mode="lines" if len(steps) > 2 else "lines+markers",
                             name=esc(name), legendgroup=esc(name), showlegend=legend,
                             line=dict(width=1.5, color=color), connectgaps=False), **where)
    if not finite.all():
        top = float(np.nanmax(np.where(finite, values, np.nan))) if finite.any() else 1.0
        bad = values[~finite]
        fig.add_trace(go.Scatter(
            x=i4(steps[~finite]), y=f4(np.full(len(bad), top)), mode="markers",
            marker=NONFINITE, name=esc(f"{name}: non-finite"), showlegend=False,
            customdata=np.array([str(v) for v in bad]),
            hovertemplate=f"{esc(name)} = %{{customdata}} at step %{{x}}<extra></extra>"),
            **where)


def band(fig: go.Figure, run: ReportRun, metric: str, *, row: int | None = None,
          col: int | None = None) -> None:
    """Shades a metric's healthy band; an open side ends at the data's extreme.

    A closed side is drawn where it is even when the data are far from it, so that a metric
    outside its band shows how far outside.
    """
    band = BANDS.get(metric)
    values = run.series(metric)[1]
    values = values[np.isfinite(values)]
    if band is None or (band.lo is None and band.hi is None) or not len(values):
        return
    if SHOW[metric].log:
        values = values[values > 0]
        if not len(values):
            return
    lo = band.lo if band.lo is not None else min(float(values.min()), band.hi)
    hi = band.hi if band.hi is not None else max(float(values.max()), band.lo)
    if lo >= hi:
        return
    where = dict(row=row, col=col) if row is not None else {}
    fig.add_hrect(y0=lo, y1=hi, fillcolor="#1b7f3b", opacity=0.08, line_width=0, layer="below",
                  **where)


def heatmap(page: Page, run: ReportRun, metric: str, options: Options) -> int:
    """Adds the tensor × step heatmap of one metric; returns the figures added (0 or 1)."""
    tensors, steps, values, present = _tensor_matrix(run, metric)
    if not tensors:
        return 0
    show = SHOW.get(metric, Show(metric))
    cells = downsample_2d(steps, values, options.columns, reduce=show.reduce, present=present)
    z, nonfinite = cells.cells, cells.nonfinite

    note = ""
    if len(tensors) > MAX_HEATMAP_ROWS:
        keep = _most_eventful(z, nonfinite, show.reduce, MAX_HEATMAP_ROWS)
        note = (f" Showing the {MAX_HEATMAP_ROWS} of {len(tensors)} tensors with the largest "
                + ("peak over their median" if show.reduce == "max" else "dip") +
                " and every tensor with a non-finite value, in model order.")
        tensors = [tensors[i] for i in keep]
        z, nonfinite = z[keep], nonfinite[keep]
    log = show.log and bool((z > 0).any())
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(z > 0, np.log10(z), np.nan)
    x = (cells.start + cells.stop) / 2
    # 8-18 px a row: 100 tensors make an 800 px figure; labels on every k-th row, 12 px apart
    # at least (the hover names every row).
    row_px = int(min(18, max(8, 560 / len(tensors))))
    every = math.ceil(12 / row_px)
    labelled = tensors[::every]
    fig = go.Figure(layout=layout(110 + row_px * len(tensors), None, log=False,
                                   left=label_margin(labelled, px=6)))
    fig.update_layout(hovermode="closest", margin_t=44,
                      legend=dict(x=1, xanchor="right", y=1.0, yanchor="bottom"), yaxis=dict(
        autorange="reversed", type="category", tickfont_size=10, tickmode="array",
        tickvals=[esc(t) for t in labelled], ticktext=[esc(_shorten(t)) for t in labelled]))
    colorbar = dict(title=dict(text="log scale" if log else "", side="right"), thickness=12)
    extreme = "max" if show.reduce == "max" else "min"
    head = "%{y}<br>step ≈ %{x:.0f}<br>" + extreme
    meta = None
    if log and np.isfinite(z).any():
        ticks = _log_ticks(float(np.nanmin(z)), float(np.nanmax(z)))
        colorbar.update(tickvals=ticks, ticktext=[f"{10 ** t:.2g}" for t in ticks])
        meta = {"log10": True, "relative_title": "× the tensor's median",
                "relative_hover": head + " %{customdata:.3g} × the tensor's median<extra></extra>"}
    fig.add_trace(go.Heatmap(
        z=f4(z), x=f4(x), y=[esc(t) for t in tensors], colorscale="Viridis", colorbar=colorbar,
        hoverongaps=False, meta=meta,
        hovertemplate=head + (" %{customdata:.3g}" if meta else " %{z:.3g}") + "<extra></extra>"))
    if nonfinite.any():
        rows, cols = np.nonzero(nonfinite)
        fig.add_trace(go.Scatter(x=f4(x[cols]), y=[esc(tensors[r]) for r in rows], mode="markers",
                                 marker=NONFINITE, name="NaN / inf", showlegend=True,
                                 hovertemplate="%{y}: NaN or inf near step %{x:.0f}"
                                               "<extra></extra>"))
    bins = len(cells.start)
    spans = (f" Each column holds {len(steps) // bins:,}–{-(-len(steps) // bins):,} "
             f"consecutive samples; a cell shows the "
             f"{'largest' if show.reduce == 'max' else 'smallest'} value among them."
             if len(steps) > bins else "")
    blank = " Blank: no value (or ≤ 0 on the log scale)." if np.isnan(z).any() else ""
    description = DESCRIPTION.get(metric, "")
    page.figure(fig, f"<strong>{esc(show.label)}</strong>"
                     f"{' — ' + esc(description) if description else ''}, per tensor."
                     f"{spans}{blank}{esc(note)}")
    return 1


def _tensor_matrix(run: ReportRun,
                   metric: str) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(tensors in model order, steps, values ``[tensors, steps]``, recorded mask) of a metric."""
    if metric not in run.metrics:
        return [], np.zeros(0, np.int64), np.zeros((0, 0)), np.zeros((0, 0), bool)
    scopes = run.history.scopes(metric)
    recorded = set(scopes)
    tensors = [t for t in run.tensors if t in recorded]
    known = set(tensors)
    tensors += [s for s in scopes if s != "global" and s not in known and not s.startswith("key/")]
    columns = [run.history.series(metric, t) for t in tensors]
    steps = (np.unique(np.concatenate([s for s, _ in columns])) if columns
             else np.zeros(0, np.int64))
    values = np.full((len(tensors), len(steps)), np.nan)
    present = np.zeros(values.shape, dtype=bool)
    for i, (s, v) in enumerate(columns):
        at = np.searchsorted(steps, s)
        values[i, at], present[i, at] = v, True
    return tensors, steps, values, present


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Colour-bar ticks between log10 values ``lo`` and ``hi``: decades, or 1-2-5 within a few."""
    decades = list(range(math.ceil(lo), math.floor(hi) + 1))
    if len(decades) >= 3:
        return [float(d) for d in decades]
    ticks = [math.log10(k) + d for d in range(math.floor(lo), math.ceil(hi) + 1) for k in (1, 2, 5)]
    return [t for t in ticks if lo <= t <= hi] or [lo, hi]


def label_margin(labels: list[str], *, px: float = 7.0) -> int:
    """A left margin that fits ``labels`` (``px`` a character), within 60-300 px."""
    longest = max((len(_shorten(t)) for t in labels), default=0)
    return int(min(300, max(60, 16 + px * longest)))


def _shorten(label: str, limit: int = 44) -> str:
    """A tick label of at most ``limit`` characters: the end of a long tensor name says most."""
    return label if len(label) <= limit else "…" + label[-(limit - 1):]


def _most_eventful(z: np.ndarray, nonfinite: np.ndarray, reduce: str, limit: int) -> np.ndarray:
    """Row indices (sorted) of the ``limit`` rows with the largest spike or dip; rows with a
    non-finite value first."""
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: no score, ranked last
        if reduce == "max":
            score = np.log(np.nanmax(z, axis=1) / np.nanmedian(z, axis=1))
        else:
            score = -np.nanmin(z, axis=1)
    score = np.where(np.isfinite(score), score, -np.inf)
    score[nonfinite.any(axis=1)] = np.inf
    return np.sort(np.argsort(-score, kind="stable")[:limit])


def i4(x) -> np.ndarray:
    """Steps as int32: plotly writes them as a base64 typed array (int64 would be text)."""
    return np.asarray(x, dtype=np.int32)


def f4(x) -> np.ndarray:
    """Values as float32 (7 digits, plenty for a plot): base64 typed arrays, half of float64."""
    return np.asarray(x, dtype=np.float32)
