"""Downsampling long series for plotting, without losing their spikes.

A 10,000-step run sampled every step has 10,000 points per series; a browser draws a few thousand
at most usefully, and the HTML report must stay small. Averaging bins would hide exactly what a
person opens the report for (the one step where a layer's gradient blew up), so both functions
keep extremes instead:

* `minmax_downsample` (lines): per bin of consecutive samples, the smallest and the largest
  value, at their own steps and in step order, plus the first non-finite sample of the bin.
* `downsample_2d` (heatmaps, layer × step): per bin, one cell per layer holding the bin's
  maximum (or minimum, for metrics where a dip is the event, such as top-k coverage), and a flag
  for bins that held a non-finite value.

Bins hold equal numbers of consecutive samples (not equal step ranges), so a run whose sampling
changed (``every`` changed on resume, a freeze-probe step) keeps its resolution everywhere.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["minmax_downsample", "downsample_2d", "Downsampled2D"]


def _edges(n: int, bins: int) -> np.ndarray:
    """Start indices of ``bins`` runs of consecutive samples covering ``n`` samples."""
    return np.linspace(0, n, bins + 1).astype(np.int64)[:-1]


def _check_bins(bins: int) -> None:
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ValueError(f"bins must be an integer >= 1, got {bins!r}")


def minmax_downsample(steps, values, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``2 * bins`` points (plus non-finite ones) that keep every bin's extremes.

    The samples are cut into ``bins`` runs of consecutive samples; from each run the smallest
    and the largest finite value are kept at their own steps, so a one-sample spike survives any
    amount of downsampling. A NaN or ±inf is never dropped silently: the first non-finite sample of
    each bin is kept as well (a plot shows it as a gap or a marker). The first and last samples
    are always kept, so the plotted range is the run's range. A series of at most
    ``2 * bins`` samples is returned unchanged.

    Args:
        steps: the steps, one per value, increasing.
        values: the values (NaN and ±inf allowed).
        bins: number of bins, >= 1.

    Returns:
        ``(steps, values)``: the kept samples, in step order, as new arrays of the input dtypes.
    """
    _check_bins(bins)
    steps, values = np.asarray(steps), np.asarray(values)
    if steps.shape != values.shape or steps.ndim != 1:
        raise ValueError(f"steps and values must be 1-D arrays of one length, got shapes "
                         f"{steps.shape} and {values.shape}")
    n = len(values)
    if n <= 2 * bins:
        return steps.copy(), values.copy()
    in_bin = np.repeat(np.arange(bins), np.diff(np.append(_edges(n, bins), n)))
    as_float = values.astype(np.float64, copy=False)
    finite = np.isfinite(as_float)
    # Within each bin, sort by value (non-finite last); the first entry is the bin's minimum.
    lowest = np.lexsort((np.where(finite, as_float, np.inf), ~finite, in_bin))
    highest = np.lexsort((np.where(finite, -as_float, np.inf), ~finite, in_bin))
    first_of_bin = np.flatnonzero(np.diff(in_bin, prepend=-1))
    keep = [lowest[first_of_bin], highest[first_of_bin], [0, n - 1]]
    bad = np.flatnonzero(~finite)
    if len(bad):
        keep.append(bad[np.unique(in_bin[bad], return_index=True)[1]])
    kept = np.unique(np.concatenate(keep))
    return steps[kept], values[kept]


class Downsampled2D(NamedTuple):
    """A layer × step matrix reduced to layer × bin.

    Attributes:
        start: ``[bins]`` the first step of each bin.
        stop: ``[bins]`` the last step of each bin.
        cells: ``[layers, bins]`` float64, the maximum (or minimum) of the finite values of
            each layer in each bin; NaN where the layer had no finite value there.
        nonfinite: ``[layers, bins]`` bool, where the layer recorded a NaN or ±inf in the bin.
    """

    start: np.ndarray
    stop: np.ndarray
    cells: np.ndarray
    nonfinite: np.ndarray


def downsample_2d(steps, values, bins: int, *, reduce: str = "max",
                  present=None) -> Downsampled2D:
    """Reduces a layer × step matrix to at most ``bins`` columns, keeping each bin's extreme.

    A cell holds the maximum of the layer's finite values in the bin (``reduce="max"``), the
    honest choice for norms and ratios: a spike at one step colours its whole cell. For metrics
    where the event is a dip (top-k coverage falling) pass ``reduce="min"``. Non-finite values do
    not enter the cells; `Downsampled2D.nonfinite` marks where they were, so that a plot can flag
    them instead of leaving them as blank cells indistinguishable from missing data. With at most
    ``bins`` steps every step is its own bin.

    Args:
        steps: ``[n]`` increasing steps.
        values: ``[layers, n]`` values; NaN or ±inf where a value was recorded as such.
        bins: the most columns to keep, >= 1.
        reduce: ``"max"`` (default) or ``"min"``.
        present: optional ``[layers, n]`` bool, False where the layer recorded nothing at that step
            (a tensor without a gradient); those entries are ignored. Default None: every entry
            is a recorded value.

    Returns:
        A `Downsampled2D`.
    """
    _check_bins(bins)
    if reduce not in ("max", "min"):
        raise ValueError(f"reduce must be 'max' or 'min', got {reduce!r}")
    steps = np.asarray(steps)
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or steps.ndim != 1 or values.shape[1] != len(steps):
        raise ValueError(f"values must be [layers, n] for n = len(steps) = {len(steps)}, got "
                         f"shape {values.shape}")
    present = (np.ones(values.shape, dtype=bool) if present is None
               else np.asarray(present, dtype=bool))
    if present.shape != values.shape:
        raise ValueError(f"present must have the shape of values {values.shape}, got "
                         f"{present.shape}")
    n = len(steps)
    if n == 0:
        empty = np.zeros(0, dtype=steps.dtype)
        return Downsampled2D(empty, empty, values.copy(), np.zeros(values.shape, dtype=bool))
    starts = _edges(n, min(bins, n))
    finite = np.isfinite(values) & present
    fill = -np.inf if reduce == "max" else np.inf
    ufunc = np.maximum if reduce == "max" else np.minimum
    cells = ufunc.reduceat(np.where(finite, values, fill), starts, axis=1)
    cells[np.add.reduceat(finite, starts, axis=1) == 0] = np.nan
    nonfinite = np.logical_or.reduceat(present & ~np.isfinite(values), starts, axis=1)
    stops = np.append(starts[1:], n) - 1
    return Downsampled2D(steps[starts], steps[stops], cells, nonfinite)
