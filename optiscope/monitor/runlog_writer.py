"""The run log's writer thread: turns the records `optiscope.monitor.runlog.RunLogWriter` queues
into lines and appends them to ``runlog.jsonl``, off the training thread.

Why a thread helps although Python threads share the GIL: what it does with the GIL is short
(a sample is one record object of a few arrays); its two costs release the GIL: the numbers are
turned into text in C (`optiscope.kernels.cpu_format`, a ctypes call: the ~2,000 values of a
sample at 148 tensors were ~2 ms of ``json.dumps`` on the training thread), and the line
reaches the file by ``os.write``. Without the C library the thread formats in Python (it then
holds the GIL that long, but still off the training thread's own call). The thread is not woken
at each record (`GATHER_S`): a wake-up is a context switch inside the caller's call.

Records are written in the order they were queued, one ``os.write`` per line. A failed write
keeps the line and every later one in memory (the backlog) and retries them at the next record;
the training thread is told at its next call to the writer (a warning), the log at once.
`Appender.flush` waits until everything queued has been tried; in-process readers of the log
(`optiscope.monitor.runlog.read_records`) flush its live writer first (`flush_live`), and every
live writer is flushed at interpreter exit.
"""

from __future__ import annotations

import atexit
import errno
import json
import logging
import os
import threading
import warnings
import weakref
from collections import deque
from pathlib import Path

import numpy as np

__all__ = ["Appender", "values_json", "histogram_rows", "flush_live"]

log = logging.getLogger("optiscope.monitor")
# How often the writer's thread looks for records while they come: the log on disk lags by
# about this (a SIGKILL loses what came since), and the thread takes the GIL 50 times a second
# for a moment. Waking it at each record instead costs the training thread a context switch per
# sample, 1-2 ms of write_sample at 148 tensors on a loaded 2-core machine. flush() and close()
# wake it. After IDLE_S without a record it sleeps until the next one wakes it (a sample every
# few seconds pays that wake-up; steady sampling does not).
GATHER_S = 0.02
IDLE_S = 1.0


def values_json(values) -> str:
    """A JSON array of float64 values: each as Python's repr (json writes a float so; NaN,
    Infinity, -Infinity as json does), the integral non-negative values below 2^53 (counts and
    byte sizes) as ints. The shortest text that reads back as the same float64: `load_run` then
    returns the very values of `monitor.history` (7 digits, float32's, lost the float64 the
    monitor derives from its sums, a norm's square root, a ratio, by up to 5e-7). The C
    formatter (`optiscope.kernels.cpu_format`) writes the same bytes."""
    a = np.asarray(values, dtype=np.float64).ravel()
    items = a.tolist()
    with np.errstate(invalid="ignore"):
        integral = (a == np.trunc(a)) & (np.abs(a) < 2.0**53) & ~np.signbit(a)
    for i in np.flatnonzero(integral).tolist():
        items[i] = int(items[i])
    return json.dumps(items, separators=(",", ":"))


def histogram_rows(counts) -> str:
    """A histograms record's rows: each row's nonzero span (a trained tensor fills a few dozen
    of the 148 bins), as the first nonzero bin's index and the counts from there; ``[]`` for
    none. The C formatter writes the same bytes."""
    rows = []
    for row in np.asarray(counts):
        nonzero = np.flatnonzero(row)
        if not len(nonzero):
            rows.append("[]")
            continue
        span = row[nonzero[0]: nonzero[-1] + 1]
        rows.append(f"[{nonzero[0]},{','.join(str(int(c)) for c in span)}]")
    return f"[{','.join(rows)}]"


# The live appenders of this process by their file's real path, for `flush_live`.
_LIVE: "weakref.WeakValueDictionary[str, Appender]" = weakref.WeakValueDictionary()


def flush_live(path) -> None:
    """Waits until the live writer of the run log ``path`` in this process (if any) has
    written what it was given: a reader in the same process sees every record so far."""
    if not _LIVE:
        return
    appender = _LIVE.get(os.path.realpath(path))
    if appender is not None:
        appender.before()
        appender.flush()


@atexit.register
def _flush_all() -> None:  # a script that never closes its monitor still gets its log
    for appender in list(_LIVE.values()):
        try:
            appender.before()
            appender.flush()
        except Exception:  # at exit: nothing left to tell
            pass


