"""The run log's numbers as JSON text in C (``cpu_format.c``, part of the CPU kernels' library):
the text `optiscope.monitor.runlog_writer.values_json` gives, byte for byte, written while the
GIL is released (a ctypes call releases it), so that a writer thread formats a sample while the
training thread runs Python. `formatter` is None where the library cannot be had (no C
compiler, ``OPTISCOPE_CPU_KERNEL=0``): the caller formats in Python then.
"""

from __future__ import annotations

import ctypes

import numpy as np

from optiscope.kernels import cpu

__all__ = ["Formatter", "formatter", "VALUE_BYTES"]

VALUE_BYTES = 25  # the longest value, "-2.2250738585072014e-308", and its comma


def formatter() -> "Formatter | None":
    """A formatter on the compiled library, or None without it (the reason is logged once by
    `optiscope.kernels.cpu.kernel`)."""
    lib = cpu.kernel()
    return None if lib is None else Formatter(lib)


class Formatter:
    """Formats float64 arrays into a buffer of its own, grown as needed (one per thread: the
    buffer is shared between calls)."""

    def __init__(self, lib: ctypes.CDLL):
        self._lib = lib
        self._buffer = ctypes.create_string_buffer(0)

    def _room(self, size: int):
        if len(self._buffer) < size:
            self._buffer = ctypes.create_string_buffer(max(size, 2 * len(self._buffer)))
        return self._buffer

    def arrays(self, values: np.ndarray, sizes: np.ndarray) -> list[bytes]:
        """The JSON array of each of ``len(sizes)`` consecutive pieces of ``values`` (float64),
        ``sizes[i]`` values each."""
        values = np.ascontiguousarray(values, dtype=np.float64).ravel()
        sizes = np.ascontiguousarray(sizes, dtype=np.int64)
        if sizes.ndim != 1 or (sizes < 0).any() or int(sizes.sum()) != values.size:
            raise ValueError(f"Formatter.arrays: sizes {sizes.tolist()} must be non-negative and "
                             f"add up to the {values.size} values")
        count = len(sizes)
        if not count:
            return []
        buffer = self._room(2 * count + VALUE_BYTES * values.size)
        ends = np.empty(count, dtype=np.int64)
        self._lib.optiscope_format_f64_many(values.ctypes.data, sizes.ctypes.data, count, buffer,
                                            ends.ctypes.data)
        text = ctypes.string_at(buffer, int(ends[-1]))
        bounds = ends.tolist()
        return [text[a:b] for a, b in zip([0, *bounds[:-1]], bounds)]

    def array(self, values) -> bytes:
        """The JSON array of ``values`` (anything `numpy.asarray` makes float64 of)."""
        values = np.ascontiguousarray(values, dtype=np.float64).ravel()
        buffer = self._room(2 + VALUE_BYTES * values.size)
        n = self._lib.optiscope_format_f64(values.ctypes.data, values.size, buffer)
        return ctypes.string_at(buffer, n)

    def histograms(self, counts: np.ndarray) -> bytes:
        """``[[first, c, ...], [], ...]``: each row's nonzero span of finite counts
        (``[n, bins]``), as its first nonzero bin's index and the counts from there to its last
        nonzero one, each as ``int`` makes it whole; ``[]`` for a row of zeros."""
        counts = np.ascontiguousarray(counts, dtype=np.float64)
        if counts.ndim != 2 or not np.isfinite(counts).all() or (abs(counts) >= 2.0**63).any():
            raise ValueError(f"Formatter.histograms: counts must be a 2-D array of finite "
                             f"numbers below 2^63, got {counts!r:.200}")
        rows, bins = counts.shape
        buffer = self._room(2 + rows * (3 + 21 * bins))
        n = self._lib.optiscope_format_histograms(counts.ctypes.data, rows, bins, buffer)
        return ctypes.string_at(buffer, n)
