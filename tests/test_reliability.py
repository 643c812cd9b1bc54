"""Nothing lost, nothing taken down: the monitor under bad input, odd models, full disks, a second
writer, an interrupt and values beyond float32's range.

Each test reproduces one case of a reliability sweep (the numbers are the sweep's): user input is
refused at the call that receives it, with an error naming the value and the fix; nothing the
user passes corrupts the run log or shadows a built-in metric; the monitor's own failure never
ends the user's script.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from optiscope import OptimizerMonitor, atomicfile, load_run
from optiscope.monitor import runlog
from optiscope.monitor.metrics import MONITOR_SERIES
from optiscope.monitor.runlog import META, RUNLOG, RunLogError, read_records


QUIET = dict(console=False, report=False, tensorboard=False)  # the run log only: fast


def tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def run(model, opt, mon, steps: int, *, first: int = 1, scalar=None):
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    for step in range(first, first + steps):
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        mon.log_scalar("loss", loss)
        if scalar is not None:
            scalar(step, loss)


def strict_load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return load_run(path)


# ------------------------------------------------------------------ 1, 4, 5: log_scalar's input
@pytest.mark.parametrize("name, match", [
    (3, r"log_scalar: name must be a str, got 3 \(int\).*log_scalar\(name, value\)"),
    (None, r"name must be a str, got None"),
    ("", r"name must be a non-empty"),
    ("a b", r"'a b'.*letters, digits"),
    ("[/]loss", r"'\[/\]loss'.*letters, digits"),
    ('x"}', r"letters, digits"),
    ("/loss", r"'/loss'.*cannot start or end with '/'"),
    ("x" * 201, r"at most 200 characters"),
])
def test_log_scalar_refuses_a_bad_name_at_the_call(tmp_path, name, match):
    model, opt = tiny()
    with OptimizerMonitor(opt, model=model, log_dir=tmp_path, **QUIET) as mon:
        run(model, opt, mon, 1)
        with pytest.raises((TypeError, ValueError), match=match):
            mon.log_scalar(name, 1.0)
        run(model, opt, mon, 1, first=2)
    assert strict_load(tmp_path).series("loss")[0].tolist() == [1, 2]


def test_swapped_log_scalar_arguments_are_refused_and_the_log_stays_whole(tmp_path):
    """Case 1: ``log_scalar(step, loss)`` made every sample line invalid JSON."""
    model, opt = tiny()
    with OptimizerMonitor(opt, model=model, log_dir=tmp_path, **QUIET) as mon:
        errors = []

        def swapped(step, loss):
            try:
                mon.log_scalar(step, loss)
            except TypeError as exc:
                errors.append(str(exc))

        run(model, opt, mon, 3, scalar=swapped)
    assert len(errors) == 3 and "swapped" in errors[0], errors
    loaded = strict_load(tmp_path)
    assert loaded.series("grad_norm")[0].tolist() == [1, 2, 3]
    assert loaded.series("loss")[0].tolist() == [1, 2, 3]


@pytest.mark.parametrize("name", sorted(MONITOR_SERIES))
def test_a_built_in_metric_name_is_refused_and_a_prefixed_one_is_a_user_scalar(tmp_path, name):
    """Case 4: ``log_scalar("grad_norm", x)`` replaced the built-in metric's per-tensor scopes."""
    model, opt = tiny()
    with OptimizerMonitor(opt, model=model, log_dir=tmp_path, **QUIET) as mon:
        run(model, opt, mon, 1)
        with pytest.raises(ValueError, match=rf"{name!r} is a metric the monitor records.*"
                                             rf"'trainer/{name}'"):
            mon.log_scalar(name, 1.0)
        mon.sample_next()
        run(model, opt, mon, 1, first=2,
            scalar=lambda s, loss: mon.log_scalar(f"trainer/{name}", 7.0))
    for history in (mon.history, strict_load(tmp_path)):
        if name == "grad_norm":
            assert len(history.scopes("grad_norm")) == 5, "the per-tensor scopes are gone"
        assert history.series(f"trainer/{name}")[1].tolist() == [7.0]


