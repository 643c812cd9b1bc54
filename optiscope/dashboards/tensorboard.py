"""TensorBoard sink: a run's records as TensorBoard events in the run directory.

``tensorboard --logdir runs/`` then lists each run directory as a run and shows:

* **Scalars**: every value as ``<metric>/<scope>``: ``grad_norm/global``,
  ``grad_norm/blocks.0.attn.weight``, ``state_bytes/key/exp_avg``, ``lr/group0``,
  ``loss/global``. TensorBoard groups tags by their first ``/``, so each metric is a section.
* **Custom Scalars**: an overview category with each series' global value on its own chart, then
  one category per metric family (gradients, weights and updates, moments, compression, memory,
  schedule) with one chart per metric that draws all its tensors (tag regex ``^grad_norm/``).
* **Histograms**: the log2|x| histograms of the gradient, the update and v of each sampled step,
  ``grad_log2_abs/<scope>``, ``update_log2_abs/<scope>``, ``moment2_log2_abs/<scope>``, for
  ``global`` and each tensor (the value axis is the binary exponent: see `_log2_histogram`).
* **Text**: the run's metadata as markdown tables (``run/meta``, step 0), the metrics this
  optimizer cannot have and why (``run/skipped_metrics``), metadata learnt later
  (``run/meta_updates``), and the alerts of each step (``alerts``).
* **HParams**: the first parameter group's hyperparameters with the optimizer, sampling and model
  size, against the global loss (and any other user scalar), grad norm, update ratio, second-moment
  drift and optimizer state bytes.

Layers, bottom up: `optiscope.dashboards.eventfile` writes the file format; the ``_*_summary``
functions here build summaries from tensorboard's protocol buffers and plugin metadata (no
TensorFlow needed); `TensorBoardSink` turns sink calls into them. All the scalars of a sample go
into one event, written with a compiled CRC: cheaper per scalar than the same single event
through ``torch.utils.tensorboard``'s file writer (its CRC is pure Python) and far cheaper than
one ``SummaryWriter.add_scalar`` per value; ``tests/test_tensorboard.py`` checks the first ratio.
"""

from __future__ import annotations

import math
import os
import re
import time as _time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as custom_scalar_metadata
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.plugins.hparams.summary_v2 import hparams_pb
from tensorboard.plugins.text import metadata as text_metadata

from optiscope.dashboards.trackers import plain_values
from optiscope.dashboards.eventfile import EventFile
from optiscope.dashboards.sink import RecordDecoder, Sink, Values
from optiscope.monitor.history import Alert
from optiscope.monitor.metrics import (EXP_MAX, EXP_MIN, RANGE_QUANTITIES, RANGE_SHARES,
                                       TENSOR_METRICS)
from optiscope.monitor.runlog import RUNLOG, read_records

__all__ = ["TensorBoardSink", "export_tensorboard", "FAMILIES"]

FAMILIES: dict[str, tuple[str, ...]] = {
    "gradients": ("grad_norm", "grad_max", "nonfinite_grads"),
    "weights and updates": ("weight_norm", "update_norm", "update_ratio"),
    "optimizer moments": ("moment1_norm", "moment2_norm", "moment2_drift",
                          "moment2_drift_since_freeze"),
    "compression": ("quant_error", "topk_coverage", "moment1_quant_error", "moment2_quant_error",
                    "probe_int8_m", "probe_int8_v", "probe_int4_m", "probe_int4_v",
                    "probe_int4_v_rank1"),
    "memory": ("state_bytes", "cuda_memory_allocated"),
    "schedule": ("lr", "skipped_steps"),
    "dynamic range": tuple(f"{q}_{fmt}_{what}" for q in RANGE_QUANTITIES
                           for fmt, what in RANGE_SHARES),
}
"""The monitor's series by family: one Custom Scalars category each. Any other series is a user
scalar (``log_scalar``)."""

