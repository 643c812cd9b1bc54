"""The live terminal dashboard: what the optimizer is doing, per layer, while the job runs.

``ConsoleDashboard`` is a `Sink`: `OptimizerMonitor(..., console=...)` feeds it live, and
``optiscope watch`` feeds it the records of a run log another process is writing, so both show
the same view:

* a header: the run, the optimizer and its backend, the step (with a progress bar and ETA when
  the number of steps is known), steps/s, the loss and the learning rate of each param group;
* a per-layer table of the top-N tensors by a chosen metric: gradient norm, update ratio,
  second-moment drift, top-k coverage and quantization error, each as its latest value and a
  sparkline of its recent samples, coloured by its healthy band (`optiscope.dashboards.bands`);
* global trends, a memory panel (optimizer state by state key against what fp32 AdamW would
  keep for the same model) and the latest alerts.

On a terminal the view is a `rich.live.Live` display, re-rendered at most ``refresh_per_second``
times a second from the sink calls themselves (no background thread reads the state while the
training thread writes it). Anywhere else (a log file, a CI job) it prints one concise line per
sample instead, and each alert on a line of its own.

The package: `state` (`ConsoleState`, what the dashboard knows), `view` (the renderables that draw
it); this module is the sink that feeds the state and drives the display.
"""

from __future__ import annotations

import math
import time

from rich.console import Console, RenderableType
from rich.live import Live
from rich.text import Text

from optiscope.dashboards.console.state import PER_TENSOR, ConsoleState
from optiscope.dashboards.console.view import (HEALTH_STYLES, NONFINITE_MARK, DashboardView,
                                               format_value, number, sparkline)
from optiscope.dashboards.sink import Sink, Values
from optiscope.formatting import format_bytes
from optiscope.monitor.history import Alert
from optiscope.monitor.metrics import TENSOR_METRICS

__all__ = ["ConsoleDashboard", "ConsoleState", "sparkline", "format_value", "HEALTH_STYLES",
           "NONFINITE_MARK"]


