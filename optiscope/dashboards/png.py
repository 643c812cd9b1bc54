"""The trends of one run, or several overlaid, as one PNG: ``trends.png`` beside ``report.html``.

A grid of small panels, each present when at least one run recorded its series: the loss (and up
to three more scalars the user logged), the learning rate of each parameter group, the global
gradient norm, update ratio, second-moment drift (since the previous sample, and since the freeze
step when a freeze probe ran), top-k coverage and quantization error, each over steps; ratios on a
log scale with the healthy band of `optiscope.dashboards.bands` shaded; and the optimizer state
bytes of each run split by state key. NaN and ±inf values are marked with a ✕ at the top of their
panel, at their step (red; with several runs, a row of marks per run in its colour). Long series
are downsampled to at most ``max_points`` points per line keeping each bin's minimum and
maximum, so a one-step spike survives.

Drawn with matplotlib's Agg canvas directly (`matplotlib.figure.Figure` and `FigureCanvasAgg`, no
pyplot): calling `write_png` in a Jupyter session leaves its backend, its current figure and its
rcParams as they were.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib.style
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import LogFormatter

from optiscope.atomicfile import atomic_file
from optiscope.dashboards.bands import BANDS
from optiscope.dashboards.downsample import minmax_downsample
from optiscope.dashboards.runs import as_run_list, labelled_histories
from optiscope.formatting import format_bytes
from optiscope.monitor.history import RunHistory
from optiscope.monitor.metrics import MONITOR_SERIES

__all__ = ["write_png"]


@dataclass(frozen=True)
class _Panel:
    """A panel of one series over steps: the global scope, or every scope (``lr`` per group)."""

    metric: str
    title: str
    log: bool = True
    every_scope: bool = False
    ylim: tuple[float | None, float | None] = (None, None)  # fixed limits; None: the data's


_PANELS = (
    _Panel("lr", "learning rate", log=False, every_scope=True, ylim=(0, None)),
    _Panel("grad_norm", r"gradient norm $\|g\|$"),
    _Panel("update_ratio", r"update ratio $\|\Delta\theta\|\,/\,\|\theta\|$"),
    _Panel("moment2_drift", r"second-moment drift $\|v_t - v_p\|\,/\,\|v_p\|$"),
    _Panel("moment2_drift_since_freeze",
           r"drift since the freeze step $\|v_t - v_T\|\,/\,\|v_T\|$"),
    _Panel("topk_coverage", r"top-k coverage $\|T_k(x)\|^2\,/\,\|x\|^2$", log=False,
           ylim=(0, 1.02)),
    _Panel("quant_error", r"quantization error $\|x - Q^{-1}(Q(x))\|\,/\,\|x\|$"),
    _Panel("moment1_quant_error", r"requantization error of $m$, one step"),
    _Panel("moment2_quant_error", r"requantization error of $v$, one step"),
)
# Series the monitor records itself; any other is a user scalar (``log_scalar``).
_MONITOR_SERIES = MONITOR_SERIES
_MAX_USER_SCALARS = 4
# The HTML report's run colours, so that a run has the same colour in both.
_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
            "#17becf", "#7f7f7f", "#bcbd22")
_GROUP_STYLES = ("-", "--", ":", "-.")
_NONFINITE = "#b42318"
_BAND = "#1b7f3b"
_COLUMNS = 3
_STYLE = {  # on top of matplotlib's defaults, whatever style the caller has set
    "font.size": 8.5, "axes.titlesize": 9.5, "axes.titleweight": "bold",
    "axes.titlelocation": "left", "axes.spines.top": False, "axes.spines.right": False,
    "axes.grid": True, "grid.alpha": 0.3, "grid.linewidth": 0.6, "legend.fontsize": 8.5,
    "legend.frameon": False, "lines.linewidth": 1.3, "xtick.labelsize": 8, "ytick.labelsize": 8,
}


def write_png(runs, out: str | os.PathLike, *, names: Sequence[str] | None = None,
              dpi: float = 110, max_points: int = 2000) -> Path:
    """Draws the trends of one run, or of several overlaid, into one PNG file.

    Args:
        runs: a `RunHistory` or a run directory (read with `load_run`), or a sequence of them.
        out: the PNG file to write (its directory is created; an existing file is replaced
            atomically).
        names: one legend name per run (default: the run directory's name, or the optimizer's
            class name for a `RunHistory`; repeated names get " (2)", " (3)", ...).
        dpi: resolution (default 110: about 1,400 pixels wide).
        max_points: the most points a line keeps (default 2000); longer series keep each
            bin's minimum and maximum.

    Returns:
        The path written.

    Raises:
        FileNotFoundError: a path in ``runs`` is not a run directory (from `load_run`).
        ValueError: no runs, ``names`` of the wrong length, or a bad ``dpi`` or ``max_points``.
        IsADirectoryError: ``out`` is a directory.
    """
    histories, labels = labelled_histories(as_run_list(runs, "write_png"), names, "write_png")
    if isinstance(dpi, bool) or not isinstance(dpi, (int, float)) or not 10 <= dpi <= 1000:
        raise ValueError(f"write_png: dpi must be a number in [10, 1000], got {dpi!r}")
    if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 4:
        raise ValueError(f"write_png: max_points must be an integer >= 4, got {max_points!r}")
    out = Path(out)
    if out.is_dir():
        raise IsADirectoryError(f"write_png: out {str(out)!r} is a directory; pass a file path "
                                f"such as {str(out / 'trends.png')!r}")
    with matplotlib.style.context(["default", _STYLE]):
        fig = _figure(histories, labels, dpi, max_points // 2)
        FigureCanvasAgg(fig)
        return _save(fig, out, dpi)


# ---------------------------------------------------------------------------------- the figure
def _figure(histories: list[RunHistory], labels: list[str], dpi: float, bins: int) -> Figure:
    user = _user_scalars(histories)
    panels = [_Panel(m, m, log=False) for m in user]
    panels += [p for p in _PANELS if any(p.metric in h.metrics() for h in histories)]
    memory = [(label, h) for label, h in zip(labels, histories) if _state_keys(h)]
    count = len(panels) + bool(memory)
    rows = max(1, math.ceil(count / _COLUMNS))
    fig = Figure(figsize=(13, 0.9 + 2.7 * rows), dpi=dpi, layout="constrained")
    fig.suptitle(_title(histories, labels), x=0.01, ha="left", fontsize=12, fontweight="bold")
    if not count:
        fig.text(0.5, 0.5, "no series recorded yet: the run has no sampled step", ha="center",
                 va="center", fontsize=11, color="#555555")
        return fig
    grid = fig.add_gridspec(rows, _COLUMNS)
    legend = _Legend(labels if len(histories) > 1 else [])
    first = None
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(grid[i // _COLUMNS, i % _COLUMNS], sharex=first)
        first = first or ax
        _draw(ax, panel, histories, legend, bins)
        if i + _COLUMNS >= count:
            ax.set_xlabel("step")
    if memory:
        i = len(panels)
        _draw_state_bytes(fig.add_subplot(grid[i // _COLUMNS, i % _COLUMNS]), memory)
    if legend.handles:
        fig.legend(handles=legend.handles, loc="outside upper right",
                   ncols=min(len(legend.handles), 6))
    return fig


class _Legend:
    """The figure's legend: one entry per run (when several), then the markers in use."""

    def __init__(self, runs: list[str]):
        self.handles = [Line2D([], [], color=_PALETTE[i % len(_PALETTE)], label=name)
                        for i, name in enumerate(runs)]
        self.several = len(runs) > 1
        self._seen: set[str] = set()

    def mark(self, what: str) -> None:
        if what in self._seen:
            return
        self._seen.add(what)
        if what == "nonfinite":
            self.handles.append(Line2D([], [], color="#333333" if self.several else _NONFINITE,
                                       marker="x", linestyle="", markeredgewidth=1.8,
                                       label="NaN / ±inf value"))
        elif what == "band":
            self.handles.append(Patch(color=_BAND, alpha=0.15, label="healthy band"))
        elif what == "freeze":
            self.handles.append(Line2D([], [], color="#555555", linestyle=":",
                                       label="freeze step T"))


