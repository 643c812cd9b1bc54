"""The run directory: the run log and ``meta.json`` that ``OptimizerMonitor(log_dir=...)`` writes
and `load_run` reads back.

Acceptance tests on tiny real models (a real loss, a real backward), with foreign optimizers
(``torch.optim.AdamW``, SGD with momentum) and a bundled one (optiscope's AdamW, torch backend):
the log read back is the monitor's own history; it is readable while it grows; it survives a
SIGKILL, torn and corrupt lines, an unwritable directory, a full disk and short writes;
non-finite values round-trip; ``meta.json`` describes the run.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from torch import nn

import optiscope
from optiscope import OptimizerMonitor, RunHistory, load_run
from optiscope.monitor import runlog
from optiscope.monitor.runlog import META, RUNLOG, RunLogError, RunLogWriter, read_records
from optiscope.optimizers import AdamW

TESTS = Path(__file__).resolve().parent

NAN_TENSOR = "0.weight"  # the tensor whose gradient gets a NaN entry


@dataclass(frozen=True)
class Opt:
    """An optimizer to watch: a foreign one, or one optiscope bundles."""

    name: str
    make: Callable[[object], torch.optim.Optimizer]


TORCH_ADAMW = Opt("torch-AdamW", lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1))
TORCH_SGD = Opt("torch-SGD-momentum", lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9))
BUNDLED_ADAMW = Opt("optiscope-AdamW", lambda ps: AdamW(ps, lr=1e-2, backend="torch"))
OPTIMIZERS = [TORCH_ADAMW, TORCH_SGD, BUNDLED_ADAMW]
FOREIGN_AND_BUNDLED = [TORCH_SGD, BUNDLED_ADAMW]


def tiny_model() -> nn.Module:
    """Three linear layers of odd sizes, the last with one output (a [1] bias)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 1))


def setup(case: Opt = TORCH_ADAMW) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = tiny_model()
    return model, case.make(model.parameters())


def train(model, opt, mon, steps: int, *, first: int = 1, nan_at: int | None = None,
          after_step: Callable[[int], None] | None = None) -> None:
    """Steps ``first .. first+steps-1`` of a regression on a fixed batch, as a user writes them.

    At step ``nan_at`` one entry of `NAN_TENSOR`'s gradient is NaN; ``after_step(step)`` runs
    between steps, with the monitor attached.
    """
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 6, generator=g)
    y = x.sum(1, keepdim=True).sin()
    for step in range(first, first + steps):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if step == nan_at:
            model[0].weight.grad[0, 0] = math.nan
        opt.step()
        opt.zero_grad()
        mon.log_scalar("loss", loss)
        if after_step is not None:
            after_step(step)


# ----------------------------------------------------------------------------------- helpers
def assert_log_exact(actual, expected, *, what: str) -> None:
    """The very float64 values, bit for bit (NaN for NaN): the log writes floats so that they
    read back exactly."""
    a, e = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: {a.shape[0]} values read back, {e.shape[0]} in memory"
    bad = (a.view(np.int64) != e.view(np.int64)) & ~(np.isnan(a) & np.isnan(e))
    if bad.any():
        worst = int(np.argmax(bad))
        raise AssertionError(f"{what}: {int(bad.sum())} of {a.size} values differ; first at "
                             f"{worst}: read back {a[worst]!r}, in memory {e[worst]!r}")


def assert_same_history(loaded: RunHistory, expected: RunHistory, *, what: str) -> None:
    """`load_run`'s history is the monitor's: metrics, scopes, steps, values, alerts, meta."""
    assert loaded.metrics() == expected.metrics(), f"{what}: metrics differ"
    for metric in expected.metrics():
        assert loaded.scopes(metric) == expected.scopes(metric), f"{what}: scopes of {metric}"
        for scope in expected.scopes(metric):
            got_steps, got = loaded.series(metric, scope)
            want_steps, want = expected.series(metric, scope)
            assert got_steps.tolist() == want_steps.tolist(), f"{what}: steps of {metric}/{scope}"
            assert_log_exact(got, want, what=f"{what}: {metric}/{scope}")
    assert loaded.alerts == expected.alerts, f"{what}: alerts differ"
    # "skipped_metrics" is learnt at the first sample, after the log's meta record was written:
    # see test_metadata_learnt_during_the_run_reaches_the_log.
    assert set(loaded.meta) <= set(expected.meta), f"{what}: meta keys only in the log"
    assert set(expected.meta) - set(loaded.meta) <= {"skipped_metrics"}, \
        f"{what}: meta keys missing from the log: {set(expected.meta) - set(loaded.meta)}"
    for key, value in loaded.meta.items():
        assert value == expected.meta[key], f"{what}: meta[{key!r}]"


