"""``python -m benchmarks.reliability``: the monitor's reliability sweep, case by case.

What a demanding user and an operator would try, each case judged "held" or "not held":

* crash: a writer subprocess SIGKILLed at random moments; the log must load, its samples run
  1, 2, ... without a gap, at most the last two steps lost, the samples waiting for their
  decoding batch (`monitor.DECODE_BATCH`, or those of `monitor.DECODE_WAIT_S`) and those the run
  log's writer thread was still gathering (`runlog_writer.GATHER_S`, at the child's step rate), and
  ``resume=True`` must continue it;
* interrupt: SIGINT at random moments; the log must load, with ``steps_taken`` written and a
  sample for every step taken;
* disk full (simulated: the run log's ``os.write`` and ``meta.json``'s ``write_text`` raise
  ENOSPC): the script must go on past the ``with`` block, every sample in ``monitor.history``,
  no temporary file left;
* bad input: each numbered case of the sweep that found the faults (issue 14), as the user would
  write it; held when the script finishes, the log loads, and the monitor either recorded every
  sample or refused the input at the call with an error naming it;
* concurrency: a second live writer on the same run directory (in-process and from another
  process) must be refused, and the first writer's log stay whole;
* scale: a 10,000-step × 200-tensor run log (the monitor's own writer and the metrics a sample
  of 200 tensors has): write, `load_run` and report times, and the file's size.

Prints a table and writes ``results/reliability.json``. The long log's write and load dominate
the run time: ten minutes on 2 cores shared with other jobs (the load average is recorded).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from optiscope import OptimizerMonitor, load_run
from optiscope.bench.machine import load_average
from optiscope.bench.results import script_command, write_script_results
from optiscope.monitor import runlog, runlog_writer
from optiscope.monitor.monitor import DECODE_BATCH, DECODE_WAIT_S
from optiscope.monitor.metrics import TENSOR_METRICS

SCHEMA = "optiscope-bench-reliability/1"
ROOT = Path(__file__).resolve().parent.parent
QUIET = dict(console=False, report=False, tensorboard=False)

# A training script as a user writes it: prints each step it has taken.
CHILD = textwrap.dedent("""
    import sys, time, torch
    from torch import nn
    from optiscope import OptimizerMonitor
    log_dir, steps, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(64, 32)
    with OptimizerMonitor(opt, model=model, log_dir=log_dir, resume=resume, console=False,
                          report=False, tensorboard=False) as mon:
        print("started", mon.step, flush=True)
        for _ in range(steps):
            loss = model(x).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            mon.log_scalar("loss", loss)
            print("step", mon.step, flush=True)
            time.sleep(0.002)