def _draw(ax, panel: _Panel, histories: list[RunHistory], legend: _Legend, bins: int) -> None:
    ax.set_title(panel.title)
    if panel.log:
        ax.set_yscale("log", nonpositive="mask")
        ax.yaxis.set_major_formatter(_PlainLogFormatter())
        ax.yaxis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False))
    finite: list[np.ndarray] = []
    for index, history in enumerate(histories):
        if panel.metric not in history.metrics():
            continue
        available = history.scopes(panel.metric)
        scopes = available if panel.every_scope else [s for s in ("global",) if s in available]
        color = _PALETTE[index % len(_PALETTE)]
        for j, scope in enumerate(scopes):
            steps, values = minmax_downsample(*history.series(panel.metric, scope), bins)
            ok = np.isfinite(values)
            ax.plot(steps, np.where(ok, values, np.nan), color=color,
                    linestyle=_GROUP_STYLES[j % len(_GROUP_STYLES)],
                    marker="o" if len(steps) < 3 else None)  # one point draws no line
            finite.append(values[ok])
            if not ok.all():
                # At the top of the axes (x in data, y in axes coordinates): a NaN has no
                # height. With several runs, one row per run in the run's colour.
                ax.plot(steps[~ok], np.full(int((~ok).sum()), 0.96 - 0.05 * index),
                        linestyle="", marker="x", markersize=5, markeredgewidth=1.6,
                        color=color if legend.several else _NONFINITE,
                        transform=ax.get_xaxis_transform(), clip_on=False)
                legend.mark("nonfinite")
        if panel.metric == "moment2_drift_since_freeze" and history.meta.get("freeze_probe"):
            ax.axvline(history.meta["freeze_probe"], color="#555555", linestyle=":",
                       linewidth=1)
            legend.mark("freeze")
    lines = max(len(h.scopes(panel.metric)) for h in histories if panel.metric in h.metrics())
    if panel.every_scope and lines > 1:  # the line styles of lr's parameter groups
        ax.legend(handles=[Line2D([], [], color="#444444", label=f"group{j}",
                                  linestyle=_GROUP_STYLES[j % len(_GROUP_STYLES)])
                           for j in range(lines)], loc="best")
    if _shade_band(ax, panel, np.concatenate(finite) if finite else np.zeros(0)):
        legend.mark("band")
    ax.set_ylim(*panel.ylim)
    if not panel.log:
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useMathText=True)


