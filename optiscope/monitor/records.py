"""The one decoder of the run-log format, with its schema: every reader goes through it.

`load_run`, ``optiscope watch`` (live and ``--once``), ``optiscope tensorboard`` and
``optiscope report`` read a run log as parsed JSON records (``optiscope.monitor.runlog`` states
the format). A record comes from a file another program may have written or damaged, so none is
trusted: `RecordDecoder` checks each against the schema below and hands a consumer only records
that fit, with Python types the consumer can use as they are (an ``int`` step that fits int64,
``float`` values, ``str`` names). A record that does not fit is skipped and counted by reason,
and each `RecordDecoder.feed` ends with one warning saying how many were skipped and why.

Schema:

* ``meta``: any keys; ``steps_taken``, when present, a step (below);
* ``scopes``: ``id`` an int >= 0, ``names`` a list of strings;
* ``sample``: ``step`` an int in ``0..2**62``; ``time`` (optional) a finite number; ``values``
  an object mapping each metric name to ``[scope list id, [number, ...]]`` with as many numbers
  as the scope list has names. A number is an int or a float that fits a float (NaN and
  ±Infinity are values the monitor writes: a non-finite gradient's norm and maximum). A metric
  whose scope list was never declared (its declaration line was corrupt) is dropped and counted;
  the record's other metrics are kept;
* ``resume``: ``step`` a step: the run resumed from a checkpoint at that step, and the samples and
  alerts of later steps written before this record are void (`runlog.live_records` drops them);
* ``histograms``: ``step`` a step; ``values`` an object mapping a quantity to ``[scope list id,
  [row, ...]]``, one row per name of the scope list, a row ``[]`` or ``[first, count, ...]``:
  ``first`` an int bin index and counts numbers >= 0 that end within the ``HIST_BINS`` bins;
  decoded to ``{quantity: (names, counts [n, HIST_BINS] float64)}`` for ``on_histograms``
  (a consumer without it is not called);
* ``alert``: the fields of `Alert`: ``step`` a step, ``kind``, ``metric``, ``message`` strings,
  ``tensors`` a list of strings, ``value`` a number or null.

The consumer is anything with ``on_meta(changes)``, ``on_sample(step, time, values)`` and
``on_alert(alert)`` (and optionally ``on_resume(step)``) (the dashboards' ``Sink``, or the `RunHistory` builder of `load_run`).
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Iterable

import numpy as np

from optiscope.monitor.history import Alert
from optiscope.monitor.metrics import HIST_BINS

__all__ = ["MAX_STEP", "RecordDecoder", "SchemaError"]

MAX_STEP = 2**62  # a step beyond this is damage, and would overflow int64 arrays downstream
KINDS = ("meta", "scopes", "sample", "alert", "resume", "histograms")


class SchemaError(ValueError):
    """A record does not fit the run-log schema; the message says why, briefly."""


def _step(value, what: str = "step") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_STEP:
        raise SchemaError(f"{what} is not an int in 0..2**62")
    return value


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SchemaError(f"{what} is not a number")
    try:
        return float(value)
    except OverflowError:
        raise SchemaError(f"{what} is beyond a float's range") from None


def _strings(value, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise SchemaError(f"{what} is not a list of strings")
    return value


class RecordDecoder:
    """Validates run-log records and turns those that fit into calls on ``sink``.

    Keeps the scope lists that ``scopes`` records declare, so it can be fed a log in pieces (a
    follower reading a growing file).

    Args:
        sink: the consumer (``on_meta``, ``on_sample``, ``on_alert``).
        source: what the records come from, for the warning (a path).

    Attributes:
        skipped: how many records (or metrics of a sample) were skipped so far.
        reasons: `collections.Counter` of why.
    """

    def __init__(self, sink, source: object = "the run log"):
        self.sink = sink
        self.source = source
        self.scopes: dict[int, list[str]] = {}
        self.reasons: Counter = Counter()

    @property
    def skipped(self) -> int:
        return sum(self.reasons.values())

    def feed(self, records: Iterable) -> None:
        """Decodes ``records`` in order; one warning at the end if any were skipped."""
        before = self.reasons.copy()
        for record in records:
            try:
                self._decode(record)
            except SchemaError as exc:
                kind = record.get("type") if isinstance(record, dict) else None
                label = kind if isinstance(kind, str) and kind in KINDS else "record"
                self.reasons[f"{label}: {exc}"] += 1
        new = self.reasons - before
        if new:
            why = "; ".join(f"{n} × {reason}" for reason, n in new.most_common())
            warnings.warn(f"optiscope: {self.source}: skipped {sum(new.values())} record(s) that "
                          f"do not fit the run-log format ({why})", RuntimeWarning, stacklevel=2)

    # ------------------------------------------------------------------------------ records
    def _decode(self, record) -> None:
        if not isinstance(record, dict):
            raise SchemaError(f"a JSON {type(record).__name__}, not an object")
        kind = record.get("type")
        if kind == "sample":
            self._sample(record)
        elif kind == "scopes":
            scope_id = record.get("id")
            if isinstance(scope_id, bool) or not isinstance(scope_id, int) or scope_id < 0:
                raise SchemaError("id is not an int >= 0")
            self.scopes[scope_id] = list(_strings(record.get("names"), "names"))
        elif kind == "meta":
            changes = {k: v for k, v in record.items() if k != "type"}
            if "steps_taken" in changes:
                _step(changes["steps_taken"], "steps_taken")
            self.sink.on_meta(changes)
        elif kind == "alert":
            self.sink.on_alert(self._alert(record))
        elif kind == "histograms":
            self._histograms(record)
        elif kind == "resume":  # a resume at a checkpoint's step: see `runlog.live_records`
            step = _step(record.get("step"))
            on_resume = getattr(self.sink, "on_resume", None)
            if on_resume is not None:
                on_resume(step)
        else:
            raise SchemaError(f"unknown type {str(kind)[:40]!r}")

    def _sample(self, record: dict) -> None:
        step = _step(record.get("step"))
        time = _number(record.get("time", 0.0), "time")
        if not math.isfinite(time):
            raise SchemaError("time is not finite")
        raw = record.get("values")
        if not isinstance(raw, dict):
            raise SchemaError("values is not an object")
        values, undeclared = {}, 0
        for metric, entry in raw.items():
            if (not isinstance(entry, list) or len(entry) != 2 or isinstance(entry[0], bool)
                    or not isinstance(entry[0], int) or not isinstance(entry[1], list)):
                raise SchemaError(f"values[{metric[:40]!r}] is not [scope list id, [numbers]]")
            scope_id, numbers = entry
            names = self.scopes.get(scope_id)
            if names is None:
                undeclared += 1
                continue
            if len(numbers) != len(names):
                raise SchemaError(f"values[{metric[:40]!r}] has {len(numbers)} numbers for "
                                  f"{len(names)} scopes")
            values[metric] = (names, [_number(x, f"a value of {metric[:40]!r}") for x in numbers])
        if undeclared:  # the rest of the record is good: keep it
            self.reasons["sample: a metric names a scope list that is never declared (its "
                         "line is corrupt)"] += undeclared
        self.sink.on_sample(step, time, values)

    def _histograms(self, record: dict) -> None:
        step = _step(record.get("step"))
        raw = record.get("values")
        if not isinstance(raw, dict):
            raise SchemaError("values is not an object")
        decoded = {}
        for quantity, entry in raw.items():
            if (not isinstance(entry, list) or len(entry) != 2 or isinstance(entry[0], bool)
                    or not isinstance(entry[0], int) or not isinstance(entry[1], list)):
                raise SchemaError(f"values[{quantity[:40]!r}] is not [scope list id, [rows]]")
            names = self.scopes.get(entry[0])
            if names is None:
                self.reasons["histograms: a quantity names a scope list that is never declared "
                             "(its line is corrupt)"] += 1
                continue
            if len(entry[1]) != len(names):
                raise SchemaError(f"values[{quantity[:40]!r}] has {len(entry[1])} rows for "
                                  f"{len(names)} scopes")
            counts = np.zeros((len(names), HIST_BINS))
            for i, row in enumerate(entry[1]):
                if not isinstance(row, list):
                    raise SchemaError(f"a row of {quantity[:40]!r} is not a list")
                if not row:
                    continue
                first = row[0]
                if (isinstance(first, bool) or not isinstance(first, int)
                        or not 0 <= first <= HIST_BINS - len(row) + 1):
                    raise SchemaError(f"a row of {quantity[:40]!r} does not fit the "
                                      f"{HIST_BINS} bins")
                values = [_number(x, f"a count of {quantity[:40]!r}") for x in row[1:]]
                if not all(v >= 0 for v in values):  # NaN too
                    raise SchemaError(f"a count of {quantity[:40]!r} is not a number >= 0")
                counts[i, first:first + len(values)] = values
            decoded[quantity] = (names, counts)
        on_histograms = getattr(self.sink, "on_histograms", None)
        if on_histograms is not None and decoded:
            on_histograms(step, decoded)

    @staticmethod
    def _alert(record: dict) -> Alert:
        fields = {k: v for k, v in record.items() if k != "type"}
        unknown = set(fields) - {"step", "kind", "metric", "tensors", "message", "value"}
        if unknown:
            raise SchemaError(f"unknown field(s) {sorted(unknown)[:4]}")
        for name in ("kind", "metric", "message"):
            if not isinstance(fields.get(name), str):
                raise SchemaError(f"{name} is not a string")
        value = fields.get("value")
        return Alert(step=_step(fields.get("step")), kind=fields["kind"], metric=fields["metric"],
                     tensors=list(_strings(fields.get("tensors"), "tensors")),
                     message=fields["message"],
                     value=None if value is None else _number(value, "value"))
