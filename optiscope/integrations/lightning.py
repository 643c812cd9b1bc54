"""The monitor inside Lightning: add one callback.

    from optiscope.integrations.lightning import OptimizerMonitorCallback
    trainer = lightning.Trainer(..., callbacks=[OptimizerMonitorCallback(every=10)])

The callback attaches an `OptimizerMonitor` to the trainer's (first) optimizer when training
starts, keeps the monitor's step equal to ``trainer.global_step``, records every metric Lightning
sends to its loggers (``self.log(...)``) as ``trainer/<name>`` at the step it is logged, and
closes the monitor when training ends. Automatic optimization passes a closure to
``optimizer.step``: the monitor takes its statistics after the closure ran, and sees the
gradient before ``gradient_clip_val`` clipped it. The run directory defaults to
``<default_root_dir>/optiscope``; ``fit(ckpt_path=...)`` continues it at the checkpoint's step.
With ``on_nonfinite="raise"`` the first sampled step with a non-finite gradient is not applied
and ``trainer.should_stop`` ends the fit after it, with an error logged that names the tensors.
Only the global-zero process writes.

With ``log_to_trainer=True`` the monitor's values also go to the trainer's own loggers
(``trainer.loggers``: TensorBoard, W&B, MLflow, CSV, whatever was configured) on each sample, as
``optiscope/<metric>/<scope>`` at the optimizer step, through a `LoggerSink`
(``optiscope.dashboards.loggers``: the tracker sinks' key budget, the run-wide values plus
``grad_norm`` and ``update_ratio`` of the 20 tensors with the largest gradient norm). A dict
instead of True sets that sink's ``metrics``, ``scopes``, ``top`` and ``prefix``. The trainer's
own logged values (``trainer/...``) are not sent back. A logger that fails is reported once and
gets nothing more; training goes on.
"""

from __future__ import annotations

import logging
import os

from lightning.pytorch.callbacks import Callback

from optiscope.dashboards.loggers import LoggerSink
from optiscope.integrations._common import PREFIX, make_monitor, record_logs

__all__ = ["OptimizerMonitorCallback", "PREFIX"]

log = logging.getLogger("optiscope.integrations")


class OptimizerMonitorCallback(Callback):
    """Watches a Lightning trainer's optimizer with an `OptimizerMonitor`.

    Args:
        log_to_trainer: also send the monitor's values to the trainer's loggers (True, or a dict
            of `LoggerSink`'s ``metrics``, ``scopes``, ``top``, ``prefix``; default False).
        **monitor_kwargs: `OptimizerMonitor`'s keyword arguments (``every``, ``log_dir``,
            ``on_nonfinite``, ...). ``log_dir`` defaults to ``<default_root_dir>/optiscope``
            and ``console`` to False.

    Attributes:
        monitor: the monitor, from ``on_train_start`` on (None before).
    """

    def __init__(self, *, log_to_trainer: bool | dict = False, **monitor_kwargs):
        if "optimizer" in monitor_kwargs or "model" in monitor_kwargs:
            raise TypeError("OptimizerMonitorCallback: the trainer's optimizer and module are "
                            "attached at on_train_start; pass only OptimizerMonitor's other "
                            "keyword arguments")
        self._forward = _forward_kwargs(log_to_trainer)
        self.monitor_kwargs = monitor_kwargs
        self.monitor = None
        self._connector = None

    def on_train_start(self, trainer, pl_module):
        if not trainer.optimizers:
            raise RuntimeError("OptimizerMonitorCallback: the trainer has no optimizer "
                               "(configure_optimizers returned none)")
        if len(trainer.optimizers) > 1:
            log.warning("optiscope: %d optimizers: the monitor watches the first",
                        len(trainer.optimizers))
        default_dir = os.path.join(trainer.default_root_dir, "optiscope")
        kwargs = dict(self.monitor_kwargs)
        if self._forward is not None and trainer.is_global_zero:
            if not trainer.loggers:
                log.warning("optiscope: log_to_trainer=True, but the trainer has no logger")
            else:
                sink = LoggerSink(lambda: trainer.loggers, exclude=PREFIX + "*",
                                  **self._forward)
                kwargs["sinks"] = [*kwargs.get("sinks", ()), sink]
        self.monitor = make_monitor(trainer.optimizers[0], pl_module, default_dir,
                                    trainer.global_step, kwargs)
        self._watch_logging(trainer)

    def _watch_logging(self, trainer) -> None:
        """Every metric Lightning logs goes through its logger connector's ``log_metrics``:
        wrapped on this trainer only (undone at the end of training)."""
        connector = getattr(trainer, "_logger_connector", None)
        original = getattr(connector, "log_metrics", None)
        if original is None:
            log.warning("optiscope: this Lightning version has no logger connector to read the "
                        "logged metrics from; they are not recorded")
            return

        def log_metrics(metrics, step=None):
            if self.monitor is not None and metrics:
                record_logs(self.monitor, {k: v for k, v in metrics.items() if k != "step"},
                            trainer.global_step)
            return original(metrics, step)

        connector.log_metrics = log_metrics
        self._connector = connector

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.monitor is not None:
            self.monitor._align_step(trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.monitor is not None and self.monitor.stopped is not None and not trainer.should_stop:
            trainer.should_stop = True
            log.error("optiscope: stopping the trainer at step %d: %s", trainer.global_step,
                      self.monitor.stopped)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        # the run log in step with the checkpoint: a crash after it loses only later steps,
        # which the resumed run records again (`OptimizerMonitor.state_dict`)
        if self.monitor is not None:
            self.monitor.state_dict()

    def on_train_end(self, trainer, pl_module):
        if self._connector is not None and "log_metrics" in vars(self._connector):
            del self._connector.log_metrics
            self._connector = None
        if self.monitor is not None:
            self.monitor.close()


_FORWARD_KEYS = ("metrics", "scopes", "top", "prefix")


def _forward_kwargs(value) -> dict | None:
    """``log_to_trainer`` as LoggerSink's keyword arguments (None: off), checked now."""
    if value is False:
        return None
    if value is True:
        return {}
    if not isinstance(value, dict) or not set(value) <= set(_FORWARD_KEYS):
        raise TypeError(f"OptimizerMonitorCallback: log_to_trainer must be True, False or a dict "
                        f"with keys among {list(_FORWARD_KEYS)}, got {value!r}")
    try:  # a bad pattern or top raises here, not at on_train_start
        LoggerSink([], **value)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"OptimizerMonitorCallback: log_to_trainer: "
                        f"{str(exc).removeprefix('LoggerSink: ')}") from None
    return dict(value)