""")


def quiet_load(path) -> tuple[object, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = load_run(path)
    return history, [str(w.message) for w in caught]


def consecutive(steps) -> bool:
    steps = list(steps)
    return steps == list(range(1, len(steps) + 1))


def child(log_dir: Path, steps: int, resume: bool = False) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", CHILD, str(log_dir), str(steps),
                             "1" if resume else "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def wait_started(proc: subprocess.Popen) -> None:
    line = proc.stdout.readline()
    if not line.startswith("started"):
        raise RuntimeError(f"the writer did not start: {line!r} {proc.stderr.read()[-2000:]}")


# ------------------------------------------------------------------------------------ cases
def signalled(run: Path, rng: random.Random, sig: int) -> tuple:
    """A writer child of ``run`` sent ``sig`` 0.05 to 1.5 s into its training: its stdout, its
    stderr, the run loaded after it, the warnings loading gave and the sampled steps."""
    proc = child(run, 100_000)
    wait_started(proc)
    started = time.perf_counter()
    time.sleep(rng.uniform(0.05, 1.5))
    proc.send_signal(sig)
    elapsed = time.perf_counter() - started
    stdout, stderr = proc.communicate(timeout=120)
    history, warned = quiet_load(run)
    steps = history.series("grad_norm")[0] if "grad_norm" in history.metrics() else []
    return stdout, stderr, history, warned, steps, elapsed


def crash_cases(tmp: Path, rng: random.Random, repeats: int) -> list[dict]:
    out = []
    for i in range(repeats):
        run = tmp / f"crash{i}"
        stdout, _, _, warned, steps, elapsed = signalled(run, rng, signal.SIGKILL)
        taken = max([int(line.split()[1]) for line in stdout.split("\n")
                     if line.startswith("step")] or [0])
        lost = taken - len(steps)
        # the samples waiting to be decoded (a batch of DECODE_BATCH, or what came in
        # DECODE_WAIT_S, and the last one) and the records the run log's writer thread gathers
        # before it writes them (GATHER_S): the steps taken in that time
        rate = taken / max(elapsed, 1e-9)
        allowed = 2 + min(DECODE_BATCH, math.ceil(DECODE_WAIT_S * rate)) + math.ceil(
            runlog_writer.GATHER_S * rate)
        resumed = child(run, 3, resume=True)
        rout, rerr = resumed.communicate(timeout=120)
        after, _ = quiet_load(run)
        after_steps = after.series("grad_norm")[0]
        held = (consecutive(steps) and lost <= allowed and resumed.returncode == 0
                and consecutive(after_steps) and len(after_steps) == len(steps) + 3)
        out.append(dict(case=f"crash: SIGKILL after {taken} steps, then resume=True", held=held,
                        detail=f"{len(steps)} samples loaded ({lost} of the last steps lost, "
                               f"{allowed} allowed), "
                               f"{len(warned)} warnings; resumed to step {after_steps[-1]}"
                               + ("" if resumed.returncode == 0 else f"; resume: {rerr[-300:]}")))
    return out


def interrupt_cases(tmp: Path, rng: random.Random, repeats: int) -> list[dict]:
    out = []
    for i in range(repeats):
        run = tmp / f"sigint{i}"
        _, stderr, history, warned, steps, _ = signalled(run, rng, signal.SIGINT)
        taken = history.meta.get("steps_taken")
        held = ("KeyboardInterrupt" in stderr and taken is not None and consecutive(steps)
                and len(steps) == taken and not warned)
        out.append(dict(case="interrupt: SIGINT in the training loop", held=held,
                        detail=f"steps_taken {taken}, {len(steps)} samples, {len(warned)} "
                               "warnings"))
    return out


class FullDisk:
    """The run log's ``os.write`` and ``Path.write_text`` (meta.json) raise ENOSPC while full."""

    def __init__(self, log: Path):
        self.log, self.full = log, False
        self.real_write, self.real_text = os.write, Path.write_text

    def __enter__(self):
        disk = self

        def write(fd, data):
            if disk.full and disk.log.exists() and os.path.samestat(os.fstat(fd),
                                                                    disk.log.stat()):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return disk.real_write(fd, data)

        def write_text(path, *args, **kwargs):
            if disk.full:
                open(path, "w").close()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return disk.real_text(path, *args, **kwargs)

        runlog.os.write, Path.write_text = write, write_text
        return self

    def __exit__(self, *exc):
        runlog.os.write, Path.write_text = self.real_write, self.real_text


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train(model, opt, mon, steps: int, *, hook=None) -> None:
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    for step in range(1, steps + 1):
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        mon.log_scalar("loss", loss)
        if hook:
            hook(step)


def disk_cases(tmp: Path) -> list[dict]:
    out = []
    for name, free_at in (("the disk fills at step 3 and is freed at step 6", 6),
                          ("the disk fills at step 3 and is still full at close", None)):
        run = tmp / f"disk-{free_at}"
        model, opt = tiny()
        after = []
        records: list[logging.LogRecord] = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger("optiscope").addHandler(handler)
        try:
            with warnings.catch_warnings(), FullDisk(run / runlog.RUNLOG) as disk:
                warnings.simplefilter("ignore")
                with OptimizerMonitor(opt, model=model, log_dir=run, **QUIET) as mon:
                    def weather(step):
                        if step == 3:
                            disk.full = True
                        if step == free_at:
                            disk.full = False
                    train(model, opt, mon, 8, hook=weather)
                after.append(True)
            error = None
        except Exception as exc:  # noqa: BLE001 - the case is whether anything escapes
            error = f"{type(exc).__name__}: {exc}"
        finally:
            logging.getLogger("optiscope").removeHandler(handler)
        errors = [r for r in records if r.levelno >= logging.ERROR]
        tracebacks = sum(r.exc_info is not None for r in errors)
        history, _ = quiet_load(run)
        in_memory = mon.history.series("grad_norm")[0].tolist()
        # the writer thread may not have written a sample before the disk filled at step 3
        on_disk = (history.series("grad_norm")[0].tolist() if "grad_norm" in history.metrics()
                   else [])
        leftovers = [p.name for p in run.glob("*.tmp")]
        held = (bool(after) and in_memory == list(range(1, 9)) and not leftovers
                and tracebacks == 0 and consecutive(on_disk)
                and (free_at is None or on_disk == in_memory))
        out.append(dict(case=f"disk full: {name}", held=held,
                        detail=error or f"script went on; {len(in_memory)} samples in memory, "
                        f"{len(on_disk)} in the log; {len(errors)} error lines, {tracebacks} "
                        f"tracebacks; left behind: {leftovers or 'nothing'}"))
    return out