_FAMILY_OF = {metric: family for family, metrics in FAMILIES.items() for metric in metrics}
_DESCRIPTIONS = {m.name: m.description for m in TENSOR_METRICS} | {
    "state_bytes": "bytes of the optimizer state",
    "cuda_memory_allocated": "bytes allocated on the CUDA device",
    "lr": "learning rate of each parameter group",
    "skipped_steps": "steps a GradScaler skipped (inf/NaN gradients), running total",
}
# Charts that split a metric's scopes: state bytes per tensor, and per state key (exp_avg, ...).
_SPLIT_CHARTS = {"state_bytes": (("per tensor", r"(?!key/)"), ("per state key", r"(global$|key/)"))}
# The monitor's series that the HParams dashboard compares runs on, besides the user scalars.
_HPARAM_METRICS = ("grad_norm", "update_ratio", "moment2_drift", "state_bytes")


class TensorBoardSink(Sink):
    """Writes a run's records as TensorBoard events (see the module docstring for what is shown).

    Nothing happens until the first record: then the directory and the event file are created.
    Tags are ``<metric>/<scope>`` exactly as the monitor names them (dots, slashes and spaces
    included: TensorBoard takes any Unicode tag); the only characters replaced are those that
    cannot be encoded as UTF-8 (lone surrogates), which the protocol buffers reject, by ``?``.
    Non-finite values are written as they are: TensorBoard stores and reads back NaN and ±inf.

    Each sample is one event holding all its scalars. The Custom Scalars layout is written at the
    first sample and written again, whole, at a sample that brings a series it lacks (a drift
    needs two samples; a user scalar may start later): TensorBoard uses the last layout. Alerts
    are written, one text per step, when the next sample arrives, at `flush` and at `close`; the
    HParams summaries at the first sample with the monitor's statistics, and the session's end at
    `close` (``STATUS_SUCCESS`` once the metadata has the ``steps_taken`` the monitor records when
    it closes, else ``STATUS_UNKNOWN``).

    Args:
        log_dir: the directory for the event file: the run directory, so that ``tensorboard
            --logdir`` on its parent shows each run as one run.
        flush_secs: the longest time events wait in memory while more arrive (default 10.0);
            they are also written once 1 MiB is waiting, at `flush` and at `close`.
    """

    def __init__(self, log_dir: str | os.PathLike, *, flush_secs: float = 10.0):
        if isinstance(flush_secs, bool) or not isinstance(flush_secs, (int, float)) \
                or not flush_secs >= 0:
            raise ValueError(f"TensorBoardSink: flush_secs must be a number of seconds >= 0, got "
                             f"{flush_secs!r}")
        self.log_dir = Path(log_dir)
        self.flush_secs = float(flush_secs)
        self._file: EventFile | None = None
        self._closed = False
        self._meta: dict = {}
        self._step = 0
        self._time: float | None = None
        self._tags: dict[str, dict[str, str]] = {}
        self._series: dict[str, tuple[bool, bool]] = {}  # metric -> (has global, has others)
        self._laid_out: dict[str, tuple[bool, bool]] = {}
        self._hparams_written = False
        self._alerts: list[Alert] = []

    @property
    def path(self) -> Path | None:
        """The event file, once the first record has created it."""
        return self._file.path if self._file is not None else None

    # ------------------------------------------------------------------------------ records
    def on_meta(self, changes: dict) -> None:
        first = not self._meta
        self._meta.update(changes)
        if first:
            when = float(self._meta.get("start_time") or _time.time())
            self._write(0, when, _text_summary("run/meta", _meta_markdown(self._meta)))
        else:
            when = self._time if self._time is not None else _time.time()
            rest = {k: v for k, v in changes.items() if k != "skipped_metrics"}
            if rest:
                self._write(self._step, when, _text_summary("run/meta_updates", _table(rest)))
        if changes.get("skipped_metrics"):
            self._write(0, when, _text_summary("run/skipped_metrics",
                                               _skipped_markdown(changes["skipped_metrics"])))

    def on_sample(self, step: int, time: float, values: Values) -> None:
        self._write_alerts()
        self._step, self._time = step, time
        summary = Summary()
        add = summary.value.add
        for metric, (scopes, numbers) in values.items():
            if isinstance(numbers, np.ndarray):
                numbers = numbers.tolist()
            for tag, x in zip(self._tags_of(metric, scopes), numbers):
                add(tag=tag, simple_value=x)
            seen = self._series.get(metric, (False, False))
            if seen != (True, True):
                self._series[metric] = (seen[0] or "global" in scopes,
                                        seen[1] or any(s != "global" for s in scopes))
        self._write(step, time, summary)
        if self._series != self._laid_out:
            self._write(step, time, _layout_summary(self._series))
            self._laid_out = dict(self._series)
        if not self._hparams_written and any(m in _FAMILY_OF for m in values):
            self._write_hparams(time)

    def on_histograms(self, step: int, histograms: dict) -> None:
        """The log2|x| histograms as ``<quantity>_log2_abs/<scope>`` (global and each tensor)
        in the Histograms tab (`_log2_histogram`)."""
        summary = Summary()
        for quantity, (scopes, counts) in histograms.items():
            counts = np.asarray(counts)
            tags = self._tags_of(f"{quantity}_log2_abs", ["global", *scopes])
            for tag, row in zip(tags, [counts.sum(axis=0), *counts]):
                if (histo := _log2_histogram(row)) is not None:
                    summary.value.add(tag=tag, histo=histo)
        when = self._time if self._time is not None else _time.time()
        self._write(step, when, summary)

    def on_alert(self, alert: Alert) -> None:
        self._check_open()
        self._alerts.append(alert)

    def on_resume(self, step: int) -> None:
        """The run continues at ``step + 1`` (a checkpoint restored): a ``SessionLog.START``
        event at that step, TensorBoard's own mark of a restart (``SummaryWriter(purge_step=)``
        writes the same), makes its reader drop what this file holds of that step and later;
        alerts not yet written of those steps are dropped here, and the layout, which may have
        been written at one of them, is written again at the next sample."""
        self._check_open()
        self._alerts = [a for a in self._alerts if a.step <= step]
        self._laid_out = {}
        self._step = min(self._step, step)
        self._write_event(Event(wall_time=_time.time(), step=step + 1,
                                session_log=SessionLog(status=SessionLog.START)))

    def flush(self) -> None:
        """Writes the pending alerts and everything buffered to the event file."""
        self._write_alerts()
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        """Writes what is pending and the HParams session end, and closes the event file.

        Closing again does nothing.
        """
        if self._closed:
            return
        try:
            self._write_alerts()
            if self._file is not None:
                when = self._time if self._time is not None else _time.time()
                if not self._hparams_written and self._meta:
                    self._write_hparams(when)
                if self._hparams_written:
                    done = "steps_taken" in self._meta
                    self._write(self._step, when, _session_end_summary(
                        api_pb2.STATUS_SUCCESS if done else api_pb2.STATUS_UNKNOWN, when))
        finally:
            self._closed = True
            if self._file is not None:
                self._file.close()

    # ------------------------------------------------------------------------------ helpers
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"optiscope: this TensorBoardSink for {str(self.log_dir)!r} is "
                               "closed; create a new one to write more events")

    def _write(self, step: int, time: float, summary: Summary) -> None:
        self._write_event(Event(wall_time=time, step=step, summary=summary))

    def _write_event(self, event: Event) -> None:
        self._check_open()
        if self._file is None:
            self._file = EventFile(self.log_dir, flush_secs=self.flush_secs)
        self._file.write(event)

    def _tags_of(self, metric: str, scopes: Sequence[str]) -> list[str]:
        cache = self._tags.get(metric)
        if cache is None:
            cache = self._tags[metric] = {}
        tags = []
        for scope in scopes:
            tag = cache.get(scope)
            if tag is None:
                tag = cache[scope] = _clean(f"{metric}/{scope}")
            tags.append(tag)
        return tags

    def _write_alerts(self) -> None:
        if not self._alerts:
            return
        by_step: dict[int, list[Alert]] = {}
        for alert in self._alerts:
            by_step.setdefault(alert.step, []).append(alert)
        self._alerts = []
        when = self._time if self._time is not None else _time.time()
        for step, alerts in sorted(by_step.items()):
            self._write(step, when, _text_summary("alerts", _alerts_markdown(alerts)))

    def _write_hparams(self, time: float) -> None:
        hparams = _hparams(self._meta)
        skipped = self._meta.get("skipped_metrics") or {}
        user = [m for m, (has_global, _) in self._series.items()
                if m not in _FAMILY_OF and has_global]
        metrics = [f"{m}/global" for m in user + [m for m in _HPARAM_METRICS if m not in skipped]]
        start = float(self._meta.get("start_time") or time)
        self._write(0, time, _experiment_summary(hparams, metrics, start))
        self._write(0, time, hparams_pb(hparams, start_time_secs=start))
        self._hparams_written = True


