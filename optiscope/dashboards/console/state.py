"""What the terminal dashboard knows about a run: a plain object fed by the sink calls.

`ConsoleState` holds the latest value of every per-tensor metric, a short history of each for the
sparklines, the global trends, user scalars, learning rates, optimizer-state bytes, the latest
alerts, and the series the compression-readiness verdicts read (`verdicts`). It draws nothing: the renderables of `optiscope.dashboards.console.view` read it, and a
test can fill one directly (`record`, `on_meta`, `add_alert`) without a console.
"""

from __future__ import annotations

import math
import os
from collections import deque

from optiscope.dashboards.sink import Values
from optiscope.monitor.history import Alert, RunHistory
from optiscope.monitor.metrics import MONITOR_SERIES, TENSOR_METRICS
from optiscope.monitor.readiness import PER_TENSOR_SERIES, READINESS_SERIES, Verdict, readiness

__all__ = ["ConsoleState", "LAYER_COLUMNS", "TREND_ROWS", "PER_TENSOR"]

# (metric, column header, sparkline on a log scale): norms and ratios span decades, so a linear
# scale would flatten everything but the largest sample; coverage and loss are read linearly.
LAYER_COLUMNS = (
    ("grad_norm", "grad norm", True),
    ("update_ratio", "upd ratio", True),
    ("moment2_drift", "v drift", True),
    ("topk_coverage", "top-k cov", False),
    ("quant_error", "quant err", True),
)
TREND_ROWS = (
    ("grad_norm", "grad norm", True),
    ("update_ratio", "update ratio", True),
    ("moment2_drift", "v drift", True),
    ("moment2_drift_since_freeze", "v since freeze", True),  # only with a freeze step
    ("loss", "loss", False),
)
PER_TENSOR = {m.name for m in TENSOR_METRICS}
_TREND_METRICS = {metric for metric, _, _ in TREND_ROWS}
# Records that are neither per-tensor metrics nor user scalars.
_MONITOR_SERIES = PER_TENSOR | MONITOR_SERIES
_TREND_HISTORY = 240      # global samples kept for the trend sparklines (a wide terminal's worth)
_RATE_WINDOW = 8          # samples over which steps/s is measured
ALERTS_SHOWN = 3


