"""The terminal dashboard (`optiscope.dashboards.console`).

Real runs (a tiny transformer under optiscope's AdamW, or torch's SGD) are replayed from their run
logs into a `ConsoleDashboard` drawing on a recording rich Console at a fixed width without
colour, and the text is checked against the run's own numbers (`load_run`). Colours are checked
on the styles of the rendered segments, not on escape codes.
"""

from __future__ import annotations

import io
import math
import re
import time

import pytest
from rich.console import Console
from rich.style import Style

from optiscope import load_run
from optiscope.dashboards.bands import health
from optiscope.dashboards.console import (HEALTH_STYLES, NONFINITE_MARK, ConsoleDashboard,
                                          ConsoleState, format_value, sparkline)
from optiscope.dashboards.console.view import ReadinessPanel
from optiscope.dashboards.sink import RecordDecoder
from optiscope.monitor.history import Alert
from optiscope.monitor.readiness import INT8_MAX_ERROR, NO_DATA, readiness
from optiscope.monitor.runlog import RUNLOG, read_records
from runs import NAN_TENSOR, train_run

STEPS = 12
WIDTH = 120


@pytest.fixture(scope="module")
def adamw_run(tmp_path_factory):
    """12 steps of optiscope's AdamW; a NaN in q.weight's gradient at the last step."""
    return train_run(tmp_path_factory.mktemp("adamw"), steps=STEPS, nan_at=STEPS)


@pytest.fixture(scope="module")
def sgd_run(tmp_path_factory):
    """12 steps of torch's SGD with momentum: no second moment."""
    return train_run(tmp_path_factory.mktemp("sgd"), steps=STEPS, optimizer="sgd")


# ----------------------------------------------------------------------------------- helpers
def recorder(width: int = WIDTH) -> Console:
    """A console that records what it prints, at a fixed width, without colour or a terminal."""
    return Console(record=True, width=width, force_terminal=False, color_system=None,
                   file=io.StringIO())


def replay(dashboard: ConsoleDashboard, run_dir, *, skip_meta: bool = False) -> None:
    records = read_records(run_dir / RUNLOG)
    if skip_meta:
        records = (r for r in records if r.get("type") != "meta")
    RecordDecoder(dashboard).feed(records)


def final_frame(run_dir, *, width: int = WIDTH, **options) -> str:
    """The text of the live dashboard's last frame after replaying ``run_dir``."""
    console = recorder(width)
    dashboard = ConsoleDashboard(console, live=True, **options)
    replay(dashboard, run_dir)
    dashboard.close()
    return console.export_text()


def line_of(text: str, start: str) -> str:
    lines = [line for line in text.splitlines() if line.startswith(start)]
    assert len(lines) == 1, f"expected one line starting with {start!r}, found {len(lines)}:\n{text}"
    return lines[0]


def last_values(run_dir, metric: str) -> dict[str, float]:
    """Each tensor's value of ``metric`` at the run's last step."""
    history = load_run(run_dir)
    out = {}
    for scope in history.scopes(metric):
        steps, values = history.series(metric, scope)
        if len(steps) and steps[-1] == STEPS:
            out[scope] = float(values[-1])
    return out


def ranked(values: dict[str, float]) -> list[str]:
    """Tensor names by value, largest first, non-finite values before all others."""
    tensors = [s for s in values if s != "global"]
    return sorted(tensors, key=lambda s: (0, 0.0) if not math.isfinite(values[s]) else (1, -values[s]))


def styled(renderable, width: int = WIDTH) -> list[tuple[str, Style]]:
    """The (text, style) segments of ``renderable`` as a colour terminal would draw them."""
    console = Console(width=width, color_system="truecolor", force_terminal=True,
                      file=io.StringIO())
    return [(seg.text, seg.style or Style()) for seg in console.render(renderable)
            if seg.text.strip()]


# ----------------------------------------------------------------------------------- pieces
@pytest.mark.parametrize("values, log, expected", [
    ([1, 2, 3, 4, 5, 6, 7, 8], False, "▁▂▃▄▅▆▇█"),
    ([10.0 ** k for k in range(8)], True, "▁▂▃▄▅▆▇█"),
    ([10.0 ** k for k in range(8)], False, "▁▁▁▁▁▁▂█"),  # 1e6 is 0.1 of 1e7
    ([3, 3, 3], False, "▄▄▄"),
    ([0, 1, 100], True, "▁▁█"),          # zero has no logarithm: the bottom bar
    ([], False, ""),
    ([5], True, "▄"),
])
def test_sparkline_scales(values, log, expected):
    assert sparkline(values, log=log).plain == expected


