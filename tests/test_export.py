"""The long table of a run (``optiscope export``, `RunHistory.to_pandas`), read back with pandas.

The oracle is the run log itself, parsed here with ``json`` (scope lists and samples, no optiscope
code): every value it holds must be exactly one row, with its step, metric, scope and value
(bit for bit: the CSV writes Python's shortest round-trip repr), and nothing else; `load_run`
must hold the same values.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pandas as pd
import pytest

from optiscope.cli import main
from optiscope.dashboards.export import export_run
from optiscope.monitor.history import RunHistory
from optiscope.monitor.runlog import RUNLOG, load_run
from runs import train_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real run with a NaN gradient at step 3 (NaN norms, inf maxima) and a loss scalar."""
    return train_run(tmp_path_factory.mktemp("export") / "run", steps=5, nan_at=3)


def logged_values(run_dir) -> dict[tuple[int, str, str], float]:
    """Every value of the run log, straight from its JSON lines."""
    scopes, values = {}, {}
    for line in (run_dir / RUNLOG).read_text().splitlines():
        record = json.loads(line)
        if record["type"] == "scopes":
            scopes[record["id"]] = record["names"]
        elif record["type"] == "sample":
            for metric, (sid, numbers) in record["values"].items():
                for scope, x in zip(scopes[sid], numbers):
                    key = (record["step"], metric, scope)
                    assert key not in values, f"the run log holds {key} twice"
                    values[key] = float(x)
    return values


def assert_table_is_the_log(df: pd.DataFrame, want: dict, what: str) -> None:
    assert list(df.columns) == ["step", "metric", "scope", "value"], what
    assert len(df) == len(want), f"{what}: {len(df)} rows for {len(want)} values in the run log"
    got = {}
    for step, metric, scope, value in zip(df["step"].tolist(), df["metric"].astype(str).tolist(),
                                          df["scope"].astype(str).tolist(), df["value"].tolist()):
        key = (int(step), metric, scope)
        assert key not in got, f"{what}: two rows for {key}"
        got[key] = float(value)
    extra, missing = sorted(got.keys() - want.keys()), sorted(want.keys() - got.keys())
    assert not extra and not missing, (f"{what}: rows not in the log: {extra[:3]}; values "
                                       f"without a row: {missing[:3]}")
    bad = [k for k, v in want.items()
           if not (got[k] == v or (math.isnan(got[k]) and math.isnan(v)))]
    assert not bad, (f"{what}: {len(bad)} values differ, first {bad[0]}: {got[bad[0]]!r} vs "
                     f"{want[bad[0]]!r}")


def test_the_log_has_nan_and_inf_to_carry(run_dir):
    values = list(logged_values(run_dir).values())
    assert any(math.isnan(v) for v in values) and any(math.isinf(v) for v in values)


def test_load_run_holds_exactly_the_logged_values(run_dir):
    want = logged_values(run_dir)
    history = load_run(run_dir)
    n = sum(len(history.series(m, s)[0]) for m in history.metrics() for s in history.scopes(m))
    assert n == len(want)
    assert_table_is_the_log(history.to_pandas(), want, "to_pandas")


def test_an_empty_history_is_an_empty_table():
    df = RunHistory().to_pandas()
    assert len(df) == 0 and list(df.columns) == ["step", "metric", "scope", "value"]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_the_export_has_one_row_per_logged_value(run_dir, tmp_path, capsys, fmt):
    out = tmp_path / f"run.{fmt}"
    assert main(["export", str(run_dir), "--format", fmt, "-o", str(out)]) == 0
    want = logged_values(run_dir)
    assert f"{len(want)} rows" in capsys.readouterr().out
    df = pd.read_csv(out) if fmt == "csv" else pd.read_parquet(out)
    assert_table_is_the_log(df, want, fmt)
    if fmt == "parquet":
        assert df["step"].dtype == np.int64 and df["value"].dtype == np.float64


def test_the_format_follows_the_suffix(run_dir, tmp_path):
    export_run(run_dir, tmp_path / "a.parquet")
    assert (tmp_path / "a.parquet").read_bytes()[:4] == b"PAR1"
    export_run(run_dir, tmp_path / "a.txt")
    assert (tmp_path / "a.txt").read_text().startswith("step,metric,scope,value\n")


def test_missing_libraries_name_the_extra(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    assert main(["export", str(run_dir), "--format", "parquet", "-o", str(tmp_path / "x")]) == 1
    assert "pip install 'optiscope[parquet]'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["export", str(run_dir), "-o", str(tmp_path / "x.csv")]) == 0  # no pandas needed
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match=r"optiscope\[pandas\]"):
        load_run(run_dir).to_pandas()


def test_bad_input_is_one_line(run_dir, tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing"), "-o", str(tmp_path / "x.csv")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["export", str(run_dir), "-o", str(tmp_path)]) == 1
    assert "is a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["export", str(run_dir), "--format", "xlsx", "-o", str(tmp_path / "x")])
    assert exit_.value.code == 2