def load_quietly(path) -> RunHistory:
    """`load_run`, failing on any warning: a clean log has no torn or corrupt line."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return load_run(path)


def sample_steps(log: Path) -> list[int]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return [r["step"] for r in read_records(log) if r["type"] == "sample"]


class FlakyDisk:
    """Stands in for ``os.write`` as runlog.py calls it, on the run log only: raises ENOSPC
    (``mode="full"``) or writes the first half of the line (``mode="short"``) while told to."""

    def __init__(self, monkeypatch, log: Path):
        self.real = os.write
        self.log = log
        self.mode: str | None = None
        self.failures = 0
        monkeypatch.setattr(runlog.os, "write", self)

    def __call__(self, fd: int, data) -> int:
        if self.mode is None or not self._is_log(fd):
            return self.real(fd, data)
        self.failures += 1
        if self.mode == "full":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.real(fd, bytes(data)[: len(data) // 2])

    def _is_log(self, fd: int) -> bool:
        st, ref = os.fstat(fd), self.log.stat()
        return (st.st_dev, st.st_ino) == (ref.st_dev, ref.st_ino)


def no_hooks(opt: torch.optim.Optimizer) -> bool:
    return not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


# ------------------------------------------------------------------- 1. the log is the history
@pytest.mark.parametrize("case", OPTIMIZERS, ids=lambda c: c.name)
def test_load_run_returns_the_monitors_history(tmp_path, case):
    model, opt = setup(case)
    with OptimizerMonitor(opt, model=model, log_dir=tmp_path) as mon:
        train(model, opt, mon, 6, nan_at=5)
    loaded = load_quietly(tmp_path)

    assert isinstance(loaded, RunHistory)
    assert_same_history(loaded, mon.history, what=case.name)
    # Not vacuous: the optimizer's metrics, the user's scalar, every step, the NaN alert.
    assert {"grad_norm", "update_ratio", "weight_norm", "state_bytes", "lr", "loss"} \
        <= set(loaded.metrics())
    assert loaded.series("lr", "group0")[0].tolist() == [1, 2, 3, 4, 5, 6]
    assert loaded.scopes("grad_norm") == ["global"] + [n for n, _ in model.named_parameters()]
    first = loaded.alerts[0]
    assert (first.step, first.kind, first.tensors) == (5, "nonfinite_grads", [NAN_TENSOR])


def test_run_history_equality_compares_the_series():
    a, b = RunHistory(meta={"run": 1}), RunHistory(meta={"run": 1})
    for h in (a, b):
        h.add(1, "grad_norm", ["global", "w"], [1.5, math.nan])
    assert a == b
    b.add(2, "grad_norm", ["global"], [2.0])
    assert a != b, "two histories with the same meta and alerts but different series compared equal"


# -------------------------------------------------------------- 2. readable while it is written
def test_the_log_is_readable_while_the_monitor_writes_it(tmp_path):
    model, opt = setup(BUNDLED_ADAMW)
    mon = OptimizerMonitor(opt, model=model, every=2, log_dir=tmp_path)
    follower = open(tmp_path / RUNLOG, "rb")  # follows the file as it grows, like `optiscope watch`
    followed: list[dict] = []

    def read_now(step: int) -> None:
        # Records reach the file from the writer's thread a moment after the step that gave
        # them; a reader in the training process waits for them (load_run does it itself).
        mon.writer.flush()
        new = follower.read()
        assert new == b"" or new.endswith(b"\n"), \
            f"after step {step} the log ends in a partial line: ...{new[-60:]!r}"
        followed.extend(json.loads(line) for line in new.splitlines())
        assert_same_history(load_quietly(tmp_path), mon.history, what=f"after step {step}")
        written = [r["step"] for r in followed if r["type"] == "sample"]
        sampled = [s for s in range(1, step + 1) if mon.is_sampled(s)]
        # The sample of the step just taken may wait for its log_scalar calls; no other may.
        assert written in (sampled, [s for s in sampled if s < step]), \
            f"after step {step}: samples {written} in the log, {sampled} taken"

    try:
        train(model, opt, mon, 7, after_step=read_now)
        mon.close()
        read_now(7)
    finally:
        follower.close()
    assert sample_steps(tmp_path / RUNLOG) == [1, 3, 5, 7]
    assert followed == list(read_records(tmp_path / RUNLOG))


# ---------------------------------------------------------------------------------- 3. crashes
CRASH_STEPS = 5

# Trains in a subprocess until step CRASH_STEPS, writes what its monitor has recorded so far to a
# marker file, then waits, mid-loop, to be killed.
CHILD = textwrap.dedent("""
    import json, os, sys, time
    from test_runlog import BUNDLED_ADAMW, setup, train
    from optiscope import OptimizerMonitor

    log_dir, marker, last = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model, opt = setup(BUNDLED_ADAMW)
    mon = OptimizerMonitor(opt, model=model, log_dir=log_dir)

    def after_step(step):
        if step < last:
            return
        # What the process must have on disk before it may die: a SIGKILL loses the records
        # still queued for the writer's thread.
        mon.writer.flush()
        h = mon.history
        series = {m: {s: [a.tolist() for a in h.series(m, s)] for s in h.scopes(m)}
                  for m in h.metrics()}
        with open(marker + ".tmp", "w") as f:
            json.dump(series, f)
        os.replace(marker + ".tmp", marker)
        while True:
            time.sleep(1)

    train(model, opt, mon, last + 100, after_step=after_step)
    raise SystemExit("not killed")
