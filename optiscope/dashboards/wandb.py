"""Weights & Biases sink: a run's values as W&B history, its metadata as config, its alerts as a
table.

``OptimizerMonitor(opt, model=model, log_dir="runs/exp1", sinks=[WandbSink()])`` logs into the
active W&B run (``wandb.init()``, or the one HF Trainer's and Lightning's W&B integrations start),
or starts one named after the run and finishes it at `close`. What is sent and how (key budget,
background thread, failure) is in `optiscope.dashboards.trackers`.

In W&B:

* history keys ``<metric>/<scope>`` (``grad_norm/global``, ``grad_norm/blocks.0.attn.weight``,
  ``lr/group0``, ``loss/global``), each row with ``optiscope/step`` = the optimizer step, which
  ``define_metric`` makes their x-axis. W&B's own ``_step`` counts ``log`` calls and must only
  grow, so the optimizer step cannot be it in a run that HF Trainer or Lightning also log to.
* config ``optiscope``: the optimizer, the first group's hyperparameters, how the monitor samples,
  the model's size, versions (`optiscope.dashboards.trackers.flat_meta`), updated with what the
  monitor learns later (``steps_taken``, ``skipped_metrics``).
* alerts: at `close`, the table ``optiscope/alerts`` (step, kind, metric, value, tensors, message)
  and the summary ``optiscope/alerts_count``; with ``alert=True`` also ``wandb.alert`` for each
  (W&B's notifications by e-mail or Slack, off by default: a spiky run would send many).
"""

from __future__ import annotations

from optiscope.dashboards.trackers import (TrackerSink, alert_line, check_flags, check_strings,
                                           flat_meta, require, run_name)
from optiscope.monitor.history import Alert

__all__ = ["WandbSink", "STEP_KEY"]

STEP_KEY = "optiscope/step"
_ALERT_COLUMNS = ["step", "kind", "metric", "value", "tensors", "message"]


class WandbSink(TrackerSink):
    """Sends the monitor's records to Weights & Biases (see the module docstring for what goes
    where).

    Args:
        run: the W&B run to log into (default None: ``wandb.run`` at the first sample, else a
            new run).
        project: the project of a new run (default None: W&B's, e.g. ``WANDB_PROJECT``).
        name: the name of a new run (default None: the run directory's name when the metadata has
            it, else ``optiscope-<optimizer>-<start time>``).
        init_kwargs: more arguments for ``wandb.init`` of a new run (``entity``, ``tags``,
            ``dir``, ``mode``...).
        alert: also call ``wandb.alert`` for each alert (default False).
        prefix: put before every history key (default none).
        metrics, scopes, top, max_queue, close_timeout, block: as for `TrackerSink`.

    Raises:
        ImportError: wandb is not installed (``pip install 'optiscope[wandb]'``).
    """

    tracker = "WandbSink"

    def __init__(self, *, run=None, project: str | None = None, name: str | None = None,
                 init_kwargs: dict | None = None, alert: bool = False, prefix: str = "",
                 **options):
        require("wandb", "WandbSink", "wandb", "wandb")
        super().__init__(prefix=prefix, **options)
        check_strings("WandbSink", project=project, name=name)
        if init_kwargs is not None and not isinstance(init_kwargs, dict):
            raise TypeError(f"WandbSink: init_kwargs must be a dict of wandb.init arguments, got "
                            f"{init_kwargs!r}")
        check_flags("WandbSink", alert=alert)
        self.run = run
        self.project = project
        self.name = name
        self.init_kwargs = dict(init_kwargs or {})
        self.alert = alert
        self._config: dict = {}
        self._defined: set[str] = set()

    # ------------------------------------------------------------------------------ hooks
    def _find_active(self):
        import wandb

        return self.run if self.run is not None else wandb.run

    def _open(self, active, meta: dict) -> None:
        if active is None:
            import wandb

            kwargs = dict(reinit="create_new")  # leaves wandb.run, the user's, alone
            if self.project is not None:
                kwargs["project"] = self.project
            kwargs["name"] = self.name or run_name(meta)
            kwargs.update(self.init_kwargs)
            active = wandb.init(**kwargs)
            self.owns_run = True
        self.run = active
        self.run.define_metric(STEP_KEY, hidden=False)
        self._log_meta(meta)

    def _log_samples(self, samples) -> None:
        run, prefix = self.run, self.prefix
        for step, _time, values in samples:
            row = {prefix + k: v for k, v in values.items()}
            for key in row:
                if key not in self._defined:  # each key, not a glob: it meets the user's keys
                    self._defined.add(key)
                    if "*" not in key:  # W&B reads "*" as a glob (and refuses it mid-name)
                        run.define_metric(key, step_metric=STEP_KEY)
            row[STEP_KEY] = step
            run.log(row)

    def _log_meta(self, changes: dict) -> None:
        self._config.update(flat_meta(changes))
        key = "optiscope" if not self.prefix else f"optiscope/{self.prefix.rstrip('/')}"
        self.run.config.update({key: dict(self._config)}, allow_val_change=True)

    def _log_alert(self, alert: Alert) -> None:
        if self.alert:
            import wandb

            self.run.alert(title=f"optiscope: {alert.kind} at step {alert.step}",
                           text=alert_line(alert), level=wandb.AlertLevel.WARN)

    def _finish(self, alerts: list[Alert], failed: bool) -> None:
        if self.run is None:
            return
        try:
            if not failed:
                import wandb

                name = f"optiscope/{self.prefix}alerts"
                if alerts:
                    table = wandb.Table(columns=_ALERT_COLUMNS, data=[
                        [a.step, a.kind, a.metric, a.value, ", ".join(a.tensors), a.message]
                        for a in alerts])
                    self.run.log({name: table, STEP_KEY: self._last_step})
                self.run.summary[f"{name}_count"] = len(alerts)
        finally:
            if self.owns_run:
                self.run.finish(exit_code=1 if failed else 0)
