"""How the monitor feeds its dashboards: every record reaches every sink in order, a run log
replayed through `RecordDecoder` gives a sink the same calls, a failing sink is dropped without
stopping training, and ``console=`` / ``sample_next`` / ``report=`` do what they say."""

from __future__ import annotations

import io
import logging

import pytest
import torch
from rich.console import Console

from models import TinyTransformer, train_steps
from optiscope import OptimizerMonitor
from optiscope.dashboards import RecordDecoder, Sink
from optiscope.monitor.runlog import RUNLOG, read_records
from optiscope.optimizers import AdamW


class Recorder(Sink):
    """Keeps every call, values as plain lists, so two recorders can be compared."""

    def __init__(self):
        self.calls = []

    def on_meta(self, changes):
        self.calls.append(("meta", sorted(changes)))

    def on_sample(self, step, time, values):
        self.calls.append(("sample", step, {m: (list(s), [float(x) for x in v])
                                            for m, (s, v) in values.items()}))

    def on_alert(self, alert):
        self.calls.append(("alert", alert.step, alert.kind, alert.tensors))

    def close(self):
        self.calls.append(("close",))


def test_every_record_reaches_the_sink_and_a_replay_matches_it(tmp_path):
    torch.manual_seed(0)
    model = TinyTransformer()
    opt = AdamW(model.parameters(), lr=1e-2, backend="torch")
    live = Recorder()
    mon = OptimizerMonitor(opt, model=model, every=2, log_dir=tmp_path, sinks=[live],
                           tensorboard=False, report=False, strict=True)
    train_steps(mon, model, opt, 9, nan_at=5)
    mon.close()

    kinds = [c[0] for c in live.calls]
    assert kinds[0] == "meta" and kinds[-1] == "close"
    assert [c[1] for c in live.calls if c[0] == "sample"] == [1, 3, 5, 7, 9]
    alerts = [c for c in live.calls if c[0] == "alert"]
    assert alerts[0] == ("alert", 5, "nonfinite_grads", ["q.weight"])  # then NaN spreads
    sample = next(c for c in live.calls if c[0] == "sample")[2]
    assert sample["grad_norm"][0][0] == "global" and "q.weight" in sample["grad_norm"][0]
    assert sample["loss"][0] == ["global"]

    replayed = Recorder()
    RecordDecoder(replayed).feed(read_records(tmp_path / RUNLOG))
    replayed.close()
    def shape(calls):  # values are compared in the next test, to the run log's precision
        return [(c[0], c[1], {m: s for m, (s, _) in c[2].items()}) if c[0] == "sample" else c
                for c in calls if c[0] != "meta"]

    assert shape(replayed.calls) == shape(live.calls)
    # The same metadata keys arrive, whether in the first record or in later updates.
    keys = lambda calls: {k for c in calls if c[0] == "meta" for k in c[1]}  # noqa: E731
    assert keys(replayed.calls) == keys(live.calls)


def test_values_match_within_the_run_logs_precision(tmp_path):
    torch.manual_seed(0)
    model = TinyTransformer()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    live = Recorder()
    with OptimizerMonitor(opt, model=model, log_dir=tmp_path, sinks=[live], tensorboard=False,
                          report=False, strict=True) as mon:
        train_steps(mon, model, opt, 3)
    replayed = Recorder()
    RecordDecoder(replayed).feed(read_records(tmp_path / RUNLOG))
    a = [c for c in live.calls if c[0] == "sample"]
    b = [c for c in replayed.calls if c[0] == "sample"]
    for (_, _, va), (_, _, vb) in zip(a, b, strict=True):
        assert va.keys() == vb.keys()
        for metric in va:
            assert va[metric][0] == vb[metric][0]
            assert va[metric][1] == pytest.approx(vb[metric][1], rel=1e-6, nan_ok=True)


class Broken(Sink):
    def __init__(self):
        self.samples = 0
        self.closed = 0

    def on_sample(self, step, time, values):
        self.samples += 1
        raise RuntimeError("dashboard bug")

    def close(self):
        self.closed += 1


def test_a_failing_sink_is_dropped_and_training_goes_on(caplog):
    torch.manual_seed(0)
    model = TinyTransformer()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    broken, fine = Broken(), Recorder()
    mon = OptimizerMonitor(opt, model=model, sinks=[broken, fine])
    with caplog.at_level(logging.ERROR, logger="optiscope.monitor"):
        train_steps(mon, model, opt, 4)
        mon.close()
    assert broken.samples == 1 and broken.closed == 1, "called once, then switched off"
    assert [c[1] for c in fine.calls if c[0] == "sample"] == [1, 2, 3, 4]
    assert "Broken dashboard failed" in caplog.text
    assert len(mon.history.series("grad_norm")[0]) == 4

    strict = OptimizerMonitor(torch.optim.SGD(model.parameters(), lr=0.1), sinks=[Broken()],
                              strict=True)
    with pytest.raises(RuntimeError, match="dashboard bug"):
        train_steps(strict, model, strict.optimizer, 1)
        strict.close()  # the sample is decoded (and handed to the sinks) at the latest here


def test_sample_next_records_the_step_and_the_scalars_after_it():
    torch.manual_seed(0)
    model = TinyTransformer()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = OptimizerMonitor(opt, model=model, every=4)
    train_steps(mon, model, opt, 6)
    mon.sample_next()
    train_steps(mon, model, opt, 1)
    mon.log_scalar("val_loss", 1.5)
    train_steps(mon, model, opt, 2)
    mon.close()
    assert list(mon.history.series("grad_norm")[0]) == [1, 5, 7, 9]
    steps, values = mon.history.series("val_loss")
    assert list(steps) == [7] and list(values) == [1.5]


def test_console_argument(monkeypatch):
    from optiscope.dashboards.console import ConsoleDashboard

    opt = torch.optim.SGD(TinyTransformer().parameters(), lr=0.1)

    def dashboards(**kwargs):
        mon = OptimizerMonitor(opt, **kwargs)
        found = [s for s in mon.sinks if isinstance(s, ConsoleDashboard)]
        mon.close()
        return found

    monkeypatch.setattr("sys.stdout", io.StringIO())  # not a terminal
    assert dashboards() == [], "auto: off when stdout is not a terminal"
    assert len(dashboards(console=True)) == 1
    assert dashboards(console=False) == []
    console = Console(file=io.StringIO(), width=100)
    (made,) = dashboards(console=console)
    assert made.console is console
    mine = ConsoleDashboard(Console(file=io.StringIO()), top=3)
    assert dashboards(console=mine) == [mine]
    with pytest.raises(ValueError, match="console must be"):
        OptimizerMonitor(opt, console="yes")
    with pytest.raises(TypeError, match="sinks must be"):
        OptimizerMonitor(opt, sinks=[print])
    with pytest.raises(TypeError, match="tensorboard must be"):
        OptimizerMonitor(opt, tensorboard="on")


def test_close_writes_the_report_and_png_into_the_run_directory(tmp_path):
    torch.manual_seed(0)
    model = TinyTransformer()
    opt = AdamW(model.parameters(), lr=1e-2, backend="torch")
    with OptimizerMonitor(opt, model=model, log_dir=tmp_path / "run", console=False) as mon:
        train_steps(mon, model, opt, 4)
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"report.html", "trends.png", "runlog.jsonl", "meta.json"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)

    with OptimizerMonitor(opt, model=model, log_dir=tmp_path / "bare", tensorboard=False,
                          report=False) as mon:
        train_steps(mon, model, opt, 2)
    assert {p.name for p in (tmp_path / "bare").iterdir()} == {"runlog.jsonl", "meta.json"}