def expect_refusal(fn) -> tuple[bool, str]:
    """(refused with a TypeError/ValueError/OSError at the call, its message)."""
    try:
        fn()
    except (TypeError, ValueError, OSError) as exc:
        return True, f"{type(exc).__name__}: {str(exc)[:140]}"
    except Exception as exc:  # noqa: BLE001
        return False, f"{type(exc).__name__} (not a clear refusal): {str(exc)[:140]}"
    return False, "accepted"


def records_everything(make_opt, params: list, grads, steps=4, **kwargs):
    """Trains ``steps`` steps, ``grads(step, params)`` setting the gradients; held when every
    step has a sample and no monitor error was logged. Returns (held, detail, monitor)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("optiscope").addHandler(handler)
    mon = None
    try:
        opt = make_opt(params)
        with OptimizerMonitor(opt, **QUIET, **kwargs) as mon:
            for step in range(1, steps + 1):
                grads(step, params)
                opt.step()
    except Exception as exc:  # noqa: BLE001
        return False, f"{type(exc).__name__}: {str(exc)[:140]}", mon
    finally:
        logging.getLogger("optiscope").removeHandler(handler)
    errors = [r.getMessage()[:100] for r in records if r.levelno >= logging.ERROR]
    recorded = "grad_norm" in mon.history.metrics()
    got = mon.history.series("grad_norm")[0].tolist() if recorded else []
    ok = got == list(range(1, steps + 1)) and not errors
    return ok, f"{len(got)} of {steps} samples; {len(errors)} errors logged" + (
        f" ({errors[0]})" if errors else ""), mon


def ones(step, params):
    for p in params:
        p.grad = torch.ones_like(p)


def bad_input_cases(tmp: Path) -> list[dict]:
    out = []

    def case(number, what, held, detail):
        out.append(dict(case=f"bad input {number}: {what}", held=held, detail=detail))

    # 1, 4, 5: log_scalar
    model, opt = tiny()
    run = tmp / "swapped"
    refusals = []
    with OptimizerMonitor(opt, model=model, log_dir=run, **QUIET) as mon:
        train(model, opt, mon, 3, hook=lambda s: refusals.append(
            expect_refusal(lambda: mon.log_scalar(s, 0.5))))
    history, warned = quiet_load(run)
    case(1, "log_scalar(step, loss), arguments swapped",
         all(r for r, _ in refusals) and history.series("loss")[0].tolist() == [1, 2, 3]
         and not warned, refusals[0][1])
    model, opt = tiny()
    with OptimizerMonitor(opt, model=model, **QUIET) as mon:
        train(model, opt, mon, 1)
        refused, message = expect_refusal(lambda: mon.log_scalar("grad_norm", 1.0))
    case(4, "log_scalar('grad_norm', x)", refused and len(mon.history.scopes("grad_norm")) > 1,
         message)
    for label, value in (("'abc'", "abc"), ("None", None), ("[1.0]", [1.0]),
                         ("1+2j", 1 + 2j), ("10**400", 10**400), ("True", True)):
        model, opt = tiny()
        run = tmp / f"value-{len(out)}"
        with OptimizerMonitor(opt, model=model, log_dir=run, **QUIET) as mon:
            train(model, opt, mon, 1)
            refused, message = expect_refusal(lambda: mon.log_scalar("x", value))
            train(model, opt, mon, 1)
        history, warned = quiet_load(run)
        case(5, f"log_scalar('x', {label})", refused and not warned
             and history.series("loss")[0].tolist() == [1, 2], message)

    # 2: the constant cache (index lists against float lists)
    def sgd(params):
        return torch.optim.SGD(params, lr=0.1)

    def first_only(step, params):
        params[0].grad, params[1].grad = torch.ones_like(params[0]), None

    for what, params, grads, kwargs in (
            ("a 0-d parameter", [nn.Parameter(torch.tensor(1.5)), nn.Parameter(torch.ones(3))],
             ones, {}),
            ("two parameters, only one with a gradient",
             [nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))], first_only, {}),
            ("sample_size=1", [nn.Parameter(torch.ones(5, 3))], ones, dict(sample_size=1)),
            ("a zero-size tensor followed by a small one",
             [nn.Parameter(torch.zeros(0)), nn.Parameter(torch.ones(3))], ones, {})):
        held, detail, _ = records_everything(sgd, params, grads, **kwargs)
        case(2, what, held, detail)

    # 3: float64 parameters with a bundled optimizer
    from optiscope.optimizers import AdamW
    params = [nn.Parameter(torch.ones(4, 3, dtype=torch.float64))]
    held, detail, _ = records_everything(lambda ps: AdamW(ps, lr=1e-2, backend="torch"),
                                         params, ones)
    if not held:  # refusing float64 at construction, with a clear error, is held too
        refused, message = expect_refusal(lambda: OptimizerMonitor(
            AdamW(params, lr=1e-2, backend="torch"), **QUIET))
        held, detail = refused, f"{detail}; at construction: {message}"
    case(3, "float64 parameters, bundled AdamW (torch backend)", held, detail)

    # 7: a corrupt cached C library
    case(7, *corrupt_library(tmp))

    # 8: resume=True on another run's log
    model, opt = tiny()
    run = tmp / "identity"
    with OptimizerMonitor(opt, model=model, log_dir=run, **QUIET) as mon:
        train(model, opt, mon, 2)
    size = (run / runlog.RUNLOG).stat().st_size
    refused, message = expect_refusal(lambda: OptimizerMonitor(
        torch.optim.SGD(model.parameters(), lr=0.1), model=model, log_dir=run, resume=True,
        **QUIET))
    case(8, "resume=True: an SGD run into an AdamW log",
         refused and (run / runlog.RUNLOG).stat().st_size == size, message)

    # 10: records that do not fit the schema, read by load_run and the report
    case(10, *hostile_records(tmp))

    # 11: complex parameters, an optimizer without parameters
    z = nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    case(11, "a complex parameter", *expect_refusal(
        lambda: OptimizerMonitor(torch.optim.SGD([z], lr=0.1), **QUIET)))
    case(11, "an optimizer without parameters", *expect_refusal(
        lambda: OptimizerMonitor(torch.optim.SGD([{"params": []}], lr=0.1), **QUIET)))

    # 12: constructor arguments
    for kwargs in (dict(seed="abc"), dict(resume="no"), dict(process_group="x"),
                   dict(log_dir="")):
        model, opt = tiny()
        refused, message = expect_refusal(lambda: OptimizerMonitor(opt, model=model, **QUIET,
                                                                   **kwargs))
        case(12, ", ".join(f"{k}={v!r}" for k, v in kwargs.items()),
             refused and not Path(runlog.RUNLOG).exists(), message)
    model, opt = tiny()
    held, detail = True, "accepted"
    try:
        with OptimizerMonitor(opt, model=model, every=np.int64(2), **QUIET) as mon:
            train(model, opt, mon, 3)
        held = mon.history.series("grad_norm")[0].tolist() == [1, 3]
    except Exception as exc:  # noqa: BLE001
        held, detail = False, f"{type(exc).__name__}: {exc}"
    case(12, "every=np.int64(2)", held, detail)

    # 14: gradients beyond float32's range, against a float64 oracle
    for scale in (1e30, 1e-30):
        grads = {}

        def big(step, params, scale=scale):
            for i, p in enumerate(params):
                g = torch.Generator().manual_seed(10 * step + i)
                p.grad = torch.randn(p.shape, generator=g) * scale
                grads[step, i] = p.grad.double()
        params = [nn.Parameter(torch.zeros(80, 64)), nn.Parameter(torch.zeros(80))]
        ok, detail, mon = records_everything(lambda ps: torch.optim.SGD(ps, lr=1e-3), params,
                                             big, steps=2)
        want = math.sqrt(sum(float(g.square().sum()) for (s, _), g in grads.items() if s == 2))
        got = mon.history.series("grad_norm")[1][-1] if ok else math.nan
        error = abs(got - want) / want
        case(14, f"gradients of {scale:g}: grad_norm against float64",
             bool(ok and math.isfinite(got) and error < 1e-6),
             f"{got:.6g} against {want:.6g} (relative error {error:.1e})")
    return out


def corrupt_library(tmp: Path) -> tuple[str, bool, str]:
    """A cached ``optiscope_cpu-*.so`` cut to 10 bytes: the first bundled step must not die."""
    from optiscope.kernels import cpu
    lib = cpu.kernel()
    if lib is None:
        return "a corrupt cached C library", True, "no C compiler here: nothing cached"
    cache = tmp / "cache"
    cache.mkdir()
    (cache / Path(lib._name).name).write_bytes(Path(lib._name).read_bytes()[:10])
    code = ("import torch; from optiscope.optimizers import AdamW; p = torch.nn.Parameter("
            "torch.ones(8)); opt = AdamW([p], lr=0.1, backend='torch'); p.grad = torch.ones(8); "
            "opt.step(); print('stepped')")
    env = dict(os.environ, OPTISCOPE_CACHE_DIR=str(cache),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)
    held = proc.returncode == 0 and "stepped" in proc.stdout
    last = (proc.stderr.strip().splitlines() or [""])[-1]
    return ("a corrupt cached C library (file too short)", held,
            "the step ran" if held else last[:160])


def hostile_records(tmp: Path) -> tuple[str, bool, str]:
    """A run log with ``"step": 10**30``, ``"values": []`` and a scalar named ``[/]loss``."""
    run = tmp / "hostile"
    model, opt = tiny()
    with OptimizerMonitor(opt, model=model, log_dir=run, **QUIET) as mon:
        train(model, opt, mon, 2)
    with open(run / runlog.RUNLOG, "a") as f:
        f.write('{"type":"scopes","id":90,"names":["global"]}\n')
        f.write('{"type":"sample","step":' + str(10**30)
                + ',"time":1,"values":{"loss":[90,[1]]}}\n')
        f.write('{"type":"sample","step":3,"time":1,"values":[]}\n')
        f.write('{"type":"sample","step":4,"time":1,"values":{"[/]loss":[90,[1]]}}\n')
    from optiscope.cli import main as cli
    try:
        history, _ = quiet_load(run)
        with contextlib.redirect_stdout(None), contextlib.redirect_stderr(open(os.devnull, "w")):
            code = cli(["report", str(run)])
        held, detail = code == 0, f"load_run: {len(history.series('grad_norm')[0])} samples; " \
                                  f"report exit {code}"
    except BaseException as exc:  # noqa: BLE001 - SystemExit too
        held, detail = False, f"{type(exc).__name__}: {str(exc)[:140]}"
    return "records that do not fit the schema (step 10**30, values [], '[/]loss')", held, detail


def concurrency_cases(tmp: Path) -> list[dict]:
    out = []
    run = tmp / "two-writers"
    model, opt = tiny()
    first = OptimizerMonitor(opt, model=model, log_dir=run, **QUIET)
    train(model, opt, first, 2)
    model2, opt2 = tiny()
    refused, message = expect_refusal(lambda: OptimizerMonitor(opt2, model=model2, log_dir=run,
                                                               resume=True, **QUIET))
    proc = child(run, 3, resume=True)
    _, stderr = proc.communicate(timeout=120)
    other = proc.returncode != 0 and "another live monitor" in stderr
    train(model, opt, first, 2)
    first.close()
    history, warned = quiet_load(run)
    steps = history.series("grad_norm")[0].tolist()
    out.append(dict(case="concurrency: a second writer, same process and another process",
                    held=refused and other and steps == [1, 2, 3, 4] and not warned,
                    detail=f"{message}; the other process: "
                           f"{(stderr.strip().splitlines() or ['?'])[-1][:120]}"))
    with OptimizerMonitor(opt, model=model, log_dir=run, resume=True, **QUIET) as again:
        train(model, opt, again, 2)  # once the first writer has closed, the run resumes
    steps = quiet_load(run)[0].series("grad_norm")[0].tolist()
    out.append(dict(case="concurrency: resume once the first writer has closed",
                    held=steps == [1, 2, 3, 4, 5, 6], detail=f"samples {steps}"))
    return out


def scale_case(tmp: Path, steps: int, tensors: int) -> tuple[dict, dict]:
    """The monitor's writer on a long run: each sample with the metrics of ``tensors`` tensors."""
    from optiscope.dashboards.report import write_report
    run = tmp / "scale"
    writer = runlog.RunLogWriter(run)
    writer.write_meta({"optimizer": "synthetic", "params": [
        {"name": f"layer{i}.weight", "shape": [16, 16]} for i in range(tensors)]})
    rng = np.random.default_rng(0)
    scopes = ["global"] + [f"layer{i}.weight" for i in range(tensors)]
    names = [m.name for m in TENSOR_METRICS if m.name not in (
        "moment2_drift_since_freeze", "quant_error", "grad_diagonality",
        "grad_diagonality_original")]
    started = time.perf_counter()
    for step in range(1, steps + 1):
        values = {name: (scopes, rng.lognormal(size=len(scopes))) for name in names}
        values["lr"] = (["group0"], [1e-3])
        values["loss"] = (["global"], [float(rng.random())])
        writer.write_sample(step, time.time(), values)
    writer.close()
    write_s = time.perf_counter() - started
    started = time.perf_counter()
    history, warned = quiet_load(run)
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    write_report([history], run / "report.html")
    report_s = time.perf_counter() - started
    size = (run / runlog.RUNLOG).stat().st_size
    loaded = history.series("grad_norm")[0].tolist()
    figures = dict(steps=steps, tensors=tensors, metrics=len(names) + 2,
                   log_mb=round(size / 1e6, 1), write_s=round(write_s, 1),
                   load_s=round(load_s, 1), report_s=round(report_s, 1),
                   report_mb=round((run / "report.html").stat().st_size / 1e6, 1))
    held = loaded == list(range(1, steps + 1)) and not warned
    return dict(case=f"scale: {steps} samples x {tensors} tensors", held=held,
                detail=f"{figures['log_mb']} MB log written in {figures['write_s']} s, "
                       f"load_run {figures['load_s']} s, report {figures['report_s']} s"), figures


