"""Every reader of a run log goes through one decoder with a schema: a record that does not fit
(a step of 10**30, values that are not an object, a number beyond a float, names that are not
strings, ...) is skipped and counted with one warning, through `load_run`, ``optiscope report``,
``optiscope watch --once`` and ``optiscope tensorboard``; the records around it are kept."""

from __future__ import annotations

import json
import warnings

import pytest

from optiscope import load_run
from optiscope.cli import main
from optiscope.monitor.records import RecordDecoder
from optiscope.monitor.runlog import RUNLOG
from runs import train_run


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    run = train_run(tmp_path_factory.mktemp("clean") / "run", steps=3)
    lines = (run / RUNLOG).read_text().splitlines(keepends=True)
    global_id = next(r["id"] for r in map(json.loads, lines)
                     if r["type"] == "scopes" and r["names"] == ["global"])
    return lines, global_id


def _bad_records(g: int) -> dict[str, str]:
    """One malformed line per case (JSON text: some are not what json.dumps would write)."""
    sample = '{"type": "sample", "step": %s, "time": 1.0, "values": %s}'
    loss = '{"loss": [%d, [0.5]]}' % g
    return {
        "step 10**30": sample % (10**30, loss),
        "step -1": sample % (-1, loss),
        "step a string": sample % ('"7"', loss),
        "step a bool": sample % ("true", loss),
        "step a float": sample % ("7.0", loss),
        "values []": sample % (7, "[]"),
        "values entry not a pair": sample % (7, '{"loss": [%d]}' % g),
        "too many numbers": sample % (7, '{"loss": [%d, [0.5, 0.6]]}' % g),
        "a number as a string": sample % (7, '{"loss": [%d, ["0.5"]]}' % g),
        "a number beyond a float": sample % (7, '{"loss": [%d, [%d]]}' % (g, 10**400)),
        "time 10**400": '{"type": "sample", "step": 7, "time": %d, "values": %s}' % (10**400, loss),
        "scope names not strings": '{"type": "scopes", "id": 99, "names": [1, 2]}',
        "scope id negative": '{"type": "scopes", "id": -1, "names": ["a"]}',
        "alert step 10**30": json.dumps(dict(type="alert", step=10**30, kind="grad_spike",
                                             metric="grad_norm", tensors=["global"], message="x",
                                             value=1.0)),
        "alert without message": json.dumps(dict(type="alert", step=2, kind="grad_spike",
                                                 metric="grad_norm", tensors=["global"])),
        "alert tensors not strings": json.dumps(dict(type="alert", step=2, kind="k", metric="m",
                                                     tensors=[1], message="x")),
        "not an object": "[1, 2, 3]",
        "unknown type": '{"type": "mystery", "step": 1}',
        "meta steps_taken 10**30": '{"type": "meta", "steps_taken": %d}' % 10**30,
    }


def _write(dir_, lines):
    dir_.mkdir(parents=True, exist_ok=True)
    (dir_ / RUNLOG).write_text("".join(lines))
    return dir_


