"""The run log's writer thread (optiscope/monitor/runlog_writer.py): the file it writes is, byte
for byte and record for record, the one the writer wrote on the training thread (the format of
the module docstring of optiscope/monitor/runlog.py, rebuilt here from `values_json`, whose
floats are Python's repr); scope lists are recognised by identity only while unchanged; the
caller's numbers are copied; flush, close and the end of the process write everything queued.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import optiscope.kernels.cpu_format as cpu_format
from optiscope.kernels import cpu
from optiscope.monitor.history import Alert
from optiscope.monitor.runlog import RUNLOG, RunLogWriter, load_run, read_records
from optiscope.monitor import runlog_writer
from optiscope.monitor.runlog_writer import histogram_rows, values_json

ROOT = Path(__file__).resolve().parent.parent


class Expected:
    """The lines a run log must hold, built from the format's description."""

    def __init__(self):
        self.lines: list[str] = []
        self.ids: dict[tuple, int] = {}

    def scope_id(self, scopes) -> int:
        key = tuple(scopes)
        if key not in self.ids:
            self.ids[key] = len(self.ids)
            self.lines.append(json.dumps({"type": "scopes", "id": self.ids[key],
                                          "names": list(key)}))
        return self.ids[key]

    def sample(self, step, time, values, histograms=None) -> None:
        parts = [f"{json.dumps(m)}:[{self.scope_id(s)},{values_json(v)}]"
                 for m, (s, v) in values.items()]
        self.lines.append(f'{{"type":"sample","step":{step},"time":{time:.3f},'
                          f'"values":{{{",".join(parts)}}}}}')
        if histograms:
            parts = [f"{json.dumps(q)}:[{self.scope_id(s)},{histogram_rows(c)}]"
                     for q, (s, c) in histograms.items()]
            self.lines.append(f'{{"type":"histograms","step":{step},'
                              f'"values":{{{",".join(parts)}}}}}')

    def text(self) -> bytes:
        return "".join(line + "\n" for line in self.lines).encode()


def a_run(log_dir: Path) -> Expected:
    """Writes every kind of record, interleaved, and returns what the file must hold."""
    rng = np.random.default_rng(0)
    tensors = [f"layer{i}.weight" for i in range(148)]
    scopes = ["global", *tensors]
    expected = Expected()
    writer = RunLogWriter(log_dir)
    meta = {"optimizer": "AdamW", "every": 1}
    writer.write_meta(meta)
    expected.lines.append(json.dumps({"type": "meta", **meta}, default=str))
    for step in range(1, 7):
        per = rng.standard_normal(149) * 10.0 ** rng.uniform(-12, 12, 149)
        per[[3, 7]] = [math.nan, -math.inf]
        values = {
            "grad_norm": (scopes, per),
            "update_ratio": (scopes, np.abs(per) / 3.0),
            "state_bytes": (["global", *tensors, "key/exp_avg"],  # a new list at each step
                            [int(x) for x in rng.integers(0, 2**40, 150)]),
            "lr": ([f"group{i}" for i in range(2)], [1e-3 * step, 2.0**-step]),
            "loss": (["global"], [float(rng.random())]),
        }
        histograms = None
        if step % 2 == 0:
            counts = np.rint(rng.exponential(1e3, (148, 148)) * (rng.random((148, 148)) < .2))
            histograms = {"grad": (tensors, counts), "update": (tensors[:5], counts[:5])}
        time = 1.7e9 + step / 7
        writer.write_sample(step, time, values, histograms)
        expected.sample(step, time, values, histograms)
        if step == 2:
            alert = Alert(step, "grad_spike", "grad_norm", ["global"], "a spike", 12.5)
            writer.write_alert(alert)
            expected.lines.append(json.dumps({"type": "alert", **alert.to_json()}))
        if step == 3:
            writer.update_meta({"skipped_metrics": {"quant_error": "none"}})
            expected.lines.append(json.dumps({"type": "meta", "skipped_metrics":
                                              {"quant_error": "none"}}))
            scopes[5] = "renamed.weight"  # the same list object, changed in place
        if step == 5:
            writer.write_resume(4)
            expected.lines.append(json.dumps({"type": "resume", "step": 4}))
    writer.close()
    return expected


@pytest.mark.parametrize("formatting", ["C", "Python"])
def test_the_file_is_the_format_record_for_record(tmp_path, monkeypatch, formatting):
    if formatting == "C" and cpu.kernel() is None:
        pytest.skip("no C compiler: the run log formats in Python")
    if formatting == "Python":
        monkeypatch.setattr(cpu_format, "formatter", lambda: None)
    expected = a_run(tmp_path)
    written = (tmp_path / RUNLOG).read_bytes()
    assert written.splitlines() == expected.text().splitlines()
    assert written == expected.text()
    # the list changed in place was declared again, and nothing else was
    declared = [r["names"] for r in read_records(tmp_path / RUNLOG) if r["type"] == "scopes"]
    assert sum("renamed.weight" in names for names in declared) == 1
    assert len(declared) == len({tuple(n) for n in declared})