def test_sparkline_marks_nonfinite_values_in_red():
    text = sparkline([0.0, math.nan, 3.0, math.inf, -math.inf, 7.0])
    assert text.plain == f"▁{NONFINITE_MARK}▄{NONFINITE_MARK}{NONFINITE_MARK}█"
    marks = [span for span in text.spans if text.plain[span.start:span.end] == NONFINITE_MARK]
    assert len(marks) == 3 and all(span.style == "bold red" for span in marks)


def test_sparkline_width_keeps_the_latest_values():
    assert sparkline(range(1, 101), width=8).plain == "▁▂▃▄▅▆▇█"  # 93 .. 100, rescaled
    assert sparkline([1, 2, 3], width=0).plain == ""


def test_sparkline_colours_each_bar_by_its_band():
    text = sparkline([1e-3, 5e-2, 0.5], log=True, metric="update_ratio")
    assert [span.style for span in text.spans] == ["green", "yellow", "red"]


@pytest.mark.parametrize("metric, value, shown", [
    ("update_ratio", 1e-3, "0.001"),
    ("update_ratio", 5e-2, "0.05"),
    ("update_ratio", 0.5, "0.5"),
    ("update_ratio", 2.5e-6, "2.50e-06"),
    ("grad_norm", 12345.0, "1.23e+04"),
    ("grad_norm", math.nan, "NaN"),
    ("grad_norm", math.inf, "inf"),
    ("topk_coverage", 0.1332, "13.3%"),
    ("moment2_drift", 0.0, "0"),
])
def test_format_value_styles_by_health(metric, value, shown):
    text = format_value(metric, value)
    assert text.plain == shown
    assert text.style == HEALTH_STYLES[health(metric, value)]


def test_health_styles_are_distinct_colours():
    assert format_value("update_ratio", 1e-3).style == "green"
    assert format_value("update_ratio", 5e-2).style == "yellow"
    assert format_value("update_ratio", 0.5).style == "bold red"
    assert format_value("grad_norm", 1.0).style == ""  # no band: no colour
    assert format_value("grad_norm", None).plain == "·"


@pytest.mark.parametrize("kwargs, message", [
    (dict(sort_by="loss"), "sort_by must be a per-tensor metric"),
    (dict(top=0), "top must be an integer >= 1, got 0"),
    (dict(spark_len=2.5), "spark_len must be an integer >= 1, got 2.5"),
    (dict(refresh_per_second=0), "refresh_per_second must be a number > 0, got 0"),
    (dict(total_steps=0), "total_steps must be an integer >= 1 or None, got 0"),
])
def test_bad_arguments_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ConsoleDashboard(recorder(), **kwargs)


# ----------------------------------------------------------------------------------- a real run
def test_dashboard_of_a_real_run(adamw_run):
    text = final_frame(adamw_run, total_steps=20)
    history = load_run(adamw_run)

    # Header: run, optimizer, step of total, steps/s, loss, lr.
    assert "optiscope · " in text
    assert "AdamW (torch backend) · 3,671 parameters in 21 tensors · every step sampled" in text
    assert f"step {STEPS} / 20 " in text and " 60% " in text and "ETA " in text
    assert re.search(r" · [0-9.e+]+ steps/s · ", text)
    loss = float(history.series("loss")[1][-1])
    assert f" · loss {format_value('loss', loss).plain} · lr 0.01 · finished" in text

    # Layers: the top 12 by the last gradient norm, the NaN one first and marked.
    grad = last_values(adamw_run, "grad_norm")
    order = ranked(grad)
    assert order[0] == NAN_TENSOR
    assert "layers · top 12 of 21 by grad_norm" in text
    rows = [line.split()[0] for line in text.splitlines()
            if line.split() and line.split()[0] in grad and line.split()[0] != "global"]
    assert rows == order[:12]
    assert "… 9 more layers" in text
    nan_row = line_of(text, NAN_TENSOR)
    assert nan_row.startswith(f"{NAN_TENSOR} (1 inf/NaN)") and " NaN " in nan_row
    assert nan_row.split()[4].endswith(NONFINITE_MARK), "the sparkline ends in the NaN mark"

    # Values as formatted, each beside its sparkline.
    ratio, coverage = last_values(adamw_run, "update_ratio"), last_values(adamw_run, "topk_coverage")
    head = line_of(text, "head.weight ").split()
    assert head[1] == format_value("grad_norm", grad["head.weight"]).plain
    assert head[3] == format_value("update_ratio", ratio["head.weight"]).plain
    assert head[7] == format_value("topk_coverage", coverage["head.weight"]).plain
    assert all(re.fullmatch("[▁▂▃▄▅▆▇█]+", head[k]) for k in (2, 4, 6, 8))
    assert "— not recorded: quant err: AdamW does not compress its state" in text

    # Global trends, memory against fp32 AdamW, alerts.
    assert re.search(r"│ grad norm +NaN [▁▂▃▄▅▆▇█]+×", text)
    assert re.search(r"│ loss +[0-9.]+ [▁▂▃▄▅▆▇█]{12} ", text)
    assert "optimizer state · 1.00× AdamW fp32" in text  # the same state, fp32
    assert re.search(r"exp_avg_sq +14\.3 KiB █+░+ +50%", text)  # 3,671 × 4 bytes
    assert re.search(r"total +28\.8 KiB 8\.02 B/param", text)
    assert "alerts · 1" in text
    assert history.alerts[0].message in text