def _load_clean(lines, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return load_run(_write(tmp_path / "clean", lines))


@pytest.mark.parametrize("case", list(_bad_records(0)))
def test_load_run_skips_and_counts_a_record_that_does_not_fit(case, clean_run, tmp_path):
    lines, g = clean_run
    expected = _load_clean(lines, tmp_path)
    bad = _bad_records(g)[case] + "\n"
    # the bad record in the middle: what follows it is kept
    damaged = _write(tmp_path / "damaged", lines[:-2] + [bad] + lines[-2:])
    with pytest.warns(RuntimeWarning, match=r"skipped 1 record\(s\) that do not fit") as caught:
        got = load_run(damaged)
    assert len([w for w in caught if "do not fit" in str(w.message)]) == 1
    assert got == expected, f"{case}: the other records changed"


def test_a_sample_naming_an_undeclared_scope_list_keeps_its_other_metrics(clean_run, tmp_path):
    lines, g = clean_run
    record = {"type": "sample", "step": 9, "time": 1.0,
              "values": {"loss": [g, [0.25]], "orphan": [12345, [1.0]]}}
    run = _write(tmp_path / "run", lines + [json.dumps(record) + "\n"])
    with pytest.warns(RuntimeWarning, match="never declared"):
        got = load_run(run)
    assert got.series("loss")[0][-1] == 9 and got.series("loss")[1][-1] == 0.25
    assert "orphan" not in got.metrics()


def test_non_finite_values_are_values(clean_run, tmp_path):
    """NaN and ±Infinity are what the monitor writes for a non-finite gradient: kept."""
    lines, g = clean_run
    extra = ['{"type": "sample", "step": 9, "values": {"loss": [%d, [%s]]}}\n' % (g, x)
             for x in ("NaN", "Infinity", "-Infinity")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = load_run(_write(tmp_path / "run", lines + extra))
    steps, values = got.series("loss")
    assert list(steps[-1:]) == [9] and str(values[-1]) == "-inf"


def test_the_decoder_counts_by_reason_and_warns_once_per_feed(clean_run):
    lines, g = clean_run
    bad = _bad_records(g)

    class Sink:
        def __init__(self):
            self.samples = []

        def on_meta(self, changes):
            pass

        def on_sample(self, step, time, values):
            self.samples.append(step)

        def on_alert(self, alert):
            pass

    sink = Sink()
    decoder = RecordDecoder(sink, source="test log")
    records = [json.loads(line) for line in lines] + [json.loads(bad[c]) for c in bad]
    with pytest.warns(RuntimeWarning) as caught:
        decoder.feed(records)
    assert len(caught) == 1 and f"test log: skipped {len(bad)} record(s)" in str(caught[0].message)
    assert decoder.skipped == len(bad)
    assert sink.samples == [1, 2, 3]
    assert any("step is not an int in 0..2**62" in r for r in decoder.reasons)
    assert decoder.reasons["sample: values is not an object"] == 1


# ------------------------------------------------------------------------------------ the CLI
@pytest.fixture(scope="module")
def damaged_run(clean_run, tmp_path_factory):
    lines, g = clean_run
    bad = [line + "\n" for line in _bad_records(g).values()]
    run = _write(tmp_path_factory.mktemp("damaged") / "run", lines[:-2] + bad + lines[-2:])
    return run, len(bad)


def _cli(capfd, *argv):
    """``optiscope ARGV``: exit status, stdout, and stderr with the warnings it would print."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status = main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return status, out, err + "".join(f"{w.category.__name__}: {w.message}\n" for w in caught)


def test_report_skips_and_counts(damaged_run, capfd, tmp_path):
    run, n = damaged_run
    status, out, err = _cli(capfd, "report", run, "-o", tmp_path / "r.html", "--no-png")
    assert status == 0, err
    assert f"skipped {n} record(s)" in err and (tmp_path / "r.html").stat().st_size > 0


def test_watch_once_skips_and_counts(damaged_run, capfd):
    run, n = damaged_run
    status, out, err = _cli(capfd, "watch", run, "--once")
    assert status == 0, err
    assert f"skipped {n} record(s)" in err and "step" in out


def test_tensorboard_skips_and_counts(damaged_run, capfd, tmp_path):
    run, n = damaged_run
    status, out, err = _cli(capfd, "tensorboard", run, "--out", tmp_path / "tb")
    assert status == 0, err
    assert f"skipped {n} record(s)" in err and list((tmp_path / "tb").glob("*tfevents*"))


def test_watch_once_with_rich_markup_in_a_scalar_name(clean_run, capfd, tmp_path):
    lines, g = clean_run
    extra = ['{"type": "sample", "step": 4, "values": {"[/]loss": [%d, [0.5]], '
             '"[bold red]x": [%d, [1.5]]}}\n' % (g, g)]
    run = _write(tmp_path / "run", lines + extra)
    status, out, err = _cli(capfd, "watch", run, "--once")
    assert status == 0, err
    assert "[/]loss" in out