def test_the_callers_numbers_are_copied(tmp_path):
    writer = RunLogWriter(tmp_path)
    numbers, listed = np.array([1.5, 2.5]), [3.0, 4.0]
    counts = np.array([[0.0, 2.0, 1.0]])
    writer.write_sample(1, 0.0, {"a": (["x", "y"], numbers), "b": (["x", "y"], listed)},
                        {"grad": (["x"], counts)})
    numbers[:], listed[:], counts[:] = -1.0, [-1.0, -1.0], 9.0  # before the thread writes them
    writer.close()
    sample, hist = [r for r in read_records(tmp_path / RUNLOG) if r["type"] != "scopes"]
    assert sample["values"] == {"a": [0, [1.5, 2.5]], "b": [0, [3, 4]]}
    assert hist["values"] == {"grad": [1, [[1, 2, 1]]]}


def test_flush_puts_every_record_given_in_the_file(tmp_path):
    writer = RunLogWriter(tmp_path)
    try:
        for step in range(1, 51):
            writer.write_sample(step, 0.0, {"m": (["global"], [step / 3])})
            writer.flush()
            lines = (tmp_path / RUNLOG).read_bytes().splitlines()
            assert len(lines) == step + 1 and json.loads(lines[-1])["step"] == step
        for step in range(51, 101):
            writer.write_sample(step, 0.0, {"m": (["global"], [step / 3])})
        # this process's readers wait for its writer
        assert load_run(tmp_path).series("m", "global")[0].tolist() == list(range(1, 101))
    finally:
        writer.close()


def test_bad_numbers_fail_at_the_call_and_the_writer_goes_on(tmp_path):
    writer = RunLogWriter(tmp_path)
    with pytest.raises(ValueError):
        writer.write_sample(1, 0.0, {"m": (["global"], ["not a number"])})
    with pytest.raises(ValueError, match="finite"):
        writer.write_sample(1, 0.0, {"m": (["global"], [1.0])},
                            {"grad": (["x"], np.array([[math.nan]]))})
    writer.write_sample(2, 0.0, {"m": (["a", "b"], np.array([[1.0], [2.0]]))})  # 2-D: flattened
    writer.close()
    samples = [r for r in read_records(tmp_path / RUNLOG) if r["type"] == "sample"]
    assert [(r["step"], r["values"]["m"][1]) for r in samples] == [(2, [1, 2])]


def test_a_writer_never_closed_is_written_out_at_exit(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from optiscope.monitor.runlog import RunLogWriter
        writer = RunLogWriter(sys.argv[1])
        for step in range(1, 201):
            writer.write_sample(step, 0.0, {{"m": (["global"], [step / 7])}})
    """)
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=120)
    steps = [r["step"] for r in read_records(tmp_path / RUNLOG) if r["type"] == "sample"]
    assert steps == list(range(1, 201))


def lines_on_disk_within(log: Path, count: int, seconds: float) -> int:
    """How many lines the file holds once it has ``count``, or after ``seconds`` (no flush: as
    another process following the log sees it)."""
    deadline = time.monotonic() + seconds
    while True:
        n = len(log.read_bytes().splitlines())
        if n >= count or time.monotonic() > deadline:
            return n
        time.sleep(0.005)


def test_records_reach_the_disk_without_a_flush_also_after_the_thread_idled(tmp_path):
    writer = RunLogWriter(tmp_path)
    log = tmp_path / RUNLOG
    try:
        writer.write_sample(1, 0.0, {"m": (["global"], [1.0])})  # scopes and the sample
        assert lines_on_disk_within(log, 2, 5.0) == 2
        time.sleep(runlog_writer.IDLE_S + 0.3)  # the thread sleeps until a record wakes it
        writer.write_sample(2, 0.0, {"m": (["global"], [2.0])})
        assert lines_on_disk_within(log, 3, 5.0) == 3
    finally:
        writer.close()


def test_a_record_that_fails_to_format_is_logged_and_the_next_ones_are_written(
        tmp_path, monkeypatch, caplog):
    real, failed = runlog_writer.Appender._sample_lines, []

    def fails_once(self, step, *args):
        if step == 2 and not failed:
            failed.append(step)
            raise RuntimeError("formatting failed")
        return real(self, step, *args)

    monkeypatch.setattr(runlog_writer.Appender, "_sample_lines", fails_once)
    writer = RunLogWriter(tmp_path)
    for step in (1, 2, 3):
        writer.write_sample(step, 0.0, {"m": (["global"], [step / 3])})
    writer.close()
    assert failed == [2]
    assert [r["step"] for r in read_records(tmp_path / RUNLOG) if r["type"] == "sample"] == [1, 3]
    assert any("formatting failed" in r.getMessage() or "formatting failed" in str(r.exc_info)
               for r in caplog.records)


def test_the_monitors_state_dict_leaves_the_log_in_step_with_the_checkpoint(tmp_path,
                                                                             monkeypatch):
    """`state_dict()` (taken for a checkpoint) returns only when what the writer thread holds is
    on disk: the file, read raw, has every sample the monitor decoded so far."""
    import torch

    from optiscope import OptimizerMonitor

    monkeypatch.setattr(runlog_writer, "GATHER_S", 30.0)  # the thread would hold them 30 s
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = OptimizerMonitor(opt, model=model, log_dir=tmp_path, console=False, tensorboard=False,
                           report=False)
    for _ in range(5):
        model(torch.randn(2, 4)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    decoded = mon.history.series("grad_norm")[0].tolist()
    mon.state_dict()
    lines = (tmp_path / RUNLOG).read_text().splitlines()
    on_disk = [json.loads(line)["step"] for line in lines if '"type":"sample"' in line]
    mon.close()
    assert decoded and on_disk == decoded