def export_tensorboard(run_dir: str | os.PathLike,
                       out_dir: str | os.PathLike | None = None) -> Path:
    """Writes the TensorBoard events of a recorded run, as `TensorBoardSink` would have live.

    For runs recorded without TensorBoard: the run log is replayed through a `TensorBoardSink`.

    Args:
        run_dir: the run directory (the ``log_dir`` a monitor wrote).
        out_dir: where to write the event file (default None: ``run_dir`` itself, so that
            ``tensorboard --logdir`` on its parent shows it as the run).

    Returns:
        The event file written.

    Raises:
        FileNotFoundError: ``run_dir`` holds no run log.
        FileExistsError: ``out_dir`` already holds TensorBoard events (exporting twice would show
            every value twice).
    """
    run_dir = Path(run_dir)
    log = run_dir / RUNLOG
    if not log.is_file():
        raise FileNotFoundError(f"optiscope: {str(run_dir)!r} is not a run directory: no {RUNLOG} "
                                "there; pass the log_dir a monitor wrote")
    out = Path(out_dir) if out_dir is not None else run_dir
    existing = sorted(out.glob("*tfevents*")) if out.is_dir() else []
    if existing:
        raise FileExistsError(f"optiscope: {str(out)!r} already holds TensorBoard events "
                              f"({existing[0].name}); pass another out_dir, or delete them to "
                              "export again")
    sink = TensorBoardSink(out)
    try:
        RecordDecoder(sink, source=log).feed(read_records(log))
    finally:
        sink.close()
    if sink.path is None:
        raise ValueError(f"optiscope: {str(log)!r} holds no records; nothing to export")
    return sink.path


