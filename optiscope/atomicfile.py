"""Replacing a file so that no reader ever sees half of it.

`atomic_file` writes into a temporary file in the target's directory and renames it over the
target only when the writing succeeded (a rename within one file system is atomic); on failure the
temporary file is removed and the old file, if any, stays. The run log's ``meta.json``, the HTML
report and the PNG are written through it. Imports nothing from optiscope.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = ["atomic_file"]


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Opens a temporary file beside ``path`` (``mode`` ``"w"``, UTF-8, or ``"wb"``); on a clean
    exit it becomes ``path`` (readable by all: 0644), replacing what was there.

    The directory is created if missing. Raises what the file system raises (``OSError``).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