class ConsoleDashboard(Sink):
    """Live terminal dashboard of a run (or one line per sample where there is no terminal).

    Constructing it has no side effect: the live display starts at the first sample. Call
    `close` at the end; it renders the final state once and leaves it on screen.

    Args:
        console: where to draw (default None: a new `rich.console.Console` on stdout).
        live: True for the live view, False for one line per sample (default None: live when
            ``console.is_terminal``).
        top: how many layers the table shows, the largest by ``sort_by`` first (default 12);
            on a terminal too short for them, as many as fit.
        sort_by: the per-tensor metric that ranks the layers (default ``"grad_norm"``); its
            non-finite values rank first.
        refresh_per_second: the most renders per second (default 4.0); samples in between only
            update the state.
        spark_len: samples of history kept per layer and metric for the sparklines (default 32);
            a narrow terminal shows fewer.
        total_steps: the number of steps the run will take, for a progress bar and an ETA
            (default None: neither).
        title: the run's name in the header (default None: the training command).
    """

    def __init__(self, console: Console | None = None, *, live: bool | None = None,
                 top: int = 12, sort_by: str = "grad_norm", refresh_per_second: float = 4.0,
                 spark_len: int = 32, total_steps: int | None = None, title: str | None = None):
        if sort_by not in PER_TENSOR:
            raise ValueError(f"ConsoleDashboard: sort_by must be a per-tensor metric "
                             f"({', '.join(m.name for m in TENSOR_METRICS)}), got {sort_by!r}")
        for name, value in (("top", top), ("spark_len", spark_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ConsoleDashboard: {name} must be an integer >= 1, got {value!r}")
        if not isinstance(refresh_per_second, (int, float)) or not refresh_per_second > 0:
            raise ValueError(f"ConsoleDashboard: refresh_per_second must be a number > 0, got "
                             f"{refresh_per_second!r}")
        if total_steps is not None and (isinstance(total_steps, bool)
                                        or not isinstance(total_steps, int) or total_steps < 1):
            raise ValueError(f"ConsoleDashboard: total_steps must be an integer >= 1 or None, "
                             f"got {total_steps!r}")
        self.console = console if console is not None else Console()
        self.live = self.console.is_terminal if live is None else bool(live)
        self.top = top
        self.sort_by = sort_by
        self.refresh_interval = 1.0 / refresh_per_second
        self.spark_len = spark_len
        self.total_steps = total_steps
        self.title = title
        self._live: Live | None = None
        self._last_render = -math.inf
        self._dirty = False
        self._closed = False
        self.reset()

    # -------------------------------------------------------------------------- sink calls
    def reset(self) -> None:
        """Forgets the run (``watch`` calls it when the run log was replaced); keeps the display."""
        self.state = ConsoleState(self.spark_len)
        self._dirty = True

    @property
    def meta(self) -> dict:
        return self.state.meta

    @property
    def step(self) -> int | None:
        return self.state.step

    def on_meta(self, changes: dict) -> None:
        self.state.on_meta(changes)
        self._dirty = True

    def on_sample(self, step: int, time: float, values: Values) -> None:
        self.state.record(step, time, values)
        self._dirty = True
        if self.live:
            self._maybe_render()
        elif not self._closed:
            self._print_line(step, values)

    def on_alert(self, alert: Alert) -> None:
        self.state.add_alert(alert)
        self._dirty = True
        if self.live:
            self._maybe_render()
        elif not self._closed:
            self.console.print(Text(f"alert  {alert.message}", style="red"), markup=False,
                               highlight=False, emoji=False, soft_wrap=True)

    def refresh(self) -> None:
        """Renders now if anything changed since the last render, within the rate limit.

        ``watch`` calls it after each poll of the run log, so the last records of a burst are
        shown without waiting for the next one.
        """
        if self.live:
            self._maybe_render()

    def close(self) -> None:
        """Renders the final state once and stops the live display, leaving it on screen."""
        if self._closed:
            return
        self._closed = True
        if self._live is not None:
            self._live.update(self.render(), refresh=True)
            self._live.stop()
        elif self.live and (self.state.samples or self.state.meta):  # a run without samples (yet)
            self.console.print(self.render())

    # -------------------------------------------------------------------------- drawing
    def render(self) -> RenderableType:
        """The whole view, laid out for this dashboard's console; it draws the state as it is
        when rendered."""
        return DashboardView(self.state, top=self.top, sort_by=self.sort_by,
                             spark_len=self.spark_len, total_steps=self.total_steps,
                             title=self.title, console=self.console)

    def _maybe_render(self) -> None:
        if self._closed or not self._dirty:
            return
        now = time.monotonic()
        if now - self._last_render < self.refresh_interval:
            return
        renderable = self.render()
        if self._live is None:
            self._live = Live(renderable, console=self.console, auto_refresh=False,
                              transient=False, vertical_overflow="ellipsis")
            self._live.start(refresh=True)
        else:
            self._live.update(renderable, refresh=True)
        # Measured after rendering, so a render slower than the interval cannot take every call.
        self._last_render = time.monotonic()
        self._dirty = False

    def _print_line(self, step: int, values: Values) -> None:
        """The plain mode's line for one sample (and the run's description before the first)."""
        def glob(metric: str) -> float | None:
            scopes, numbers = values.get(metric, ((), ()))
            return numbers[list(scopes).index("global")] if "global" in scopes else None

        if self.state.samples == 1:
            self.console.print(self.state.describe(), markup=False, highlight=False, emoji=False,
                               soft_wrap=True)
        parts = [f"step {step}"]
        for label, metric in (("loss", "loss"), ("grad", "grad_norm"), ("upd", "update_ratio"),
                              ("drift", "moment2_drift")):
            v = glob(metric)
            if v is not None:
                parts.append(f"{label} {number(v)}")
        state = glob("state_bytes")
        if state is not None:
            parts.append(f"state {format_bytes(state)}")
        rate = self.state.steps_per_second()
        if rate is not None:
            parts.append(f"{rate:.3g} steps/s")
        if self.state.alert_count:
            parts.append(f"alerts {self.state.alert_count}")
        self.console.print("  ".join(parts), markup=False, highlight=False, emoji=False,
                           soft_wrap=True)
