"""The run directory's append-only run log: written at each sample, readable while it grows.

``runlog.jsonl`` holds one JSON object per line:

* ``{"type": "meta", ...}`` — first line: the run's metadata (also written to ``meta.json``);
  a later meta record adds or replaces keys (`RunLogWriter.update_meta`);
* ``{"type": "scopes", "id": k, "names": [...]}`` — a list of scope names, declared once;
* ``{"type": "sample", "step": t, "time": unix_s, "values": {metric: [k, [v, ...]]}}`` — one
  sampled step: for each metric the id of its scope list and one value per scope
  (``NaN``/``Infinity`` as Python's json writes them);
* ``{"type": "histograms", "step": t, "values": {quantity: [k, [[first, c, ...], ...]]}}`` —
  the log2 histograms of a sampled step (``optiscope.monitor.ranges``): for ``grad``,
  ``update`` and ``moment2``, the id of the scope list and per tensor its nonzero bins, as the
  first bin's index and the counts from there (whole numbers; ``[]`` for none);
* ``{"type": "alert", ...}`` — an alert (`Alert` fields);
* ``{"type": "resume", "step": k}`` — the run was resumed from a checkpoint at step k: the
  samples and alerts of steps after k written before this record belong to an abandoned attempt
  and are void (the reader drops them; the log stays append-only).

Records are written by a thread of the writer's own (`optiscope.monitor.runlog_writer`): the
training thread queues a sample's numbers and the thread turns them into text (in C, without the
GIL) and appends the line, in the order the records were queued, within about
`runlog_writer.GATHER_S` of the call. In-process readers of the log (`read_records`, `load_run`)
and `RunLogWriter.flush` wait for what is queued; a process killed outright (SIGKILL) loses
what was queued and not yet written (the samples of the last ``GATHER_S``), and an exit without
`RunLogWriter.close` still writes it (atexit).

A line is written with one ``write`` and a crash leaves at most the last line torn; the reader
skips it with a warning, and ``resume=True`` cuts it off before appending (else the first new
line would be glued to it and lost as well). A failed write (disk full, file system gone) is
reported loudly at the sample where it happens, the file is cut back to its last complete line,
training goes on, and the records that could not be written are kept and retried at the next
sample; `RunLogWriter.close` raises `RunLogError` if any could not be written in the end (the
monitor logs it as one error, and raises it only when ``strict``).
"""

from __future__ import annotations

import errno
import json
import contextlib
import logging
import os
import weakref
import warnings

try:
    import fcntl
except ImportError:  # Windows: no lock against a second writer
    fcntl = None
from pathlib import Path

import numpy as np

from optiscope.atomicfile import atomic_file
from optiscope.monitor.history import Alert, RunHistory
from optiscope.monitor.records import RecordDecoder
from optiscope.monitor.runlog_writer import Appender, flush_live, values_json

__all__ = ["RUNLOG", "META", "LOCK", "RunLogError", "RunIdentityError", "RunLogWriter",
           "NullWriter", "check_resume", "open_run", "load_run", "read_records", "live_records"]

RUNLOG = "runlog.jsonl"
META = "meta.json"
LOCK = "runlog.lock"  # held (flock) by the live writer; the kernel drops it when the process dies
log = logging.getLogger("optiscope.monitor")


class RunLogError(OSError):
    """The run log could not be written."""


class RunIdentityError(ValueError):
    """``resume=True`` on the run log of another run (another optimizer or model)."""


_values_json = values_json  # the Python formatter, the C one's oracle (kernels/cpu_format.c)


