"""The sections of one run in the report: summary, compression readiness, trends, per-layer
heatmaps, second-moment drift and the freeze verdict, quantization error, top-k coverage, dynamic
range (report/ranges.py), memory, alerts."""

from __future__ import annotations

import math
import time
from collections import Counter

import numpy as np
import plotly.graph_objects as go

from optiscope.dashboards.bands import BANDS, health
from optiscope.dashboards.downsample import minmax_downsample
from optiscope.dashboards.html import Page, esc, table
from optiscope.dashboards.report.figures import (band, f4, grid, heatmap, i4, label_margin, layout,
                                                 line)
from optiscope.dashboards.report.ranges import dynamic_range_section
from optiscope.dashboards.report.run import (LAYER_METRICS, MIN_TAIL, MONITOR_METRICS, PALETTE,
                                             QUANT_METRICS, SHOW, TREND_METRICS, Options,
                                             ReportRun, hyperparameter, bytes_per_param, worth_showing)
from optiscope.dashboards.report.verdicts import readiness_section
from optiscope.formatting import format_bytes, format_number

MAX_ALERT_ROWS = 200


def run_sections(page: Page, run: ReportRun, options: Options, *, several: bool) -> list:
    """Appends every section of one run; returns its table-of-contents entries."""
    p = run.prefix
    sections = [("summary", "Summary", _summary),
                ("readiness", "Compression readiness", readiness_section),
                ("trends", "Trends", _trends),
                ("layers", "Per-layer heatmaps", _layers),
                ("drift", "Second moment: drift and freezing", _drift),
                ("quantization", "Quantization error", _quantization),
                ("coverage", "Top-k coverage", _coverage),
                ("ranges", "Dynamic range", dynamic_range_section), ("memory", "Memory", _memory),
                ("alerts", "Alerts", _alerts)]
    nav = []
    if several:
        page.html(f'<h2 id="{p}run" style="border-bottom-width:3px">Run {run.index + 1}: '
                  f"{esc(run.name)}</h2>")
        nav.append((f"{p}run", f"Run {run.index + 1}: {run.name}"))
    for anchor, heading, build in sections:
        tag = "h3" if several else "h2"
        page.html(f'<section id="{p}{anchor}"><{tag}>{esc(heading)}</{tag}>')
        build(page, run, options)
        page.html("</section>")
        if not several:
            nav.append((f"{p}{anchor}", heading))
    return nav