class Appender:
    """Appends records to the open run log ``fd`` (``path``) on a thread of its own.

    A queued record is ``("lines", [line, ...])``: whole lines (bytes), or ``("sample",
    lines, step, time, heads, numbers, sizes, histograms, declared)``: a sample, formatted on
    the thread (`lines`), after the lines that declare its scope lists, and its histograms
    after the lines that declare theirs.
    """

    def __init__(self, fd: int, path: Path):
        self.fd: int | None = fd
        self.path = path
        self.backlog: deque[bytes] = deque()  # lines not written yet (a full disk)
        self.failed_since: str | None = None
        self._cut_to: int | None = None  # a torn tail to cut off before the next write
        self._queue: deque = deque()  # records for the thread; None ends it
        self._wake = threading.Event()  # set by flush and stop; by put when the thread idles
        self._idle = False
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._dirty = False  # something queued since the last flush
        self._warning: str | None = None  # a failure to warn the caller of, at its next call
        self._formatter = None
        self._formatter_known = False
        self._errors = 0
        self.before_flush: weakref.WeakMethod | None = None  # the monitor's waiting samples
        _LIVE[os.path.realpath(path)] = self

    def before(self) -> None:
        """Lets the monitor hand over the samples it still holds (`before_flush`)."""
        hook = self.before_flush() if self.before_flush is not None else None
        if hook is not None:
            hook()

    # ------------------------------------------------------------------- the caller's side
    def put(self, record: tuple) -> None:
        """Queues a record (written on the thread, after every record queued before it).

        The thread is not woken unless it idles: it looks every `GATHER_S` seconds."""
        if os.getpid() != self._pid:  # a forked child: no thread of ours runs here
            self._write(record)
        else:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="optiscope-runlog",
                                                daemon=True)
                self._thread.start()
            self._queue.append(record)
            self._dirty = True  # after the record: a concurrent flush then waits for it
            if self._idle:  # read after the append; the thread looks again after setting it
                self._wake.set()
        if self._warning is not None:
            self._warn()

    def flush(self) -> None:
        """Waits until every record queued so far was written, or kept in the backlog."""
        if (self._dirty and self._thread is not None and os.getpid() == self._pid
                and threading.current_thread() is not self._thread):
            self._dirty = False
            done = threading.Event()
            self._queue.append(done)
            self._wake.set()
            while self._thread.is_alive() and not done.wait(1.0):
                pass
        if self._warning is not None:
            self._warn()

    def stop(self) -> None:
        """Writes what is queued, ends the thread and tries the backlog once more."""
        thread, self._thread = self._thread, None
        if thread is not None and os.getpid() == self._pid:
            self._queue.append(None)
            self._wake.set()
            thread.join()
        self.flush_backlog()
        if self._warning is not None:
            self._warn()
        _LIVE.pop(os.path.realpath(self.path), None)

    def _warn(self) -> None:
        message, self._warning = self._warning, None
        if message is not None:
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    # --------------------------------------------------------------------- the thread's side
    def _run(self) -> None:
        queue = self._queue
        while True:
            while queue:
                record = queue.popleft()
                if record is None:
                    return
                if isinstance(record, threading.Event):
                    record.set()
                    continue
                try:
                    self._write(record)
                except BaseException:  # never end the thread: training goes on
                    self._errors += 1
                    if self._errors <= 3:
                        log.exception("optiscope: writing a record to the run log %s failed; "
                                      "training goes on%s", self.path,
                                      "" if self._errors < 3 else " (further errors not shown)")
            # Records gather (a flush or close cuts it short): one wake-up and one turn with the
            # GIL for what several steps gave.
            waited = 0.0
            while not queue and waited < IDLE_S:
                if self._wake.wait(GATHER_S):
                    self._wake.clear()
                    break
                waited += GATHER_S
            if not queue:
                self._idle = True
                if not queue:  # looked at after idle is set: a put from now on wakes us
                    self._wake.wait()
                self._wake.clear()
                self._idle = False

    def _write(self, record: tuple) -> None:
        self.backlog.extend(self.lines(record))
        self.flush_backlog()

    def lines(self, record: tuple) -> list[bytes]:
        """A queued record's lines."""
        if record[0] == "lines":
            return record[1]
        return record[1] + self._sample_lines(*record[2:])

    def _format(self):
        if not self._formatter_known:  # here, not at import: the first use may compile it
            from optiscope.kernels.cpu_format import formatter
            self._formatter, self._formatter_known = formatter(), True
        return self._formatter

    def _sample_lines(self, step, time, heads: list[bytes], numbers: np.ndarray | None,
                      sizes: list[int], histograms, declared: list[bytes]) -> list[bytes]:
        """A sample's line, and its histograms' line when it has them."""
        text = self._format()
        if not heads:
            bodies = []
        elif text is not None:
            bodies = text.arrays(numbers, sizes)
        else:
            ends = np.cumsum(sizes).tolist()
            bodies = [values_json(numbers[a:b]).encode()
                      for a, b in zip([0, *ends[:-1]], ends)]
        parts = b",".join(head + body + b"]" for head, body in zip(heads, bodies))
        lines = [f'{{"type":"sample","step":{step},"time":{time:.3f},"values":{{'.encode()
                 + parts + b"}}\n"]
        if histograms:
            rows = [head + (text.histograms(counts) if text is not None
                            else histogram_rows(counts).encode()) + b"]"
                    for head, counts in histograms]
            lines.extend(declared)
            lines.append(f'{{"type":"histograms","step":{step},"values":{{'.encode()
                         + b",".join(rows) + b"}}\n")
        return lines

    def flush_backlog(self) -> None:
        """Writes the backlog's lines in order, each with one ``os.write``; at a failure, cuts
        the file back to its last whole line and keeps the rest for the next try."""
        while self.backlog and self.fd is not None:
            data = self.backlog[0]
            try:
                if self._cut_to is not None:  # an earlier cut failed: never append to a torn line
                    os.ftruncate(self.fd, self._cut_to)
                    self._cut_to = None
                size = os.fstat(self.fd).st_size
                self._cut_to = size  # until the whole line is in
                written = os.write(self.fd, data)
                if written != len(data):
                    raise OSError(errno.ENOSPC, f"short write ({written} of {len(data)} bytes)")
                self._cut_to = None
            except OSError as exc:
                if self._cut_to is not None:
                    try:  # cut the torn line off so the log stays line-complete
                        os.ftruncate(self.fd, self._cut_to)
                        self._cut_to = None
                    except OSError:
                        pass  # retried before the next write
                if self.failed_since is None:
                    self.failed_since = f"{exc.strerror or exc}"
                    log.error("optiscope: writing the run log %s failed: %s. Training goes on; "
                              "records are kept in memory and retried at each sample.",
                              self.path, self.failed_since)
                    self._warning = (f"optiscope: writing the run log {self.path} failed: "
                                     f"{self.failed_since}; records are kept in memory and "
                                     "retried")
                return
            self.backlog.popleft()
        if not self.backlog and self.failed_since is not None:
            log.warning("optiscope: the run log %s is writable again; nothing was lost", self.path)
            self.failed_since = None