class _PlainLogFormatter(LogFormatter):
    """matplotlib's choice of labelled ticks on a log axis (minor ones too on a short range),
    written as plain numbers (0.03, 1e-05) rather than as 3×10⁻²."""

    def __call__(self, x, pos=None):
        return f"{x:.3g}" if super().__call__(x, pos) else ""


def _shade_band(ax, panel: _Panel, values: np.ndarray) -> bool:
    """Shades the metric's healthy band, an open side clipped to the data (or to the panel's
    fixed limits); True if drawn."""
    band = BANDS.get(panel.metric)
    if panel.log:
        values = values[values > 0]
    if band is None or not len(values):
        return False
    bottom, top = (float(values.min()) if panel.ylim[0] is None else panel.ylim[0],
                   float(values.max()) if panel.ylim[1] is None else panel.ylim[1])
    lo = band.lo if band.lo is not None else bottom
    hi = band.hi if band.hi is not None else top
    if lo >= hi:
        return False
    limits = ax.get_ylim()
    ax.axhspan(lo, hi, color=_BAND, alpha=0.08, linewidth=0, zorder=0)
    ax.set_ylim(limits)  # the band never stretches the axis: the data decide the range
    return True


def _draw_state_bytes(ax, memory: list[tuple[str, RunHistory]]) -> None:
    """One horizontal bar per run: its last state bytes, stacked by state key."""
    ax.set_title("optimizer state, by state key")
    keys = list(dict.fromkeys(k for _, h in memory for k in _state_keys(h)))
    colors = {k: _PALETTE[(i + 4) % len(_PALETTE)] for i, k in enumerate(keys)}
    largest = max(sum(_state_keys(h).values()) for _, h in memory)
    exponent = min(int(math.log(largest, 1024)), 4) if largest >= 1 else 0
    scale = 1024.0 ** exponent  # the axis in one binary unit, so its ticks are round numbers
    for row, (label, history) in enumerate(memory):
        left = 0.0
        for key, nbytes in _state_keys(history).items():
            ax.barh(row, nbytes / scale, left=left / scale, color=colors[key], height=0.6)
            left += nbytes
        n_params = history.meta.get("n_params")
        per = f", {left / n_params:.2f} B/param" if n_params else ""
        ax.annotate(f" {format_bytes(left)}{per}", (left / scale, row), va="center", fontsize=8)
    ax.set_yticks(range(len(memory)), [label for label, _ in memory])
    ax.set_ylim(max(len(memory), 3) - 0.5, -0.5)  # bars keep their thickness for one run
    ax.set_xlim(0, 1.6 * largest / scale if largest > 0 else 1)
    ax.set_xlabel(("B", "KiB", "MiB", "GiB", "TiB")[exponent])
    ax.grid(axis="y", visible=False)
    ax.legend(handles=[Patch(color=colors[k], label=k) for k in keys], loc="lower right",
              title="state key", title_fontsize=8)


# ---------------------------------------------------------------------------------- helpers
def _user_scalars(histories: list[RunHistory]) -> list[str]:
    """The user's global scalars of any run, ``loss`` first, at most `_MAX_USER_SCALARS`."""
    found = dict.fromkeys(m for h in histories for m in h.metrics()
                          if m not in _MONITOR_SERIES and h.scopes(m) == ["global"])
    return sorted(found, key=lambda m: m != "loss")[:_MAX_USER_SCALARS]


def _state_keys(history: RunHistory) -> dict[str, float]:
    """The last state bytes of each state key (``exp_avg``, ...)."""
    if "state_bytes" not in history.metrics():
        return {}
    out = {}
    for scope in history.scopes("state_bytes"):
        if scope.startswith("key/"):
            values = history.series("state_bytes", scope)[1]
            if len(values) and np.isfinite(values[-1]):
                out[scope[len("key/"):]] = float(values[-1])
    return out


def _title(histories: list[RunHistory], labels: list[str]) -> str:
    if len(histories) > 1:
        return f"optiscope trends: {len(histories)} runs"
    meta = histories[0].meta
    facts = [labels[0]]
    if meta.get("optimizer_name") and meta["optimizer_name"] != labels[0]:
        facts.append(str(meta["optimizer_name"]))
    if meta.get("n_params"):
        facts.append(f"{int(meta['n_params']):,} parameters")
    steps = histories[0].last_step()
    if steps:
        facts.append(f"{steps:,} steps" + (f", sampled every {meta['every']}"
                                           if meta.get("every", 1) != 1 else ""))
    return "optiscope trends: " + " · ".join(facts)


def _save(fig: Figure, out: Path, dpi: float) -> Path:
    """Writes the PNG through a temporary file, so no reader sees half an image."""
    with atomic_file(out, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi, metadata={"Software": "optiscope"})
    return out
