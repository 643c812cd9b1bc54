"""The report's "Compression readiness" section: the verdicts of `optiscope.monitor.readiness`,
one row each (question, answer, the deciding figure, steps), then what each rests on: its
threshold, the evidence series and figures, and the confidence the sample allows."""

from __future__ import annotations

from optiscope.dashboards.html import Page, esc, table
from optiscope.dashboards.report.run import Options, ReportRun
from optiscope.formatting import format_number
from optiscope.monitor.readiness import NO, NO_DATA, UNCLEAR, YES, Verdict

ANSWER_CLASS = {YES: "ok", NO: "bad", UNCLEAR: "warn", NO_DATA: "muted"}


def readiness_section(page: Page, run: ReportRun, options: Options) -> None:
    verdicts = run.readiness
    page.html("<p>For this run, what compressing the optimizer's state or its inputs would cost. "
              "Each answer is a heuristic threshold applied to series the monitor recorded; "
              "<em>unclear</em> means the figure is within the sample's uncertainty of the "
              "threshold (or too few steps were sampled). docs/readiness.md says what each "
              "threshold rests on.</p>")
    rows = [[esc(v.question), answer_html(v), esc(v.figure or v.detail),
             esc(f"{v.steps[0]:,}–{v.steps[1]:,}") if v.steps else "—"] for v in verdicts]
    page.html(table(["question", "answer", "figure", "steps"], rows, numeric={3}))
    details = []
    for v in verdicts:
        if v.answer == NO_DATA:
            continue
        evidence = "; ".join(
            f"<code>{esc(e.series)}</code>{'' if e.scope == 'global' else f' ({esc(e.scope)})'} "
            f"{esc(e.statistic)}: {esc(format_number(e.value) if e.value is not None else '—')}"
            for e in v.evidence)
        items = [("threshold", esc(v.threshold)), ("evidence", evidence or "—"),
                 ("confidence", esc(v.confidence or "—")), ("why", esc(v.detail))]
        details.append(f"<h3>{esc(v.label)}: {answer_html(v)}</h3><ul>"
                       + "".join(f"<li><strong>{k}</strong>: {t}</li>" for k, t in items if t)
                       + "</ul>")
    page.html("".join(details))
    missing = [v for v in verdicts if v.answer == NO_DATA]
    if missing:
        page.html('<p class="note">No data: ' + "; ".join(
            f"{esc(v.label)} ({esc(v.detail)})" for v in missing) + ".</p>")


def answer_html(verdict: Verdict) -> str:
    return f'<span class="{ANSWER_CLASS[verdict.answer]}">{esc(verdict.answer)}</span>'
