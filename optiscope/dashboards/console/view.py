"""The terminal dashboard's pictures: small pieces (`sparkline`, `format_value`) and one renderable
per part of the view, each drawing a `ConsoleState` as it is when rich renders it.

`DashboardView` is the whole frame: the `Header`, the `LayerTable`, the `TrendsPanel` and
`MemoryPanel` (side by side on a wide terminal, stacked on a narrow one), the `ReadinessPanel`
and the `AlertsPanel`; on a terminal it shows fewer layers rather than outgrow the screen, and
the readiness panel only where every layer asked for still fits. Every name that comes from the run
(tensor, metric, scalar, state key, alert) is drawn as a `Text`, never parsed as rich markup.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from optiscope.dashboards.bands import health
from optiscope.dashboards.console.state import LAYER_COLUMNS, TREND_ROWS, ConsoleState
from optiscope.formatting import format_bytes
from optiscope.monitor.readiness import NO, NO_DATA, UNCLEAR, YES

__all__ = ["sparkline", "format_value", "number", "HEALTH_STYLES", "NONFINITE_MARK",
           "DashboardView", "Header", "LayerTable", "TrendsPanel", "MemoryPanel", "ReadinessPanel",
           "AlertsPanel"]

BARS = "▁▂▃▄▅▆▇█"
NONFINITE_MARK = "×"
HEALTH_STYLES = {"ok": "green", "warn": "yellow", "bad": "bold red", "none": ""}
_BAR_STYLES = {"ok": "green", "warn": "yellow", "bad": "red", "none": "cyan"}
_NAME_WIDTH = (12, 36)    # the layer-name column's bounds, in cells
_VALUE_WIDTH = 8          # "1.23e-05"
_SIDE_BY_SIDE = 100       # narrower than this, trends and memory are stacked
_MIN_ROWS = 3             # layers shown however short the terminal
_TABLE_CHROME = 5         # the layer table's title, header, rule, "more" row and caption
_MIN_SPARK = 4            # narrower than this, the table shows values only
_NONFINITE_LABEL = " ({} inf/NaN)"
_FP32_ADAMW_BYTES_PER_PARAM = 8   # exp_avg + exp_avg_sq in fp32
_FP32_ADAMW_BYTES_PER_TENSOR = 4  # torch keeps `step` as a float32 scalar tensor
_ANSWER_STYLES = {YES: "bold green", NO: "bold red", UNCLEAR: "yellow", NO_DATA: "dim"}


# ----------------------------------------------------------------------------------- pieces
def sparkline(values: Iterable[float], *, log: bool = False, width: int | None = None,
              metric: str | None = None) -> Text:
    """A one-line chart of ``values``: one block character (``▁`` … ``█``) per value.

    Args:
        values: the series, oldest first.
        log: scale on log10 (default False); zero or negative values sit on the bottom bar.
        width: show only the last ``width`` values (default None: all of them).
        metric: colour each bar by ``health(metric, value)`` (default None: one neutral colour).

    Returns:
        A `Text` of one cell per value. NaN and ±inf are a red ``×``; a constant series is a row
        of middle bars.
    """
    values = list(values)
    if width is not None:
        values = values[-width:] if width > 0 else []

    def scaled(v: float) -> float | None:
        if not math.isfinite(v) or (log and v <= 0):
            return None
        return math.log10(v) if log else v

    points = [scaled(v) for v in values]
    finite = [p for p in points if p is not None]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 0.0)
    text = Text(no_wrap=True, overflow="crop")
    for v, p in zip(values, points):
        if not math.isfinite(v):
            text.append(NONFINITE_MARK, style="bold red")
            continue
        if p is None:
            index = 0
        elif hi > lo:
            index = round((p - lo) / (hi - lo) * (len(BARS) - 1))
        else:
            index = len(BARS) // 2 - 1
        state = health(metric, v) if metric is not None else "none"
        text.append(BARS[index], style=_BAR_STYLES[state])
    return text


def format_value(metric: str, value: float | None) -> Text:
    """A metric's value as the dashboard shows it, styled by its healthy band.

    Coverage is a percentage; everything else three significant digits, in e-notation outside
    [1e-3, 1e4). ``None`` (no value yet) is a dim ``·``.
    """
    if value is None:
        return Text("·", style="dim")
    if metric == "topk_coverage" and math.isfinite(value):
        text = number(value * 100) + "%"
    else:
        text = number(value)
    return Text(text, style=HEALTH_STYLES[health(metric, value)])


def number(v: float) -> str:
    """A value in the dashboard's compact form: three significant digits, e-notation outside
    [1e-3, 1e4)."""
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v == 0:
        return "0"
    if 1e-3 <= abs(v) < 1e4:
        return format(v, ".3g")
    return format(v, ".2e")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def _shorten(name: str, width: int) -> str:
    """Cuts a long tensor name on the left: its end (``q_proj.weight``) says the most."""
    return name if len(name) <= width else "…" + name[len(name) - width + 1:]


def _bar(fraction: float, width: int) -> Text:
    filled = max(0, min(width, round(fraction * width)))
    return Text("█" * filled, style="magenta") + Text("░" * (width - filled), style="bright_black")




def _label_value_grid() -> Table:
    """A borderless table of rows: a label, a right-aligned value, and what follows it."""
    table = Table.grid(padding=(0, 1))
    table.add_column(no_wrap=True)
    table.add_column(justify="right", no_wrap=True)
    table.add_column(no_wrap=True)
    return table


# ----------------------------------------------------------------------------------- the view
class DashboardView:
    """The whole frame, laid out for ``console``'s width (and height, on a terminal); without
    one, for the console that renders it."""

    def __init__(self, state: ConsoleState, *, top: int, sort_by: str, spark_len: int,
                 total_steps: int | None = None, title: str | None = None,
                 console: Console | None = None):
        self.state, self.top, self.sort_by = state, top, sort_by
        self.spark_len, self.total_steps, self.title = spark_len, total_steps, title
        self.console = console

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        console = self.console or console
        width = console.width
        side_by_side = width >= _SIDE_BY_SIDE
        trends = TrendsPanel(self.state, (width * 3) // 5 if side_by_side else width)
        memory = MemoryPanel(self.state)
        bottom = Table.grid(expand=True, padding=(0, 1))
        if side_by_side:
            bottom.add_column(ratio=3)
            bottom.add_column(ratio=2)
            bottom.add_row(trends, memory)
        else:
            bottom.add_column()
            bottom.add_row(trends)
            bottom.add_row(memory)
        header = Header(self.state, title=self.title, total_steps=self.total_steps)
        alerts = AlertsPanel(self.state)
        readiness: list[RenderableType] = [ReadinessPanel(self.state)] if self.state.samples else []
        rows = self.top
        if console.is_terminal:  # keep the frame on screen: fewer layers, not a cut view
            def height(part: RenderableType) -> int:
                return len(console.render_lines(part, console.options, pad=False))

            room = console.height - height(header) - height(alerts) - _TABLE_CHROME
            if room - height(bottom) < _MIN_ROWS:  # a short terminal: layers and alerts first
                yield Group(header, self._layers(width, max(_MIN_ROWS, room)), alerts)
                return
            rows = min(rows, room - height(bottom))
            layers = len(self.state.layers)
            if readiness and room - height(bottom) - height(readiness[0]) < min(self.top, layers):
                readiness = []  # the verdicts give way to the layers
        yield Group(header, self._layers(width, rows), bottom, *readiness, alerts)

    def _layers(self, width: int, rows: int) -> LayerTable:
        return LayerTable(self.state, sort_by=self.sort_by, width=width, rows=rows,
                          spark_len=self.spark_len)


class Header:
    """The run, the optimizer, the step with progress and ETA, steps/s, the loss and the lr."""

    def __init__(self, state: ConsoleState, *, title: str | None = None,
                 total_steps: int | None = None):
        self.state, self.title, self.total_steps = state, title, total_steps

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        state = self.state
        name = self.title or state.run_name() or "optiscope"
        line = Text()
        if state.step is None:
            line.append("waiting for the first sample…", style="dim")
        else:
            line.append("step ", style="bold")
            line.append(f"{state.step:,}", style="bold")
            if self.total_steps:
                done = min(1.0, state.step / self.total_steps)
                line.append(f" / {self.total_steps:,} ")
                filled = round(done * 24)
                line.append("━" * filled, style="green")
                line.append("━" * (24 - filled), style="bright_black")
                line.append(f" {done:.0%}")
            rate = state.steps_per_second()
            if rate is not None:
                if self.total_steps and state.step < self.total_steps and rate > 0:
                    line.append(f" · ETA {_duration((self.total_steps - state.step) / rate)}")
                line.append(f" · {rate:.3g} steps/s")
            if "loss" in state.scalars:
                line.append(" · loss ")
                line.append(number(state.scalars["loss"]), style="bold")
            if state.lr:
                shown = ", ".join(number(lr) for _, lr in state.lr[:3])
                more = f" (+{len(state.lr) - 3} groups)" if len(state.lr) > 3 else ""
                line.append(f" · lr {shown}{more}")
            if state.finished_at is not None:
                line.append(" · finished", style="bold green")
        yield Panel(Group(Text(state.describe(), style="cyan"), line),
                    title=Text(f"optiscope · {name}", style="bold"), title_align="left",
                    box=box.ROUNDED)


class LayerTable:
    """The top ``rows`` tensors by ``sort_by``: each metric's latest value and a sparkline."""

    def __init__(self, state: ConsoleState, *, sort_by: str, width: int, rows: int,
                 spark_len: int):
        self.state, self.sort_by, self.width, self.rows = state, sort_by, width, rows
        self.spark_len = spark_len

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        state, width = self.state, self.width
        layers, ranked = state.ranked_layers(self.sort_by)
        shown = layers[:self.rows]
        skipped = state.skipped_metrics()
        present = [c for c in LAYER_COLUMNS if c[0] not in skipped]
        marks = {name: state.value("nonfinite_grads", name) for name in shown}
        labels = {name: _NONFINITE_LABEL.format(int(marks[name])) if marks[name] else ""
                  for name in shown}
        # Columns are 3 cells apart (padding and the box's divider); a skipped metric's column is
        # as wide as its header; the others share the rest: each a value, a space, a sparkline.
        fixed = 3 * len(LAYER_COLUMNS) + sum(len(h) for m, h, _ in LAYER_COLUMNS if m in skipped)
        values_only = sum(max(len(h), _VALUE_WIDTH) for m, h, _ in present)
        wanted = max([_NAME_WIDTH[0]] + [len(n) + len(labels[n]) for n in shown])
        name_width = max(_NAME_WIDTH[0], min(wanted, _NAME_WIDTH[1], width - fixed - values_only))
        spark = (width - name_width - fixed) // max(1, len(present)) - _VALUE_WIDTH - 1
        spark = min(self.spark_len, spark) if spark >= _MIN_SPARK else 0

        order = f"top {len(shown)} of {len(layers)} by {self.sort_by}" if ranked else \
            f"{len(shown)} of {len(layers)} in model order"
        table = Table(box=box.SIMPLE_HEAD, title=Text(f"layers · {order}", style="bold"),
                      title_justify="left", show_edge=False, pad_edge=False, padding=(0, 1))
        table.add_column("layer", no_wrap=True, max_width=name_width)
        for metric, header, _ in LAYER_COLUMNS:
            table.add_column(header, no_wrap=True, justify="left")
        for name in shown:
            cell = Text(_shorten(name, max(4, name_width - len(labels[name]))))
            if marks[name]:  # the tensor whose gradient has inf/NaN entries, at a glance
                cell.stylize("bold red")
                cell.append(labels[name], style="bold red")
            row: list[RenderableType] = [cell]
            for metric, _, log in LAYER_COLUMNS:
                row.append(self._cell(metric, name, log, spark, metric in skipped))
            table.add_row(*row)
        if len(layers) > len(shown):
            table.add_row(Text(f"… {len(layers) - len(shown)} more layers", style="dim"))
        if not layers:
            table.add_row(Text("no layers yet", style="dim"))
        notes = [f"{header}: {skipped[m]}" for m, header, _ in LAYER_COLUMNS if m in skipped]
        if notes:
            table.caption = Text("— not recorded: " + "; ".join(notes), style="dim")
            table.caption_justify = "left"
        yield table

    def _cell(self, metric: str, name: str, log: bool, spark: int, skipped: bool) -> Text:
        if skipped:
            return Text("—", style="dim")
        entry = self.state.latest.get(metric, {}).get(name)
        if entry is None:
            return format_value(metric, None)
        value = format_value(metric, entry[1])
        if entry[0] != self.state.step:  # no value this sample (no gradient): an old one, dimmed
            value.stylize("dim")
        value.pad_left(_VALUE_WIDTH - len(value))
        if spark:
            value.append(" ")
            value.append_text(sparkline(self.state.history[metric].get(name, ()), log=log,
                                        width=spark, metric=metric))
        return value


