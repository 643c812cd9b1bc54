"""What one sampled step of the monitor costs the training thread: dispatched aten ops and added
milliseconds, for a model of many small tensors (``python -m benchmarks.monitor_step``).

On a GPU a sampled step's cost is host time and kernel launches, which a CPU measures honestly
when the tensors are tiny: GPT-2's 148 tensors (12 blocks) at d_model 16, or the same structure
with 83 blocks (1,000 tensors). ``every=1`` and the monitor's defaults (the automatic coordinate
sample, the top-k probe, drift), a run log always written.

Ops: a `TorchDispatchMode` is entered by a step pre-hook registered before the monitor's and left
by one registered after it, and likewise around the post-hooks: it counts what the monitor's hooks
dispatch, including the decoding of the previous sample and the run-log and sink writing when
they run there. Not counted: view and metadata ops (`is_view`: an op whose schema returns an
alias of an input without writing it — ``view``, ``reshape``'s alias, ``slice``, ``select``,
``t``, ``expand``, ``detach``, ``split``, ``as_strided``, ...); calls into the C kernel through
ctypes are not aten ops and are counted apart (``c_calls``). A bundled optimizer's statistics
(written by its own kernel inside ``step``) are outside the hooks: in the time, not in the ops.

Milliseconds: a monitored and an unmonitored optimizer of the same kind, each on its own copy of
the parameters with the same gradients, step in alternation (the order drawn each round); added
ms = median(monitored step) − median(unmonitored step), the step timed around
``optimizer.step()`` (hooks included); ``added_mean_ms`` the same with means (work done on some
steps only would hide from the medians). ``hooks_ms``: the median time spent inside the monitor's
hooks themselves.
"""

from __future__ import annotations

import contextlib
import io
import random
import statistics
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from optiscope.bench.cases import gpt2_shapes

__all__ = ["OpCounter", "OPTIMIZERS", "SINKS", "shapes_for", "count_ops", "time_step", "measure"]

# Ops that read or set metadata only (they may reach a dispatch mode without being views).
_METADATA = {"aten::sym_size", "aten::sym_stride", "aten::sym_numel", "aten::sym_storage_offset",
             "aten::is_same_size", "aten::_has_compatible_shallow_copy_type"}


def _counted(func) -> bool:
    return not (func.is_view or func._schema.name in _METADATA)