# ---------------------------------------------------------------------------------- summaries
def _clean(text: str) -> str:
    """``text`` with what UTF-8 cannot encode (lone surrogates) replaced by ``?``."""
    if text.isascii():
        return text
    return text.encode("utf-8", "replace").decode("utf-8")


def _log2_histogram(counts: np.ndarray) -> HistogramProto | None:
    """One row of exponent bins (`optiscope.monitor.metrics`) as a TensorBoard histogram of
    log2|x|: the value axis is the binary exponent. Only nonzero finite entries have one: zeros
    and non-finite entries are left out (the run log keeps them, and the shares count them);
    entries below 2^EXP_MIN or at or above 2^EXP_MAX are drawn in the bin one below or above the
    range. Each bucket's entries count at its middle for sum and sum_squares. None when no entry
    is nonzero and finite."""
    inner = counts[1:-1]  # below, one per exponent, above
    used = np.flatnonzero(inner)
    if not len(used):
        return None
    # bucket i holds log2|x| in [upper[i] - 1, upper[i]); the buckets from the first used one to
    # the last, empty ones included: TensorBoard takes a bucket's left edge from the one before
    span = slice(used[0], used[-1] + 1)
    upper = np.arange(EXP_MIN, EXP_MAX + 2, dtype=np.float64)[span]
    n = inner[span]
    mids = upper - 0.5
    return HistogramProto(min=float(upper[0] - 1), max=float(upper[-1]), num=float(n.sum()),
                          sum=float((n * mids).sum()), sum_squares=float((n * mids ** 2).sum()),
                          bucket_limit=upper.tolist(), bucket=n.tolist())


