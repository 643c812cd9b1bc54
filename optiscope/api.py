"""The public `OptimizerMonitor`: the monitor core with the dashboards it draws by default.

`optiscope.monitor.monitor.MonitorCore` hooks the optimizer, computes the metrics, writes the
run log and calls its sinks; it knows sinks only through their interface. This top-layer class
turns ``console=``, ``tensorboard=`` and ``report=`` into the dashboards they ask for, and
writes the HTML report and the PNG once the run log is closed.
"""

from __future__ import annotations

import logging
import sys

from optiscope.dashboards.sink import Sink
from optiscope.monitor.monitor import MonitorCore

__all__ = ["OptimizerMonitor"]

log = logging.getLogger("optiscope.monitor")


class OptimizerMonitor(MonitorCore):
    __doc__ = MonitorCore.__doc__

    _report = False

    def _default_sinks(self, console, tensorboard: bool, report: bool) -> list[Sink]:
        self._report = report
        sinks = []
        dashboard = _console_sink(console)
        if dashboard is not None:
            sinks.append(dashboard)
        if tensorboard:
            from optiscope.dashboards.tensorboard import TensorBoardSink
            sinks.append(TensorBoardSink(self.log_dir))
        return sinks

    def _after_close(self) -> None:
        if self._report:
            self._write_report()

    def _write_report(self) -> None:
        """``report.html`` and ``trends.png`` in the run directory; a failure is logged (the run
        log is complete by now: ``optiscope report`` can make them again)."""
        from optiscope.dashboards.png import write_png
        from optiscope.dashboards.report import write_report
        name = self.log_dir.name or str(self.log_dir)
        for what, fn, file in (("report", write_report, "report.html"),
                               ("PNG", write_png, "trends.png")):
            try:
                fn([self.history], self.log_dir / file, names=[name])
            except Exception as exc:
                if self.strict:
                    raise
                # A full or read-only disk is said in one line; anything else is a bug: traceback.
                (log.error if isinstance(exc, OSError) else log.exception)(
                    "optiscope: writing the %s %s failed%s; run `optiscope report %s` to try "
                    "again", what, self.log_dir / file,
                    f" ({exc})" if isinstance(exc, OSError) else "", self.log_dir)


def _console_sink(console) -> Sink | None:
    """The dashboard that ``console=`` asks for (see `OptimizerMonitor`)."""
    if console is False or console is None:
        return None
    if isinstance(console, Sink):
        return console
    if console == "auto":
        if not sys.stdout.isatty():
            return None
        console = True
    from optiscope.dashboards.console import ConsoleDashboard
    if console is True:
        return ConsoleDashboard()
    return ConsoleDashboard(console)