class NullWriter:
    """The run log when there is no ``log_dir``: records stay in memory only."""

    path = None

    def write_meta(self, meta: dict) -> None:
        pass

    def update_meta(self, changes: dict) -> None:
        pass

    def write_sample(self, step: int, time: float, values: dict[str, tuple[list[str], object]],
                     histograms: dict | None = None) -> None:
        pass

    def write_alert(self, alert: Alert) -> None:
        pass

    def write_resume(self, step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def before_flush(self, method) -> None:
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
        self._lock = _lock(self.dir)
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            _unlock(self._lock)
            raise RunLogError(f"optiscope: cannot write the run log {str(self.path)!r}: "
                              f"{exc.strerror or exc}; pass a writable log_dir") from exc
        self._scope_ids: dict[tuple[str, ...], int] = {}
        # per metric (histogram quantity): its scope id, its entry's text up to its values, and
        # a copy of its scope names
        self._heads: dict[str, tuple[int, bytes, list]] = {}
        self._next_scope_id = 0
        self._meta: dict = {}
        self._meta_failed = False
        if resume and self.path.stat().st_size:
            try:
                self._cut_torn_tail()
            except OSError as exc:
                os.close(self._fd)
                _unlock(self._lock)
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
        self._appender = Appender(self._fd, self.path)

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
            self._appender.stop()
            self._appender.fd = None
            os.close(self._fd)
            self._fd = None
            self._lock = _unlock(self._lock)
            raise
        self._append([json.dumps({"type": "meta", **meta}, default=str)])

    def update_meta(self, changes: dict) -> None:
        """Adds or replaces metadata keys learnt during the run (``meta.json`` is rewritten)."""
        self._meta.update(changes)
        try:
            self._write_meta_json()
            self._meta_failed = False
        except RunLogError as exc:  # the run log record below still carries the change
            if not self._meta_failed:  # once per failure, not at every change
                log.error("%s; the run log still records the change", exc)
            self._meta_failed = True
        self._append([json.dumps({"type": "meta", **changes}, default=str)])

    def _write_meta_json(self) -> None:
        path = self.dir / META
        try:  # replaced, not rewritten in place: a crash never leaves half a meta.json
            with atomic_file(path) as f:
                f.write(json.dumps(self._meta, indent=1, default=str) + "\n")
        except OSError as exc:  # atomic_file removed its temporary file; the old one stays
            raise RunLogError(f"optiscope: cannot write {str(path)!r}: "
                              f"{exc.strerror or exc}") from exc

    def _scope_id(self, scopes, lines: list[bytes]) -> int:
        """The id of a scope list, declared (a line added to ``lines``) the first time."""
        key = tuple(scopes)
        scope_id = self._scope_ids.get(key)
        if scope_id is None:
            scope_id = self._scope_ids[key] = self._next_scope_id
            self._next_scope_id += 1
            lines.append(json.dumps({"type": "scopes", "id": scope_id,
                                     "names": list(key)}).encode() + b"\n")
        return scope_id

    def _heads_of(self, entries, lines: list[bytes], seen: dict) -> tuple[list[bytes], list]:
        """For ``(name, (scopes, data))`` entries: each one's text up to its data,
        ``"name":[k,`` (k the id of its scope list), and the data.

        A metric's scopes are compared with a copy of its names of last time: the same names
        (the same list, or a new one of the same str objects) compare in a pass of pointer
        comparisons, without hashing them all. ``seen``: the scope ids of this sample's lists
        so far, by the id of the list (alive while the sample is written): a list several
        metrics share is compared once."""
        heads, data = [], []
        known = self._heads
        for name, (scopes, numbers) in entries:
            head = known.get(name)
            scope_id = seen.get(id(scopes))
            if scope_id is None:
                if head is not None and head[2] == scopes:
                    scope_id = head[0]
                else:
                    scope_id = self._scope_id(scopes, lines)
                seen[id(scopes)] = scope_id
            if head is None or head[0] != scope_id:
                head = known[name] = (scope_id, f"{json.dumps(name)}:[{scope_id},".encode(),
                                      list(scopes))
            heads.append(head[1])
            data.append(numbers)
        return heads, data

    def write_sample(self, step: int, time: float, values: dict[str, tuple[list[str], object]],
                     histograms: dict | None = None) -> None:
        """Writes one sampled step: for each metric ``values[metric] = (scopes, numbers)``
        (``numbers`` a list or an array, one per scope), and its log2 histograms
        (``{quantity: (scopes, counts)}``, whole numbers) in the same write.

        The numbers are copied here and turned into text on the writer's thread."""
        lines: list[bytes] = []
        seen: dict[int, int] = {}
        heads, arrays = self._heads_of(values.items(), lines, seen)
        try:  # lists and 1-D arrays (what the monitor gives) in one copy
            sizes = [len(a) for a in arrays]
            flat = np.concatenate(arrays, dtype=np.float64, casting="same_kind") if arrays else None
            if flat is not None and flat.ndim != 1:
                raise ValueError("not 1-D")
        except (TypeError, ValueError):  # 0-d or n-d arrays, objects; and a bad number's error
            arrays = [np.asarray(a, dtype=np.float64).ravel() for a in arrays]
            sizes = [a.size for a in arrays]
            flat = np.concatenate(arrays)
        hists, declared = None, []
        if histograms:  # the lists they declare follow the sample's line
            hist_heads, counts = self._heads_of(histograms.items(), declared, seen)
            counts = [np.array(c, dtype=np.float64) for c in counts]  # copies: the caller's stay
            for quantity, c in zip(histograms, counts):
                if c.ndim != 2 or not np.isfinite(c).all():
                    raise ValueError(f"optiscope: the histograms of {quantity!r} must be a 2-D "
                                     f"array of finite counts, got {c!r:.200}")
            hists = list(zip(hist_heads, counts))
        self._put(("sample", lines, step, time, heads, flat, sizes, hists, declared))

    def write_alert(self, alert: Alert) -> None:
        self._append([json.dumps({"type": "alert", **alert.to_json()})])

    def write_resume(self, step: int) -> None:
        """Records that the run continues after ``step``: what was recorded before for later
        steps is superseded."""
        self._append([json.dumps({"type": "resume", "step": int(step)})])

    def flush(self) -> None:
        """Waits until every record given so far is written (or, on a failing disk, kept to
        retry): before the log is read back, or where the process must have it. The
        monitor's samples waiting for their batch are handed over first (`before_flush`)."""
        self._appender.before()
        self._appender.flush()

    def before_flush(self, method) -> None:
        """A bound method called (on the caller's thread) before a reader of this process
        flushes the log (`runlog_writer.flush_live`, and at exit): the monitor's samples that
        wait for their batch. Held weakly."""
        self._appender.before_flush = weakref.WeakMethod(method)

    def close(self) -> None:
        """Writes what is queued, retries what could not be written, and closes the log.

        Raises:
            RunLogError: records could not be written (they are in the monitor's history)."""
        if self._fd is None:
            return
        appender = self._appender
        appender.stop()
        fd, self._fd = self._fd, None
        appender.fd = None
        self._lock = _unlock(self._lock)
        try:
            os.close(fd)
        except OSError as exc:  # network file systems report deferred write errors here
            raise RunLogError(f"optiscope: closing the run log {str(self.path)!r} failed: "
                              f"{exc.strerror or exc}; its last records may be lost") from exc
        if appender.backlog:
            raise RunLogError(f"optiscope: {len(appender.backlog)} records could not be written "
                              f"to {str(self.path)!r} ({appender.failed_since}); the log holds "
                              "the run up to the first of them, and all of them are in "
                              "monitor.history")

    @property
    def unwritten(self) -> int:
        """Records not written (a full disk): kept in memory and retried at the next record."""
        self._appender.flush()
        return len(self._appender.backlog)

    # ------------------------------------------------------------------------------ writing
    def _append(self, lines: list[str]) -> None:
        self._put(("lines", [line.encode() + b"\n" for line in lines]))

    def _put(self, record: tuple) -> None:
        if self._fd is None:  # closed: kept, as a record that could not be written
            self._appender.backlog.extend(self._appender.lines(record))
            return
        self._appender.put(record)


def _lock(log_dir: Path) -> tuple[int, Path] | None:
    """Takes the run directory's writer lock, or says who holds it. A lock of a process that
    died is gone with it (flock), so a crashed run never blocks its own resumption; `_unlock`
    removes the file, so a lock is taken again if the file was replaced while we waited."""
    if fcntl is None:
        return None
    path = log_dir / LOCK
    for _ in range(8):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunLogError(f"optiscope: cannot write {str(path)!r}: {exc.strerror or exc}; "
                              "pass a writable log_dir") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunLogError(f"optiscope: cannot lock {str(path)!r}: "
                                  f"{exc.strerror or exc}") from exc
            raise RunLogError(f"optiscope: {str(log_dir)!r} is being written by another live "
                              f"monitor (pid {holder}); two writers would interleave their "
                              "steps: pass another log_dir, or close the other monitor "
                              "first") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except OSError:
            same = False
        if same:
            with contextlib.suppress(OSError):  # who holds it, for the message above
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd, path
        os.close(fd)  # the holder removed the file as we locked it: lock the new one
    raise RunLogError(f"optiscope: cannot lock {str(path)!r}: it keeps being replaced")


def _unlock(lock: tuple[int, Path] | None) -> None:
    if lock is not None:
        fd, path = lock
        with contextlib.suppress(OSError):
            path.unlink()  # while still held: whoever opened it before retries on a new file
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)  # for a forked child that still shares the fd
        with contextlib.suppress(OSError):
            os.close(fd)