def test_top_n_and_more_layers_row(adamw_run):
    text = final_frame(adamw_run, top=3)
    order = ranked(last_values(adamw_run, "grad_norm"))
    assert "layers · top 3 of 21 by grad_norm" in text
    assert "… 18 more layers" in text
    for name in order[:3]:
        line_of(text, name + " ")
    for name in order[3:]:
        assert not any(line.startswith(name + " ") for line in text.splitlines())


def test_sort_by_another_metric(adamw_run):
    text = final_frame(adamw_run, top=4, sort_by="weight_norm")
    order = ranked(last_values(adamw_run, "weight_norm"))
    assert "layers · top 4 of 21 by weight_norm" in text
    rows = [line.split()[0] for line in text.splitlines() if line.split() and line.split()[0] in order]
    assert rows == order[:4]


def test_sort_by_a_metric_the_run_lacks_keeps_model_order(adamw_run):
    text = final_frame(adamw_run, top=5, sort_by="quant_error")
    assert "layers · 5 of 21 in model order" in text
    names = [p["name"] for p in load_run(adamw_run).meta["params"]]
    rows = [line.split()[0] for line in text.splitlines() if line.split() and line.split()[0] in names]
    assert rows == names[:5]


def test_narrow_terminal_shows_values_without_sparklines(adamw_run):
    text = final_frame(adamw_run, width=80, top=3)
    assert max(len(line) for line in text.splitlines()) <= 80
    head = line_of(text, "head.weight ").split()
    assert head[1] == format_value("grad_norm", last_values(adamw_run, "grad_norm")["head.weight"]).plain
    assert not re.search("[▁▂▃▄▅▆▇█]", line_of(text, "head.weight "))
    assert "…" not in text.split("layers ·")[1].splitlines()[1], "no header cut short"


@pytest.mark.parametrize("height, layers, trends", [(60, 12, True), (24, 5, True), (20, 8, False)])
def test_frame_fits_a_short_terminal(adamw_run, height, layers, trends):
    """On a terminal the frame never outgrows the screen: fewer layers first, then the trends
    and memory panels go; the header, some layers and the alerts stay."""
    console = Console(record=True, width=WIDTH, height=height, force_terminal=True,
                      color_system=None, file=io.StringIO())
    dashboard = ConsoleDashboard(console, live=False)
    replay(dashboard, adamw_run)
    console.export_text()  # drops the plain lines printed meanwhile
    console.print(dashboard.render())
    text = console.export_text()
    assert len(text.splitlines()) <= height
    assert f"layers · top {layers} of 21" in text and "alerts · 1" in text
    assert ("global trends" in text) == trends and ("optimizer state" in text) == trends
    # The readiness panel gives way first: it shows only where every layer asked for fits.
    assert ("compression readiness" in text) == (layers == 12)


def test_health_colours_in_the_rendered_view(adamw_run):
    dashboard = ConsoleDashboard(recorder(), live=False)
    replay(dashboard, adamw_run)
    segments = styled(dashboard.render())
    nans = [style for text, style in segments if text.strip() == "NaN"]
    assert nans and all(s.color is not None and s.color.name == "red" and s.bold for s in nans)
    marks = [style for text, style in segments if text == NONFINITE_MARK]
    assert marks and all(s.color.name == "red" for s in marks)
    # Every update ratio in the table has its band's colour.
    ratio = last_values(adamw_run, "update_ratio")
    shown = {text.strip(): style for text, style in segments}
    for name in ranked(last_values(adamw_run, "grad_norm"))[:12]:
        value = format_value("update_ratio", ratio[name])
        expected = Style.parse(value.style) if value.style else Style()
        assert shown[value.plain].color == expected.color, (name, value.plain)
    names = [style for text, style in segments if text.startswith(NAN_TENSOR)]
    assert names[0].color.name == "red", "the NaN layer's name is red"