@pytest.mark.parametrize("value, match", [
    ("abc", r"value must be a real number or a one-element tensor, got 'abc' \(str\)"),
    (None, r"got None"),
    ([1.0], r"got \[1.0\] \(list\)"),
    (1 + 2j, r"got \(1\+2j\) \(complex\)"),
    (10**400, r"out of float64's range"),
    (True, r"got True \(bool\).*float\(value\)"),
    (torch.tensor(1 + 1j), r"complex64 tensor"),
    (torch.tensor(True), r"bool tensor"),
    (np.array([1.0, 2.0]), r"2 elements"),
])
def test_log_scalar_refuses_a_bad_value_at_the_call(tmp_path, value, match):
    """Case 5: bad values were accepted, failed later, lost samples and made close() raise."""
    model, opt = tiny()
    with OptimizerMonitor(opt, model=model, every=2, log_dir=tmp_path, **QUIET) as mon:
        for step in (1, 2):  # sampled, then not: the same answer either way
            run(model, opt, mon, 1, first=step)
            with pytest.raises((TypeError, ValueError), match=match):
                mon.log_scalar("metric", value)
        run(model, opt, mon, 1, first=3)
    loaded = strict_load(tmp_path)
    assert loaded.series("loss")[0].tolist() == [1, 3]
    assert "metric" not in loaded.metrics()


@pytest.mark.parametrize("value, expected", [
    (2, 2.0), (np.float32(0.5), 0.5), (np.int64(3), 3.0), (np.array(4.0), 4.0),
    (np.array([5.0]), 5.0), (math.nan, math.nan), (-math.inf, -math.inf),
    (torch.tensor([6.0], dtype=torch.bfloat16), 6.0), (torch.tensor(7, dtype=torch.int32), 7.0),
])
def test_log_scalar_takes_real_numbers_and_non_finite_floats(tmp_path, value, expected):
    model, opt = tiny()
    with OptimizerMonitor(opt, model=model, log_dir=tmp_path, **QUIET) as mon:
        run(model, opt, mon, 1, scalar=lambda s, loss: mon.log_scalar("x", value))
    for history in (mon.history, strict_load(tmp_path)):
        got = history.series("x")[1].tolist()
        assert got == [expected] or (math.isnan(expected) and math.isnan(got[0])), got


# ------------------------------------------------------------------- 11, 12: the constructor
def test_complex_parameters_are_refused_at_construction():
    model = nn.Linear(3, 2)
    z = nn.Parameter(torch.zeros(4, dtype=torch.complex64))
    opt = torch.optim.SGD([*model.parameters(), z], lr=0.1)
    with pytest.raises(TypeError, match=r"'group0.param2' is complex64.*torch.view_as_real"):
        OptimizerMonitor(opt, **QUIET)


def test_an_optimizer_without_parameters_is_refused_at_construction():
    opt = torch.optim.SGD([{"params": []}], lr=0.1)
    with pytest.raises(ValueError, match=r"optimizer has no parameters.*after the model"):
        OptimizerMonitor(opt, **QUIET)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(seed="abc"), TypeError, r"seed must be an integer in \[0, 2\*\*64\), got 'abc'"),
    (dict(seed=-1), ValueError, r"seed must be an integer in \[0, 2\*\*64\), got -1"),
    (dict(seed=True), TypeError, r"seed must be an integer.*got True"),
    (dict(resume="no"), TypeError, r"resume must be True or False, got 'no'"),
    (dict(strict=1), TypeError, r"strict must be True or False, got 1"),
    (dict(process_group="x"), TypeError, r"process_group must be None or a "
                                         r"torch.distributed.ProcessGroup, got 'x'"),
    (dict(log_dir=""), ValueError, r"log_dir must be a directory path or None, got ''"),
    (dict(log_dir=3), TypeError, r"log_dir must be a directory path or None, got 3"),
    (dict(every=True), TypeError, r"every must be an integer >= 1, got True"),
    (dict(every=2.0), TypeError, r"every must be an integer >= 1, got 2.0"),
    (dict(topk_density=True), TypeError, r"topk_density must be in \(0, 1\] or None, got True"),
    (dict(topk_density=math.nan), ValueError, r"topk_density must be in \(0, 1\] or None"),
    (dict(spike_factor="10"), TypeError, r"spike_factor must be a number > 1, got '10'"),
    (dict(scaler=3), TypeError, r"scaler must be a torch.amp.GradScaler or None, got 3"),
    (dict(sinks="x"), TypeError, r"sinks must be a list of"),
])
def test_constructor_arguments_are_validated(kwargs, error, match, tmp_path):
    model, opt = tiny()
    with pytest.raises(error, match=match):
        OptimizerMonitor(opt, model=model, **QUIET, **kwargs)
    assert not opt._optimizer_step_pre_hooks, "a refused monitor left its hooks behind"
    assert not list(Path.cwd().glob(RUNLOG))