# ------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reliability",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=4, help="random crashes and SIGINTs (4)")
    parser.add_argument("--steps", type=int, default=10_000, help="samples of the long log")
    parser.add_argument("--tensors", type=int, default=200, help="tensors of the long log")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random moments")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="directory of reliability.json (benchmarks/results)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    logging.getLogger("optiscope").setLevel(logging.INFO)
    logging.getLogger("optiscope").propagate = False  # the cases' expected errors: not printed
    started, load_before = time.perf_counter(), load_average()
    results, figures = [], {}
    with tempfile.TemporaryDirectory(prefix="optiscope-reliability-") as tmp:
        root = Path(tmp)
        os.chdir(root)  # log_dir="" must not write here either
        sections = (("crash", lambda: crash_cases(root, rng, args.repeats)),
                    ("interrupt", lambda: interrupt_cases(root, rng, args.repeats)),
                    ("disk full", lambda: disk_cases(root)),
                    ("bad input", lambda: bad_input_cases(root)),
                    ("concurrency", lambda: concurrency_cases(root)))
        for name, fn in sections:
            try:
                results.extend(fn())
            except Exception:  # noqa: BLE001 - a sweep that dies is a case not held
                results.append(dict(case=f"{name}: the sweep itself", held=False,
                                    detail=traceback.format_exc(limit=3)[-400:]))
        case, figures = scale_case(root, args.steps, args.tensors)
        results.append(case)
        os.chdir(ROOT)
    seconds = time.perf_counter() - started
    width = max(len(r["case"]) for r in results)
    print(f"{'case':<{width}}  result    detail")
    for r in results:
        print(f"{r['case']:<{width}}  {'held' if r['held'] else 'NOT HELD':<8}  {r['detail']}")
    held = sum(r["held"] for r in results)
    print(f"\n{held} of {len(results)} cases held ({seconds:.0f} s)")
    write_script_results(args.output, "reliability.json", schema=SCHEMA,
                         command=script_command("benchmarks.reliability", argv),
                         held=held, cases=len(results), seconds=round(seconds, 1),
                         cpus=os.cpu_count(),
                         load_average={"start": load_before, "end": load_average()},
                         scale=figures, results=results)
    return 0 if held == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
