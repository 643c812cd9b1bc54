"""A sampled step on its way to the host, the copy that brings it there, and the thread that
decodes it and writes its records."""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from optiscope.monitor.collect import storage_parts
from optiscope.monitor.statewatch import StateWatch

__all__ = ["_Pending", "_to_host", "Worker", "state_bytes", "StateSizes", "StateFigures"]

log = logging.getLogger("optiscope.monitor")


@dataclass
class _Pending:
    """A sampled step whose numbers are on their way to the host."""

    step: int
    time: float
    rows: Tensor | None = None            # [n_tensors, NUM_COLS] (host, or pinned when CUDA)
    active: list[int] = field(default_factory=list)  # the tensors the step updated
    skipped_device: Tensor | None = None  # found_inf total of fused steps, host copy
    scalars: dict[str, object] = field(default_factory=dict)
    lrs: list[float] = field(default_factory=list)
    state_bytes: tuple | None = None      # (`StateFigures` at the step, CUDA bytes allocated)
    scopes: list[str] = field(default_factory=list)  # the slots' names at the step
    skipped_host: int = 0
    event: object = None                  # torch.cuda.Event once sealed, on CUDA
    sealed: bool = False
    checked: bool = False                 # on_nonfinite="raise" looked before the update


def _to_host(t: Tensor) -> Tensor:
    """Starts a device-to-host copy without waiting for it (a plain copy on CPU: numpy's for the
    float64 rows, without a dispatched op)."""
    if t.device.type == "cpu":
        if (t.dtype == torch.float64 and type(t) is Tensor and not t.requires_grad
                and not t.is_neg()):
            return torch.from_numpy(np.array(t.numpy()))
        return t.clone()
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out


class Worker:
    """Runs the decoding of samples and the writing of their records (run log, sinks) in order,
    on a thread of its own, so that the training thread only queues them.

    Args:
        threaded: False runs every call at once on the caller's thread (``strict`` monitors:
            an error there must reach the caller).
    """

    def __init__(self, threaded: bool):
        self.threaded = threaded
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Condition()
        self._waiting = 0       # calls queued and not yet finished
        self._thread: threading.Thread | None = None
        self.errors = 0

    def submit(self, fn, *args) -> None:
        """Runs ``fn(*args)`` after every call submitted before it."""
        if not self.threaded or self.on_worker():
            fn(*args)
            return
        with self._idle:
            self._waiting += 1
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="optiscope-records",
                                            daemon=True)
            self._thread.start()
        self._queue.put((fn, args))

    def on_worker(self) -> bool:
        return threading.current_thread() is self._thread

    def flush(self) -> None:
        """Waits until every submitted call has run (at once on the worker itself)."""
        if self._thread is None or self.on_worker():
            return
        with self._idle:
            while self._waiting:
                self._idle.wait()

    def _run(self) -> None:
        while True:
            fn, args = self._queue.get()
            try:
                fn(*args)
            except BaseException:  # never kill the thread: training goes on
                self.errors += 1
                if self.errors <= 3:
                    log.exception("optiscope: decoding or writing a sample failed; training goes "
                                  "on%s", "" if self.errors < 3 else " (further errors not shown)")
            finally:
                with self._idle:
                    self._waiting -= 1
                    self._idle.notify_all()


def state_bytes(states: list[list], cuda: int | None, shared
                ) -> tuple[list[int], dict[str, int], int, int | None]:
    """Bytes of each tensor's optimizer state (storages counted once), per key, and shared
    (``shared``: the optimizer's `shared_state_bytes`, or None); ``states``: each tensor's state
    items at the step, measured here, on the worker."""
    seen: set = set()
    per_tensor, per_key = [], {}
    for items in states:
        total = 0
        for key, value in items:
            if not isinstance(value, Tensor):
                continue
            for ident, nbytes in storage_parts(value):  # a subclass: its inner tensors
                if ident in seen:
                    continue
                seen.add(ident)
                total += nbytes
                per_key[key] = per_key.get(key, 0) + nbytes
        per_tensor.append(total)
    return per_tensor, per_key, int(shared()) if shared else 0, cuda


@dataclass(frozen=True)
class StateFigures:
    """`state_bytes` of the slots' state at a step (shared between samples: never changed)."""

    per_tensor: list[int]
    per_key: dict[str, int]
    total: int              # sum of per_tensor
    tail: list[int]         # per_tensor, then per_key's values: the record after the global


class StateSizes:
    """The slots' `StateFigures`, measured again only when the state holds other tensors than at
    the last sample (`StateWatch`; what escapes it is said there: a tensor resized in place).

    Measuring walks every state tensor's storages; it runs on the training thread, at the step
    whose state it measures, and at most when the state's tensors change (the first sample, a
    state created or replaced, a new param group): so the decoding, on the worker thread or
    later, never reads a state that has moved on.
    """

    def __init__(self):
        self._watch = StateWatch()
        self._figures: StateFigures | None = None
        self.version = 0  # counts the changes of the state's tensors seen
        self._seen: tuple[int, int] | None = None  # (id of the state, step) of the last look

    def reset(self) -> None:
        """The slots changed: measure at the next sample."""
        self._watch.reset()
        self._figures = None

    def version_at(self, state: dict, completed: int) -> int | None:
        """`version` of ``state`` now, when it is the state of the last look (a state loaded
        since replaces ``optimizer.state``), no tensor of it was freed since, and no optimizer
        step has completed since (``completed``: the last step that did); else None. A state
        tensor replaced by the user between two steps, without freeing the old one, escapes."""
        if self._seen == (id(state), completed) and not self._watch.freed:
            return self.version
        return None

    def at_step(self, state: dict, slots: list, step: int) -> StateFigures:
        """The figures of the ``slots``' (`TensorSlot`) entries of ``state``
        (``optimizer.state``) after ``step``."""
        self._seen = (id(state), step)
        if self._watch.changed(state) or self._figures is None:
            self.version += 1
            per_tensor, per_key, _, _ = state_bytes(
                [list(state.get(s.param, {}).items()) for s in slots], None, None)
            self._figures = StateFigures(per_tensor, per_key, sum(per_tensor),
                                         [*per_tensor, *per_key.values()])
        return self._figures