def _summary(page: Page, run: ReportRun, options: Options) -> None:
    meta = run.meta
    last_step = run.history.last_step()
    alerts = run.history.alerts
    cards = [("optimizer", esc(meta.get("optimizer_name") or "unknown")),
             ("parameters", f"{run.n_params:,}" if run.n_params else "unknown"),
             ("steps", f"{last_step:,}")]
    if run.state_bytes is not None:
        cards.append(("state bytes / parameter", bytes_per_param(run.state_bytes, run.n_params)))
        cards.append(("state memory", esc(format_bytes(run.state_bytes))))
    cls = "bad" if any(a.kind == "nonfinite_grads" for a in alerts) else "warn" if alerts else "ok"
    cards.append(("alerts", f'<span class="{cls}">{len(alerts):,}</span>'))
    verdict = run.verdict
    if verdict.available:
        text = (f'<span class="ok">from step {verdict.freeze_step:,}</span>' if verdict.stable
                else '<span class="warn">not stable</span>')
        cards.append(("freeze v (1-bit Adam)", text))
    page.html('<div class="cards">' + "".join(
        f'<div class="card"><div class="label">{label}</div><div class="value">{value}</div></div>'
        for label, value in cards) + "</div>")
    page.html(f'<p><strong>Second moment.</strong> {esc(verdict.message)} '
              f'<a href="#{run.prefix}drift">Details</a>.</p>')

    started = meta.get("start_time")
    rows = [("optimizer", meta.get("optimizer")), ("backend", meta.get("backend")),
            ("parameters", f"{run.n_params:,} in {len(run.tensors):,} tensors"
                           if run.n_params else None),
            ("parameter bytes", format_bytes(meta["param_bytes"]) if meta.get("param_bytes")
                                else None),
            ("steps", f"{last_step:,}, sampled every {meta.get('every', 1)}"),
            ("freeze probe", meta.get("freeze_probe")),
            ("top-k probe", f"density {meta['topk_density']:g}, block {meta.get('topk_block')}"
                            if meta.get("topk_density") else None),
            ("started", time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(started)))
                        if isinstance(started, (int, float)) and started > 0 else None),
            ("host", meta.get("host")), ("command", meta.get("command")),
            ("versions", ", ".join(f"{k} {v}" for k, v in (meta.get("versions") or {}).items()
                                   if v is not None))]
    page.html('<h3>Run</h3>' + table(["", ""], [[esc(k), esc(v)] for k, v in rows
                                                if v not in (None, "")]))
    groups = meta.get("hyperparameters") or []
    if groups:
        keys = list(dict.fromkeys(k for g in groups for k in g))
        page.html("<h3>Hyperparameters</h3>" + table(
            ["", *(f"group {i}" for i in range(len(groups)))],
            [[esc(k), *(esc(hyperparameter(g.get(k))) for g in groups)] for k in keys]))

    latest = []
    for metric in [*TREND_METRICS, "moment2_drift_since_freeze", "quant_error", *QUANT_METRICS,
                   "topk_coverage"]:
        steps, values = run.series(metric)
        if not len(values):
            continue
        last = float(values[-1])
        state = health(metric, last)
        band = BANDS.get(metric)
        finite = values[np.isfinite(values)]
        latest.append([esc(metric), f'<span class="{state}">{format_number(last)}</span>',
                       format_number(finite.min()) if len(finite) else "—",
                       format_number(finite.max()) if len(finite) else "—",
                       esc(band.why) if band else ""])
    if latest:
        page.html("<h3>Latest values (global)</h3>" + table(
            ["metric", "last", "min", "max", "healthy band"], latest, numeric={1, 2, 3},
            caption="Coloured by the healthy bands shared with the terminal dashboard: "
                    '<span class="ok">ok</span>, <span class="warn">worth a look</span>, '
                    '<span class="bad">bad</span> (non-finite is always bad).'))
    skipped = meta.get("skipped_metrics") or {}
    if skipped:
        page.html("<h3>Not recorded</h3>" + table(
            ["metric", "why"], [[esc(k), esc(v)] for k, v in skipped.items()]))


def _trends(page: Page, run: ReportRun, options: Options) -> None:
    if run.user_scalars:
        fig = grid(len(run.user_scalars), run.user_scalars)
        for i, name in enumerate(run.user_scalars):
            line(fig, run, name, "global", options, row=i // 2 + 1, col=i % 2 + 1, name=name,
                  legend=False)
        page.figure(fig, "Logged with <code>monitor.log_scalar(name, value)</code> on sampled "
                         "steps.")
    else:
        page.html('<p class="note">No loss: log it with <code>monitor.log_scalar("loss", '
                  "loss)</code> to see it here.</p>")
    if "lr" in run.metrics:
        fig = go.Figure(layout=layout(260, "learning rate", log=True))
        for scope in run.history.scopes("lr"):
            line(fig, run, "lr", scope, options, name=scope.replace("group", "group "))
        page.figure(fig, "Learning rate of each parameter group (as the optimizer reported it "
                         "on sampled steps).")
    metrics = [m for m in TREND_METRICS if worth_showing(run, m)]
    if not metrics:
        page.html('<p class="note">No sampled steps: the run recorded no metrics.</p>')
        return
    fig = grid(len(metrics), [SHOW[m].label for m in metrics], height_per_row=230)
    for i, metric in enumerate(metrics):
        row, col = i // 2 + 1, i % 2 + 1
        line(fig, run, metric, "global", options, row=row, col=col, name=metric,
              legend=False)
        if SHOW[metric].log:
            fig.update_yaxes(type="log", row=row, col=col)
        band(fig, run, metric, row=row, col=col)
    page.figure(fig, "Global values: norms over all tensors (√Σ‖·‖²), ratios of the global "
                     "sums, maxima. Shaded: the healthy band. "
                     '<span class="bad">✕</span> marks a NaN or inf.')