class TrendsPanel:
    """The global trends and user scalars: latest value and a sparkline, ``width`` cells wide."""

    def __init__(self, state: ConsoleState, width: int):
        self.state, self.width = state, width

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        state = self.state
        table = _label_value_grid()
        rows = list(TREND_ROWS) + [(m, m, False) for m in state.scalars if m != "loss"]
        spark = max(0, self.width - 4 - 14 - _VALUE_WIDTH - 2)  # borders, label, value, gaps
        for metric, label, log in rows:
            series = state.trends.get(metric)
            if not series:
                continue
            table.add_row(Text(label), format_value(metric, series[-1]),
                          sparkline(series, log=log, width=spark, metric=metric))
        if not table.rows:
            table.add_row(Text("no samples yet", style="dim"))
        yield Panel(table, title="global trends", title_align="left", box=box.ROUNDED)


class MemoryPanel:
    """Optimizer state by state key, the total, and fp32 AdamW's for the same model."""

    def __init__(self, state: ConsoleState):
        self.state = state

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        state = self.state
        table = _label_value_grid()
        total = state.state.get("global")
        keys = {s[4:]: v for s, v in state.state.items() if s.startswith("key/")}
        if total is None:
            table.add_row(Text("no samples yet", style="dim"))
            yield Panel(table, title="optimizer state", title_align="left", box=box.ROUNDED)
            return
        for key, v in sorted(keys.items(), key=lambda kv: -kv[1]):
            share = v / total if total > 0 else 0.0
            table.add_row(Text(key), format_bytes(v), _bar(share, 10) + Text(f" {share:4.0%}"))
        shared = total - sum(keys.values())
        if shared > 0:
            table.add_row("shared", format_bytes(shared), Text(f"{shared / total:.0%}"))
        n_params, params = state.meta.get("n_params"), state.meta.get("params")
        known = isinstance(n_params, (int, float)) and n_params > 0 and isinstance(params, list)
        table.add_row(Text("total", style="bold"), Text(format_bytes(total), style="bold"),
                      Text(f"{total / n_params:.2f} B/param" if known else ""))
        title = Text("optimizer state")
        if known:
            adamw = (_FP32_ADAMW_BYTES_PER_PARAM * n_params
                     + _FP32_ADAMW_BYTES_PER_TENSOR * len(params))
            table.add_row(Text("AdamW fp32", style="dim"), Text(format_bytes(adamw), style="dim"),
                          Text(f"{adamw / n_params:.2f} B/param", style="dim"))
            ratio = total / adamw
            title.append(" · ")
            title.append(f"{ratio:.2f}× AdamW fp32", style="bold green" if ratio < 0.95 else
                         "bold yellow" if ratio > 1.05 else "bold")
        if state.cuda_bytes is not None and math.isfinite(state.cuda_bytes):
            table.add_row("CUDA alloc", format_bytes(state.cuda_bytes), "")
        yield Panel(table, title=title, title_align="left", box=box.ROUNDED)