def _text_summary(tag: str, markdown: str) -> Summary:
    summary = Summary()
    summary.value.add(
        tag=tag, metadata=text_metadata.create_summary_metadata(display_name=tag, description=""),
        tensor=TensorProto(dtype="DT_STRING", tensor_shape=TensorShapeProto(),
                           string_val=[markdown.encode("utf-8", "replace")]))
    return summary


def _layout_summary(series: dict[str, tuple[bool, bool]]) -> Summary:
    """The Custom Scalars layout for the series seen so far (metric -> has global, has others).

    The overview charts each series' run-wide value: its global scope, or all its scopes when it
    has no global one (``lr`` per parameter group); user scalars come first. The per-tensor
    categories start closed, since each of their charts draws a line per tensor.
    """
    def chart(title: str, regex: str) -> layout_pb2.Chart:
        return layout_pb2.Chart(title=title,
                                multiline=layout_pb2.MultilineChartContent(tag=[regex]))

    def titled(metric: str) -> str:
        return f"{metric}: {_DESCRIPTIONS[metric]}" if metric in _DESCRIPTIONS else _clean(metric)

    ordered = sorted(series, key=lambda m: m in _FAMILY_OF)  # stable: user scalars first
    overview = [chart(titled(m), f"^{re.escape(_clean(m))}/{'global$' if series[m][0] else ''}")
                for m in ordered]
    categories = [layout_pb2.Category(title="optiscope: global", chart=overview)]
    grouped: dict[str, list[layout_pb2.Chart]] = {}
    for metric in ordered:
        if not series[metric][1]:
            continue
        prefix = f"^{re.escape(_clean(metric))}/"
        family = _FAMILY_OF.get(metric, "other")
        splits = _SPLIT_CHARTS.get(metric, (("", ""),))
        grouped.setdefault(family, []).extend(
            chart(f"{titled(metric)}{', ' + part if part else ''}", prefix + rest)
            for part, rest in splits)
    for family in [*FAMILIES, "other"]:
        if family in grouped:
            categories.append(layout_pb2.Category(title=f"optiscope: {family}",
                                                  chart=grouped[family], closed=True))
    layout = layout_pb2.Layout(category=categories)
    summary = Summary()
    summary.value.add(tag=custom_scalar_metadata.CONFIG_SUMMARY_TAG,
                      metadata=custom_scalar_metadata.create_summary_metadata(),
                      tensor=TensorProto(dtype="DT_STRING", tensor_shape=TensorShapeProto(),
                                         string_val=[layout.SerializeToString()]))
    return summary


def _hparams(meta: dict) -> dict[str, bool | float | int | str]:
    """The run's hyperparameters for the HParams dashboard: the optimizer and its first group's
    hyperparameters, then how the monitor sampled and what it watched. Lists become strings
    (``betas="(0.9, 0.999)"``); unset values are left out."""
    groups = meta.get("hyperparameters") or [{}]
    out: dict = {"optimizer": meta.get("optimizer_name"), "backend": meta.get("backend")}
    out.update(groups[0])
    out.update(param_groups=len(groups), n_params=meta.get("n_params"),
               param_bytes=meta.get("param_bytes"), every=meta.get("every"),
               world_size=meta.get("world_size"), freeze_probe=meta.get("freeze_probe"),
               topk_density=meta.get("topk_density"))
    return {_clean(key): _clean(value) if isinstance(value, str) else value
            for key, value in plain_values(out).items()}


def _hparams_plugin_summary(tag: str, data: plugin_data_pb2.HParamsPluginData) -> Summary:
    summary = Summary()
    summary.value.add(tag=tag, metadata=hparams_metadata.create_summary_metadata(data),
                      tensor=hparams_metadata.NULL_TENSOR)
    return summary


