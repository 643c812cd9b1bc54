"""The monitor's step control: closures, clip calls, explicit-step scalars, resume, and
``on_nonfinite="raise"``: the parts of `OptimizerMonitor` that follow what a trainer does around
``optimizer.step``, kept apart from the hooks' sampling core.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import Tensor

from optiscope.monitor import clipping
from optiscope.monitor.checks import DeferInterrupt
from optiscope.monitor.history import Alert
from optiscope.monitor.metrics import Col
from optiscope.monitor.nonfinite import NonFiniteGradientError, nonfinite_message
from optiscope.monitor.pending import _Pending, _to_host

__all__ = ["StepControl"]

log = logging.getLogger("optiscope.monitor")


class StepControl:
    """Mixed into `OptimizerMonitor` (which owns every attribute used here)."""

    def _init_step_control(self, start_step, on_nonfinite: str) -> None:
        if on_nonfinite not in ("warn", "raise"):
            raise ValueError(f"OptimizerMonitor: on_nonfinite must be 'warn' or 'raise', got "
                             f"{on_nonfinite!r}")
        if start_step is not None and (isinstance(start_step, bool) or not isinstance(start_step, int)
                                       or start_step < 0):
            raise ValueError(f"OptimizerMonitor: start_step must be a step >= 0 or None, got "
                             f"{start_step!r}")
        self.on_nonfinite = on_nonfinite
        self.stopped: NonFiniteGradientError | None = None  # why "raise" stopped the run
        self._stop_quietly = False    # the callbacks: skip the update and stop the trainer
        self._closure_depth = 0       # > 0 while a closure given to step() runs
        self._begin_pending = False   # a sampled step whose statistics wait for its closure
        self._capture: clipping.Capture | None = None

    def _pre_hook(self, optimizer, args, kwargs):
        # The step's number: one after the last that completed (a step interrupted or failed
        # inside optimizer.step is not counted, and its number is used again by the next one).
        self.step = self._completed + 1
        self._calls += 1
        # torch passes the bound call's arguments: args[0] is the optimizer itself
        closure = kwargs.get("closure") if "closure" in kwargs else (args[1] if len(args) > 1 else None)
        if closure is None:
            if self._pending or self._current is not None or self.is_sampled(self.step):
                with DeferInterrupt():  # Ctrl-C lands after the step's record is started
                    self._guard(self._before_step, kwargs)
            else:  # nothing to record: no signal calls either
                self._guard(self._before_step, kwargs)
            self._check_nonfinite_before()
            return None
        # forward and backward run inside the closure, after this hook: the statistics are taken
        # when it has run (the first call: LBFGS calls it again after moving θ)
        self._guard(self._before_step, kwargs, True)
        wrapped = self._wrap_closure(closure, kwargs)
        if "closure" in kwargs:
            return args, {**kwargs, "closure": wrapped}
        return (args[0], wrapped, *args[2:]), kwargs

    def _post_hook(self, optimizer, args, kwargs) -> None:
        self._completed = self.step
        if self._begin_pending:  # the closure never ran: nothing to describe
            self._begin_pending, self._current = False, None
        if self.is_sampled(self.step):
            with DeferInterrupt():  # Ctrl-C lands after the step's record is complete
                self._guard(self._after_step)
        self._check_nonfinite_after()

    def _begin(self, kwargs: dict) -> None:
        self.collector.begin(kwargs)
        capture, self._capture = self._capture, None
        if capture is not None and capture.step == self.step:
            columns = capture.columns(self.slots, self.collector.active)
            if columns is not None:  # the gradient before clipping
                self.collector.override_pre(columns)
            self._current.scalars["clip_coef"] = _to_host(torch.as_tensor(capture.coef()))
        else:
            self._current.scalars["clip_coef"] = 1.0

    def state_dict(self) -> dict:
        """What a checkpoint needs to resume the run log in step with it: save it with the
        model and optimizer, and pass it to `load_state_dict` of the monitor of the resumed run
        (made with ``resume=True`` and the same ``log_dir``). The records handed to the run
        log's writer thread so far are on disk when it returns, so a process killed right after
        saving the checkpoint leaves a log in step with it."""
        writer = getattr(self, "writer", None)
        if writer is not None:
            self._decode_waiting()  # the samples waiting for their batch
            self._worker.flush()
            writer.flush()
            # the scalars logged for this step after the checkpoint: written at the next hook
            self._checkpointed = self.step
        return {"step": self.step, "every": self.every}

    def load_state_dict(self, state: dict) -> None:
        """Continues the run at the checkpoint's step: the next optimizer step is
        ``state["step"] + 1``, and what was recorded after that step (by an attempt that went on
        past the checkpoint, then crashed) is superseded."""
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError(f"OptimizerMonitor.load_state_dict: expected the dict "
                             f"OptimizerMonitor.state_dict() returned, got {state!r}")
        self._drain(block=True)
        self._restart_at(state["step"])

    def _restart_at(self, step: int) -> None:
        """The next step is ``step + 1``; later records in the run log are void from here on."""
        self._current, self._capture, self._begin_pending = None, None, False
        self.step = self._completed = step
        self._worker.flush()  # the samples before the resume mark are written before it
        self.writer.write_resume(step)
        self._history.drop_after(step)
        self._emit("on_resume", step)  # none yet at construction: `_start` tells them

    def _align_step(self, step: int) -> None:
        """A trainer's step count is the truth (it counts a step a GradScaler skipped)."""
        if step != self.step and self._closure_depth == 0:
            self._seal_current()
            self.step = self._completed = step

    def _scalar_at(self, name: str, value, step: int) -> None:
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= self.step:
            raise ValueError(f"optiscope: log_scalar({name!r}, step={step!r}): step must be an "
                             f"integer in [0, {self.step}] (the monitor's current step)")
        if isinstance(value, Tensor):  # an earlier step's record is sealed at once: read it now
            value = (_to_host(value.detach().reshape(())) if step == self.step
                     else float(value.detach().reshape(()).item()))
        current = self._current
        if current is not None and current.step == step and not current.sealed:
            current.scalars[name] = value
            return
        pending = _Pending(step, time.time(), scalars={name: value})
        if step == self.step:  # later scalars of this step join it
            self._seal_current()
            self._current = pending
        else:
            pending.sealed = True
        self._pending.append(pending)

    def _wrap_closure(self, closure, kwargs):
        called = False

        def closure_seen_by_optiscope(*a, **k):
            nonlocal called
            self._closure_depth += 1
            try:
                out = closure(*a, **k)
            finally:
                self._closure_depth -= 1
            if not called:
                called = True
                if self._begin_pending:
                    self._begin_pending = False
                    with torch.no_grad():
                        self._guard(self._begin, kwargs)
                    self._check_nonfinite_before()
            return out

        return closure_seen_by_optiscope

    # ----------------------------------------------------------------------------- clipping
    def _clip_begin(self, params: list):
        """A clip call (see `optiscope.monitor.clipping`): on a sampled step, takes the
        statistics of the gradients it is about to clip."""
        if not self._hooks:
            return None
        step = self.step if self._closure_depth else self.step + 1
        if not self.is_sampled(step) or (self._closure_depth and not self._begin_pending):
            return None  # unsampled, or a closure called again (LBFGS) after the statistics
        watched = {id(s.param) for s in self.slots}
        if not any(id(p) in watched for p in params):
            return None  # another model's clip call
        try:
            if self._capture is None or self._capture.step != step:
                self._capture = clipping.Capture(step)
            token = self._capture.take(self.slots, params)
            return None if token is None else (self._capture, token)
        except Exception:
            if self.strict:
                raise
            log.exception("optiscope: reading the gradients before clipping failed at step %d; "
                          "the clipped gradient is recorded", step)
            self._capture = None
            return None

    def _clip_end(self, token, coef) -> None:
        capture, fresh = token
        try:
            capture.finish(self.slots, fresh, coef)
        except Exception:
            if self.strict:
                raise
            log.exception("optiscope: reading the clip coefficient failed")

    # ----------------------------------------------------------------------------- non-finite
    def _check_nonfinite_before(self) -> None:
        """on_nonfinite="raise": stops before the update when the gradient statistics exist
        before it (one host synchronisation, on sampled steps only)."""
        current = self._current
        if (self.on_nonfinite != "raise" or current is None or current.step != self.step
                or self._begin_pending):
            return
        column = self.collector.pre_column(Col.GRAD_NONFINITE)
        if column is None:  # computed by the bundled optimizer's update: checked after it
            return
        current.checked = True
        counts = column.detach().float().cpu().tolist()
        bad = [(self.slots[i].scope, c) for i, c in zip(self.collector.active, counts) if c > 0]
        if not bad:
            return
        self._current = None  # this step is not taken: no sample
        message = nonfinite_message(self.step, bad, applied=False)
        self._alert(Alert(self.step, "nonfinite_grads", "nonfinite_grads", [n for n, _ in bad],
                          message, float(sum(c for _, c in bad))))
        self._stop(NonFiniteGradientError(message, self.step, [n for n, _ in bad]), skip=True)

    def _check_nonfinite_after(self) -> None:
        """on_nonfinite="raise" for a bundled optimizer's own statistics: right after the step."""
        pending = self._pending[-1] if self._pending else None
        if (self.on_nonfinite != "raise" or pending is None or pending.step != self.step
                or pending.checked or pending.rows is None):
            return
        pending.checked = True
        if pending.rows.is_pinned():  # its copy from the device may still be in flight
            torch.cuda.current_stream().synchronize()
        counts = pending.rows[pending.active, int(Col.GRAD_NONFINITE)].tolist()
        bad = [(self.slots[i].scope, c) for i, c in zip(pending.active, counts) if c > 0]
        if bad:
            self._drain(block=True)  # the sample and its alert are recorded
            message = nonfinite_message(self.step, bad, applied=True)
            self._stop(NonFiniteGradientError(message, self.step, [n for n, _ in bad]), skip=False)

    def _stop(self, error: NonFiniteGradientError, *, skip: bool) -> None:
        self.stopped = error
        if not self._stop_quietly:
            raise error
        log.error("optiscope: %s", error)
        if skip:  # the optimizer skips tensors without a gradient: the update is not applied
            for slot in self.slots:
                slot.param.grad = None