def _layers(page: Page, run: ReportRun, options: Options) -> None:
    shown = 0
    for metric in LAYER_METRICS + tuple(m for m in run.metrics if m not in MONITOR_METRICS
                                         and m not in run.user_scalars):
        if metric == "nonfinite_grads" and not worth_showing(run, metric):
            continue
        shown += heatmap(page, run, metric, options)
    if not shown:
        page.html('<p class="note">No per-tensor metrics were recorded.</p>')
    missing = [m for m in LAYER_METRICS if m not in run.metrics and m != "nonfinite_grads"]
    if missing and shown:
        page.html('<p class="note">Not in this run: ' + "; ".join(
            f"{esc(m)} ({esc(run.skipped(m) or 'not recorded')})" for m in missing) + ".</p>")


def _drift(page: Page, run: ReportRun, options: Options) -> None:
    verdict = run.verdict
    page.html(f"<p>{esc(verdict.message)}</p>")
    if not verdict.available:
        return
    page.html(f'<p class="note">How it is decided. Summed drift: for each sampled step T the '
              f"drift measured after T is added up, each term weighted by ‖v‖ where it starts, "
              f"over ‖v_T‖; by the triangle inequality this bounds how far v moves from v_T for "
              f"the rest of the run. It is conservative: noise that cancels out over many steps "
              f"adds up in it. Freeze probe (<code>freeze_probe=T₀</code>): ‖v_t − v_T₀‖/‖v_T₀‖ "
              f"measured directly. A step counts as a freeze step when v stays within the "
              f"tolerance ({verdict.tol:g}) of its value there and at least "
              f"{MIN_TAIL:.0%} of the run follows it (a short tail proves little); the verdict "
              f"takes the earliest.</p>")
    fig = go.Figure(layout=layout(340, "relative change of v", log=True))
    line(fig, run, "moment2_drift", "global", options, name="drift between samples")
    steps, remaining = minmax_downsample(verdict.steps, verdict.remaining, options.bins)
    fig.add_trace(go.Scatter(x=i4(steps), y=f4(np.where(np.isfinite(remaining), remaining,
                                                            np.nan)),
                             mode="lines", name="bound on ‖v_end − v_T‖/‖v_T‖",
                             line=dict(color="#9467bd", dash="dot")))
    if run.has("moment2_drift_since_freeze"):
        line(fig, run, "moment2_drift_since_freeze", "global", options,
              name="measured ‖v_t − v_T₀‖/‖v_T₀‖", color="#2ca02c")
    span = np.concatenate([run.series(m)[0] for m in ("moment2_drift",
                                                      "moment2_drift_since_freeze")])
    if len(span):  # a trace, not an annotated line: annotations misplace on log axes
        fig.add_trace(go.Scatter(x=i4([span.min(), span.max()]), y=f4([verdict.tol] * 2),
                                 mode="lines", name=f"tolerance {verdict.tol:g}",
                                 line=dict(color="#b42318", dash="dash", width=1)))
    marks = {verdict.probe_step: "T₀ (probe)", verdict.freeze_step: "freeze step"}
    if verdict.freeze_step is not None and verdict.freeze_step == verdict.probe_step:
        marks = {verdict.freeze_step: "freeze step = T₀ (probe)"}
    for step, text in marks.items():
        if step is not None:
            fig.add_vline(x=step, line=dict(color="#555", dash="dot", width=1),
                          annotation_text=text, annotation_position="top right")
    page.figure(fig, "Global second-moment drift between consecutive samples, the bound from "
                     "each step to the end, and, with <code>freeze_probe</code>, the measured "
                     "distance from v at the probe step.")
    for metric in ("moment2_drift", "moment2_drift_since_freeze"):
        heatmap(page, run, metric, options)


