"""The HTML report: one self-contained file that says what the optimizer did during a run.

`write_report` turns one run, or several, into a single HTML file that opens offline in any
browser (plotly.js is inlined once; no network reference at all) and stays small for long runs
(series are downsampled keeping every bin's minimum and maximum, so spikes survive; heatmaps
keep each bin's maximum). `OptimizerMonitor.close` writes it into the run directory and
``optiscope report RUN_DIR [RUN_DIR ...] -o FILE`` writes it from run logs.

For each run the report has:

* a summary: optimizer, hyperparameters, optimizer-state bytes per parameter against fp32 AdamW,
  alerts, the latest value of each global metric coloured by the healthy bands of
  `optiscope.dashboards.bands`, whether Adam's second moment became stable enough to freeze and
  from which step (`optiscope.monitor.analysis.freeze_verdict`), and the metrics the run could
  not record, with the reason;
* compression readiness: is 8-bit or 4-bit optimizer state safe, would MicroAdam's top-k keep
  most of the gradient, from which step could 1-bit Adam freeze v, which low-precision formats
  hold the gradients (`optiscope.monitor.readiness`), each with its threshold, evidence and
  confidence;
* trends: the loss and other logged scalars, learning rates, and the global metrics;
* per-layer heatmaps (tensor × step), one per per-tensor metric, on a log colour scale for norms;
* second-moment drift and the freeze verdict; quantization error; top-k coverage (each with its
  heatmap, or the reason the run lacks it);
* the memory breakdown: state bytes per state key and per tensor, against fp32 AdamW;
* the alerts.

With several runs it starts with a comparison: a table, loss against step overlaid, the global
metrics overlaid, and loss against optimizer-state memory (one labelled point per run) with the
state bytes per parameter of each run; each run's own sections follow.

The package: `run` (the report's view of a run), `figures` (plotly helpers), `sections` (one
run's sections), `compare` (several runs); this module assembles the page.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

from optiscope.atomicfile import atomic_file
from optiscope.dashboards.html import Page, esc
from optiscope.dashboards.report.compare import comparison
from optiscope.dashboards.report.run import Options, ReportRun
from optiscope.dashboards.report.sections import run_sections
from optiscope.dashboards.runs import as_run_list, labelled_histories
from optiscope.monitor.analysis import FreezeVerdict, freeze_verdict

__all__ = ["write_report", "freeze_verdict", "FreezeVerdict"]


def write_report(runs, out: str | os.PathLike, *, names: Sequence[str] | None = None,
                 title: str | None = None, max_points: int = 2000, heatmap_columns: int = 300,
                 freeze_tol: float = 0.1) -> Path:
    """Writes the HTML report of one run or several into one self-contained file.

    Args:
        runs: a `RunHistory` or a run directory (``str`` / ``os.PathLike``, read with
            `load_run`), or a sequence of them; several runs are compared and overlaid.
        out: the HTML file to write (its directory is created; an existing file is replaced
            atomically).
        names: one display name per run (default: the run directory's name, or the optimizer's
            class name for a `RunHistory`; repeated names get " (2)", " (3)", ...).
        title: the page title (default "optiscope report: <name>", or "... <n> runs").
        max_points: the most points a line keeps (default 2000): longer series are cut into
            ``max_points / 2`` bins and keep each bin's minimum and maximum.
        heatmap_columns: the most step columns a heatmap keeps (default 300); a cell holds its
            bin's maximum (minimum for top-k coverage).
        freeze_tol: the tolerance of `freeze_verdict` (default 0.1).

    Returns:
        The path written.

    Raises:
        FileNotFoundError: a path in ``runs`` is not a run directory (from `load_run`).
        ValueError: no runs, ``names`` of the wrong length, or a bad ``max_points``,
            ``heatmap_columns`` or ``freeze_tol``.
        IsADirectoryError: ``out`` is a directory.
    """
    runs = as_run_list(runs, "write_report")
    for name, value, low in (("max_points", max_points, 4),
                             ("heatmap_columns", heatmap_columns, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"write_report: {name} must be an integer >= {low}, got {value!r}")
    if isinstance(freeze_tol, bool) or not (isinstance(freeze_tol, (int, float))
                                            and freeze_tol > 0):
        raise ValueError(f"write_report: freeze_tol must be a number > 0, got {freeze_tol!r}")
    out = Path(out)
    if out.is_dir():
        raise IsADirectoryError(f"write_report: out {str(out)!r} is a directory; pass a file "
                                f"path such as {str(out / 'report.html')!r}")

    histories, labels = labelled_histories(runs, names, "write_report")
    report = [ReportRun(label, h, i, freeze_tol)
              for i, (label, h) in enumerate(zip(labels, histories))]
    if title is None:
        title = (f"optiscope report: {labels[0]}" if len(report) == 1
                 else f"optiscope report: {len(report)} runs")
    page = Page(title)
    options = Options(max_points // 2, heatmap_columns)
    page.html(f'<p class="muted">Written {esc(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))}'
              f" by optiscope. Lines keep each bin's minimum and maximum (at most "
              f"{max_points:,} points), so spikes survive downsampling.</p>")
    nav = []
    if len(report) > 1:
        nav += comparison(page, report, options)
    for run in report:
        nav += run_sections(page, run, options, several=len(report) > 1)
    with atomic_file(out) as f:
        f.write(page.render(nav))
    return out
