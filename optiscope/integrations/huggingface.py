"""The monitor inside the Hugging Face ``Trainer``: add one callback.

    from optiscope.integrations.huggingface import OptimizerMonitorCallback
    trainer = Trainer(model, args, train_dataset=..., callbacks=[OptimizerMonitorCallback(every=10)])

The callback attaches an `OptimizerMonitor` to the optimizer the Trainer builds (Accelerate's
wrapper is unwrapped) when training begins, keeps the monitor's step equal to the Trainer's
``global_step``, records every number the Trainer logs (loss, learning rate, grad_norm, eval
metrics) as ``trainer/<name>`` at the step it is logged, and closes the monitor when training
ends. The run directory defaults to ``<output_dir>/optiscope``; a resumed ``train(
resume_from_checkpoint=...)`` continues it at the checkpoint's step. With
``on_nonfinite="raise"`` the first sampled step with a non-finite gradient is not applied and the
Trainer stops after it (``control.should_training_stop``), with an error logged that names the
tensors. Only the main process writes.
"""

from __future__ import annotations

import logging
import os

from transformers import TrainerCallback

from optiscope.integrations._common import PREFIX, make_monitor, record_logs

__all__ = ["OptimizerMonitorCallback", "PREFIX"]

log = logging.getLogger("optiscope.integrations")


class OptimizerMonitorCallback(TrainerCallback):
    """Watches the Trainer's optimizer with an `OptimizerMonitor`.

    Args:
        **monitor_kwargs: `OptimizerMonitor`'s keyword arguments (``every``, ``log_dir``,
            ``on_nonfinite``, ...). ``log_dir`` defaults to ``<output_dir>/optiscope`` and
            ``console`` to False.

    Attributes:
        monitor: the monitor, from ``on_train_begin`` on (None before).
    """

    def __init__(self, **monitor_kwargs):
        if "optimizer" in monitor_kwargs or "model" in monitor_kwargs:
            raise TypeError("OptimizerMonitorCallback: the Trainer's optimizer and model are "
                            "attached at on_train_begin; pass only OptimizerMonitor's other "
                            "keyword arguments")
        self.monitor_kwargs = monitor_kwargs
        self.monitor = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.monitor is not None:  # a second train() call: a new attempt
            self.monitor.close()
        if optimizer is None:
            raise RuntimeError("OptimizerMonitorCallback: the Trainer has no optimizer at "
                               "on_train_begin (DeepSpeed/FSDP create it later); use "
                               "OptimizerMonitor directly on trainer.optimizer")
        default_dir = os.path.join(args.output_dir, "optiscope") if args.output_dir else None
        self.monitor = make_monitor(optimizer, model, default_dir, state.global_step,
                                    self.monitor_kwargs)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor._align_step(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.monitor is not None and self.monitor.stopped is not None:
            control.should_training_stop = True
            log.error("optiscope: stopping the Trainer at step %d: %s", state.global_step,
                      self.monitor.stopped)
        return control

    def on_save(self, args, state, control, **kwargs):
        # the run log in step with the checkpoint just saved (`OptimizerMonitor.state_dict`)
        if self.monitor is not None:
            self.monitor.state_dict()

    def on_log(self, args, state, control, logs=None, **kwargs):
        record_logs(self.monitor, logs, state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.close()
