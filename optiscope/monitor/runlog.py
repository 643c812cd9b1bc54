"""The run directory's append-only run log: written at each sample, readable while it grows.

``runlog.jsonl`` holds one JSON object per line:

* ``{"type": "meta", ...}`` — first line: the run's metadata (also written to ``meta.json``);
  a later meta record adds or replaces keys (`RunLogWriter.update_meta`);
* ``{"type": "scopes", "id": k, "names": [...]}`` — a list of scope names, declared once;
* ``{"type": "sample", "step": t, "time": unix_s, "values": {metric: [k, [v, ...]]}}`` — one
  sampled step: for each metric the id of its scope list and one value per scope
  (``NaN``/``Infinity`` as Python's json writes them);
* ``{"type": "alert", ...}`` — an alert (`Alert` fields);
* ``{"type": "resume", "step": k}`` — the run was resumed from a checkpoint at step k: the
  samples and alerts of steps after k written before this record belong to an abandoned attempt
  and are void (the reader drops them; the log stays append-only).

A line is written with one ``write`` and a crash leaves at most the last line torn; the reader
skips it with a warning, and ``resume=True`` cuts it off before appending (else the first new
line would be glued to it and lost as well). A failed write (disk full, file system gone) is
reported loudly at the sample where it happens, the file is cut back to its last complete line,
training goes on, and the records that could not be written are kept and retried at the next
sample; `close` raises if any could not be written in the end.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import warnings
from collections import deque
from pathlib import Path

import numpy as np

from optiscope.monitor.history import Alert, RunHistory

__all__ = ["RUNLOG", "META", "RunLogError", "RunLogWriter", "NullWriter", "load_run",
           "read_records", "live_records"]

RUNLOG = "runlog.jsonl"
META = "meta.json"
log = logging.getLogger("optiscope.monitor")


class RunLogError(OSError):
    """The run log could not be written."""


def _number(x: float) -> str:
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    if x.is_integer() and abs(x) < 2**53:
        # Counts and byte sizes stay exact: ".7g" wrote 123456789 state bytes as 1.234568e+08.
        return str(int(x))
    return format(x, ".7g")  # float32 precision: the statistics are float32 sums


def _values_json(values) -> str:
    return "[" + ",".join(_number(float(v)) for v in np.asarray(values).ravel()) + "]"


class NullWriter:
    """The run log when there is no ``log_dir``: records stay in memory only."""

    path = None

    def write_meta(self, meta: dict) -> None:
        pass

    def update_meta(self, changes: dict) -> None:
        pass

    def write_sample(self, step: int, time: float, values: dict[str, tuple[list[str], object]]) -> None:
        pass

    def write_alert(self, alert: Alert) -> None:
        pass

    def write_resume(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class RunLogWriter:
    """Appends records to ``log_dir/runlog.jsonl``.

    Args:
        log_dir: the run directory; created if missing.
        resume: append to an existing run log (default False: an existing one is an error, so two
            runs are never mixed by accident).
    """

    def __init__(self, log_dir: str | os.PathLike, *, resume: bool = False):
        self.dir = Path(log_dir)
        self.path = self.dir / RUNLOG
        if self.dir.exists() and not self.dir.is_dir():
            raise RunLogError(f"optiscope: log_dir {str(self.dir)!r} is a file, not a directory; "
                              "pass a directory path")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunLogError(f"optiscope: cannot create log_dir {str(self.dir)!r}: "
                              f"{exc.strerror or exc}; pass a writable directory") from exc
        if self.path.exists() and self.path.stat().st_size and not resume:
            raise FileExistsError(f"optiscope: {str(self.path)!r} already holds a run; pass a new "
                                  "log_dir, or resume=True to append to it")
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            raise RunLogError(f"optiscope: cannot write the run log {str(self.path)!r}: "
                              f"{exc.strerror or exc}; pass a writable log_dir") from exc
        self._scope_ids: dict[tuple[str, ...], int] = {}
        self._backlog: deque[bytes] = deque()
        self._failed_since: str | None = None
        self._cut_to: int | None = None  # a torn tail to cut off before the next write
        self._next_scope_id = 0
        self._meta: dict = {}
        if resume and self.path.stat().st_size:
            try:
                self._cut_torn_tail()
            except OSError as exc:
                os.close(self._fd)
                raise RunLogError(f"optiscope: cannot resume the run log {str(self.path)!r}: "
                                  f"{exc.strerror or exc}") from exc
            for record in read_records(self.path, warn=False):
                if not isinstance(record, dict):
                    continue
                if record.get("type") == "scopes":
                    self._scope_ids[tuple(record["names"])] = record["id"]
                    self._next_scope_id = max(self._next_scope_id, record["id"] + 1)
                elif record.get("type") == "meta":
                    self._meta.update((k, v) for k, v in record.items() if k != "type")

    def _cut_torn_tail(self) -> None:
        """Cuts an unterminated last line (a crash while writing it) off a run log to resume."""
        size = end = os.fstat(self._fd).st_size
        keep = 0
        with open(self.path, "rb") as f:
            while end > 0:  # back from the end, 64 KiB at a time, to the last newline
                start = max(0, end - 65536)
                f.seek(start)
                chunk = f.read(end - start)
                if end == size and chunk.endswith(b"\n"):
                    return
                if (i := chunk.rfind(b"\n")) >= 0:
                    keep = start + i + 1
                    break
                end = start
        os.ftruncate(self._fd, keep)
        warnings.warn(f"optiscope: {self.path}: cut off its torn last line ({size - keep} bytes, "
                      "the interrupted run was writing it) before resuming", RuntimeWarning,
                      stacklevel=4)

    # ------------------------------------------------------------------------------ records
    def write_meta(self, meta: dict) -> None:
        """Writes the run's metadata: ``meta.json`` and the run log's first record."""
        self._meta = dict(meta)
        try:
            self._write_meta_json()
        except RunLogError:
            os.close(self._fd)
            self._fd = None
            raise
        self._append([json.dumps({"type": "meta", **meta}, default=str)])

    def update_meta(self, changes: dict) -> None:
        """Adds or replaces metadata keys learnt during the run (``meta.json`` is rewritten)."""
        self._meta.update(changes)
        try:
            self._write_meta_json()
        except RunLogError as exc:  # the run log record below still carries the change
            log.error("%s", exc)
        self._append([json.dumps({"type": "meta", **changes}, default=str)])

    def _write_meta_json(self) -> None:
        path = self.dir / META
        tmp = path.with_name(META + ".tmp")
        try:  # replaced, not rewritten in place: a crash never leaves half a meta.json
            tmp.write_text(json.dumps(self._meta, indent=1, default=str) + "\n")
            os.replace(tmp, path)
        except OSError as exc:
            raise RunLogError(f"optiscope: cannot write {str(path)!r}: "
                              f"{exc.strerror or exc}") from exc

    def write_sample(self, step: int, time: float, values: dict[str, tuple[list[str], object]]) -> None:
        """Appends one sampled step: ``values[metric] = (scopes, numbers)``."""
        lines, parts = [], []
        for metric, (scopes, numbers) in values.items():
            key = tuple(scopes)
            if key not in self._scope_ids:
                self._scope_ids[key] = self._next_scope_id
                self._next_scope_id += 1
                lines.append(json.dumps({"type": "scopes", "id": self._scope_ids[key],
                                         "names": list(key)}))
            parts.append(f"{json.dumps(metric)}:[{self._scope_ids[key]},{_values_json(numbers)}]")
        lines.append(f'{{"type":"sample","step":{step},"time":{time:.3f},'
                     f'"values":{{{",".join(parts)}}}}}')
        self._append(lines)

    def write_alert(self, alert: Alert) -> None:
        self._append([json.dumps({"type": "alert", **alert.to_json()})])

    def write_resume(self, step: int) -> None:
        """Records that the run continues after ``step``: what was recorded before for later
        steps is superseded."""
        self._append([json.dumps({"type": "resume", "step": int(step)})])

    def close(self) -> None:
        if self._fd is None:
            return
        self._flush_backlog()
        fd, self._fd = self._fd, None
        try:
            os.close(fd)
        except OSError as exc:  # network file systems report deferred write errors here
            raise RunLogError(f"optiscope: closing the run log {str(self.path)!r} failed: "
                              f"{exc.strerror or exc}; its last records may be lost") from exc
        if self._backlog:
            raise RunLogError(f"optiscope: {len(self._backlog)} records could not be written to "
                              f"{str(self.path)!r} ({self._failed_since}); they are in "
                              "monitor.history")

    # ------------------------------------------------------------------------------ writing
    def _append(self, lines: list[str]) -> None:
        self._backlog.extend(line.encode() + b"\n" for line in lines)
        self._flush_backlog()

    def _flush_backlog(self) -> None:
        while self._backlog and self._fd is not None:
            data = self._backlog[0]
            try:
                if self._cut_to is not None:  # an earlier cut failed: never append to a torn line
                    os.ftruncate(self._fd, self._cut_to)
                    self._cut_to = None
                size = os.fstat(self._fd).st_size
                self._cut_to = size  # until the whole line is in
                written = os.write(self._fd, data)
                if written != len(data):
                    raise OSError(errno.ENOSPC, f"short write ({written} of {len(data)} bytes)")
                self._cut_to = None
            except OSError as exc:
                if self._cut_to is not None:
                    try:  # cut the torn line off so the log stays line-complete
                        os.ftruncate(self._fd, self._cut_to)
                        self._cut_to = None
                    except OSError:
                        pass  # retried before the next write
                if self._failed_since is None:
                    self._failed_since = f"{exc.strerror or exc}"
                    log.error("optiscope: writing the run log %s failed: %s. Training goes on; "
                              "records are kept in memory and retried at each sample.",
                              self.path, self._failed_since)
                    warnings.warn(f"optiscope: writing the run log {self.path} failed: "
                                  f"{self._failed_since}; records are kept in memory and retried",
                                  RuntimeWarning, stacklevel=4)
                return
            self._backlog.popleft()
        if not self._backlog and self._failed_since is not None:
            log.warning("optiscope: the run log %s is writable again; nothing was lost", self.path)
            self._failed_since = None


def read_records(path: str | os.PathLike, *, warn: bool = True):
    """Yields the records of a run log, skipping a torn or corrupt line with a warning.

    Reads line by line (a long run's log can be hundreds of MB). The last line is incomplete when
    the writer crashed in the middle of it, or is writing it right now.
    """
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            last = not line.endswith(b"\n")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                if warn:
                    what = (f"the last line (line {number}) is incomplete: the run was interrupted "
                            "while writing it, or is writing it now" if last else
                            f"line {number} is not valid JSON")
                    warnings.warn(f"optiscope: {path}: {what}; skipped", RuntimeWarning,
                                  stacklevel=2)
                continue
            yield record


def load_run(path: str | os.PathLike) -> RunHistory:
    """Reads a run directory (or its ``runlog.jsonl``) into a `RunHistory`.

    A torn last line, a corrupt line, or a record that does not fit the format (a sample naming
    an unknown scope list, a value count that does not match its scopes) is skipped with a
    warning; everything else is kept.

    Args:
        path: the ``log_dir`` a monitor wrote, or the run log file itself.
    """
    path = Path(path)
    file = path / RUNLOG if path.is_dir() else path
    if not file.exists():
        what = "is not a run directory" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"optiscope: {str(path)!r} {what}: no {RUNLOG} there")
    history = RunHistory()
    scopes: dict[int, list[str]] = {}
    undeclared: dict[int, int] = {}  # scope list id -> values that name it
    for number, record in enumerate(live_records(file), start=1):
        kind = record.get("type") if isinstance(record, dict) else type(record).__name__
        try:
            if kind == "resume":
                if int(history.meta.get("steps_taken", 0)) > int(record["step"]):
                    history.meta.pop("steps_taken")  # the abandoned attempt's count
            elif kind == "meta":
                history.meta.update((k, v) for k, v in record.items() if k != "type")
            elif kind == "scopes":
                scopes[record["id"]] = record["names"]
            elif kind == "sample":
                step, rows = int(record["step"]), []
                for metric, (scope_id, values) in record["values"].items():
                    if scope_id not in scopes:  # its declaration was on a corrupt line
                        undeclared[scope_id] = undeclared.get(scope_id, 0) + 1
                    elif len(scopes[scope_id]) != len(values):
                        raise ValueError(f"{metric!r} has {len(values)} values for "
                                         f"{len(scopes[scope_id])} scopes")
                    else:
                        rows.append((metric, scopes[scope_id], values))
                for metric, names, values in rows:
                    history.add(step, metric, names, values)
            elif kind == "alert":
                history.alerts.append(Alert(**{k: v for k, v in record.items() if k != "type"}))
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            warnings.warn(f"optiscope: {file}: record {number} ({kind}) does not fit the run log "
                          f"format ({exc!r}); skipped", RuntimeWarning, stacklevel=2)
    if undeclared:
        warnings.warn(f"optiscope: {file}: {sum(undeclared.values())} sampled values name scope "
                      f"lists that are never declared (ids {sorted(undeclared)}: their line is "
                      "corrupt); skipped", RuntimeWarning, stacklevel=2)
    return history


def _resume_points(path) -> list[tuple[int, int]]:
    """(line number, step) of each resume record; only lines that mention it are parsed."""
    points = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if b'"resume"' not in line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("type") == "resume":
                try:
                    points.append((number, int(record["step"])))
                except (KeyError, TypeError, ValueError):
                    continue
    return points


def live_records(path: str | os.PathLike, *, warn: bool = True):
    """`read_records` without the samples and alerts a later resume record supersedes: a record
    of step s on line i is void when a resume record at step k < s follows it."""
    points = _resume_points(path)
    if not points:
        yield from read_records(path, warn=warn)
        return
    # void_after[j]: the smallest resume step among the resume records after line points[j-1]
    lines = [n for n, _ in points]
    floor = [0] * len(points)
    low = None
    for j in range(len(points) - 1, -1, -1):
        low = points[j][1] if low is None else min(low, points[j][1])
        floor[j] = low
    j = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            while j < len(lines) and lines[j] < number:
                j += 1
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                if warn:
                    last = not line.endswith(b"\n")
                    what = (f"the last line (line {number}) is incomplete: the run was interrupted "
                            "while writing it, or is writing it now" if last else
                            f"line {number} is not valid JSON")
                    warnings.warn(f"optiscope: {path}: {what}; skipped", RuntimeWarning,
                                  stacklevel=2)
                continue
            if (j < len(lines) and isinstance(record, dict)
                    and record.get("type") in ("sample", "alert")):
                try:
                    if int(record["step"]) > floor[j]:
                        continue
                except (KeyError, TypeError, ValueError):
                    pass  # load_run says what is wrong with it
            yield record