def test_optimizer_without_moments_shows_dashes_and_why(sgd_run):
    text = final_frame(sgd_run)
    assert "SGD" in text
    head = line_of(text, "head.weight ").split()
    assert head[5] == "—", "v drift: SGD keeps no second moment"
    assert "v drift: SGD keeps no second moment" in text
    assert "quant err: SGD does not compress its state" in text
    assert re.search(r"momentum_buffer +14\.3 KiB", text)
    assert "optimizer state · 0.50× AdamW fp32" in text  # 4 of 8 bytes per parameter, no step
    assert "alerts · 0" in text


def test_a_monitor_draws_the_same_view_as_its_replayed_run_log(tmp_path, adamw_run):
    """The monitor hands the dashboard numpy arrays and unrounded times; the view is the same
    (but for steps/s: the run log keeps times to the millisecond)."""
    console = recorder()
    train_run(tmp_path, steps=STEPS, nan_at=STEPS, console=ConsoleDashboard(console, live=True))
    steps_per_second = re.compile(r"[0-9.e+]+ steps/s")
    live = steps_per_second.sub("N steps/s", console.export_text())
    replayed = steps_per_second.sub("N steps/s", final_frame(tmp_path))
    assert live == replayed
    assert f"{NAN_TENSOR} (1 inf/NaN)" in live and "… 9 more layers" in live


def test_plain_lines_off_a_terminal(adamw_run):
    console = recorder()
    dashboard = ConsoleDashboard(console)  # a recording console is no terminal
    assert not dashboard.live
    replay(dashboard, adamw_run)
    dashboard.close()
    lines = console.export_text().splitlines()
    assert lines[0] == "AdamW (torch backend) · 3,671 parameters in 21 tensors · every step sampled"
    samples = [line for line in lines if line.startswith("step ")]
    assert [int(line.split()[1]) for line in samples] == list(range(1, STEPS + 1))
    history = load_run(adamw_run)
    first = samples[0]
    assert first.startswith(f"step 1  loss {format_value('loss', history.series('loss')[1][0]).plain}"
                            f"  grad {format_value('grad_norm', history.series('grad_norm')[1][0]).plain}")
    assert "  state 28.8 KiB" in first and "drift" not in first  # no drift at the first sample
    assert " drift " in samples[1] and " steps/s" in samples[1]
    alert = [i for i, line in enumerate(lines) if line.startswith("alert  ")]
    assert [lines[i] for i in alert] == [f"alert  {history.alerts[0].message}"]
    assert lines[alert[0] - 1].startswith(f"step {STEPS} "), "the alert follows its sample"
    assert not any("\x1b" in line or "━" in line for line in lines), "no live view"


def test_plain_lines_print_text_verbatim():
    console = recorder()
    dashboard = ConsoleDashboard(console, live=False)
    dashboard.on_sample(1, 0.0, {"loss": (["global"], [1.5])})
    dashboard.on_alert(Alert(1, "grad_spike", "grad_norm", ["blocks[0].w"],
                             "step 1: [bold]blocks[0].w[/bold] :smile: spiked"))
    assert console.export_text().splitlines() == [
        "optimizer not known yet", "step 1  loss 1.5",
        "alert  step 1: [bold]blocks[0].w[/bold] :smile: spiked"]


def test_samples_before_meta_and_scopes_appearing_later(adamw_run):
    dashboard = ConsoleDashboard(recorder(), live=False)
    replay(dashboard, adamw_run, skip_meta=True)  # a watch that started mid-file
    text = recorder_text(dashboard)
    assert "optimizer not known yet" in text and "AdamW fp32" not in text
    assert "… 9 more layers" in text and "head.weight" in text
    for record in read_records(adamw_run / RUNLOG):
        if record.get("type") == "meta":
            RecordDecoder(dashboard).feed([record])
    text = recorder_text(dashboard)
    assert "AdamW (torch backend)" in text and "1.00× AdamW fp32" in text

    fresh = ConsoleDashboard(recorder(), live=False)
    fresh.on_sample(1, 10.0, {"grad_norm": (["global", "a"], [1.0, 1.0])})
    assert "layers · top 1 of 1" in recorder_text(fresh)
    fresh.on_sample(3, 11.0, {"grad_norm": (["global", "a", "b"], [3.0, 1.0, 2.8])})
    text = recorder_text(fresh)
    assert "layers · top 2 of 2" in text and "2 steps/s" in text
    assert [line.split()[0] for line in text.splitlines() if line[:2] in ("a ", "b ")] == ["b", "a"]