def check_resume(saved: dict, current: dict, path: str | os.PathLike) -> None:
    """Refuses to append a run to the log of another: the optimizer's class, and the
    parameters' names and shapes, must be those the log's metadata records (a key the log lacks
    is not compared).

    Raises:
        RunIdentityError: what differs, and the fix.
    """
    differences = []
    if "optimizer" in saved and saved["optimizer"] != current.get("optimizer"):
        differences.append(f"the optimizer is {current.get('optimizer')}, the log's "
                           f"{saved['optimizer']}")
    if "params" in saved:
        def shapes(meta):
            return {p["name"]: list(p["shape"]) for p in meta.get("params", ())
                    if isinstance(p, dict) and "name" in p and "shape" in p}
        there, here = shapes(saved), shapes(current)
        changed = [f"{n} {here[n]} (log: {there[n]})" for n in here if n in there
                   and here[n] != there[n]]
        for what, names in (("shapes differ", changed),
                            ("only in this run", [n for n in here if n not in there]),
                            ("only in the log", [n for n in there if n not in here])):
            if names:
                more = f" and {len(names) - 3} more" if len(names) > 3 else ""
                differences.append(f"{what}: {', '.join(names[:3])}{more}")
    if differences:
        raise RunIdentityError(
            f"optiscope: resume=True, but {str(path)!r} is the log of another run: "
            f"{'; '.join(differences)}. Pass another log_dir for this run (resume=True only "
            "continues the same model and optimizer)")


