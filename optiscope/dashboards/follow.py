"""``optiscope watch``: the terminal dashboard of a run that another process is writing.

The training job appends to ``RUN_DIR/runlog.jsonl`` (`optiscope.monitor.runlog`); `watch`
follows that file with a `RunLogFollower` and feeds its records through a `RecordDecoder` into
the same `ConsoleDashboard` that ``OptimizerMonitor(console=...)`` draws, so a job started in
another terminal, under ``nohup`` or in a batch system shows the same view.

Following is cheap: each poll is one ``stat``; the file is opened and read only when it has
grown, and only from where the last poll stopped.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import NamedTuple

from rich.console import Console

from optiscope.dashboards.console import ConsoleDashboard
from optiscope.dashboards.sink import RecordDecoder
from optiscope.monitor.runlog import RUNLOG

__all__ = ["RunLogFollower", "Update", "watch"]


class Update(NamedTuple):
    """What one `RunLogFollower.poll` found.

    Attributes:
        records: the records of the complete lines that arrived, in order.
        restarted: the file was replaced or truncated since the last poll, and ``records``
            start again from its beginning: forget what the earlier records said.
        more: there are more bytes to read right now (the poll stopped at its read limit).
        found: the run log exists.
    """

    records: list
    restarted: bool
    more: bool
    found: bool


class RunLogFollower:
    """Reads a growing run log incrementally, one poll at a time.

    Yields complete lines only: an unterminated last line (being written right now, or torn by
    a crash) stays in the file until its newline arrives, and is read again then. A complete
    line that is not JSON is skipped and counted. A file that is replaced (another inode) or
    truncated before what was read starts over from its beginning, flagged in the `Update`. A
    file or run directory that does not exist yet is waited for.

    Args:
        path: the run directory (``log_dir``), or the run log file itself (a ``.jsonl`` path).
        chunk_bytes: the most bytes one poll reads (default 4 MiB), so catching up with a long
            log shows progress and holds little memory; the rest comes with ``Update.more``.

    Attributes:
        path: the run log file followed.
        corrupt: complete lines skipped because they were not JSON.
        restarts: how many times the file was replaced or truncated.
    """

    def __init__(self, path: str | os.PathLike, *, chunk_bytes: int = 1 << 22):
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
            raise ValueError(f"RunLogFollower: chunk_bytes must be an integer >= 1, got "
                             f"{chunk_bytes!r}")
        path = Path(path)
        self.path = path if path.suffix == ".jsonl" or path.is_file() else path / RUNLOG
        self.chunk_bytes = chunk_bytes
        self.corrupt = 0
        self.restarts = 0
        self._file_id: tuple[int, int] | None = None  # (st_dev, st_ino) of the file being read
        self._offset = 0  # where the first line not yet returned starts
        self._end = 0     # how far the file has been read (the offset plus an unfinished line)

    def poll(self) -> Update:
        """Reads what was appended since the last poll (at most ``chunk_bytes`` of it)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return Update([], False, False, False)
        restarted = False
        if self._file_id is not None:
            if (st.st_dev, st.st_ino) != self._file_id or st.st_size < self._offset:
                self._offset = self._end = 0
                self.restarts += 1
                restarted = True
            elif st.st_size < self._end:  # a resumed writer cut off the torn line we had seen
                self._end = self._offset
        self._file_id = (st.st_dev, st.st_ino)
        if st.st_size == self._end:
            return Update([], restarted, False, True)
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:  # removed between the stat and the open
            return Update([], restarted, False, False)
        with f:
            st = os.fstat(f.fileno())
            if (st.st_dev, st.st_ino) != self._file_id:  # replaced in between: next poll
                return Update([], restarted, True, True)
            f.seek(self._offset)
            data = f.read(min(st.st_size - self._offset, self.chunk_bytes))
            cut = data.rfind(b"\n")
            while cut < 0 and self._offset + len(data) < st.st_size:  # a line over the limit
                more = f.read(self.chunk_bytes)
                if (i := more.rfind(b"\n")) >= 0:
                    cut = len(data) + i
                data += more
        self._end = self._offset + len(data)
        records = []
        if cut >= 0:
            self._offset += cut + 1
            for line in data[:cut].split(b"\n"):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except ValueError:
                    self.corrupt += 1
        return Update(records, restarted, self._end < st.st_size, True)


