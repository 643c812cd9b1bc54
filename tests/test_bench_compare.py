"""benchmarks/compare.py: the side-by-side table of two revisions' step times (the runs
themselves are `python -m benchmarks`, tested in test_bench.py)."""

from __future__ import annotations

import pytest

from benchmarks.compare import main, table


def _doc(times: dict) -> dict:
    return {"rows": [{"workload": w, "case": c, "ms_median": t} for (w, c), t in times.items()]
            + [{"workload": "w", "case": "failed", "ms_median": None}]}


def test_the_table_gives_each_sides_median_over_rounds_and_their_ratio():
    base = [_doc({("w", "a"): t, ("w", "b"): 2.0}) for t in (1.0, 3.0, 2.0)]
    head = [_doc({("w", "a"): t, ("w", "c"): 5.0}) for t in (4.0, 1.0, 3.0)]
    lines = table(base, head, ("old", "new")).splitlines()
    assert lines[0] == "| workload | case | old ms | new ms | ratio |"
    # a: medians 2 (of 1, 3, 2) and 3 (of 4, 1, 3); b only in base, c only in head
    assert "| w | a | 2 | 3 | 1.500 |" in lines
    assert "| w | b | 2 | — | — |" in lines
    assert "| w | c | — | 5 | — |" in lines
    assert not any("failed" in line for line in lines)
    assert lines[-1] == "median ratio over 1 rows: 1.500"


def test_fewer_than_one_round_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["HEAD", "--rounds", "0"])
    assert exc.value.code == 2
    assert "--rounds must be at least 1, got 0" in capsys.readouterr().err
