"""optiscope: see what your optimizer does.

    from optiscope import OptimizerMonitor, load_run
    from optiscope.optimizers import AdamW
"""

from optiscope._version import __version__
from optiscope.api import OptimizerMonitor
from optiscope.monitor import Alert, RunHistory, load_run
from optiscope.monitor.nonfinite import NonFiniteGradientError

__all__ = ["OptimizerMonitor", "load_run", "RunHistory", "Alert", "NonFiniteGradientError",
           "__version__"]