def watch(run_dir: str | os.PathLike, *, console: Console | None = None,
          poll_interval: float = 0.5, once: bool = False, top: int = 12,
          sort_by: str = "grad_norm", timeout: float | None = None) -> int:
    """Shows the dashboard of the run in ``run_dir`` and follows it until interrupted.

    Waits for a run directory or run log that does not exist yet (saying so once), starts over
    when the run log is replaced, and leaves the last frame on screen at Ctrl-C. Off a terminal
    it prints one line per sample instead of the live view.

    Args:
        run_dir: the ``log_dir`` of the run (or its ``runlog.jsonl``).
        console: where to draw (default None: stdout).
        poll_interval: seconds between looks at the run log (default 0.5).
        once: show the run as it is now, once, and return (default False): for scripts.
        top: layers shown, the largest by ``sort_by`` first (default 12).
        sort_by: the per-tensor metric that ranks the layers (default ``"grad_norm"``).
        timeout: stop after this many seconds (default None: only at Ctrl-C).

    Returns:
        The exit status: 0, or 1 when ``timeout`` ran out before the run log appeared.

    Raises:
        FileNotFoundError: ``once`` and there is no run log at ``run_dir``.
        ValueError: ``once`` and the run log holds no record yet; or a bad argument.
    """
    if isinstance(poll_interval, bool) or not isinstance(poll_interval, (int, float)) \
            or not poll_interval > 0:
        raise ValueError(f"watch: poll_interval must be a number of seconds > 0, got "
                         f"{poll_interval!r}")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not timeout >= 0):
        raise ValueError(f"watch: timeout must be a number of seconds >= 0 or None, got "
                         f"{timeout!r}")
    console = console if console is not None else Console()
    follower = RunLogFollower(run_dir)
    options = dict(top=top, sort_by=sort_by, title=str(run_dir))
    if once:
        return _show_once(follower, ConsoleDashboard(console, live=True, **options))

    dashboard = ConsoleDashboard(console, **options)
    decoder = RecordDecoder(dashboard, source=follower.path)
    deadline = None if timeout is None else time.monotonic() + timeout
    waiting = seen = False
    try:
        while True:
            update = follower.poll()
            if not update.found and not waiting:
                console.print(f"waiting for {follower.path} ...", markup=False, highlight=False)
            waiting, seen = not update.found, seen or update.found
            if update.restarted:
                console.print(f"{follower.path} was replaced: following the new run",
                              markup=False, highlight=False)
                dashboard.reset()
                decoder = RecordDecoder(dashboard, source=follower.path)
            decoder.feed(update.records)
            dashboard.refresh()
            if update.more:
                continue
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                time.sleep(min(poll_interval, left))
            else:
                time.sleep(poll_interval)
    except KeyboardInterrupt:
        pass
    finally:
        dashboard.close()
    if not seen:
        console.print(f"no run log appeared at {follower.path} within {timeout:g} s",
                      markup=False, highlight=False)
        return 1
    return 0


def _show_once(follower: RunLogFollower, dashboard: ConsoleDashboard) -> int:
    """Feeds ``dashboard`` the whole run log as it is now, then draws it once."""
    if not follower.path.exists():
        raise FileNotFoundError(
            f"optiscope watch: no run log at {str(follower.path)!r}: pass the log_dir that the "
            "run's OptimizerMonitor writes, or leave out once=True (--once) to wait for it")
    decoder = RecordDecoder(dashboard, source=follower.path)
    records = 0
    while True:
        update = follower.poll()
        records += len(update.records)
        decoder.feed(update.records)
        if not update.more:
            break
    if not records:
        raise ValueError(
            f"optiscope watch: the run log {str(follower.path)!r} holds no complete record yet "
            "(the run has not written its first line); wait for it, or leave out once=True "
            "(--once) to follow it")
    dashboard.close()
    return 0