class ConsoleState:
    """The dashboard's view of one run, updated by `on_meta`, `record` and `add_alert`.

    Args:
        spark_len: samples of history kept per layer and metric for the sparklines.
    """

    def __init__(self, spark_len: int = 32):
        self.spark_len = spark_len
        self.meta: dict = {}
        self.step: int | None = None
        self.clock: deque[tuple[int, float]] = deque(maxlen=_RATE_WINDOW)
        self.finished_at: int | None = None
        # metric -> scope -> (step, value): the latest value of every per-tensor metric.
        self.latest: dict[str, dict[str, tuple[int, float]]] = {}
        # metric -> scope -> recent values, for the layer sparklines.
        self.history: dict[str, dict[str, deque[float]]] = {m: {} for m, _, _ in LAYER_COLUMNS}
        self.trends: dict[str, deque[float]] = {}
        self.scalars: dict[str, float] = {}       # user scalars' latest values
        self.lr: list[tuple[str, float]] = []
        self.state: dict[str, float] = {}         # state_bytes: "global" and "key/..." scopes
        self.cuda_bytes: float | None = None
        self.skipped_steps = 0
        self.layers: dict[str, None] = {}          # tensor names in first-seen order
        self.alerts: deque[Alert] = deque(maxlen=ALERTS_SHOWN)
        self.alert_count = 0
        self.samples = 0
        # The series the compression-readiness verdicts read: global values (and per tensor the
        # few whose spread sets a standard error), sharing `meta`, so `verdicts` can judge live.
        self.readiness_history = RunHistory(meta=self.meta)
        self._verdicts: list[Verdict] = []
        self._verdicts_at: tuple[int, int] | None = None
        self._meta_changes = 0

    # -------------------------------------------------------------------------- updates
    def on_meta(self, changes: dict) -> None:
        self.meta.update(changes)
        self._meta_changes += 1
        for p in changes.get("params") or ():  # model order ranks ties and first renders
            if isinstance(p, dict) and "name" in p:
                self.layers.setdefault(str(p["name"]), None)
        if "steps_taken" in changes:
            self.finished_at = int(changes["steps_taken"])

    def add_alert(self, alert: Alert) -> None:
        self.alerts.append(alert)
        self.alert_count += 1

    def record(self, step: int, at: float, values: Values) -> None:
        """Takes one sample: ``values[metric] = (scopes, numbers)``."""
        self.samples += 1
        if self.step is None or step >= self.step:
            self.step = step
        if self.finished_at is not None and step > self.finished_at:
            self.finished_at = None  # a resumed run is going on
        if not self.clock or step > self.clock[-1][0]:
            self.clock.append((step, at))
        for metric, (scopes, numbers) in values.items():
            if metric in READINESS_SERIES:
                kept = [(s, v) for s, v in zip(scopes, numbers)
                        if s == "global" or metric in PER_TENSOR_SERIES]
                if kept:
                    self.readiness_history.add(step, metric, *map(list, zip(*kept)))
            if metric in PER_TENSOR:
                latest = self.latest.setdefault(metric, {})
                history = self.history.get(metric)
                for scope, v in zip(scopes, numbers):
                    latest[scope] = (step, v)
                    if scope != "global":
                        self.layers.setdefault(scope, None)
                    if history is not None:
                        if scope not in history:
                            history[scope] = deque(maxlen=self.spark_len)
                        history[scope].append(v)
            elif metric == "state_bytes":
                self.state = {s: v for s, v in zip(scopes, numbers)
                              if s == "global" or s.startswith("key/")}
            elif metric == "lr":
                self.lr = list(zip(scopes, numbers))
            elif metric == "skipped_steps":
                self.skipped_steps = int(numbers[0]) if math.isfinite(numbers[0]) else 0
            elif metric == "cuda_memory_allocated":
                self.cuda_bytes = numbers[0]
            elif list(scopes) == ["global"] and metric not in _MONITOR_SERIES:
                self.scalars[metric] = numbers[0]
            else:
                continue
            if "global" in scopes and (metric in _TREND_METRICS or metric in self.scalars):
                trend = self.trends.setdefault(metric, deque(maxlen=_TREND_HISTORY))
                trend.append(numbers[list(scopes).index("global")])

    # -------------------------------------------------------------------------- queries
    def steps_per_second(self) -> float | None:
        if len(self.clock) < 2:
            return None
        (s0, t0), (s1, t1) = self.clock[0], self.clock[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else None

    def verdicts(self) -> list[Verdict]:
        """The compression-readiness verdicts of the run so far (recomputed only after a new
        sample or meta change)."""
        at = (self.samples, self._meta_changes)
        if self._verdicts_at != at:
            self._verdicts, self._verdicts_at = readiness(self.readiness_history), at
        return self._verdicts

    def skipped_metrics(self) -> dict[str, str]:
        skipped = self.meta.get("skipped_metrics")
        return skipped if isinstance(skipped, dict) else {}

    def value(self, metric: str, scope: str = "global") -> float | None:
        entry = self.latest.get(metric, {}).get(scope)
        return None if entry is None else entry[1]

    def ranked_layers(self, sort_by: str) -> tuple[list[str], bool]:
        """Tensor names, largest ``sort_by`` first (non-finite first of all), and whether the
        ranking metric has any value (otherwise the model's order)."""
        latest = self.latest.get(sort_by, {})

        def key(name: str) -> tuple[int, float]:
            entry = latest.get(name)
            if entry is None:
                return (2, 0.0)
            v = entry[1]
            return (0, 0.0) if not math.isfinite(v) else (1, -v)

        ranked = any(name in latest for name in self.layers)
        layers = list(self.layers)
        return (sorted(layers, key=key) if ranked else layers), ranked

    def describe(self) -> str:
        """One line naming the run: the plain mode's first line and the header's first row."""
        name = self.meta.get("optimizer_name")
        parts = [f"{name} ({self.meta['backend']} backend)" if name and self.meta.get("backend")
                 else str(name or "optimizer not known yet")]
        n_params, params = self.meta.get("n_params"), self.meta.get("params")
        if isinstance(n_params, (int, float)) and isinstance(params, list):
            parts.append(f"{int(n_params):,} parameters in {len(params)} tensors")
        every = self.meta.get("every")
        if isinstance(every, int):
            parts.append("every step sampled" if every == 1 else f"every {every} steps sampled")
        world = self.meta.get("world_size")
        if isinstance(world, int) and world > 1:
            parts.append(f"{world} ranks")
        return " · ".join(parts)

    def run_name(self) -> str | None:
        """The training command, as ``train.py --lr 3e-4`` rather than its interpreter's full
        path."""
        command = str(self.meta.get("command") or "").split()
        if not command:
            return None
        return " ".join([os.path.basename(command[0]), *command[1:]])