class ReadinessPanel:
    """The compression-readiness verdicts of the run so far: one line each (what, the answer,
    the deciding figure against its threshold), and the questions without data on one line."""

    def __init__(self, state: ConsoleState):
        self.state = state

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        verdicts = self.state.verdicts()
        shown = [v for v in verdicts if v.answer != NO_DATA]
        table = Table.grid(padding=(0, 1))  # the figure is cut, never the label or the answer
        table.add_column(no_wrap=True, min_width=max((len(v.label) for v in shown), default=0))
        table.add_column(no_wrap=True, min_width=max((len(v.answer) for v in shown), default=0))
        table.add_column(no_wrap=True, overflow="ellipsis")
        for v in verdicts:
            if v.answer != NO_DATA:
                table.add_row(Text(v.label), Text(v.answer, style=_ANSWER_STYLES[v.answer]),
                              Text(v.figure or v.detail, style="dim" if v.answer == UNCLEAR
                                   and not v.figure else ""))
        missing = [v.label for v in verdicts if v.answer == NO_DATA]
        parts: list[RenderableType] = [table] if table.rows else []
        if missing:
            parts.append(Text("no data: " + ", ".join(missing), style="dim", no_wrap=True,
                              overflow="ellipsis"))
        yield Panel(Group(*parts), title="compression readiness",
                    title_align="left", box=box.ROUNDED)


class AlertsPanel:
    """The latest alerts, their count, and the steps GradScaler skipped."""

    def __init__(self, state: ConsoleState):
        self.state = state

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        state = self.state
        title = f"alerts · {state.alert_count}"
        if state.skipped_steps:
            title += f" · {state.skipped_steps} steps skipped (inf/NaN gradients)"
        if not state.alerts:
            body: RenderableType = Text("none", style="green")
        else:
            lines = [Text(alert.message, style="bold red" if alert.kind == "nonfinite_grads"
                          else "yellow", no_wrap=True, overflow="ellipsis")
                     for alert in state.alerts]
            if state.alert_count > len(lines):
                lines.insert(0, Text(f"… {state.alert_count - len(lines)} earlier", style="dim"))
            body = Group(*lines)
        style = "red" if state.alert_count else "green"
        yield Panel(body, title=title, title_align="left", box=box.ROUNDED, border_style=style)