def test_numpy_integers_are_integers(tmp_path):
    model, opt = tiny()
    with OptimizerMonitor(opt, model=model, every=np.int64(2), sample_size=np.int32(3),
                          topk_block=np.int64(8), freeze_probe=np.int64(2), seed=np.uint64(5),
                          topk_density=np.float32(0.5), spike_factor=np.float64(5),
                          log_dir=tmp_path, **QUIET) as mon:
        run(model, opt, mon, 4)
    assert mon.every == 2 and type(mon.every) is int
    assert strict_load(tmp_path).series("grad_norm")[0].tolist() == [1, 2, 3]


# ------------------------------------------------------------------------ 6: a full disk
class FullDisk:
    """A disk that fills up when told: the run log's ``os.write`` and the writes into the files
    `atomic_file` opens (how ``meta.json`` is written) fail with ENOSPC, after the file was
    created, as on a real disk."""

    def __init__(self, monkeypatch, log: Path):
        self.real_write, real_fdopen = os.write, os.fdopen
        self.log, self.full = log, False
        monkeypatch.setattr(runlog.os, "write", self._write)
        disk = self

        def fdopen(fd, *args, **kwargs):
            f = real_fdopen(fd, *args, **kwargs)
            if disk.full:
                def write(data):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                f.write = write
            return f

        monkeypatch.setattr(atomicfile.os, "fdopen", fdopen)

    def _write(self, fd, data):
        st, ref = os.fstat(fd), self.log.stat()
        if self.full and (st.st_dev, st.st_ino) == (ref.st_dev, ref.st_ino):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.real_write(fd, data)


@pytest.mark.parametrize("strict", [False, True], ids=["default", "strict"])
def test_a_full_disk_at_close_does_not_end_the_script(tmp_path, monkeypatch, caplog, strict):
    """Case 6: close() raised RunLogError out of the ``with`` block (the model was never saved),
    logged 9 tracebacks, and left an empty meta.json.tmp behind."""
    model, opt = tiny()
    disk = FullDisk(monkeypatch, tmp_path / RUNLOG)
    caplog.set_level(logging.INFO, logger="optiscope")
    after = []

    def training():
        with OptimizerMonitor(opt, model=model, log_dir=tmp_path, **QUIET, strict=strict) as mon:
            run(model, opt, mon, 2)
            mon.writer.flush()  # what was given so far reaches the disk before it fills up
            disk.full = True
            run(model, opt, mon, 3, first=3)
        after.append("the model is saved")
        return mon

    if strict:
        with pytest.warns(RuntimeWarning), pytest.raises(RunLogError, match=r"\d+ records"):
            training()
        return
    with pytest.warns(RuntimeWarning, match=r"writing the run log .* failed"):
        mon = training()
    assert after, "the code after the with block did not run"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert all(r.exc_info is None for r in errors), "a traceback for a full disk"
    assert len(errors) <= 3, [r.getMessage() for r in errors]
    final = errors[-1].getMessage()
    found = re.search(r"\b(\d+) records could not be written to .*runlog.jsonl", final)
    assert found and int(found[1]) >= 4, final  # 3 samples, close()'s steps_taken, ...
    assert "No space left" in final and "monitor.history" in final
    assert not list(tmp_path.glob("*.tmp")), "a temporary file was left behind"
    assert mon.history.series("grad_norm")[0].tolist() == [1, 2, 3, 4, 5]
    assert mon.history.meta["steps_taken"] == 5
    loaded = strict_load(tmp_path)  # the log holds the run up to the disk filling up
    assert loaded.series("grad_norm")[0].tolist() == [1]  # sample 2 is written during step 3


# ------------------------------------------------------------------- 13: an interrupt (SIGINT)
def sigint():
    os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture
def default_sigint():
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT has a handler of its own here")


def test_an_interrupt_while_a_sample_is_processed_keeps_the_completed_step(tmp_path,
                                                                            default_sigint):
    """Case 13: a Ctrl-C during the monitor's processing of step 3 lost step 3's record."""
    model, opt = tiny()
    with pytest.raises(KeyboardInterrupt):
        with OptimizerMonitor(opt, model=model, log_dir=tmp_path, **QUIET) as mon:
            end = mon.collector.end

            def interrupted(step):
                if step == 3:
                    sigint()
                return end(step)

            mon.collector.end = interrupted
            run(model, opt, mon, 5)
    assert mon.step == 3 and mon.history.meta["steps_taken"] == 3
    for history in (mon.history, strict_load(tmp_path)):
        assert history.series("grad_norm")[0].tolist() == [1, 2, 3]
        assert history.meta["steps_taken"] == 3