def _experiment_summary(hparams: dict, metrics: list[str], created: float) -> Summary:
    """The HParams experiment: which hyperparameters (typed) and metric tags to show.

    Written beside the scalars, not in a sub-directory as ``SummaryWriter.add_hparams`` does, so
    that the metrics are this run's own scalars.
    """
    def kind(value) -> int:
        if isinstance(value, bool):
            return api_pb2.DATA_TYPE_BOOL
        return api_pb2.DATA_TYPE_STRING if isinstance(value, str) else api_pb2.DATA_TYPE_FLOAT64

    experiment = api_pb2.Experiment(
        time_created_secs=created,
        hparam_infos=[api_pb2.HParamInfo(name=k, type=kind(v)) for k, v in hparams.items()],
        metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=_clean(m))) for m in metrics])
    return _hparams_plugin_summary(hparams_metadata.EXPERIMENT_TAG,
                                   plugin_data_pb2.HParamsPluginData(experiment=experiment))


def _session_end_summary(status: int, end_time: float) -> Summary:
    info = plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=end_time)
    return _hparams_plugin_summary(hparams_metadata.SESSION_END_INFO_TAG,
                                   plugin_data_pb2.HParamsPluginData(session_end_info=info))


# ---------------------------------------------------------------------------------- markdown
def _cell(value) -> str:
    """A markdown table cell: code-formatted, pipes escaped, on one line."""
    if isinstance(value, float) and math.isfinite(value) and value != int(value):
        value = f"{value:.6g}"
    text = str(value).replace("`", "'").replace("|", "\\|").replace("\n", " ")
    return f"`{text}`" if text else ""


def _table(rows: dict) -> str:
    """Key | value rows; a dict value becomes ``key.subkey`` rows."""
    lines = ["| key | value |", "|---|---|"]
    for key, value in rows.items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, v in items:
            lines.append(f"| {_cell(key if sub is None else f'{key}.{sub}')} | {_cell(v)} |")
    return "\n".join(lines)


def _meta_markdown(meta: dict) -> str:
    """The run's metadata: run facts, hyperparameters per group, parameter tensors."""
    facts = {k: v for k, v in meta.items()
             if k not in ("hyperparameters", "params", "skipped_metrics")}
    if isinstance(facts.get("start_time"), (int, float)):
        facts["start_time"] = _time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                             _time.gmtime(facts["start_time"]))
    sections = ["### Run\n\n" + _table(facts)]
    groups = meta.get("hyperparameters") or []
    if groups:
        keys = list(dict.fromkeys(k for g in groups for k in g))
        rows = ["| | " + " | ".join(f"group{i}" for i in range(len(groups))) + " |",
                "|---" * (len(groups) + 1) + "|"]
        rows += [f"| {_cell(k)} | " + " | ".join(_cell(g.get(k, "")) for g in groups) + " |"
                 for k in keys]
        sections.append("### Hyperparameters\n\n" + "\n".join(rows))
    params = meta.get("params") or []
    if params:
        columns = list(dict.fromkeys(k for p in params for k in p))
        rows = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
        rows += ["| " + " | ".join(_cell(p.get(c, "")) for c in columns) + " |" for p in params]
        sections.append(f"### Parameters ({len(params)} tensors)\n\n" + "\n".join(rows))
    return "\n\n".join(sections)


def _skipped_markdown(skipped: dict) -> str:
    lines = ["| metric | not recorded because |", "|---|---|"]
    lines += [f"| {_cell(k)} | {str(v).replace('|', '/')} |" for k, v in skipped.items()]
    return "\n".join(lines)


def _alerts_markdown(alerts: list[Alert]) -> str:
    """One line per alert; its message names the tensors."""
    lines = []
    for a in alerts:
        what = f"**{a.kind}**" if a.metric == a.kind else f"**{a.kind}** ({a.metric})"
        value = "" if a.value is None else f" [value {a.value:.4g}]"
        lines.append(f"- {what}{value}: {a.message}")
    return "\n".join(lines)
