"""MLflow sink: a run's values as MLflow metrics, its metadata as parameters, its alerts as text.

``OptimizerMonitor(opt, model=model, log_dir="runs/exp1", sinks=[MLflowSink()])`` logs into the
active MLflow run (``mlflow.start_run()``, or the one HF Trainer's and Lightning's MLflow
integrations start), or starts one named after the run and ends it at `close`. What is sent
and how (key budget, background thread, failure) is in `optiscope.dashboards.trackers`.

In MLflow:

* metrics ``<metric>/<scope>`` (``grad_norm/global``, ``grad_norm/blocks.0.attn.weight``,
  ``lr/group0``, ``loss/global``) with ``step`` = the optimizer step and the sample's time;
  characters MLflow refuses in a key become ``_``. MLflow's SQL stores keep NaN but store ±inf
  as ±1.797e308 (the largest float64).
* parameters ``optiscope.<key>``: the optimizer, the first group's hyperparameters, how the
  monitor samples, the model's size, versions (`optiscope.dashboards.trackers.flat_meta`), once;
  metadata learnt later (``steps_taken``, ``skipped_metrics``) as tags ``optiscope.<key>``.
* alerts: the tag ``optiscope.alerts`` (how many so far) and, at `close`, the text artifact
  ``optiscope/alerts.txt`` with one line per alert.
"""

from __future__ import annotations

import re

from optiscope.dashboards.trackers import (TrackerSink, alert_line, check_strings, flat_meta, log,
                                           require, run_name)
from optiscope.monitor.history import Alert

__all__ = ["MLflowSink", "mlflow_key"]

_BAD = re.compile(r"[^/\w.\- :]")
_MAX_KEY = 250  # MLflow's limit on metric, parameter and tag keys
_MAX_VALUE = 500  # parameter values are cut to this (a command line can be long)
_BATCH = 1000  # metrics per log_batch (MLflow's limit)
_PARAMS_PER_BATCH = 100


def mlflow_key(key: str) -> str:
    """``key`` as MLflow accepts it: only letters, digits, ``_ - . / :`` and spaces, no empty,
    ``.`` or ``..`` path segment, at most 250 characters; anything else becomes ``_``."""
    key = _BAD.sub("_", key)
    key = "/".join(p if p not in ("", ".", "..") else "_" for p in key.split("/"))
    return key[:_MAX_KEY]


class MLflowSink(TrackerSink):
    """Sends the monitor's records to MLflow (see the module docstring for what goes where).

    Args:
        run_id: the MLflow run to log into (default None: the active run at the first sample,
            else a new run).
        experiment: the experiment of a new run, by name, created if missing (default None: the
            active one, ``MLFLOW_EXPERIMENT_NAME``/``MLFLOW_EXPERIMENT_ID``, else MLflow's
            default experiment).
        run_name: the name of a new run (default None: the run directory's name when the
            metadata has it, else ``optiscope-<optimizer>-<start time>``).
        tracking_uri: where MLflow stores runs (default None: ``mlflow.get_tracking_uri()``).
        prefix: put before every metric, parameter and tag key (default none).
        metrics, scopes, top, max_queue, close_timeout, block: as for `TrackerSink`.

    Raises:
        ImportError: MLflow is not installed (``pip install 'optiscope[mlflow]'``).
    """

    tracker = "MLflowSink"

    def __init__(self, *, run_id: str | None = None, experiment: str | None = None,
                 run_name: str | None = None, tracking_uri: str | None = None,
                 prefix: str = "", **options):
        require("mlflow", "MLflowSink", "MLflow", "mlflow")
        super().__init__(prefix=prefix, **options)
        check_strings("MLflowSink", run_id=run_id, experiment=experiment, run_name=run_name,
                      tracking_uri=tracking_uri)
        self.run_id = run_id
        self.experiment = experiment
        self.run_name = run_name
        self.tracking_uri = tracking_uri
        self._client = None
        self._keys: dict[str, str] = {}

    # ------------------------------------------------------------------------------ hooks
    def _find_active(self):
        import mlflow

        if self.tracking_uri is None:  # the training thread's, as mlflow.log_metric would use
            self.tracking_uri = mlflow.get_tracking_uri()
        if self.run_id is not None:
            return self.run_id
        run = mlflow.active_run()  # kept per thread by MLflow: looked up here
        return run.info.run_id if run is not None else None

    def _open(self, active, meta: dict) -> None:
        from mlflow import MlflowClient

        self._client = MlflowClient(self.tracking_uri)
        if active is None:
            run = self._client.create_run(self._experiment_id(), run_name=self._name(meta),
                                          tags={"optiscope.created_by": "optiscope.MLflowSink"})
            active = run.info.run_id
            self.owns_run = True
        self.run_id = active
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        items = [Param(self._key(f"optiscope.{self.prefix}{k}"), str(v)[:_MAX_VALUE])
                 for k, v in flat_meta(meta).items()]
        try:
            for i in range(0, len(items), _PARAMS_PER_BATCH):
                self._client.log_batch(self.run_id, params=items[i:i + _PARAMS_PER_BATCH])
        except MlflowException as exc:
            if self.owns_run:
                raise
            # The run already has other optiscope.* parameters (a second monitor in the same
            # run): parameters cannot change, tags can.
            log.warning("optiscope: MLflowSink: the active run already holds different "
                        "optiscope.* parameters (%s); this monitor's metadata goes into tags "
                        "instead (pass prefix= to tell two monitors apart)", exc.message)
            self._log_meta(meta)

    def _log_samples(self, samples) -> None:
        from mlflow.entities import Metric

        metrics = []
        prefix = self.prefix
        for step, time, values in samples:
            ms = int(time * 1000)
            metrics.extend(Metric(self._key(prefix + k), v, ms, step) for k, v in values.items())
        for i in range(0, len(metrics), _BATCH):
            self._client.log_batch(self.run_id, metrics=metrics[i:i + _BATCH])

    def _log_meta(self, changes: dict) -> None:
        from mlflow.entities import RunTag

        tags = [RunTag(self._key(f"optiscope.{self.prefix}{k}"), str(v)[:8000])
                for k, v in flat_meta(changes).items()]
        for i in range(0, len(tags), _PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, tags=tags[i:i + _PARAMS_PER_BATCH])

    def _log_alert(self, alert: Alert) -> None:
        self._client.set_tag(self.run_id, self._key(f"optiscope.{self.prefix}alerts"),
                             str(len(self._alerts)))

    def _finish(self, alerts: list[Alert], failed: bool) -> None:
        if self._client is None or self.run_id is None:
            return
        try:
            if alerts and not failed:
                text = "".join(alert_line(a) + "\n" for a in alerts)
                prefix = mlflow_key(self.prefix) if self.prefix else ""
                self._client.log_text(self.run_id, text, f"optiscope/{prefix}alerts.txt")
        finally:
            if self.owns_run:
                self._client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")

    # ------------------------------------------------------------------------------ helpers
    def _key(self, key: str) -> str:
        clean = self._keys.get(key)
        if clean is None:
            clean = self._keys[key] = mlflow_key(key)
        return clean

    def _experiment_id(self) -> str:
        if self.experiment is not None:
            found = self._client.get_experiment_by_name(self.experiment)
            return found.experiment_id if found is not None else \
                self._client.create_experiment(self.experiment)
        from mlflow.tracking import fluent

        return fluent._get_experiment_id() or "0"  # as mlflow.start_run() would choose

    def _name(self, meta: dict) -> str:
        if self.run_name:
            return self.run_name
        return run_name(meta)

