"""TensorBoard's event file format: the bottom layer of `TensorBoardSink`.

TensorBoard reads every file of a run directory whose name contains ``tfevents``. Such a file is a
sequence of records, each an ``Event`` protocol buffer framed as (little-endian)::

    uint64 length | uint32 masked CRC-32C of the length | data | uint32 masked CRC-32C of the data

and the first event names the format version (``file_version = "brain.Event:2"``).

The CRC comes from ``google-crc32c`` (a C implementation): tensorboard's own writer (which
``torch.utils.tensorboard`` uses) computes it in pure Python one byte at a time, on a background
thread that still holds the GIL, and for a sample of many scalars that is a large share of what
writing the sample costs. Where ``google-crc32c`` is not installed (a declared dependency, but a
checkout run without installing it, as on the first GPU machine, lacks it), that pure-Python CRC
is used, said once at WARNING: slower writing rather than a monitor that cannot start. The tests
check both against known CRC-32C values and tensorboard's, and read the files back with
tensorboard's `EventAccumulator`, which checks every record's CRC.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import time
from pathlib import Path

from tensorboard.compat.proto.event_pb2 import Event

try:
    import google_crc32c
except ImportError:  # pragma: no cover - exercised by monkeypatching in the tests
    google_crc32c = None

__all__ = ["EventFile", "crc32c", "masked_crc32c"]

log = logging.getLogger("optiscope.dashboards")
_said_slow = False


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``, as in iSCSI and the TFRecord format."""
    if google_crc32c is not None:
        return google_crc32c.value(data)
    global _said_slow
    if not _said_slow:
        _said_slow = True
        log.warning("optiscope: google-crc32c is not installed; TensorBoard events are "
                    "checksummed in pure Python (slower): pip install google-crc32c")
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import crc32c as slow

    return slow(data)


def masked_crc32c(data: bytes) -> int:
    """The CRC as TFRecord stores it: rotated right by 15 bits plus a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class EventFile:
    """Appends events to a new event file in ``log_dir``.

    Records are kept in memory and written to the file when ``max_buffered`` bytes are waiting,
    when ``flush_secs`` have passed since the last write (checked as each event arrives: there is
    no background thread), at `flush` and at `close`.

    Args:
        log_dir: the directory; created if missing.
        flush_secs: the longest time an event waits in memory while others arrive (default 10).
        max_buffered: bytes kept in memory before they are written (default 1 MiB).
    """

    def __init__(self, log_dir: str | os.PathLike, *, flush_secs: float = 10.0,
                 max_buffered: int = 1 << 20):
        self.dir = Path(log_dir)
        self.flush_secs = flush_secs
        self.max_buffered = max_buffered
        self._buffer: list[bytes] = []
        self._buffered = 0
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._file, self.path = self._create()
        except OSError as exc:
            raise OSError(exc.errno, f"optiscope: cannot write TensorBoard events into "
                          f"{str(self.dir)!r}: {exc.strerror or exc}; pass a writable "
                          "directory") from exc
        self._flushed_at = time.monotonic()
        self.write(Event(wall_time=time.time(), file_version="brain.Event:2"))
        self.flush()

    def _create(self):
        """A file named as tensorboard names its own, with a counter that avoids any existing."""
        stem = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
        for n in range(1000):
            path = self.dir / f"{stem}.{n}"
            try:
                return open(path, "xb"), path
            except FileExistsError:
                continue
        raise FileExistsError(f"optiscope: {str(self.dir)!r} already holds event files "
                              f"{stem}.0 to .999; pass another directory")

    def write(self, event: Event) -> None:
        """Frames and buffers one event."""
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        self._buffer.append(b"".join((header, struct.pack("<I", masked_crc32c(header)), data,
                                      struct.pack("<I", masked_crc32c(data)))))
        self._buffered += len(data) + 16
        if (self._buffered >= self.max_buffered
                or time.monotonic() - self._flushed_at >= self.flush_secs):
            self.flush()

    def flush(self) -> None:
        """Writes the buffered events to the file (and the operating system)."""
        if self._buffer:
            data = b"".join(self._buffer)
            self._buffer.clear()
            self._buffered = 0
            try:
                self._file.write(data)
                self._file.flush()
            except OSError as exc:
                raise OSError(exc.errno, f"optiscope: writing TensorBoard events to "
                              f"{str(self.path)!r} failed: {exc.strerror or exc}") from exc
        self._flushed_at = time.monotonic()

    def close(self) -> None:
        """Flushes and closes the file; closing again does nothing."""
        if self._file.closed:
            return
        try:
            self.flush()
        finally:
            self._file.close()
