"""The optimizer monitor: hooks, sampling schedule, metric definitions, run log and its reader.

`MonitorCore` draws no dashboards; the public `OptimizerMonitor` (``from optiscope import
OptimizerMonitor``, defined in optiscope/api.py above the dashboards) adds them.
"""

from optiscope.monitor.history import Alert, RunHistory
from optiscope.monitor.monitor import MonitorCore
from optiscope.monitor.runlog import load_run

__all__ = ["MonitorCore", "load_run", "RunHistory", "Alert"]


def __getattr__(name: str):
    if name == "OptimizerMonitor":  # it moved above the dashboards, which it chooses
        raise ImportError("optiscope.monitor.OptimizerMonitor is now "
                             "optiscope.OptimizerMonitor: use `from optiscope import "
                             "OptimizerMonitor` (optiscope.monitor.MonitorCore is the monitor "
                             "without default dashboards)")
    raise AttributeError(f"module 'optiscope.monitor' has no attribute {name!r}")
