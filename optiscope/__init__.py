"""optiscope: see what your optimizer does.

    from optiscope import OptimizerMonitor, load_run
    from optiscope.optimizers import AdamW
"""

__version__ = "0.1.0"

from optiscope.monitor import Alert, OptimizerMonitor, RunHistory, load_run  # noqa: E402
from optiscope.monitor.nonfinite import NonFiniteGradientError  # noqa: E402

__all__ = ["OptimizerMonitor", "load_run", "RunHistory", "Alert", "NonFiniteGradientError",
           "__version__"]
