"""`LoggerSink`: the monitor's values into loggers that have ``log_metrics(metrics, step)``.

That is the interface of a trainer's own loggers (Lightning's TensorBoard, W&B, MLflow and CSV
loggers); ``optiscope.integrations.lightning`` wires this sink to ``trainer.loggers`` when asked
(``log_to_trainer=True``). It knows nothing of Lightning: it calls the method and nothing else.

* **Keys**: ``<prefix><metric>/<scope>`` (default prefix ``optiscope/``), the same values as the
  tracker sinks send, chosen by the same key budget (`KeyBudget` in
  ``optiscope.dashboards.trackers``: ``metrics=``, ``scopes=``, ``top=``, same defaults). The
  prefix keeps them apart from the user's own logged metrics (``self.log("grad_norm", ...)``)
  and groups them in one section of TensorBoard and W&B.
* **Step**: the optimizer step the values belong to (the monitor's step; Lightning logs a
  batch's own metrics at the number of steps taken before it, one less).
* **On the training thread**: a trainer calls its loggers from the training thread, and they
  are not made to be called from two threads at once (the CSV logger rewrites its file); the
  cost per sample is the logger's own, as for a ``self.log`` call.
* **Failure**: the first error of a logger is logged once and that logger gets nothing more;
  training, the run log and the other loggers go on. This sink never raises.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterable, Sequence

from optiscope.dashboards.sink import Sink, Values
from optiscope.dashboards.trackers import DEFAULT_METRICS, DEFAULT_TOP, KeyBudget

__all__ = ["LoggerSink"]

log = logging.getLogger("optiscope.dashboards")


class LoggerSink(Sink):
    """Sends each sample's chosen values to every logger, as ``log_metrics(values, step)``.

    Args:
        loggers: objects with a ``log_metrics(metrics: dict[str, float], step: int)`` method, or
            a callable returning them (read at each sample).
        metrics, scopes, top: the key budget (`KeyBudget`; the tracker sinks' defaults).
        prefix: put before every key (default ``"optiscope/"``).
        exclude: glob patterns of metric names not sent (e.g. ``"trainer/*"``: the trainer's own
            logged values, which the monitor records and its loggers already have).
    """

    def __init__(self, loggers: Sequence | Callable[[], Sequence], *,
                 metrics: str | Iterable[str] = DEFAULT_METRICS, scopes: str | Iterable[str] = (),
                 top: int = DEFAULT_TOP, prefix: str = "optiscope/",
                 exclude: str | Iterable[str] = ()):
        try:
            self.budget = KeyBudget(metrics, scopes, top)
            self.exclude = KeyBudget(exclude).metrics  # the same pattern check
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"LoggerSink: {exc}") from None
        if not isinstance(prefix, str):
            raise TypeError(f"LoggerSink: prefix must be a string, got {prefix!r}")
        if not callable(loggers):
            loggers = list(loggers)
            bad = [x for x in loggers if not callable(getattr(x, "log_metrics", None))]
            if bad:
                raise TypeError(f"LoggerSink: every logger needs a log_metrics(metrics, step) "
                                f"method; {bad[0]!r} has none")
        self._loggers = loggers
        self.prefix = prefix
        self.failed: dict[int, str] = {}  # id(logger) -> the reason it was switched off
        self._excluded: dict[str, bool] = {}

    def loggers(self) -> list:
        return list(self._loggers() if callable(self._loggers) else self._loggers)

    def on_sample(self, step: int, time: float, values: Values) -> None:
        try:
            values = {m: v for m, v in values.items() if not self._is_excluded(m)}
            chosen = self.budget.select(values) if values else {}
            loggers = self.loggers() if chosen else []
        except Exception:  # a bug here must not reach training
            log.exception("optiscope: choosing the values for the trainer's loggers failed")
            return
        if not chosen:
            return
        metrics = {self.prefix + key: value for key, value in chosen.items()}
        for logger in loggers:
            if id(logger) in self.failed:
                continue
            try:
                logger.log_metrics(dict(metrics), int(step))
            except Exception as exc:
                reason = self.failed[id(logger)] = f"{type(exc).__name__}: {exc}"
                log.error("optiscope: the logger %s failed: %s. It gets no more of the monitor's "
                          "values; training, the run log and the other loggers go on.",
                          type(logger).__name__, reason)
                log.debug("optiscope: logger failure", exc_info=exc)

    def _is_excluded(self, metric: str) -> bool:
        hit = self._excluded.get(metric)
        if hit is None:
            hit = self._excluded[metric] = any(fnmatch.fnmatchcase(metric, p)
                                               for p in self.exclude)
        return hit