def test_an_interrupt_inside_the_optimizer_step_is_not_a_step_taken(tmp_path, default_sigint):
    """Case 13: steps_taken counted the step a Ctrl-C interrupted."""
    model, opt = tiny()
    with pytest.raises(KeyboardInterrupt):
        with OptimizerMonitor(opt, model=model, log_dir=tmp_path, **QUIET) as mon:
            # after the monitor's pre-hook, before the update
            opt.register_step_pre_hook(lambda o, a, k: sigint() if mon.step == 3 else None)
            run(model, opt, mon, 5)
    for history in (mon.history, strict_load(tmp_path)):
        assert history.meta["steps_taken"] == 2
        assert history.series("grad_norm")[0].tolist() == [1, 2]


def test_a_step_that_raises_is_not_counted_and_its_number_is_used_again(tmp_path):
    model, opt = tiny()
    with OptimizerMonitor(opt, model=model, log_dir=tmp_path, **QUIET) as mon:
        run(model, opt, mon, 2)
        handle = opt.register_step_pre_hook(lambda o, a, k: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            run(model, opt, mon, 1, first=3)
        handle.remove()
        run(model, opt, mon, 2, first=3)
    assert mon.history.series("grad_norm")[0].tolist() == [1, 2, 3, 4]
    assert mon.history.meta["steps_taken"] == 4


# ------------------------------------------------------------ 8: resume checks the run, a lock
def test_resume_refuses_another_optimizer_s_log(tmp_path):
    """Case 8: an SGD run was appended to an AdamW log without a word."""
    model, opt = tiny()
    with OptimizerMonitor(opt, model=model, log_dir=tmp_path, **QUIET) as mon:
        run(model, opt, mon, 2)
    before = (tmp_path / RUNLOG).read_bytes()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(runlog.RunIdentityError,
                       match=r"another run: the optimizer is torch.optim.sgd.SGD, the log's "
                             r"torch.optim.adamw.AdamW.*another log_dir"):
        OptimizerMonitor(sgd, model=model, log_dir=tmp_path, resume=True, console=False)
    assert not sgd._optimizer_step_pre_hooks
    assert (tmp_path / RUNLOG).read_bytes() == before, "the refused run wrote to the log"


def test_resume_refuses_another_model_s_log(tmp_path):
    model, opt = tiny()
    with OptimizerMonitor(opt, model=model, log_dir=tmp_path, **QUIET) as mon:
        run(model, opt, mon, 1)
    other = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1), nn.Linear(1, 1))
    with pytest.raises(runlog.RunIdentityError,
                       match=r"shapes differ: 0.weight \[6, 4\] \(log: \[5, 4\]\), 0.bias \[6\] "
                             r"\(log: \[5\]\), 2.weight \[1, 6\] \(log: \[1, 5\]\); only in this "
                             r"run: 3.weight, 3.bias"):
        OptimizerMonitor(torch.optim.AdamW(other.parameters()), model=other, log_dir=tmp_path,
                         resume=True, console=False)
    # the same run resumes (the refused attempt left no lock behind)
    with OptimizerMonitor(opt, model=model, log_dir=tmp_path, resume=True, **QUIET) as mon:
        run(model, opt, mon, 1, first=2)
    assert strict_load(tmp_path).series("grad_norm")[0].tolist() == [1, 2]


def test_a_second_live_writer_is_refused_and_the_lock_goes_with_the_first(tmp_path):
    """Case 8: two concurrent writers interleaved their steps with no lock or warning."""
    model, opt = tiny()
    first = OptimizerMonitor(opt, model=model, log_dir=tmp_path, **QUIET)
    run(model, opt, first, 2)
    model2 = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    with pytest.raises(RunLogError, match=rf"being written by another live monitor "
                                          rf"\(pid {os.getpid()}\).*another log_dir"):
        OptimizerMonitor(opt2, model=model2, log_dir=tmp_path, resume=True, console=False)
    first.close()
    assert not (tmp_path / runlog.LOCK).exists()
    with OptimizerMonitor(opt2, model=model2, log_dir=tmp_path, resume=True, **QUIET) as second:
        run(model2, opt2, second, 1, first=3)
    assert strict_load(tmp_path).series("grad_norm")[0].tolist() == [1, 2, 3]