def _quantization(page: Page, run: ReportRun, options: Options) -> None:
    _compression_section(page, run, options, "quant_error",
                         "Relative error of the optimizer's own compression: MicroAdam's 4-bit "
                         "error feedback, 1-bit Adam's 1-bit momentum.")
    _overlay(page, run, options, QUANT_METRICS[:2],
             "What a compressed optimizer's requantization rounds off each step: its stored m "
             "(v) against β·m_{t−1} + (1−β)·g (g²) computed exactly from its own stored state, "
             "on the coordinate sample.")
    _overlay(page, run, options, QUANT_METRICS[2:],
             "Probes of the uncompressed m and v: sampled 256-entry blocks quantized as 8-bit "
             "(dynamic code, absmax per 256) and 4-bit (absmax per 128; v also with rank-1 "
             "normalisation and a code without zero) optimizers would store them.")


def _overlay(page: Page, run: ReportRun, options: Options, metrics: tuple[str, ...],
             intro: str) -> None:
    """The global series of related metrics in one figure, then each one's heatmap."""
    present = [m for m in metrics if run.has(m)]
    if not present:
        why = run.skipped(metrics[0]) or "not recorded in this run"
        page.html(f'<p class="note">No {esc(", ".join(metrics))}: {esc(why)}.</p>')
        return
    page.html(f"<p>{esc(intro)}</p>")
    fig = go.Figure(layout=layout(300, "relative error", log=True))
    for metric in present:
        line(fig, run, metric, "global", options, name=metric)
    bands = [BANDS[m].why for m in present if m in BANDS]
    band(fig, run, present[0])
    page.figure(fig, "Global values" + (f"; shaded: the healthy band ({esc(bands[0])})."
                                        if bands else "."))
    for metric in present:
        heatmap(page, run, metric, options)


def _coverage(page: Page, run: ReportRun, options: Options) -> None:
    density, block = run.meta.get("topk_density"), run.meta.get("topk_block")
    probe = (f" For optimizers that do not sparsify, a probe on the gradient: density "
             f"{density:g}, blocks of {block} entries." if density else "")
    _compression_section(page, run, options, "topk_coverage",
                         "Share of ‖x‖² that a blockwise top-k keeps (MicroAdam: its own "
                         f"accumulator and density).{probe} Heatmap cells hold the bin's "
                         "minimum: a dip is the event.")


def _compression_section(page: Page, run: ReportRun, options: Options, metric: str,
                         intro: str) -> None:
    if not run.has(metric):
        why = run.skipped(metric) or "not recorded in this run"
        page.html(f'<p class="note">No {esc(metric)}: {esc(why)}.</p>')
        return
    page.html(f"<p>{esc(intro)}</p>")
    show = SHOW[metric]
    fig = go.Figure(layout=layout(300, show.label, log=show.log))
    line(fig, run, metric, "global", options, name=metric)
    band(fig, run, metric)
    page.figure(fig, f"Global {esc(metric)}; shaded: the healthy band "
                     f"({esc(BANDS[metric].why)}).")
    heatmap(page, run, metric, options)