def recorder_text(dashboard: ConsoleDashboard) -> str:
    console = recorder()
    console.print(dashboard.render())
    return console.export_text()


def test_no_output_before_the_first_sample_and_close_is_idempotent(adamw_run):
    console = recorder()
    dashboard = ConsoleDashboard(console, live=True)
    dashboard.close()
    assert console.export_text() == "", "nothing seen, nothing drawn"

    console = recorder()
    dashboard = ConsoleDashboard(console, live=True)
    records = list(read_records(adamw_run / RUNLOG))
    RecordDecoder(dashboard).feed(records[:1])  # the meta record
    assert console.export_text(clear=False) == "" and dashboard._live is None
    RecordDecoder(dashboard).feed(records)
    assert dashboard._live is not None and dashboard._live.is_started
    dashboard.close()
    dashboard.close()
    text = console.export_text()
    assert text.count("optiscope · ") == 1 and not dashboard._live.is_started


def test_renders_are_throttled(adamw_run):
    dashboard = ConsoleDashboard(recorder(), live=True, refresh_per_second=4.0)
    renders = []
    render = dashboard.render
    dashboard.render = lambda: renders.append(time.monotonic()) or render()
    RecordDecoder(dashboard).feed(r for r in read_records(adamw_run / RUNLOG)
                                  if r.get("type") == "meta")
    scopes = ["global"] + [f"layer{i}.weight" for i in range(40)]
    start = time.monotonic()
    for step in range(1, 1001):
        dashboard.on_sample(step, start + step * 1e-3, {
            metric: (scopes, [step * 1e-3] * len(scopes))
            for metric in ("grad_norm", "update_ratio", "moment2_drift", "topk_coverage")})
    elapsed = time.monotonic() - start
    assert 1 <= len(renders) <= 2 + elapsed * 4.0, (
        f"{len(renders)} renders for 1000 samples in {elapsed:.2f} s at 4 per second")
    # Samples 20 ms apart for 0.6 s: a render every 0.25 s, not one per sample.
    before = len(renders)
    for step in range(1001, 1031):
        time.sleep(0.02)
        dashboard.on_sample(step, start + step * 1e-3, {"grad_norm": (scopes, [1.0] * len(scopes))})
    assert 2 <= len(renders) - before <= 4, renders[before:]
    gaps = [b - a for a, b in zip(renders, renders[1:])]
    assert all(gap >= 0.25 for gap in gaps), gaps
    count = len(renders)
    dashboard.close()
    assert len(renders) == count + 1, "close draws the final state once"


def test_readiness_panel_shows_the_runs_verdicts(adamw_run):
    text = final_frame(adamw_run)
    panel = text.split("compression readiness")[1].split("alerts ·")[0]
    verdicts = readiness(load_run(adamw_run))  # from the whole run log: the same answers
    answered = [v for v in verdicts if v.answer != NO_DATA]
    assert {"topk", "freeze"} <= {v.key for v in answered}  # recorded by every Adam run
    for v in answered:
        assert re.search(rf"│ {re.escape(v.label)} +{v.answer} +{re.escape(v.figure)} +│", panel), v
    missing = ", ".join(v.label for v in verdicts if v.answer == NO_DATA)
    assert (f"│ no data: {missing} " in panel) if missing else "no data" not in panel


def test_readiness_panel_of_probe_series_fed_live():
    state = ConsoleState()
    state.on_meta({"params": [{"name": "w", "numel": 1000, "sampled": 1000}],
                   "topk_block": 4096, "topk_density": 0.01})
    for step in range(1, 7):  # the window, the last half: steps 4..6
        state.record(step, float(step), {
            "probe_int8_m": (["global", "w"], [INT8_MAX_ERROR / 5, INT8_MAX_ERROR / 5]),
            "probe_int8_v": (["global", "w"], [INT8_MAX_ERROR * 2, INT8_MAX_ERROR * 2])})
    text = Console(record=True, width=100, color_system=None, file=io.StringIO())
    text.print(ReadinessPanel(state))
    lines = text.export_text()
    # m at a fifth of the 5 % limit, v at twice it: not safe.
    assert re.search(r"│ 8-bit state +no +m 1 %, v 10 % \(limit 5 %\) +│", lines), lines
    assert "no data: 4-bit state, top-k (k = 1 %), freeze v (1-bit), bf16 gradients" in lines
    assert state.verdicts() is state.verdicts(), "computed once per sample"
