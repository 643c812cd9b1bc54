"""What both trainer callbacks share: building the monitor, and the trainer's logged scalars."""

from __future__ import annotations

import logging
import numbers
from pathlib import Path

from optiscope.api import OptimizerMonitor
from optiscope.monitor.runlog import RUNLOG

__all__ = ["PREFIX", "make_monitor", "record_logs"]

log = logging.getLogger("optiscope.integrations")

# A trainer logs "grad_norm", "loss", "learning_rate"...: its scalars are recorded under this
# prefix, so they never collide with the monitor's own metrics (its grad_norm is the gradient
# before clipping; the trainer's may be after).
PREFIX = "trainer/"


def make_monitor(optimizer, model, default_dir, step: int, kwargs: dict) -> OptimizerMonitor:
    """An `OptimizerMonitor` for a trainer at its global ``step``.

    ``log_dir`` defaults to ``default_dir``; the console dashboard defaults to off (the trainer
    draws its own progress bar). A run log already there is continued at ``step``: the
    checkpoint the trainer resumed from (0: a run started over), superseding what was recorded
    after it.
    """
    kwargs = dict(kwargs)
    kwargs.setdefault("console", False)
    log_dir = kwargs.setdefault("log_dir", default_dir)
    if log_dir is not None and "resume" not in kwargs:
        path = Path(log_dir) / RUNLOG
        if step > 0 or (path.exists() and path.stat().st_size):
            kwargs["resume"] = True
    if step > 0 or kwargs.get("resume"):
        kwargs.setdefault("start_step", step)
    monitor = OptimizerMonitor(optimizer, model=model, **kwargs)
    monitor._stop_quietly = True  # on_nonfinite="raise": the callback stops the trainer
    return monitor


def record_logs(monitor: OptimizerMonitor | None, logs: dict, step: int) -> None:
    """Records each number in ``logs`` as ``trainer/<key>`` at ``step``, sampled or not."""
    if monitor is None or not logs or not monitor._hooks:  # none yet, or closed
        return
    step = min(int(step), monitor.step)
    for key, value in logs.items():
        if hasattr(value, "numel") and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        try:
            monitor.log_scalar(PREFIX + str(key), float(value), step=step)
        except Exception:
            if monitor.strict:
                raise
            log.exception("optiscope: recording the trainer's %r failed", key)
