"""The comparison at the top of a report of several runs: a table, loss against step overlaid, loss
against optimizer-state memory, and the global metrics overlaid."""

from __future__ import annotations

import math

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from optiscope.dashboards.html import Page, esc, table
from optiscope.dashboards.report.figures import grid, layout, line
from optiscope.dashboards.report.run import (ADAMW_BYTES_PER_PARAM, QUANT_METRICS, SHOW,
                                             TREND_METRICS, Options, ReportRun, bytes_per_param,
                                             worth_showing)
from optiscope.formatting import format_bytes, format_number


def comparison(page: Page, runs: list[ReportRun], options: Options) -> list:
    """The comparison sections of a multi-run report; returns their table-of-contents entries."""
    page.html('<section id="compare"><h2>Comparison</h2>')
    rows = []
    for run in runs:
        final, best = run.loss()
        adamw = run.adamw_bytes()
        verdict = run.verdict
        freeze = (f"from step {verdict.freeze_step:,}" if verdict.stable else
                  "not stable" if verdict.available else "—")
        rows.append([f'<span style="color:{run.color}">■</span> {esc(run.name)}',
                     esc(run.meta.get("optimizer_name") or ""), esc(run.meta.get("backend") or ""),
                     f"{run.n_params:,}", f"{run.history.last_step():,}",
                     format_number(final) if final is not None else "—",
                     format_number(best) if best is not None else "—",
                     esc(format_bytes(run.state_bytes)) if run.state_bytes is not None else "—",
                     bytes_per_param(run.state_bytes, run.n_params) if run.state_bytes is not None
                     else "—",
                     format_number(run.state_bytes / adamw) if run.state_bytes is not None and adamw
                     else "—",
                     esc(freeze), f"{len(run.history.alerts):,}"])
    page.html(table(["run", "optimizer", "backend", "parameters", "steps", "final loss",
                     "min loss", "state", "B/param", "× fp32 AdamW", "freeze v", "alerts"],
                    rows, numeric={3, 4, 5, 6, 7, 8, 9, 11},
                    caption="Final loss: the last logged value; min loss: the smallest finite "
                            "one. × fp32 AdamW: state bytes over the 8 bytes per parameter (plus "
                            "step counters) of fp32 AdamW."))
    page.html("</section>")

    page.html('<section id="compare-loss"><h2>Loss</h2>')
    with_loss = [r for r in runs if r.has("loss")]
    if with_loss:
        fig = go.Figure(layout=layout(380, "loss", log=False))
        for run in with_loss:
            line(fig, run, "loss", "global", options, name=run.name, color=run.color)
        page.figure(fig, "Loss against step, every run.")
    else:
        page.html('<p class="note">No run logged a loss (<code>monitor.log_scalar("loss", '
                  "loss)</code>).</p>")
    page.html("</section>")

    page.html('<section id="compare-memory"><h2>Loss against optimizer-state memory</h2>')
    _loss_vs_memory(page, runs)
    page.html("</section>")

    page.html('<section id="compare-metrics"><h2>Global metrics, overlaid</h2>')
    metrics = [m for m in (*TREND_METRICS, "quant_error", *QUANT_METRICS, "topk_coverage")
               if any(worth_showing(r, m) for r in runs)]
    if any(r.has("lr", "group0") for r in runs):
        metrics.append("lr")
    if metrics:
        fig = grid(len(metrics), [SHOW[m].label + (" (group 0)" if m == "lr" else "")
                                   for m in metrics], height_per_row=230, legend=True)
        for i, metric in enumerate(metrics):
            row, col = i // 2 + 1, i % 2 + 1
            for run in runs:
                scope = "group0" if metric == "lr" else "global"
                if run.has(metric, scope):
                    line(fig, run, metric, scope, options, row=row, col=col, name=run.name,
                          color=run.color, legend=i == 0)
            if SHOW[metric].log:
                fig.update_yaxes(type="log", row=row, col=col)
        page.figure(fig, "Each run in its own colour; the legend hides or shows a run in every "
                         "panel at once.")
    page.html("</section>")
    return [("compare", "Comparison"), ("compare-loss", "Loss, all runs"),
            ("compare-memory", "Loss against memory"), ("compare-metrics", "Metrics, all runs")]


def _loss_vs_memory(page: Page, runs: list[ReportRun]) -> None:
    """Final and best loss against state memory (one point per run), and bytes per parameter."""
    fig = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4], horizontal_spacing=0.12,
                        subplot_titles=("loss against optimizer-state memory",
                                        "state bytes per parameter"))
    fig.update_layout(height=420, margin=dict(l=70, r=20, t=40, b=60), template="none",
                      hovermode="closest")
    plotted = 0
    for run in runs:
        if run.state_bytes is None:
            continue
        mib = run.state_bytes / 2**20
        final, best = run.loss()
        for value, symbol, what in ((final, "circle", "final"), (best, "circle-open", "min")):
            if value is None or not math.isfinite(value):
                continue
            fig.add_trace(go.Scatter(
                x=[mib], y=[value], mode="markers+text",
                text=[esc(run.name) if what == "final" else ""],
                textposition="top center", marker=dict(color=run.color, size=12, symbol=symbol),
                name=esc(f"{run.name} ({what} loss)"), showlegend=False,
                hovertemplate=f"{esc(run.name)}<br>{what} loss %{{y:.4g}}<br>"
                              f"state %{{x:.3f}} MiB<extra></extra>"), row=1, col=1)
            plotted += 1
        per = run.state_bytes / run.n_params if run.n_params else math.nan
        fig.add_trace(go.Bar(x=[esc(run.name)], y=[per], marker_color=run.color, showlegend=False,
                             name=esc(run.name),
                             hovertemplate="%{x}: %{y:.3g} B/param<extra></extra>"), row=1, col=2)
    fig.add_hline(y=ADAMW_BYTES_PER_PARAM, row=1, col=2, line=dict(dash="dash", color="#555"),
                  annotation_text="fp32 AdamW moments", annotation_position="top left")
    fig.update_xaxes(title_text="optimizer state (MiB)", row=1, col=1)
    fig.update_yaxes(title_text="loss", row=1, col=1)
    fig.update_yaxes(title_text="bytes per parameter", rangemode="tozero", row=1, col=2)
    caption = ("Filled: the final loss; open: the smallest. Memory: optimizer state at the last "
               "sample. Lower left is better: less loss for less memory.")
    if not plotted:
        caption = "No run logged a loss: only the memory is shown. " + caption
    page.figure(fig, caption)