def open_run(log_dir: str | os.PathLike, *, resume: bool, meta: dict
             ) -> tuple[RunLogWriter, RunHistory]:
    """The writer of a run directory and the history the run continues: a new one (``meta``
    written), or, with ``resume`` and a non-empty log, the logged run's after `check_resume`."""
    writer = RunLogWriter(log_dir, resume=resume)
    try:
        if resume and writer.path.stat().st_size:
            history = load_run(log_dir)
            check_resume(history.meta, meta, writer.path)
        else:
            history = RunHistory(meta=meta)
            writer.write_meta(meta)
    except BaseException:
        with contextlib.suppress(Exception):
            writer.close()
        raise
    return writer, history


def read_records(path: str | os.PathLike, *, warn: bool = True):
    """Yields the records of a run log, skipping a torn or corrupt line with a warning.

    Reads line by line (a long run's log can be hundreds of MB). The last line is incomplete when
    the writer crashed in the middle of it, or is writing it right now.
    """
    flush_live(path)  # this process's own writer of it: what it was given is in the file
    for _, record in _numbered_records(path, warn):
        yield record


def _numbered_records(path, warn: bool):
    """(line number, record) of each line that parses; see `read_records`."""
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
                                  stacklevel=3)
                continue
            yield number, record


class _HistoryBuilder:
    """The consumer of decoded records that `load_run` fills a `RunHistory` with."""

    def __init__(self):
        self.history = RunHistory()

    def on_meta(self, changes: dict) -> None:
        self.history.meta.update(changes)

    def on_sample(self, step: int, time: float, values: dict) -> None:
        for metric, (names, numbers) in values.items():
            self.history.add(step, metric, names, numbers)

    def on_alert(self, alert: Alert) -> None:
        self.history.alerts.append(alert)

    def on_histograms(self, step: int, histograms: dict) -> None:
        self.history.add_histograms(step, histograms)

    def on_resume(self, step: int) -> None:
        if int(self.history.meta.get("steps_taken", 0)) > step:
            self.history.meta.pop("steps_taken")  # the abandoned attempt's count


def load_run(path: str | os.PathLike) -> RunHistory:
    """Reads a run directory (or its ``runlog.jsonl``) into a `RunHistory`.

    A torn last line or a corrupt line is skipped with a warning; the records are checked
    against the run-log schema by `optiscope.monitor.records.RecordDecoder`, and those that do
    not fit (a step that is not a sane int, values that do not match their scopes, a sample
    naming an undeclared scope list, ...) are skipped and counted, with one warning saying how
    many and why; everything else is kept.

    Args:
        path: the ``log_dir`` a monitor wrote, or the run log file itself.
    """
    path = Path(path)
    file = path / RUNLOG if path.is_dir() else path
    if not file.exists():
        what = "is not a run directory" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"optiscope: {str(path)!r} {what}: no {RUNLOG} there")
    builder = _HistoryBuilder()
    RecordDecoder(builder, source=file).feed(live_records(file))
    return builder.history


def _resume_points(path) -> list[tuple[int, int]]:
    """(line number, step) of each resume record; only lines that mention it are parsed."""
    flush_live(path)
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
    for number, record in _numbered_records(path, warn):
        while j < len(lines) and lines[j] < number:
            j += 1
        if (j < len(lines) and isinstance(record, dict)
                and record.get("type") in ("sample", "alert", "histograms")):
            try:
                if int(record["step"]) > floor[j]:
                    continue
            except (KeyError, TypeError, ValueError):
                pass  # load_run says what is wrong with it
        yield record