def test_a_monitor_that_fails_after_opening_its_log_releases_the_lock(tmp_path, monkeypatch):
    """The lock stayed held (and the hooks registered) when __init__ failed after the run log
    was opened: constructing the monitor again on the same directory was refused."""
    model, opt = tiny()
    from optiscope.monitor import monitor as core

    def broken(mon):
        raise RuntimeError("clipping hooks failed")

    with monkeypatch.context() as patch:
        patch.setattr(core.clipping, "register", broken)
        with pytest.raises(RuntimeError, match="clipping hooks failed"):
            OptimizerMonitor(opt, model=model, log_dir=tmp_path, **QUIET)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert not (tmp_path / runlog.LOCK).exists()
    with OptimizerMonitor(opt, model=model, log_dir=tmp_path, resume=True, **QUIET) as mon:
        run(model, opt, mon, 2)
    assert strict_load(tmp_path).series("grad_norm")[0].tolist() == [1, 2]


def test_the_lock_of_a_killed_writer_does_not_block_resume(tmp_path):
    import subprocess
    import sys
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT);"
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'1'); print('locked', flush=True);"
            "time.sleep(60)")
    tmp_path.mkdir(exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / runlog.LOCK)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        model, opt = tiny()
        with pytest.raises(RunLogError, match="another live monitor"):
            OptimizerMonitor(opt, model=model, log_dir=tmp_path, console=False)
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        with OptimizerMonitor(opt, model=model, log_dir=tmp_path, **QUIET) as mon:
            run(model, opt, mon, 1)
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert strict_load(tmp_path).series("grad_norm")[0].tolist() == [1]


# --------------------------------------------------------- 14: values beyond float32's range
def _bundled_adamw(params):
    from optiscope.optimizers import AdamW
    return AdamW(params, lr=1e-2, backend="torch")


@pytest.mark.parametrize("scale", [1e30, 1e-30], ids=["1e30", "1e-30"])
@pytest.mark.parametrize("make, sums", [
    (lambda ps: torch.optim.SGD(ps, lr=1e-3), "c"),
    (lambda ps: torch.optim.SGD(ps, lr=1e-3), "torch"),
    (lambda ps: torch.optim.AdamW(ps, lr=1e-3), "c"),
    (lambda ps: torch.optim.AdamW(ps, lr=1e-3), "torch"),
    (_bundled_adamw, "c"),
], ids=["SGD-C-sums", "SGD-torch-sums", "AdamW-C-sums", "AdamW-torch-sums",
        "bundled-AdamW-C-kernel"])
def test_norms_of_gradients_beyond_float32_range_are_finite_and_right(make, sums, scale,
                                                                      monkeypatch):
    """Case 14: gradients of 1e30 gave grad_norm = inf (true: 8e30) with no alert; of 1e-30, 0."""
    from optiscope.kernels import cpu
    if cpu.kernel() is None:
        pytest.skip("no C compiler here")
    if sums == "torch":  # the monitor's torch reductions, as on a GPU or without a compiler
        monkeypatch.setattr(cpu, "sums_apply", lambda tensors: False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 80), nn.Linear(80, 3))  # 5120 weights: > one C block
    opt = make(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    grads = {}
    with OptimizerMonitor(opt, model=model, console=False, strict=True) as mon:
        for step in (1, 2):
            for name, p in model.named_parameters():
                p.grad = torch.randn(p.shape) * scale
                grads[step, name] = p.grad.double()
            opt.step()
    for step in (1, 2):
        expected = {n: float(grads[step, n].norm()) for n in names}
        expected["global"] = math.sqrt(sum(v * v for v in expected.values()))
        for scope, want in expected.items():
            got = mon.history.series("grad_norm", scope)[1][step - 1]
            assert got == pytest.approx(want, rel=1e-6, abs=0), (step, scope, got, want)
        assert mon.history.series("nonfinite_grads")[1][step - 1] == 0
    m = {n: opt.state[p]["exp_avg"].double() for n, p in model.named_parameters()} \
        if "exp_avg" in opt.state[model[0].weight] else None
    if m is not None:  # the first moment after step 2: 0.19 g1 + 0.1 g2, as small or large
        for name, want in m.items():
            got = mon.history.series("moment1_norm", name)[1][-1]
            assert got == pytest.approx(float(want.norm()), rel=1e-6, abs=0), (name, got)
    assert not [a for a in mon.history.alerts if a.kind == "nonfinite_grads"]