class OpCounter(TorchDispatchMode):
    """Counts dispatched non-view aten ops by name while active."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _counted(func):
            self.counts[func._schema.name.removeprefix("aten::")] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def shapes_for(n_tensors: int) -> tuple:
    """GPT-2's parameter shapes at d_model 16 (vocab 256, n_ctx 32) with ``(n − 4) / 12`` blocks:
    148 tensors is GPT-2 small's count, 1,000 is 83 blocks."""
    if (n_tensors - 4) % 12:
        raise ValueError(f"n_tensors must be 4 + 12·blocks (148, 1000, ...), got {n_tensors}")
    return gpt2_shapes(n_layer=(n_tensors - 4) // 12, d_model=16, vocab=256, n_ctx=32)


def _bundled(params):
    from optiscope.optimizers import AdamW
    return AdamW(params, lr=1e-3)


OPTIMIZERS = {
    "bundled": ("optiscope.optimizers.AdamW (default backend)", _bundled),
    "foreign": ("torch.optim.AdamW (default: for-loop on CPU)",
                lambda params: torch.optim.AdamW(params, lr=1e-3)),
    "foreign-foreach": ("torch.optim.AdamW(foreach=True)",
                        lambda params: torch.optim.AdamW(params, lr=1e-3, foreach=True)),
}
SINKS = {
    "runlog": "the run log only (console, TensorBoard and report off)",
    "sinks": "the run log, TensorBoard events and a console drawing into memory",
    "runlog-bg": "the run log only, decoded and written on the monitor's thread (background=True)",
    "sinks-bg": "the run log, TensorBoard and a console, on the monitor's thread (background=True)",
}


def _params(shapes, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    return params


def _monitor(opt, sinks: str, log_dir: str, probes: bool):
    from optiscope import OptimizerMonitor
    background = sinks.endswith("-bg")
    options = dict(every=1, log_dir=log_dir, report=False, background=background,
                   quant_probes=probes, range_probes=probes)
    if sinks.startswith("runlog"):
        return OptimizerMonitor(opt, console=False, tensorboard=False, **options)
    from rich.console import Console
    return OptimizerMonitor(opt, console=Console(file=io.StringIO(), width=120),
                            tensorboard=True, **options)


@dataclass
class _Windows:
    """Pre-hooks registered around the monitor's: an op counter and a clock over its hooks."""

    counter: OpCounter | None
    seconds: float = 0.0
    _t0: float = 0.0
    inside: bool = False

    def enter(self, *_):
        self.inside = True
        if self.counter is not None:
            self.counter.__enter__()
        self._t0 = time.perf_counter()

    def leave(self, *_):
        self.seconds += time.perf_counter() - self._t0
        self.inside = False
        if self.counter is not None:
            self.counter.__exit__(None, None, None)


def _watched(kind: str, shapes, sinks: str, log_dir: str, counter: OpCounter | None,
             probes: bool = True):
    opt = OPTIMIZERS[kind][1](_params(shapes))
    windows = _Windows(counter)
    opt.register_step_pre_hook(windows.enter)
    opt.register_step_post_hook(windows.enter)
    monitor = _monitor(opt, sinks, log_dir, probes)
    opt.register_step_pre_hook(windows.leave)
    opt.register_step_post_hook(windows.leave)
    return opt, monitor, windows


def _c_calls(windows: _Windows):
    """Counts calls into the C kernel library (ctypes) inside the monitor's hooks, on the
    calling (training) thread: the run log's writer thread formats in C too, at its own pace."""
    from optiscope.kernels import cpu
    lib = cpu.kernel()
    if lib is None:
        return contextlib.nullcontext(Counter()), Counter()
    calls: Counter = Counter()
    originals = {}
    training = threading.get_ident()
    for name in dir(lib):
        if name.startswith("optiscope_"):
            f = getattr(lib, name)
            originals[name] = f

            def wrapped(*args, _f=f, _n=name):
                if windows.inside and threading.get_ident() == training:
                    calls[_n] += 1
                return _f(*args)
            setattr(lib, name, wrapped)

    @contextlib.contextmanager
    def active():
        try:
            yield calls
        finally:
            for name, f in originals.items():
                setattr(lib, name, f)
    return active(), calls


def count_ops(kind: str, n_tensors: int, sinks: str = "runlog", steps: int = 3,
              probes: bool = True) -> dict:
    """Ops per sampled step: the last of ``steps`` (the first samples and their decoding, with
    their one-time work, come before it). ``probes``: the monitor's ``quant_probes`` and
    ``range_probes`` (default on here; off by default in the monitor)."""
    shapes = shapes_for(n_tensors)
    with tempfile.TemporaryDirectory() as log_dir:
        opt, monitor, windows = _watched(kind, shapes, sinks, log_dir, None, probes)
        for _ in range(steps - 1):
            opt.step()
        windows.counter = counter = OpCounter()
        c_context, c_counts = _c_calls(windows)
        with c_context:
            opt.step()
        windows.counter = None
        monitor.close()
    return dict(ops=counter.total, c_calls=sum(c_counts.values()),
                op_counts=dict(counter.counts.most_common()))


def time_step(kind: str, n_tensors: int, sinks: str = "runlog", rounds: int = 200,
              warmup: int = 5, seed: int = 0, probes: bool = True) -> dict:
    """Added ms per sampled step: monitored against unmonitored, interleaved (see the module)."""
    shapes = shapes_for(n_tensors)
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as log_dir:
        plain = OPTIMIZERS[kind][1](_params(shapes))
        opt, monitor, windows = _watched(kind, shapes, sinks, log_dir, None, probes)
        for _ in range(warmup):
            plain.step()
            opt.step()
        times = {"plain": [], "monitored": []}
        hooks = []
        for _ in range(rounds):
            order = [("plain", plain), ("monitored", opt)]
            rng.shuffle(order)
            for name, o in order:
                before = windows.seconds
                t0 = time.perf_counter()
                o.step()
                times[name].append(time.perf_counter() - t0)
                if o is opt:
                    hooks.append(windows.seconds - before)
        monitor.close()
    plain_ms = statistics.median(times["plain"]) * 1e3
    monitored_ms = statistics.median(times["monitored"]) * 1e3
    # the means too: work that lands on some steps only (a batch written every few samples, a
    # thread's backlog) hides from the medians
    mean = {k: statistics.fmean(v) * 1e3 for k, v in times.items()}
    return dict(plain_ms=plain_ms, monitored_ms=monitored_ms, added_ms=monitored_ms - plain_ms,
                added_mean_ms=mean["monitored"] - mean["plain"],
                hooks_ms=statistics.median(hooks) * 1e3, rounds=rounds)


def measure(kind: str, n_tensors: int, sinks: str, rounds: int, probes: bool = True) -> dict:
    """One row of the benchmark: ops and ms for one optimizer, tensor count, sink set and
    readiness probes on or off."""
    row = dict(optimizer=kind, n_tensors=n_tensors, sinks=sinks, probes=probes)
    row.update(count_ops(kind, n_tensors, sinks, probes=probes))
    row.update(time_step(kind, n_tensors, sinks, rounds, probes=probes))
    return row
