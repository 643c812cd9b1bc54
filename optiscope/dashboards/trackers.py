"""What the experiment-tracker sinks (`MLflowSink`, `WandbSink`) share.

* **The key budget.** Every value is ``<metric>/<scope>``, the TensorBoard tag. A run-wide scope
  (``global``, ``lr``'s ``group<i>``, ``state_bytes``' ``key/<state key>``) is always sent; a
  tensor's scope is sent for the per-tensor ``metrics`` (glob patterns, default ``grad_norm`` and
  ``update_ratio``) when the tensor matches one of ``scopes`` (glob patterns, default none) or is
  among the ``top`` tensors by that sample's ``grad_norm`` (default 20; non-finite first). Every
  metric of AdamW is 11 values per tensor per sample (32 with the range probes, 5 more with the
  int8/int4 probes), over 11,000 for a 1,000-tensor model; the default sends 58 (18 run-wide;
  84 with both probes on, whose globals are run-wide too; 2 × 20 per tensor): the run-wide
  series, and the two per-tensor series people read first for the tensors that dominate the
  gradient (all of them for a model of 20 tensors or fewer).
* **Off the training thread.** The monitor's calls only queue records; one daemon thread
  selects the keys and talks to the tracker, batching what has queued up. The queue holds at
  most ``max_queue`` samples: when the tracker falls that far behind, the oldest queued sample
  is dropped (training never waits for a tracker; the run log has every value) and the drops are
  reported; with ``block=True`` the caller waits instead, for replaying a run log:
  ``RecordDecoder(MLflowSink(block=True)).feed(read_records(path))``, then ``close()``. `close`
  waits for the queue to drain (at most ``close_timeout`` seconds).
* **Failure.** The first error from the tracker is logged once (``logging.error``, with the
  reason) and the sink switches itself off; training, the run log and the other dashboards go on.
* **The run.** The tracker's active run is looked up on the training thread at the first sample
  (HF Trainer and Lightning start theirs before the first optimizer step); without one the sink
  starts a run and ends it at `close`. It ends only a run it started.
"""

from __future__ import annotations

import fnmatch
import importlib
import logging
import os
import threading
import time as _time
from collections import deque
from collections.abc import Iterable

import numpy as np

from optiscope.dashboards.sink import Sink, Values
from optiscope.monitor.history import Alert

__all__ = ["TrackerSink", "KeyBudget", "DEFAULT_METRICS", "DEFAULT_TOP", "flat_meta", "plain_values",
           "alert_line", "run_name"]

log = logging.getLogger("optiscope.dashboards")

DEFAULT_METRICS = ("grad_norm", "update_ratio")
DEFAULT_TOP = 20