""")


@pytest.fixture(scope="module")
def crashed_run(tmp_path_factory) -> tuple[Path, dict]:
    """A run directory whose training process was SIGKILLed mid-run, and what its monitor held."""
    root = tmp_path_factory.mktemp("crashed")
    log_dir, marker = root / "run", root / "recorded.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(TESTS), str(TESTS.parent)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(log_dir), str(marker),
                             str(CRASH_STEPS)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"the training subprocess exited ({proc.returncode}) before step "
                            f"{CRASH_STEPS}:\n{proc.stderr.read().decode()[-3000:]}")
            assert time.monotonic() < deadline, f"no step {CRASH_STEPS} after 120 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return log_dir, json.loads(marker.read_text())


def copy_run(crashed_run, tmp_path) -> tuple[Path, dict]:
    log_dir, recorded = crashed_run
    return Path(shutil.copytree(log_dir, tmp_path / "run")), recorded


def test_a_run_killed_mid_run_leaves_a_log_that_load_run_reads(crashed_run, tmp_path):
    run, recorded = copy_run(crashed_run, tmp_path)
    loaded = load_quietly(run)  # killed between two writes: no torn line

    assert loaded.metrics() == list(recorded)
    for metric, scopes in recorded.items():
        assert loaded.scopes(metric) == list(scopes)
        for scope, (steps, values) in scopes.items():
            got_steps, got = loaded.series(metric, scope)
            assert got_steps.tolist() == steps, f"steps of {metric}/{scope}"
            assert_log_exact(got, values, what=f"{metric}/{scope}")
    # Everything sampled before the kill, except at most the sample still in flight.
    steps = loaded.series("lr", "group0")[0].tolist()
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= CRASH_STEPS - 1, steps
    assert json.loads((run / META).read_text())["optimizer_name"] == "AdamW"


def append_torn_line(log: Path) -> bytes:
    """Appends the first half of a sample line, as a crash in the middle of its write leaves."""
    last = log.read_bytes().splitlines()[-1]
    torn = last[: len(last) // 2]
    with open(log, "ab") as f:
        f.write(torn)
    return torn


def test_a_torn_last_line_is_skipped_with_a_warning(crashed_run, tmp_path):
    run, _ = copy_run(crashed_run, tmp_path)
    before = load_quietly(run)
    append_torn_line(run / RUNLOG)
    with pytest.warns(RuntimeWarning, match=r"last line"):
        after = load_run(run)
    assert after == before, "records before the torn line were lost"


def test_a_corrupt_middle_line_is_skipped_with_a_warning(crashed_run, tmp_path):
    run, _ = copy_run(crashed_run, tmp_path)
    log = run / RUNLOG
    before = load_quietly(run)
    lines = log.read_bytes().splitlines(keepends=True)
    number = next(i for i, line in enumerate(lines) if b'"step":2,' in line)
    lines[number] = lines[number][:40] + b"\x00garbage\n"
    log.write_bytes(b"".join(lines))

    with pytest.warns(RuntimeWarning, match=rf"line {number + 1} is not valid JSON"):
        after = load_run(run)
    assert after.metrics() == before.metrics()
    for metric in before.metrics():
        for scope in before.scopes(metric):
            steps, values = before.series(metric, scope)
            kept = steps != 2
            got_steps, got = after.series(metric, scope)
            assert got_steps.tolist() == steps[kept].tolist(), f"steps of {metric}/{scope}"
            assert got.tolist() == values[kept].tolist(), f"values of {metric}/{scope}"


def test_a_corrupt_scope_declaration_loses_only_the_values_that_need_it(crashed_run, tmp_path):
    run, _ = copy_run(crashed_run, tmp_path)
    log = run / RUNLOG
    before = load_quietly(run)
    lines = log.read_bytes().splitlines(keepends=True)
    number = next(i for i, line in enumerate(lines) if line.startswith(b'{"type": "scopes"')
                  and json.loads(line)["names"] == ["global"])
    lines[number] = lines[number][:20] + b"\n"
    log.write_bytes(b"".join(lines))

    with pytest.warns(RuntimeWarning) as caught:
        after = load_run(run)
    messages = [str(w.message) for w in caught]
    assert any(f"line {number + 1} is not valid JSON" in m for m in messages), messages
    assert any("never declared" in m for m in messages), messages
    lost = {m for m in before.metrics() if before.scopes(m) == ["global"]}
    assert "loss" in lost and set(after.metrics()) == set(before.metrics()) - lost
    for metric in after.metrics():
        for scope in after.scopes(metric):
            assert [a.tolist() for a in after.series(metric, scope)] == \
                   [b.tolist() for b in before.series(metric, scope)], f"{metric}/{scope}"


def test_resume_after_a_crash_cuts_the_torn_line_and_continues(crashed_run, tmp_path):
    run, _ = copy_run(crashed_run, tmp_path)
    crashed = load_quietly(run)
    last = crashed.last_step()
    append_torn_line(run / RUNLOG)

    model, opt = setup(BUNDLED_ADAMW)
    with pytest.warns(RuntimeWarning, match="cut off its torn last line"):
        mon = OptimizerMonitor(opt, model=model, log_dir=run, resume=True)
    train(model, opt, mon, 3, first=last + 1)
    mon.close()

    loaded = load_quietly(run)  # the torn line is gone, and did not swallow the first new line
    assert sample_steps(run / RUNLOG) == list(range(1, last + 4))
    assert_same_history(loaded, mon.history, what="resumed")
    for metric in crashed.metrics():
        for scope in crashed.scopes(metric):
            steps, values = loaded.series(metric, scope)
            old = steps <= last
            assert [steps[old].tolist(), values[old].tolist()] == \
                   [a.tolist() for a in crashed.series(metric, scope)], f"{metric}/{scope}"


# ------------------------------------------------------------- 4. bad directories and resuming
def test_an_unwritable_log_dir_fails_at_construction(tmp_path, monkeypatch):
    model, opt = setup()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")

    # Tests run as root, for whom chmod stops nothing: a parent that is a regular file does.
    quoted = re.escape(repr(str(blocker / "run")))
    with pytest.raises(RunLogError, match=rf"cannot create log_dir {quoted}.*pass a writable") \
            as caught:
        OptimizerMonitor(opt, model=model, log_dir=blocker / "run")
    assert isinstance(caught.value, OSError)
    with pytest.raises(RunLogError, match="is a file, not a directory"):
        OptimizerMonitor(opt, model=model, log_dir=blocker)

    real_open = os.open

    def refuse(path, *args, **kwargs):
        if os.fspath(path).endswith(RUNLOG):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(runlog.os, "open", refuse)
    with pytest.raises(RunLogError, match=r"cannot write the run log .*Permission denied; pass a "
                                          r"writable log_dir"):
        OptimizerMonitor(opt, model=model, log_dir=tmp_path / "refused")
    monkeypatch.undo()
    assert no_hooks(opt), "a monitor that failed to start left its hooks on the optimizer"


def test_an_existing_run_log_needs_resume(tmp_path):
    model, opt = setup()
    with OptimizerMonitor(opt, model=model, log_dir=tmp_path) as mon:
        train(model, opt, mon, 2)
    log = tmp_path / RUNLOG
    written = log.read_bytes()

    model, opt = setup()
    with pytest.raises(FileExistsError, match="resume=True") as caught:
        OptimizerMonitor(opt, model=model, log_dir=tmp_path)
    assert repr(str(log)) in str(caught.value) and "new log_dir" in str(caught.value)
    assert log.read_bytes() == written, "the refused monitor touched the existing run log"
    assert no_hooks(opt)


@pytest.mark.parametrize("case", FOREIGN_AND_BUNDLED, ids=lambda c: c.name)
def test_resume_appends_and_continues_the_step_count(tmp_path, case):
    model, opt = setup(case)
    with OptimizerMonitor(opt, model=model, log_dir=tmp_path) as mon:
        train(model, opt, mon, 4)
    first = load_quietly(tmp_path)

    resumed = OptimizerMonitor(opt, model=model, log_dir=tmp_path, resume=True)
    assert resumed.step == 4
    train(model, opt, resumed, 3, first=5)
    resumed.close()

    loaded = load_quietly(tmp_path)
    assert sample_steps(tmp_path / RUNLOG) == [1, 2, 3, 4, 5, 6, 7]
    assert_same_history(loaded, resumed.history, what="both parts")
    for metric in first.metrics():
        for scope in first.scopes(metric):
            steps, values = loaded.series(metric, scope)
            assert [steps[steps <= 4].tolist(), values[steps <= 4].tolist()] == \
                   [a.tolist() for a in first.series(metric, scope)], f"part 1 of {metric}/{scope}"
    declared = [tuple(r["names"]) for r in read_records(tmp_path / RUNLOG) if r["type"] == "scopes"]
    assert len(declared) == len(set(declared)), "the resumed writer declared a scope list again"


def test_resume_with_every_keeps_the_sampling_schedule(tmp_path):
    model, opt = setup()
    with OptimizerMonitor(opt, model=model, every=3, log_dir=tmp_path) as mon:
        train(model, opt, mon, 5)
    with OptimizerMonitor(opt, model=model, every=3, log_dir=tmp_path, resume=True) as mon:
        train(model, opt, mon, 2, first=6)
    assert sample_steps(tmp_path / RUNLOG) == [1, 4, 7]


# ------------------------------------------------------------------------------- 5. disk full
def test_a_full_disk_loses_nothing_and_training_goes_on(tmp_path, monkeypatch, caplog):
    model, opt = setup(TORCH_ADAMW)
    log = tmp_path / RUNLOG
    mon = OptimizerMonitor(opt, model=model, log_dir=tmp_path)
    disk = FlakyDisk(monkeypatch, log)
    weights = [p.detach().clone() for p in model.parameters()]
    before: list[int] = []

    def weather(step: int) -> None:
        mon.writer.flush()  # the records given so far meet the disk as it is until now
        if step == 2:  # samples 2..5 are written (and fail) during steps 3..6
            disk.mode = "full"
            before.extend(sample_steps(log))
        if step == 4:  # the log stays line-complete and holds what was written before
            assert log.read_bytes().endswith(b"\n") and sample_steps(log) == before
        if step == 6:
            disk.mode = None

    caplog.set_level(logging.INFO, logger="optiscope.monitor")
    with pytest.warns(RuntimeWarning, match=r"writing the run log .* failed") as caught:
        train(model, opt, mon, 10, after_step=weather)
    mon.close()

    assert disk.failures == 4
    assert all(not torch.equal(w, p) for w, p in zip(weights, model.parameters())), \
        "training stopped"
    assert mon.history.series("lr", "group0")[0].tolist() == list(range(1, 11))
    assert sum("writing the run log" in str(w.message) for w in caught) == 1, \
        "warned more than once"
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and str(log) in errors[0] and "No space left" in errors[0], errors
    assert any("writable again" in r.getMessage() for r in caplog.records)
    assert sample_steps(log) == list(range(1, 11)), "a sample is missing, repeated or out of order"
    assert_same_history(load_quietly(tmp_path), mon.history, what="after the disk freed")


def test_a_disk_still_full_at_close_raises_when_strict_and_keeps_the_history(tmp_path, monkeypatch):
    """Without strict, close() logs the same message instead (tests/test_reliability.py)."""
    model, opt = setup(TORCH_ADAMW)
    log = tmp_path / RUNLOG
    mon = OptimizerMonitor(opt, model=model, log_dir=tmp_path, strict=True)
    disk = FlakyDisk(monkeypatch, log)
    before: list[int] = []

    def fill(step: int) -> None:
        mon.writer.flush()  # the records given so far meet the disk as it is until now
        if step == 2:
            disk.mode = "full"
            before.extend(sample_steps(log))

    with pytest.warns(RuntimeWarning, match=r"writing the run log .* failed"):
        train(model, opt, mon, 6, after_step=fill)
    with pytest.raises(RunLogError) as caught:
        mon.close()

    assert mon.history.series("lr", "group0")[0].tolist() == [1, 2, 3, 4, 5, 6]
    assert sample_steps(log) == before and log.read_bytes().endswith(b"\n")
    unwritten = [s for s in range(1, 7) if s not in before]  # a sample each (no range probes)
    unwritten_records = len(unwritten) + 1  # and close()'s record of the steps taken
    message = str(caught.value)
    assert repr(str(log)) in message and f"{unwritten_records} records" in message, message
    assert "monitor.history" in message
    assert load_quietly(tmp_path).series("lr", "group0")[0].tolist() == before


# ------------------------------------------------------------------------------ 6. short writes
@pytest.mark.parametrize("cut_fails", [False, True], ids=["cut", "cut-fails-once"])
def test_a_short_write_leaves_the_log_line_complete(tmp_path, monkeypatch, cut_fails):
    model, opt = setup(BUNDLED_ADAMW)
    log = tmp_path / RUNLOG
    mon = OptimizerMonitor(opt, model=model, log_dir=tmp_path)
    disk = FlakyDisk(monkeypatch, log)
    real_ftruncate, refused, before = os.ftruncate, [], []

    def ftruncate_fails_once(fd, length):
        if not refused:
            refused.append(length)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_ftruncate(fd, length)

    def weather(step: int) -> None:
        mon.writer.flush()  # the records given so far meet the disk as it is until now
        if step == 2:  # sample 2 is written during step 3: half of its line reaches the disk
            disk.mode = "short"
            before.extend(sample_steps(log))
            if cut_fails:
                monkeypatch.setattr(runlog.os, "ftruncate", ftruncate_fails_once)
        if step == 3:
            assert disk.failures == 1
            if cut_fails:  # the torn half stays until the writer can cut it, before its next write
                assert not log.read_bytes().endswith(b"\n")
            else:
                assert log.read_bytes().endswith(b"\n") and sample_steps(log) == before
            disk.mode = None

    with pytest.warns(RuntimeWarning, match=r"short write \(\d+ of \d+ bytes\)"):
        train(model, opt, mon, 5, after_step=weather)
    mon.close()

    assert refused == ([refused[0]] if cut_fails else [])
    assert sample_steps(log) == [1, 2, 3, 4, 5]
    assert_same_history(load_quietly(tmp_path), mon.history, what="after a short write")


# ------------------------------------------------------------------------ 7. non-finite values
def test_non_finite_and_exact_values_round_trip_through_the_writer(tmp_path):
    values = [math.nan, math.inf, -math.inf, 0.0, 123456789.0, 2.0**40 + 1,
              float(np.float32(0.1)), 1e-30, -3.4e38, 1 / 3, -math.pi, -0.0, 5e-324, 2.0**60]
    scopes = [f"s{i}" for i in range(len(values))]
    writer = RunLogWriter(tmp_path)
    writer.write_meta({"run": "values"})
    writer.write_sample(1, time.time(), {"m": (scopes, np.array(values))})
    writer.close()

    record = next(r for r in read_records(tmp_path / RUNLOG) if r["type"] == "sample")
    read = record["values"]["m"][1]
    assert math.isnan(read[0]) and read[1:4] == [math.inf, -math.inf, 0.0]
    # Counts and byte sizes are exact, whatever their size.
    assert read[4:6] == [123456789, 2**40 + 1]
    assert_log_exact(read, values, what="one sample")
    assert math.copysign(1.0, read[11]) == -1.0  # -0.0 keeps its sign
    loaded = load_quietly(tmp_path)
    assert [loaded.series("m", s)[1].tolist() for s in ("s1", "s2", "s4")] == \
           [[math.inf], [-math.inf], [123456789.0]]


@pytest.mark.parametrize("case", FOREIGN_AND_BUNDLED, ids=lambda c: c.name)
def test_a_nan_gradient_round_trips_through_the_log(tmp_path, case):
    model, opt = setup(case)
    with OptimizerMonitor(opt, model=model, log_dir=tmp_path) as mon:
        train(model, opt, mon, 3, nan_at=3)

    record = next(r for r in read_records(tmp_path / RUNLOG)
                  if r["type"] == "sample" and r["step"] == 3)
    at = mon.history.scopes("grad_norm").index(NAN_TENSOR)
    assert math.isnan(record["values"]["grad_norm"][1][at])
    assert record["values"]["grad_max"][1][at] == math.inf
    assert record["values"]["nonfinite_grads"][1][at] == 1
    loaded = load_quietly(tmp_path)
    steps, grad_max = loaded.series("grad_max", NAN_TENSOR)
    assert steps.tolist() == [1, 2, 3] and grad_max[-1] == math.inf
    assert_same_history(loaded, mon.history, what=case.name)


def test_a_nan_grad_norm_stays_in_its_series(tmp_path):
    model, opt = setup(TORCH_SGD)
    with OptimizerMonitor(opt, model=model, log_dir=tmp_path) as mon:
        train(model, opt, mon, 3, nan_at=3)
    for history in (mon.history, load_quietly(tmp_path)):
        steps, values = history.series("grad_norm", NAN_TENSOR)
        assert steps.tolist() == [1, 2, 3] and math.isnan(values[-1])


# ---------------------------------------------------------------------------------- 8. meta.json
@pytest.mark.parametrize("case", FOREIGN_AND_BUNDLED, ids=lambda c: c.name)
def test_meta_json_describes_the_run(tmp_path, case):
    model, opt = setup(case)
    with OptimizerMonitor(opt, model=model, log_dir=tmp_path, every=2) as mon:
        train(model, opt, mon, 2)
    meta = json.loads((tmp_path / META).read_text())

    assert meta["optimizer"] == f"{type(opt).__module__}.{type(opt).__qualname__}"
    assert meta["optimizer_name"] == type(opt).__name__
    assert len(meta["hyperparameters"]) == len(opt.param_groups)
    for logged, group in zip(meta["hyperparameters"], opt.param_groups):
        expected = {k: list(v) if isinstance(v, tuple) else v
                    for k, v in group.items() if k not in ("params", "param_names")}
        assert logged == expected
    assert [(p["name"], p["shape"], p["dtype"], p["device"]) for p in meta["params"]] == \
           [(n, list(p.shape), "float32", "cpu") for n, p in model.named_parameters()]
    assert meta["versions"]["optiscope"] == optiscope.__version__
    assert meta["versions"]["torch"] == torch.__version__
    assert meta["versions"]["python"] == platform.python_version()
    assert meta["every"] == 2
    # The log's first record carries the same metadata.
    first = next(read_records(tmp_path / RUNLOG))
    assert first.pop("type") == "meta" and first.items() <= meta.items()
    assert load_quietly(tmp_path).meta.items() <= meta.items()


def test_update_meta_reaches_the_log_and_meta_json(tmp_path):
    writer = RunLogWriter(tmp_path)
    writer.write_meta({"a": 1, "b": 2})
    writer.write_sample(1, 0.0, {"m": (["global"], [1.0])})
    writer.update_meta({"b": 3, "c": [1, 2]})
    writer.close()
    assert load_quietly(tmp_path).meta == {"a": 1, "b": 3, "c": [1, 2]}
    assert json.loads((tmp_path / META).read_text()) == {"a": 1, "b": 3, "c": [1, 2]}

    writer = RunLogWriter(tmp_path, resume=True)  # knows the metadata written so far
    writer.update_meta({"d": 4})
    writer.close()
    assert load_quietly(tmp_path).meta == json.loads((tmp_path / META).read_text()) == \
           {"a": 1, "b": 3, "c": [1, 2], "d": 4}


def test_metadata_learnt_during_the_run_reaches_the_log(tmp_path):
    model, opt = setup(TORCH_SGD)
    with OptimizerMonitor(opt, model=model, log_dir=tmp_path) as mon:
        train(model, opt, mon, 2)
    assert set(load_quietly(tmp_path).meta) == set(mon.history.meta)
    assert set(json.loads((tmp_path / META).read_text())) == set(mon.history.meta)