def _memory(page: Page, run: ReportRun, options: Options) -> None:
    if run.state_bytes is None:
        page.html('<p class="note">No state_bytes recorded (no sampled step).</p>')
        return
    adamw = run.adamw_bytes()
    keys = [s for s in run.history.scopes("state_bytes") if s.startswith("key/")]
    by_key = {k[4:]: run.last("state_bytes", k) or 0.0 for k in keys}
    n = run.n_params
    rows = [[esc(k), esc(format_bytes(v)), bytes_per_param(v, n)] for k, v in by_key.items()]
    rows.append(["<strong>total</strong>", f"<strong>{esc(format_bytes(run.state_bytes))}</strong>",
                 f"<strong>{bytes_per_param(run.state_bytes, n)}</strong>"])
    rows.append([esc("fp32 AdamW (exp_avg + exp_avg_sq + step)"), esc(format_bytes(adamw)),
                 bytes_per_param(adamw, n)])
    ratio = run.state_bytes / adamw if adamw else math.nan
    page.html(table(["state", "bytes", "per parameter"], rows, numeric={1, 2},
                    caption=f"At the last sample. This optimizer keeps {format_number(ratio)}× "
                            "the state "
                            "of fp32 AdamW (8 bytes per parameter plus a 4-byte step counter "
                            "per tensor)."))

    fig = go.Figure(layout=layout(220, None, log=False, left=label_margin([run.name,
                                                                            "fp32 AdamW"])))
    fig.update_layout(barmode="stack", xaxis_title="bytes per parameter",
                      legend=dict(orientation="h", y=-0.35))
    for i, (key, value) in enumerate(by_key.items()):
        fig.add_trace(go.Bar(y=[esc(run.name)], x=[value / n if n else 0.0], orientation="h",
                             name=esc(key),
                             marker_color=PALETTE[i % len(PALETTE)],
                             hovertemplate=f"{esc(key)}: %{{x:.3g}} B/param<extra></extra>"))
    fig.add_trace(go.Bar(y=["fp32 AdamW"], x=[adamw / n if n else 0.0], orientation="h",
                         name="fp32 AdamW", marker_color="#bbbbbb",
                         hovertemplate="fp32 AdamW: %{x:.3g} B/param<extra></extra>"))
    page.figure(fig, "State bytes per parameter by state key, against fp32 AdamW.")

    per_tensor = [(t, run.last("state_bytes", t)) for t in run.tensors if run.has("state_bytes", t)]
    per_tensor = sorted(((t, b) for t, b in per_tensor if b), key=lambda x: -x[1])
    if per_tensor:
        top = per_tensor[:30]
        fig = go.Figure(layout=layout(120 + 18 * len(top), None, log=False,
                                       left=label_margin([t for t, _ in top])))
        per_param = [b / run.numel[t] if run.numel.get(t) else math.nan for t, b in top]
        fig.add_trace(go.Bar(y=[esc(t) for t, _ in top], x=f4([b / 2**20 for _, b in top]),
                             orientation="h", marker_color=run.color, customdata=f4(per_param),
                             hovertemplate="%{y}<br>%{x:.3f} MiB, %{customdata:.3g} B/param"
                                           "<extra></extra>"))
        fig.update_layout(xaxis_title="MiB", yaxis=dict(autorange="reversed"))
        more = f" (the largest 30 of {len(per_tensor)})" if len(per_tensor) > 30 else ""
        page.figure(fig, f"State bytes per tensor{more}.")
    steps, values = run.series("state_bytes")
    cuda = run.has("cuda_memory_allocated")
    if (len(values) and np.nanmax(values) != np.nanmin(values)) or cuda:
        fig = go.Figure(layout=layout(280, "MiB", log=False))
        fig.add_trace(go.Scatter(x=i4(steps), y=f4(values / 2**20), mode="lines",
                                 name="optimizer state", line=dict(color=run.color)))
        if cuda:
            s, v = run.series("cuda_memory_allocated")
            fig.add_trace(go.Scatter(x=i4(s), y=f4(v / 2**20), mode="lines",
                                     name="CUDA memory allocated"))
        page.figure(fig, "Memory over the run.")


def _alerts(page: Page, run: ReportRun, options: Options) -> None:
    alerts = sorted(run.history.alerts, key=lambda a: a.step)
    if not alerts:
        page.html('<p class="ok">No alerts.</p>')
        return
    counts = Counter(a.kind for a in alerts)
    page.html("<p>" + ", ".join(f"{n:,} × {esc(kind)}" for kind, n in counts.most_common())
              + ".</p>")
    rows = []
    for a in alerts[:MAX_ALERT_ROWS]:
        tensors = ", ".join(a.tensors[:5]) + (f" and {len(a.tensors) - 5} more"
                                               if len(a.tensors) > 5 else "")
        rows.append([f"{a.step:,}", esc(a.kind), esc(a.metric), esc(tensors), esc(a.message)])
    more = (f"The first {MAX_ALERT_ROWS} of {len(alerts):,}; every alert is in the run log."
            if len(alerts) > MAX_ALERT_ROWS else None)
    page.html(table(["step", "kind", "metric", "tensors", "message"], rows, numeric={0},
                    caption=more))
