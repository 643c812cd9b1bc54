"""The history of a run: what `OptimizerMonitor.history` and `load_run` return.

Values are kept per metric in growable float64 arrays (one column per scope), not as Python
floats: 10,000 samples of 150 tensors and 14 metrics stay ~170 MB as arrays and would be several
GB as Python objects.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import numpy as np

__all__ = ["Alert", "RunHistory", "LongTable"]


class LongTable(NamedTuple):
    """A run's values as columns, one row per value (`RunHistory.long_table`).

    Attributes:
        steps: int64 steps.
        metric_codes: int32 indices into ``metrics``, the metric names.
        scope_codes: int32 indices into ``scopes``, the scope names.
        values: float64 values.
    """

    steps: np.ndarray
    metric_codes: np.ndarray
    metrics: list[str]
    scope_codes: np.ndarray
    scopes: list[str]
    values: np.ndarray


@dataclass
class Alert:
    """Something the monitor noticed.

    Attributes:
        step: the optimizer step it happened at.
        kind: ``"nonfinite_grads"``, ``"grad_spike"``, ``"update_ratio_band"`` or
            ``"skipped_steps"``.
        metric: the metric that triggered it.
        tensors: the scopes (tensor names, or ``"global"``) involved.
        message: one human-readable line.
        value: the triggering value, when there is one.
    """

    step: int
    kind: str
    metric: str
    tensors: list[str]
    message: str
    value: float | None = None

    def to_json(self) -> dict:
        return asdict(self)


class _Series:
    """One metric: steps × scopes, grown by doubling."""

    def __init__(self):
        self.scopes: dict[str, int] = {}
        self.steps = np.zeros(0, dtype=np.int64)
        self.values = np.zeros((0, 0))
        self.recorded = np.zeros((0, 0), dtype=bool)  # NaN is a value; "no value" is False here
        self.n = 0
        # The columns of the last scope list (a copy of it, and a slice when they follow each
        # other): the monitor passes the same list while its tensors stay.
        self._last: tuple[list[str], object] = ([], slice(0, 0))

    def _columns(self, scopes: list[str]):
        index = self.scopes
        for s in scopes:
            if s not in index:
                index[s] = len(index)
        cols = np.array([index[s] for s in scopes], dtype=np.intp)
        if len(cols) and np.array_equal(cols, np.arange(cols[0], cols[0] + len(cols))):
            cols = slice(int(cols[0]), int(cols[0]) + len(cols))
        self._last = (list(scopes), cols)
        return cols

    def add(self, step: int, scopes: list[str], values) -> None:
        last, cols = self._last
        if scopes != last:  # C-level: the same str objects compare by identity first
            cols = self._columns(scopes)
        rows, width = self.values.shape
        if width < len(self.scopes) or self.n == rows:
            cap = rows if self.n < rows else max(16, 2 * self.n)
            grown = np.full((cap, len(self.scopes)), np.nan)
            recorded = np.zeros((cap, len(self.scopes)), dtype=bool)
            grown[: self.n, :width] = self.values[: self.n]
            recorded[: self.n, :width] = self.recorded[: self.n]
            self.values, self.recorded = grown, recorded
            self.steps = np.concatenate([self.steps, np.zeros(cap - len(self.steps), np.int64)])
        if self.n and self.steps[self.n - 1] == step:  # more values for the same step
            row = self.n - 1
        else:
            row = self.n
            self.n += 1
            self.steps[row] = step
        self.values[row, cols] = np.asarray(values, dtype=np.float64)
        self.recorded[row, cols] = True

    def keep_until(self, step: int) -> None:
        """Drops the rows of steps after ``step``."""
        keep = np.flatnonzero(self.steps[: self.n] <= step)
        if len(keep) == self.n:
            return
        n = len(keep)
        self.steps[:n] = self.steps[keep]
        self.values[:n] = self.values[keep]
        self.recorded[:n] = self.recorded[keep]
        self.n = n


class _Histograms:
    """One quantity's log2 histograms: per step the global counts (dense) and each tensor's
    nonzero span (first bin, counts) in one flat buffer, so 10,000 samples of 150 tensors cost
    about the bins they fill, not 150 × HIST_BINS each."""

    def __init__(self):
        self.scopes: dict[str, int] = {}
        self.steps: list[int] = []
        self.glob: list[np.ndarray] = []
        self.spans: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, step: int, scopes: list[str], counts: np.ndarray) -> None:
        counts = np.asarray(counts, dtype=np.float64)
        ids = np.array([self.scopes.setdefault(s, len(self.scopes)) for s in scopes], np.int32)
        nonzero = counts != 0
        first = np.where(nonzero.any(axis=1), nonzero.argmax(axis=1), 0)
        last = np.where(nonzero.any(axis=1), counts.shape[1] - nonzero[:, ::-1].argmax(axis=1), 0)
        flat = np.concatenate([row[a:b] for row, a, b in zip(counts, first, last)]) \
            if len(counts) else np.zeros(0)
        ends = np.cumsum(last - first)
        self.steps.append(step)
        self.glob.append(counts.sum(axis=0))
        self.spans.append((ids, first.astype(np.int32), ends, flat))

    def keep_until(self, step: int) -> None:
        """Drops the histograms of steps after ``step``."""
        keep = [i for i, s in enumerate(self.steps) if s <= step]
        if len(keep) < len(self.steps):
            self.steps = [self.steps[i] for i in keep]
            self.glob = [self.glob[i] for i in keep]
            self.spans = [self.spans[i] for i in keep]

    def of(self, scope: str, bins: int) -> tuple[np.ndarray, np.ndarray]:
        if scope == "global":
            return np.array(self.steps, dtype=np.int64), np.array(self.glob).reshape(-1, bins)
        sid = self.scopes[scope]
        steps, rows = [], []
        for step, (ids, first, ends, flat) in zip(self.steps, self.spans):
            hit = np.flatnonzero(ids == sid)
            if not len(hit):
                continue
            j = hit[0]
            start = ends[j - 1] if j else 0
            row = np.zeros(bins)
            row[first[j]:first[j] + ends[j] - start] = flat[start:ends[j]]
            steps.append(step)
            rows.append(row)
        return np.array(steps, dtype=np.int64), np.array(rows).reshape(-1, bins)


@dataclass
class RunHistory:
    """Every recorded value of a run.

    Attributes:
        meta: run metadata (optimizer, hyperparameters, parameter names and shapes, versions...).
        alerts: every alert, in order.
    """

    meta: dict = field(default_factory=dict)
    alerts: list[Alert] = field(default_factory=list)

    def __post_init__(self):
        self._series: dict[str, _Series] = {}
        self._histograms: dict[str, _Histograms] = {}
        self._bins = 0

    def __eq__(self, other: object) -> bool:
        # Compares the series too: the dataclass's own __eq__ saw only meta and alerts.
        if not isinstance(other, RunHistory):
            return NotImplemented
        if (self.meta, self.alerts, self.metrics()) != (other.meta, other.alerts, other.metrics()):
            return False
        if self.histogram_quantities() != other.histogram_quantities():
            return False
        for name, a in self._histograms.items():
            b = other._histograms[name]
            if a.scopes != b.scopes or a.steps != b.steps or not all(
                    np.array_equal(x, y) for sa, sb in zip(a.spans, b.spans)
                    for x, y in zip(sa, sb)):
                return False
        for name, a in self._series.items():
            b = other._series[name]
            if (a.scopes != b.scopes or not np.array_equal(a.steps[: a.n], b.steps[: b.n])
                    or not np.array_equal(a.recorded[: a.n], b.recorded[: b.n])
                    or not np.array_equal(a.values[: a.n], b.values[: b.n], equal_nan=True)):
                return False
        return True

    def add(self, step: int, metric: str, scopes: list[str], values) -> None:
        """Records ``values[i]`` for ``scopes[i]`` of ``metric`` at ``step``."""
        series = self._series.get(metric)
        if series is None:
            series = self._series[metric] = _Series()
        series.add(step, scopes, values)

    def add_sample(self, step: int, values: dict) -> None:
        """`add` of every metric of one sample: ``values[metric] = (scopes, numbers)``."""
        series = self._series
        for metric, (scopes, numbers) in values.items():
            one = series.get(metric)
            if one is None:
                one = series[metric] = _Series()
            one.add(step, scopes, numbers)

    def drop_after(self, step: int) -> None:
        """Removes the values, histograms and alerts of steps after ``step`` (in place): a run
        resumed from its checkpoint at ``step`` supersedes them, as `load_run` reading the run
        log's resume record does."""
        for series in self._series.values():
            series.keep_until(step)
        for hists in self._histograms.values():
            hists.keep_until(step)
        self.alerts[:] = [a for a in self.alerts if a.step <= step]
        if int(self.meta.get("steps_taken", 0)) > step:
            self.meta.pop("steps_taken")

    def add_histograms(self, step: int, histograms: dict) -> None:
        """Records one sample's histograms: ``{quantity: (scopes, counts [n, bins])}``."""
        for quantity, (scopes, counts) in histograms.items():
            self._bins = np.shape(counts)[1] if len(scopes) else self._bins
            self._histograms.setdefault(quantity, _Histograms()).add(step, list(scopes), counts)

    def histogram_quantities(self) -> list[str]:
        """The quantities with log2 histograms (``grad``, ``update``, ``moment2``)."""
        return list(self._histograms)

    def histogram_scopes(self, quantity: str) -> list[str]:
        """``"global"`` and the tensors with histograms of ``quantity``."""
        return ["global", *self._lookup_histograms(quantity).scopes]

    def histograms(self, quantity: str, scope: str = "global") -> tuple[np.ndarray, np.ndarray]:
        """``(steps, counts)`` of the log2|x| histograms of ``quantity`` (``grad``, ``update``,
        ``moment2``) for one tensor or ``"global"`` (the sum over the tensors): int64
        ``[n_steps]`` and float64 ``[n_steps, HIST_BINS]``, entries per bin scaled to the
        tensor; the bins are those of `optiscope.monitor.metrics` (``EXP_MIN``, ``EXP_MAX``):
        zero, below 2^EXP_MIN, one per exponent, at or above 2^EXP_MAX, non-finite."""
        h = self._lookup_histograms(quantity)
        if scope != "global" and scope not in h.scopes:
            raise KeyError(f"no {quantity} histograms for scope {scope!r}; scopes: "
                           f"{', '.join(list(h.scopes)[:8])}{' ...' if len(h.scopes) > 8 else ''}")
        return h.of(scope, self._bins)

    def _lookup_histograms(self, quantity: str) -> _Histograms:
        if quantity not in self._histograms:
            raise KeyError(f"no {quantity!r} histograms in this run; recorded: "
                           f"{', '.join(self._histograms) or 'none'}")
        return self._histograms[quantity]

    def metrics(self) -> list[str]:
        """Names of the recorded metrics and user scalars."""
        return list(self._series)

    def scopes(self, metric: str) -> list[str]:
        """Scopes recorded for ``metric``: ``"global"``, tensor names, param groups, state keys."""
        return list(self._lookup(metric).scopes)

    def series(self, metric: str, scope: str = "global") -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of one metric and scope, as int64 and float64 arrays.

        Steps where the scope had no value (a tensor without a gradient that step) are left out;
        a NaN that was recorded (a NaN gradient's norm) is kept.
        """
        s = self._lookup(metric)
        if scope not in s.scopes:
            raise KeyError(f"metric {metric!r} has no scope {scope!r}; scopes: "
                           f"{', '.join(list(s.scopes)[:8])}{' ...' if len(s.scopes) > 8 else ''}")
        col = s.scopes[scope]
        keep = s.recorded[: s.n, col]
        return s.steps[: s.n][keep], s.values[: s.n, col][keep]

    def last_step(self) -> int:
        """The last optimizer step of the run: the step count `close` recorded, else the last
        step with any value (a run that crashed loses the steps after its last sample)."""
        last = max((int(s.steps[s.n - 1]) for s in self._series.values() if s.n), default=0)
        return max(last, int(self.meta.get("steps_taken", 0)))

    def _lookup(self, metric: str) -> _Series:
        if metric not in self._series:
            raise KeyError(f"no metric {metric!r} in this run; recorded: {', '.join(self._series)}")
        return self._series[metric]

    def to_pandas(self):
        """Every recorded value as a long `pandas.DataFrame`: columns ``step`` (int64),
        ``metric``, ``scope`` (categoricals) and ``value`` (float64), one row per value; rows
        metric by metric, scope by scope, then by step (as ``optiscope export`` writes them).

        Raises:
            ImportError: pandas is not installed (``pip install 'optiscope[pandas]'``).
        """
        try:
            import pandas as pd
        except ImportError as exc:
            raise ImportError("optiscope: RunHistory.to_pandas needs pandas, which is not "
                              "installed: pip install 'optiscope[pandas]'") from exc
        t = self.long_table()
        return pd.DataFrame({
            "step": t.steps,
            "metric": pd.Categorical.from_codes(t.metric_codes, categories=t.metrics),
            "scope": pd.Categorical.from_codes(t.scope_codes, categories=t.scopes),
            "value": t.values,
        })

    def long_table(self) -> LongTable:
        """Every recorded value as one row of four columns, metric by metric, scope by scope,
        then by step: what `to_pandas` and ``optiscope export`` write."""
        steps, values, metric_codes, scope_codes = [], [], [], []
        scopes: dict[str, int] = {}
        for m, name in enumerate(self._series):
            for scope in self._series[name].scopes:
                st, va = self.series(name, scope)
                s = scopes.setdefault(scope, len(scopes))
                steps.append(st)
                values.append(va)
                metric_codes.append(np.full(len(st), m, dtype=np.int32))
                scope_codes.append(np.full(len(st), s, dtype=np.int32))

        def cat(parts, dtype):
            return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

        return LongTable(cat(steps, np.int64), cat(metric_codes, np.int32), list(self._series),
                         cat(scope_codes, np.int32), list(scopes), cat(values, np.float64))
