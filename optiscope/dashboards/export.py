"""A run's values as one long table: ``step, metric, scope, value``, one row per recorded value.

``optiscope export RUN_DIR --format csv|parquet -o FILE`` writes it; `RunHistory.to_pandas` gives
the same table as a DataFrame. Rows come metric by metric (the run's order), scope by scope (the
order the scopes first appeared), then by step; a scope without a value at a step (a tensor that
got no gradient) has no row there, a NaN that was recorded has one. CSV needs nothing beyond
Python (NaN and ±inf as ``nan``, ``inf``, ``-inf``, which pandas and most tools read back);
Parquet needs pyarrow (``pip install 'optiscope[parquet]'``).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from pathlib import Path

from optiscope.monitor.history import RunHistory
from optiscope.monitor.runlog import load_run

__all__ = ["COLUMNS", "FORMATS", "export_run", "rows"]

COLUMNS = ("step", "metric", "scope", "value")
FORMATS = ("csv", "parquet")


def rows(history: RunHistory) -> Iterator[tuple[int, str, str, float]]:
    """``(step, metric, scope, value)`` for every value ``history`` holds."""
    for metric in history.metrics():
        for scope in history.scopes(metric):
            steps, values = history.series(metric, scope)
            for step, value in zip(steps.tolist(), values.tolist()):
                yield step, metric, scope, value


def export_run(run: str | os.PathLike | RunHistory, out: str | os.PathLike,
               format: str | None = None) -> int:
    """Writes every value of a run as one long table.

    Args:
        run: a run directory (or its ``runlog.jsonl``), or a `RunHistory`.
        out: the file to write (replaced if it exists).
        format: ``"csv"`` or ``"parquet"`` (default None: from ``out``'s suffix, else CSV).

    Returns:
        The number of rows written.

    Raises:
        ValueError: an unknown format.
        ImportError: Parquet without pyarrow installed.
    """
    out = Path(out)
    if format is None:
        format = "parquet" if out.suffix.lower() in (".parquet", ".pq") else "csv"
    if format not in FORMATS:
        raise ValueError(f"optiscope: unknown export format {format!r}; choose csv or parquet")
    if format == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError as exc:
            raise ImportError("optiscope: Parquet export needs pyarrow, which is not installed: "
                              "pip install 'optiscope[parquet]' (or export --format csv)") from exc
    if out.is_dir():
        raise IsADirectoryError(f"optiscope: {str(out)!r} is a directory; pass a file name such "
                                f"as {str(out / ('run.' + format))!r}")
    history = run if isinstance(run, RunHistory) else load_run(run)
    return _write_parquet(history, out) if format == "parquet" else _write_csv(history, out)


def _write_csv(history: RunHistory, out: Path) -> int:
    n = 0
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for row in rows(history):
            writer.writerow(row)
            n += 1
    return n


def _write_parquet(history: RunHistory, out: Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = history.long_table()
    table = pa.table({
        "step": pa.array(t.steps, type=pa.int64()),
        "metric": pa.DictionaryArray.from_arrays(pa.array(t.metric_codes),
                                                 pa.array(t.metrics, type=pa.string())),
        "scope": pa.DictionaryArray.from_arrays(pa.array(t.scope_codes),
                                                pa.array(t.scopes, type=pa.string())),
        "value": pa.array(t.values, type=pa.float64()),
    })
    pq.write_table(table, out)
    return table.num_rows