def _patterns(name: str, value) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    try:
        patterns = tuple(value)
    except TypeError:
        patterns = None
    if patterns is None or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{name} must be a glob pattern or a list of them (e.g. ['grad_norm', "
                        f"'update_*']), got {value!r}")
    return patterns


def is_tensor_scope(metric: str, scope: str) -> bool:
    """Whether ``scope`` of ``metric`` is a tensor (not ``global``, ``group<i>`` or ``key/...``)."""
    return not (scope == "global" or metric == "lr" or scope.startswith("key/"))


class KeyBudget:
    """Picks the values of a sample that go to a tracker (see the module docstring).

    Args:
        metrics: glob patterns of the metrics sent per tensor (``"*"``: all).
        scopes: glob patterns of tensor names always sent (``"*"``: every tensor).
        top: how many tensors, by the sample's ``grad_norm`` (non-finite first), are sent besides.
    """

    def __init__(self, metrics: str | Iterable[str] = DEFAULT_METRICS,
                 scopes: str | Iterable[str] = (), top: int = DEFAULT_TOP):
        self.metrics = _patterns("metrics", metrics)
        self.scopes = _patterns("scopes", scopes)
        if isinstance(top, bool) or not isinstance(top, int) or top < 0:
            raise ValueError(f"top must be an int >= 0 (tensors sent per sample, by grad norm), "
                             f"got {top!r}")
        self.top = top
        self._metric_match: dict[str, bool] = {}
        self._scope_match: dict[str, bool] = {}
        self._layouts: dict[tuple, tuple[list[int], list[int], list[int]]] = {}

    def per_tensor(self, metric: str) -> bool:
        hit = self._metric_match.get(metric)
        if hit is None:
            hit = self._metric_match[metric] = any(fnmatch.fnmatchcase(metric, p)
                                                   for p in self.metrics)
        return hit

    def named(self, scope: str) -> bool:
        hit = self._scope_match.get(scope)
        if hit is None:
            hit = self._scope_match[scope] = any(fnmatch.fnmatchcase(scope, p)
                                                 for p in self.scopes)
        return hit

    def top_tensors(self, values: Values) -> set[str]:
        """The ``top`` tensors of this sample by grad norm, non-finite ones first (ties keep the
        monitor's order)."""
        if not self.top or "grad_norm" not in values:
            return set()
        scopes, numbers = values["grad_norm"]
        tensors = self._layout("grad_norm", scopes)[1]
        if len(tensors) > self.top:
            x = np.asarray(numbers, dtype=np.float64)[tensors]
            finite = np.isfinite(x)
            order = np.lexsort((-np.where(finite, x, 0.0), finite))  # stable
            tensors = [tensors[i] for i in order[: self.top]]
        return {scopes[i] for i in tensors}

    def select(self, values: Values) -> dict[str, float]:
        """``{"<metric>/<scope>": value}`` for the values of one sample that go to the tracker."""
        top = self.top_tensors(values)
        out: dict[str, float] = {}
        for metric, (scopes, numbers) in values.items():
            run_wide, tensors, named = self._layout(metric, scopes)
            chosen = list(run_wide)
            if tensors and self.per_tensor(metric):
                chosen += sorted(set(named).union(i for i in tensors if scopes[i] in top))
            for i in chosen:
                out[f"{metric}/{scopes[i]}"] = float(numbers[i])
        return out

    def _layout(self, metric: str, scopes) -> tuple[list[int], list[int], list[int]]:
        """Indices into ``scopes``: the run-wide ones, the tensors, the tensors named by
        ``scopes=``. Cached per scope list: the monitor sends the same lists sample after
        sample, and a 1,000-tensor sample is 11,000 values to sort through otherwise."""
        key = (metric, tuple(scopes))
        layout = self._layouts.get(key)
        if layout is None:
            run_wide, tensors = [], []
            for i, scope in enumerate(scopes):
                (tensors if is_tensor_scope(metric, scope) else run_wide).append(i)
            named = [i for i in tensors if self.named(scopes[i])] if self.scopes else []
            if len(self._layouts) >= 1024:  # scope lists that keep changing: start over
                self._layouts.clear()
            layout = self._layouts[key] = (run_wide, tensors, named)
        return layout


def flat_meta(meta: dict) -> dict[str, bool | int | float | str]:
    """A run's metadata as flat parameters: the first parameter group's hyperparameters as they
    are (``lr``, ``betas``), another group's as ``group<i>.<key>`` where it differs, nested
    dicts as ``<key>.<subkey>``, lists as strings; the per-tensor list becomes ``n_tensors``.
    Unset values are left out."""
    groups = meta.get("hyperparameters") or []
    out: dict = {}
    for key, value in meta.items():
        if key in ("type", "hyperparameters", "params"):
            continue
        if isinstance(value, dict):
            out.update((f"{key}.{k}", v) for k, v in value.items())
        else:
            out[key] = value
    if groups:
        out.update(groups[0])
        for i, group in enumerate(groups[1:], start=1):
            out.update((f"group{i}.{k}", v) for k, v in group.items() if groups[0].get(k) != v)
        out["param_groups"] = len(groups)
    if "params" in meta:
        out["n_tensors"] = len(meta["params"] or [])
    return plain_values(out)


def plain_values(values: dict) -> dict[str, bool | int | float | str]:
    """``values`` as a tracker's parameters take them: None left out, sequences as the text of a
    tuple (``"(0.9, 0.999)"``), anything else that is not a plain scalar as its ``str``."""
    flat = {}
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = str(tuple(value))
        elif not isinstance(value, (bool, int, float, str)):
            value = str(value)
        flat[str(key)] = value
    return flat


def alert_line(alert: Alert) -> str:
    """One line of text for an alert: ``step 9: nonfinite_grads: ...``."""
    what = alert.kind if alert.metric == alert.kind else f"{alert.kind} ({alert.metric})"
    value = "" if alert.value is None else f" [value {alert.value:.4g}]"
    return f"step {alert.step}: {what}{value}: {alert.message}"


def run_name(meta: dict) -> str:
    """A new tracker run's name: the run directory's name when the metadata has it, else
    ``optiscope-<optimizer>-<start time, UTC>``."""
    log_dir = meta.get("log_dir")
    if log_dir:
        name = os.path.basename(os.path.normpath(str(log_dir)))
        if name:
            return name
    when = meta.get("start_time")
    stamp = _time.strftime("%Y%m%d-%H%M%S", _time.gmtime(when if isinstance(when, (int, float))
                                                        else None))
    return f"optiscope-{meta.get('optimizer_name') or 'run'}-{stamp}"


def require(module: str, sink: str, package: str, extra: str):
    """Imports the tracker's ``module`` for ``sink``, or raises an ImportError that says how to
    install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"optiscope: {sink} needs {package}, which is not installed: "
                          f"pip install 'optiscope[{extra}]'") from exc


def check_strings(sink: str, **values) -> None:
    """Raises a TypeError naming the first of ``values`` that is neither a string nor None."""
    for name, value in values.items():
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{sink}: {name} must be a string, got {value!r}")


def check_flags(sink: str, **values) -> None:
    """Raises a TypeError naming the first of ``values`` that is not True or False."""
    for name, value in values.items():
        if not isinstance(value, bool):
            raise TypeError(f"{sink}: {name} must be True or False, got {value!r}")


class TrackerSink(Sink):
    """A sink that sends a run to an experiment tracker from a background thread.

    Subclasses implement the tracker's side; the hooks below run on the background thread except
    `_find_active`, which runs on the training thread (trackers keep their active run there).

    Args (the subclasses take the same ones):
        metrics: glob patterns of the metrics sent per tensor (default ``grad_norm``,
            ``update_ratio``; ``"*"``: all).
        scopes: glob patterns of tensor names always sent (default none; ``"*"``: all tensors).
        top: besides, the tensors with the largest grad norm in each sample (default 20).
        prefix: put before every key (e.g. ``"gen/"`` for a second optimizer in the same run;
            default none).
        max_queue: samples waiting for the background thread at most; beyond it the oldest is
            dropped, or with ``block`` the caller waits (default 256).
        close_timeout: seconds `close` waits for the queue to drain (default 120).
        block: wait for room in the queue instead of dropping (default False; True to replay a
            run log, where nothing is training).
    """

    tracker = "tracker"  # the name in messages

    def __init__(self, *, metrics: str | Iterable[str] = DEFAULT_METRICS,
                 scopes: str | Iterable[str] = (), top: int = DEFAULT_TOP, prefix: str = "",
                 max_queue: int = 256, close_timeout: float = 120.0, block: bool = False):
        cls = type(self).__name__
        try:
            self.budget = KeyBudget(metrics, scopes, top)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{cls}: {exc}") from None
        if not isinstance(prefix, str):  # None is no prefix to put before keys
            raise TypeError(f"{cls}: prefix must be a string, got {prefix!r}")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"{cls}: max_queue must be an int >= 1 (samples), got {max_queue!r}")
        if isinstance(close_timeout, bool) or not isinstance(close_timeout, (int, float)) \
                or not close_timeout >= 0:
            raise ValueError(f"{cls}: close_timeout must be a number of seconds >= 0, got "
                             f"{close_timeout!r}")
        check_flags(cls, block=block)
        self.prefix = prefix
        self.block = block
        self.max_queue = max_queue
        self.close_timeout = float(close_timeout)
        self.owns_run = False  # set once the background thread has started a run
        self.failed: str | None = None  # the reason, once the tracker failed
        self.dropped = 0
        self._meta: dict = {}
        self._started = False
        self._closed = False
        self._items: deque = deque()
        self._samples = 0  # samples in _items
        self._busy = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._alerts: list[Alert] = []  # written at close
        self._last_step = 0

    # ------------------------------------------------------------------- the monitor's side
    def on_meta(self, changes: dict) -> None:
        if self.failed or self._closed:
            return
        if self._started:
            self._put("meta", dict(changes))
        else:
            self._meta.update(changes)

    def on_sample(self, step: int, time: float, values: Values) -> None:
        if self.failed or self._closed:
            return
        if not self._started:
            self._start()
        self._put("sample", (int(step), float(time), values))

    def on_alert(self, alert: Alert) -> None:
        if self.failed or self._closed:
            return
        self._put("alert", alert)

    def flush(self, timeout: float | None = None) -> bool:
        """Waits until everything queued so far is sent; False if ``timeout`` ran out first."""
        deadline = None if timeout is None else _time.monotonic() + timeout
        with self._cond:
            while (self._items or self._busy) and self._thread is not None \
                    and self._thread.is_alive():
                left = None if deadline is None else deadline - _time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self) -> None:
        """Sends what is queued, the alerts and the last metadata; ends the run if this sink
        started it. Closing again does nothing."""
        if self._closed:
            return
        if not self.failed and not self._started and self._meta:
            self._start()  # no sample came: the run still gets its parameters
        self._closed = True
        if self._thread is None:
            return
        self._put("close", None, force=True)
        self._thread.join(self.close_timeout)
        if self._thread.is_alive():
            with self._cond:
                left = len(self._items)
            log.error("optiscope: %s did not finish sending within close_timeout=%g s; %d queued "
                      "records are not sent (the run log has every value)", self.tracker,
                      self.close_timeout, left)
        if self.dropped:
            log.warning("optiscope: %s fell behind; %d samples were dropped from its queue "
                        "(max_queue=%d). The run log has every value.", self.tracker,
                        self.dropped, self.max_queue)

    # ------------------------------------------------------------------- tracker hooks
    def _find_active(self):
        """On the training thread: the tracker's run to log into, or None to start one."""
        raise NotImplementedError

    def _open(self, active, meta: dict) -> None:
        """Starts a run unless ``active`` is one (sets ``owns_run``); logs the metadata."""
        raise NotImplementedError

    def _log_samples(self, samples: list[tuple[int, float, dict[str, float]]]) -> None:
        raise NotImplementedError

    def _log_meta(self, changes: dict) -> None:
        raise NotImplementedError

    def _log_alert(self, alert: Alert) -> None:
        """An alert as it happens (the whole list is written by `_finish`)."""

    def _finish(self, alerts: list[Alert], failed: bool) -> None:
        """Writes the alerts; ends the run if this sink started it (also after a failure)."""
        raise NotImplementedError

    # ------------------------------------------------------------------- plumbing
    def _start(self) -> None:
        self._started = True
        try:
            active = self._find_active()
        except Exception as exc:
            self._fail(exc)
            return
        self._put("open", (active, dict(self._meta)))

    def _fail(self, exc: BaseException) -> None:
        if self.failed:
            return
        self.failed = f"{type(exc).__name__}: {exc}"
        log.error("optiscope: %s failed: %s. It is switched off for the rest of the run; training, "
                  "the run log and the other dashboards go on.", self.tracker, self.failed)
        log.debug("optiscope: %s failure", self.tracker, exc_info=exc)

    def _put(self, kind: str, payload, *, force: bool = False) -> None:
        if self.failed and not force:
            return
        with self._cond:
            if kind == "sample":
                while self.block and self._samples >= self.max_queue and not self.failed \
                        and self._thread is not None and self._thread.is_alive():
                    self._cond.wait(1.0)
                if self._samples >= self.max_queue:
                    for i, (k, _) in enumerate(self._items):
                        if k == "sample":
                            del self._items[i]
                            break
                    self._samples -= 1
                    self.dropped += 1
                    if self.dropped == 1:
                        log.warning("optiscope: %s cannot keep up; dropping the oldest queued "
                                    "samples (max_queue=%d). The run log has every value.",
                                    self.tracker, self.max_queue)
                self._samples += 1
            self._items.append((kind, payload))
            self._cond.notify_all()
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, daemon=True,
                                            name=f"optiscope-{type(self).__name__}")
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._items:
                    self._cond.wait()
                items = list(self._items)
                self._items.clear()
                self._samples = 0
                self._busy = True
                self._cond.notify_all()  # room in the queue for a producer that waits
            try:
                done = self._process(items)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
            if done:
                return

    def _process(self, items: list) -> bool:
        """Sends a batch of queued records in order; True once ``close`` was among them."""
        samples: list = []
        for kind, payload in items:
            if kind == "close":
                self._send(self._log_samples, samples)
                samples = []
                try:
                    self._finish(self._alerts, bool(self.failed))
                except Exception as exc:
                    self._fail(exc)
                return True
            if self.failed:
                continue
            if kind == "sample":
                step, time, values = payload
                self._last_step = step
                try:
                    samples.append((step, time, self.budget.select(values)))
                except Exception as exc:
                    self._fail(exc)
                continue
            self._send(self._log_samples, samples)
            samples = []
            if kind == "open":
                self._send(self._open, *payload)
            elif kind == "meta":
                self._send(self._log_meta, payload)
            elif kind == "alert":
                self._alerts.append(payload)
                self._send(self._log_alert, payload)
        self._send(self._log_samples, samples)
        return False

    def _send(self, fn, *args) -> None:
        if self.failed or (fn == self._log_samples and not args[0]):
            return
        try:
            fn(*args)
        except Exception as exc:
            self._fail(exc)
