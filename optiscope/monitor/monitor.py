"""MonitorCore: watch any torch optimizer through its step hooks (`optiscope.OptimizerMonitor`,
in optiscope/api.py, adds the default dashboards).

The monitor never replaces ``optimizer.step``: it registers a pre-hook and a post-hook, so LR
schedulers, GradScaler and checkpointing keep working with the original optimizer object. On a
sampled step the pre-hook asks a bundled optimizer for its fused statistics (or computes the
gradient statistics itself), the post-hook finishes the per-tensor sums on the device and starts
one asynchronous copy to the host; the copy is decoded into metrics, alerts, history and the run
log when it has landed, at a later hook or at `close`. On other steps the hooks count the step and
return: no device work, no host synchronisation.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from optiscope.contract import capabilities
from optiscope.monitor import clipping
from optiscope.monitor.alerts import AlertRules
from optiscope.monitor.checks import (check_args, check_scalar_name,
                                      check_scalar_value, check_sink_args)
from optiscope.kernels.launch import local
from optiscope.monitor.collect import Collector, TensorSlot, sums_dtype
from optiscope.monitor.distributed import Topology
from optiscope.monitor.history import Alert, RunHistory
from optiscope.monitor.decode import Decoder, skip_reasons
from optiscope.monitor.metrics import NUM_COLS, ROW_COLS
from optiscope.monitor.ranges import histograms_of
from optiscope.monitor.nonfinite import NonFiniteGradientError
from optiscope.monitor.resume import unwrap_model, unwrap_optimizer
from optiscope.monitor.pending import StateSizes, Worker, _Pending, _to_host
from optiscope.monitor.steps import StepControl
from optiscope.monitor.runlog import NullWriter, RunLogError, open_run
from optiscope.monitor.runmeta import run_meta
from optiscope.monitor.sink import Sink

__all__ = ["MonitorCore", "DECODE_BATCH", "DECODE_WAIT_S"]

DECODE_BATCH = 8      # samples decoded together at a hook (`MonitorCore._batch_due`)
DECODE_WAIT_S = 0.1   # ... or as soon as the oldest has waited this long

log = logging.getLogger("optiscope.monitor")

class MonitorCore(StepControl):
    """Watches an optimizer and records the metrics of `TENSOR_METRICS` on sampled steps.

    Args:
        optimizer: any `torch.optim.Optimizer`, bundled or not.
        model: the model, to name tensors after ``model.named_parameters()`` (default None:
            ``group{i}.param{j}``, or the names a bundled optimizer was given).
        every: sample steps 1, every+1, 2·every+1, ... (default 1).
        log_dir: the run directory for the run log and metadata (default None: memory only).
        sample_size: coordinates per tensor on which copy-based statistics (second-moment drift,
            and a foreign optimizer's update norm) are computed; None (default) for the automatic
            budget of `optiscope.monitor.sampling` (under 1% of the parameter bytes).
        topk_density: density ρ of the top-k probe for optimizers that do not sparsify
            (default 0.01); None turns the probe off.
        topk_block: block size B of the top-k probe (default 4096).
        freeze_probe: step T for ``moment2_drift_since_freeze``: "had 1-bit Adam frozen v at T,
            how far has the real v moved since?" (default None: not recorded; for `OneBitAdam`,
            its own ``freeze_step``, compared with the v it would have had without freezing).
            Step T is sampled whatever ``every`` says.
        scaler: the `torch.amp.GradScaler` in use, to count the steps it skips (default None).
            The monitor sees unscaled gradients either way.
        spike_factor: grad-norm spike threshold, × its running average (default 10).
        update_ratio_band: update-ratio band, × its running geometric average (default 10).
        seed: seeds the coordinate samples (default 0).
        resume: append to an existing run log in ``log_dir``, continuing its step count
            (default False).
        start_step: the step the run continues from, e.g. the step of the checkpoint a crashed
            run resumes from (default None: 0 for a new run, the run log's last step with
            ``resume=True``). The next optimizer step is ``start_step + 1``; what an abandoned
            attempt recorded after ``start_step`` is superseded (`load_run` shows each step
            once, with the resumed run's values). See also `state_dict`.
        on_nonfinite: ``"warn"`` (default): a non-finite gradient raises an alert and training
            goes on; ``"raise"``: the first sampled step with a non-finite gradient raises
            `optiscope.NonFiniteGradientError` naming the tensors, from before the update where
            the gradient statistics are known then (any optimizer not bundled, or clipping seen;
            a bundled optimizer computes them in its update: there it raises right after).
        quant_probes: quantize sampled blocks of an uncompressed m and v as 8- and 4-bit optimizers
            would (``probe_int8_m`` ...: `optiscope.monitor.compression`; default False).
        range_probes: log2 histograms of g, θ⁺ − θ⁻ and v and the shares low-precision formats
            would flush or overflow (``grad_fp16_underflow`` ...: `optiscope.monitor.ranges`;
            default False; both cost a sampled step more: see the README). ``"exact"``: a
            bundled Adam/AdamW counts every entry in its update's pass instead of the sample
            (that pass then takes about 3.5x as long: docs/readiness.md).
        process_group: the data-parallel group for sharded parameters (default: the world).
        strict: raise errors from inside the hooks instead of logging them and carrying on
            (default False: a monitor bug never stops training).
        console: the live terminal dashboard. ``"auto"`` (default): on when stdout is a
            terminal; True: on, printing one line per sample when stdout is not a terminal;
            False: off; a `rich.console.Console` to draw on; or a configured
            `optiscope.dashboards.ConsoleDashboard`.
        tensorboard: write TensorBoard events into ``log_dir`` (default True; needs log_dir).
        report: write ``report.html`` and ``trends.png`` into ``log_dir`` at `close`
            (default True; needs log_dir).
        sinks: more consumers of the records (`optiscope.dashboards.Sink` subclasses), e.g. a
            bridge to your experiment tracker (default none).
        background: decode samples and write the run log and the sinks on a thread of the
            monitor's own, off the training thread (default False: at the next hook). Records
            then reach the file and the sinks a little later; `history` and `close` wait for
            them. Ignored with ``strict`` (errors must reach the caller).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, model: torch.nn.Module | None = None,
                 every: int = 1, log_dir: str | os.PathLike | None = None,
                 sample_size: int | None = None, topk_density: float | None = 0.01,
                 topk_block: int = 4096, freeze_probe: int | None = None, scaler=None,
                 spike_factor: float = 10.0, update_ratio_band: float = 10.0, seed: int = 0,
                 resume: bool = False, process_group=None, strict: bool = False,
                 console="auto", tensorboard: bool = True, report: bool = True,
                 sinks: Sequence[Sink] = (), start_step: int | None = None,
                 on_nonfinite: str = "warn", quant_probes: bool = False,
                 range_probes: bool | str = False, background: bool = False):
        optimizer = unwrap_optimizer(optimizer)  # Accelerate's / Lightning's wrappers
        (every, sample_size, topk_density, topk_block, freeze_probe, spike_factor,
         update_ratio_band, seed) = check_args(
            optimizer, model, every, sample_size, topk_density, topk_block, freeze_probe,
            spike_factor, update_ratio_band, seed, resume, strict, log_dir, process_group, scaler,
            quant_probes, range_probes)
        check_sink_args(console, tensorboard, report, sinks, Sink)
        self.optimizer = optimizer
        self.caps = capabilities(optimizer)  # what it provides of the contract, read once
        self.model = model
        self.every = every
        if freeze_probe is None:
            freeze_probe = self.caps.freeze_step
        self.freeze_probe = freeze_probe
        self.strict = strict
        self.slots = self._slots()
        self.topology = Topology([s.param for s in self.slots], process_group)
        self.collector = Collector(
            optimizer, self.slots, caps=self.caps,
            sample_size=sample_size, topk_density=topk_density, topk_block=topk_block,
            freeze_step=freeze_probe, seed=seed, quant_probes=quant_probes,
            range_probes=range_probes)
        self.rules = AlertRules(spike_factor, update_ratio_band)
        self.step = 0
        self._calls = 0
        self._skipped = 0
        self._fused_skips: Tensor | None = None  # running total on the device
        self._skipped_reported = 0
        self._pending: list[_Pending] = []
        self._stepping_thread = threading.get_ident()  # the thread of the last hook
        self._checkpointed = -1  # samples up to this step are decoded at once (`state_dict`)
        self._current: _Pending | None = None
        self._skip_reasons: dict[str, str] | None = None
        self._errors = 0
        self._forced: int | None = None
        self._scalar_names: set[str] = set()  # names log_scalar has accepted
        # decoding and writing of samples: off the training thread when asked
        if not isinstance(background, bool):
            raise TypeError(f"OptimizerMonitor: background must be True or False, got "
                            f"{background!r}")
        self._worker = Worker(threaded=background and not strict)
        self._scope_names: list[str] | None = None
        self._decoder, self._state_sizes = Decoder(), StateSizes()  # caches of the sampled steps
        self.collector.compression.state_version = lambda: self._state_sizes.version_at(
            self.optimizer.state, self._completed)  # no second look at the state before a step
        self._init_step_control(start_step, on_nonfinite)

        writes = log_dir is not None and self.topology.writes
        self.writer, failure = NullWriter(), None
        self._history = RunHistory(meta=run_meta(self, sample_size, topk_density, topk_block))
        if log_dir is not None:  # a tracker names a run it starts after its directory
            self._history.meta["log_dir"] = str(Path(log_dir).resolve())
        if writes:  # with resume, the logged run's history, once it is known to be this run
            try:
                self.writer, self._history = open_run(log_dir, resume=resume, meta=self._history.meta)
            except Exception as exc:
                failure = exc
        if resume:  # every rank continues rank 0's count (-1: rank 0 could not resume)
            self.step = self.topology.broadcast(-1 if failure else self._history.last_step())
        if failure is not None or self.step < 0:
            self.writer.close()
            raise failure or RuntimeError("optiscope: rank 0 could not resume the run log")
        try:
            self._start(start_step, console, tensorboard, report, sinks, writes, log_dir, scaler)
        except BaseException:
            # Nothing will call close(): release the run log (and its lock) so that the user
            # can fix the argument and construct the monitor again on the same directory.
            for hook in getattr(self, "_hooks", ()):
                hook.remove()
            self.writer.close()
            raise

    def _start(self, start_step, console, tensorboard, report, sinks, writes, log_dir,
               scaler) -> None:
        """The rest of __init__, once the run log is open: the first step, the dashboards and
        the optimizer's hooks."""
        optimizer = self.optimizer
        self._completed = self.step  # steps whose optimizer.step returned: `steps_taken`
        self.sinks: list[Sink] = []
        if start_step is not None:
            self._restart_at(start_step)

        # The dashboards: on the rank that writes (rank 0, or the only process).
        self.log_dir = None if log_dir is None else Path(log_dir)
        if self.topology.writes:
            self.sinks.extend(self._default_sinks(console, tensorboard and writes,
                                                  report and writes))
            self.sinks.extend(sinks)
        self._emit("on_meta", dict(self._history.meta))
        if start_step is not None:  # what the sinks' files hold of later steps is superseded
            self._emit("on_resume", self.step)
        self.writer.before_flush(self._decode_waiting)

        self._scaler = scaler
        if scaler is not None:
            self._watch_scaler(scaler)
        self._hooks = [optimizer.register_step_pre_hook(self._pre_hook),
                       optimizer.register_step_post_hook(self._post_hook)]
        clipping.register(self)

    # ----------------------------------------------------------------------------- public
    def log_scalar(self, name: str, value: float | Tensor, step: int | None = None) -> None:
        """Records a user series (loss, throughput, ...) at the step just taken.

        Only sampled steps (and step 0, before the first step) record it; on other steps this
        returns at once, so a tensor costs no host synchronisation there. Both arguments are
        checked at every call (TypeError, ValueError), sampled or not.

        Args:
            name: the series' name (a metric name of its own, scope ``"global"``): letters,
                digits and ``_ . - : /``, at most 200 characters, no leading, trailing or double
                ``/``. The names of the monitor's own metrics (``grad_norm``, ``lr``, ...: the
                set `optiscope.monitor.metrics.MONITOR_SERIES`) are refused, so a user scalar
                never replaces one; none of them contains ``/``, so a prefixed name such as
                ``"trainer/grad_norm"`` (a trainer's own gradient norm) is always a user scalar.
            value: a real number (int, float, numpy scalar, one-element array) or a one-element
                real tensor; NaN and ±inf are values like any other; not a bool.
            step: record it at this step (at most the current step), sampled or not: a
                trainer's logged loss at its logging step (default None: the step just taken,
                if sampled).
        """
        if not (isinstance(name, str) and name in self._scalar_names):
            check_scalar_name(name, value)
            self._scalar_names.add(name)
        value = check_scalar_value(name, value)
        if step is not None:
            self._scalar_at(name, value, step)
            return
        if self._current is None:
            if self.step != 0:
                return
            self._current = _Pending(0, time.time())
            self._pending.append(self._current)
        if isinstance(value, Tensor):
            value = _to_host(value.detach().reshape(()))
        self._current.scalars[name] = value

    def close(self) -> None:
        """Waits for the last sample, writes it, detaches the hooks and closes the run log.
        Records that could not be written (a full disk) are one logged error naming their count
        and the file, and stay in `history`; raised only when ``strict``."""
        if not self._hooks:
            return
        for h in self._hooks:
            h.remove()
        self._hooks = []
        clipping.unregister(self)
        if self._scaler is not None and "step" in vars(self._scaler):
            del self._scaler.step
        self._guard(self._drain, block=True)
        self._worker.flush()
        self._history.meta["steps_taken"] = self._completed
        self.writer.update_meta({"steps_taken": self._completed})  # resume continues from here
        self._emit("on_meta", {"steps_taken": self._completed})
        for sink in self.sinks:
            self._emit_one(sink, "close")
        self.sinks = []
        try:
            self.writer.close()
        except RunLogError as exc:
            if self.strict:
                raise
            log.error("%s", exc)  # one line: what was lost from the file, where, and where it is
        finally:
            self._after_close()

    # The dashboards are chosen above this layer (optiscope/api.py): the core draws none.
    def _default_sinks(self, console, tensorboard: bool, report: bool) -> list[Sink]:
        """The sinks ``console=``, ``tensorboard=`` and ``report=`` ask for (``tensorboard`` and
        ``report`` already False without a run directory on this rank): none here."""
        return []

    def _after_close(self) -> None:
        """Called by `close` once the run log is closed (the HTML report is written there)."""

    def __enter__(self) -> "MonitorCore":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # the body's exception is the one the user must see
            self.close()
        except Exception:
            log.exception("optiscope: closing the monitor after an error in the training loop "
                          "failed too")

    def memory_bytes(self) -> int:
        """Bytes the monitor keeps on the devices between steps (samples and saved moments)."""
        return self.collector.kept_bytes()

    def is_sampled(self, step: int) -> bool:
        """Whether ``step`` (1-based) is a sampled step."""
        return (step - 1) % self.every == 0 or step in (self.freeze_probe, self._forced)

    def sample_next(self) -> None:
        """Samples the next step whatever ``every`` says: before the last step of a run, say,
        so that its metrics and the scalars logged after it (a final evaluation) are recorded.
        In a distributed run, call it on every rank."""
        self._forced = self._completed + 1

    # ----------------------------------------------------------------------------- hooks
    def _before_step(self, kwargs: dict, defer: bool = False) -> None:
        self._stepping_thread = threading.get_ident()
        self.collector.note_step(kwargs)
        self._seal_current()
        self._drain(block=False)
        if not self.is_sampled(self.step):
            self._capture = None
            return
        if len(self.slots) != sum(len(g["params"]) for g in self.optimizer.param_groups):
            self._refresh_slots()
        self._current = _Pending(self.step, time.time())
        if defer:
            self._begin_pending = True
        else:
            self._begin(kwargs)

    def _after_step(self) -> None:
        current = self._current if self._current is not None and self._current.step == self.step else None
        failure = None
        try:
            rows = self.collector.end(self.step) if current is not None else None
        except Exception as exc:
            failure, rows = exc, None
        if rows is None:  # this rank failed: NaN rows, so the others are not left waiting
            device = local(self.slots[0].param).device
            rows = torch.full((len(self.slots), ROW_COLS), math.nan, dtype=sums_dtype(device),
                              device=device)
        rows = self.topology.reduce(rows)  # every rank, every sampled step, error or not
        if failure is not None:
            raise failure
        if current is None:
            return
        # the range probe's columns (17x the metrics' own) are NaN when it is off: not copied
        current.rows = _to_host(rows if self.collector.range_probes else rows[:, :NUM_COLS])
        current.active = list(self.collector.active)
        fused_skips = self.collector.skipped_since_last()
        if fused_skips is not None:
            self._fused_skips = fused_skips if self._fused_skips is None else self._fused_skips + fused_skips
        if self._fused_skips is not None:
            current.skipped_device = _to_host(self._fused_skips)
        declared = self.caps.group_lrs  # e.g. Adafactor's relative step
        lrs = declared() if declared is not None else [g.get("lr") for g in self.optimizer.param_groups]
        current.lrs = [math.nan if lr is None else float(lr) for lr in lrs]
        # the state's bytes now (measured again when its tensors change), the slots' names
        current.state_bytes = (self._state_sizes.at_step(self.optimizer.state, self.slots,
                                                         self.step), self._cuda_allocated())
        current.scopes = self._scopes()
        current.skipped_host = self._skipped
        self._pending.append(current)

    def _guard(self, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except NonFiniteGradientError:
            raise
        except Exception:
            if self.strict:
                raise
            self._errors += 1
            if self._errors <= 3:
                log.exception("optiscope: the monitor failed at step %d; training goes on%s",
                              self.step, "" if self._errors < 3 else " (further errors not shown)")
            self._current = None

    # ----------------------------------------------------------------------------- sinks
    def _emit(self, method: str, *args) -> None:
        for sink in list(self.sinks):
            self._emit_one(sink, method, *args)

    def _emit_one(self, sink: Sink, method: str, *args) -> None:
        """Calls one sink; a failing sink is logged and dropped, training goes on."""
        try:
            getattr(sink, method)(*args)
        except Exception as exc:
            if self.strict:
                raise
            # A full or read-only disk is said in one line; anything else is a bug: traceback.
            (log.error if isinstance(exc, OSError) else log.exception)(
                "optiscope: the %s dashboard failed in %s%s; it is switched off for the rest of "
                "the run (the run log is written separately)", type(sink).__name__, method,
                f" ({exc})" if isinstance(exc, OSError) else "")
            if sink in self.sinks:
                self.sinks.remove(sink)
            if method != "close":
                try:
                    sink.close()
                except Exception:
                    pass

    # ----------------------------------------------------------------------------- samples
    def _seal_current(self) -> None:
        """No more scalars for the current sample: mark its copies as the last ones."""
        current, self._current = self._current, None
        if current is not None and not current.sealed:
            current.sealed = True
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                current.event = torch.cuda.Event()
                current.event.record()

    def _drain(self, *, block: bool, now: bool = False) -> None:
        """Decodes the samples whose copies have landed (all of them when ``block``); at a
        step's hook, in batches (`_batch_due`) unless ``now``."""
        if block:
            self._seal_current()
        elif not now and not self._batch_due():
            return
        while self._pending and self._pending[0].sealed:
            head = self._pending[0]
            if head.event is not None:
                if not block and not head.event.query():
                    return
                head.event.synchronize()
            self._pending.pop(0)
            if self._skip_reasons is None and head.rows is not None:
                self._worker.flush()  # the first sample reads the optimizer's state: here
                self._decode(head)
            else:
                self._worker.submit(self._decode, head)
        if block:
            self._worker.flush()

    def _batch_due(self) -> bool:
        """Samples are decoded DECODE_BATCH at a time, or when the oldest waits DECODE_WAIT_S:
        after the training step the decoding's code and data are out of the caches, and the
        first sample of a batch pays for bringing them back (measured: a batch of 8 decodes in
        about a third of the time of 8 one at a hook). Readers see every sealed sample
        (`history`, `state_dict`, `close` decode what waits)."""
        pending = self._pending
        return bool(pending) and (len(pending) > DECODE_BATCH
                                  or pending[0].step <= self._checkpointed
                                  or time.time() - pending[0].time >= DECODE_WAIT_S)

    def _decode_waiting(self) -> None:
        """Decodes the sealed samples that wait for their batch, when called on the thread that
        steps the optimizer (another thread would race the hooks; it sees them a moment later)."""
        if threading.get_ident() == self._stepping_thread and self._pending:
            self._guard(self._drain, block=False, now=True)

    @property
    def history(self) -> RunHistory:
        """Every record so far: the samples of the steps before the last one (that one's
        scalars may still come), those decoded on the worker thread included."""
        self._decode_waiting()
        self._worker.flush()
        return self._history

    @history.setter
    def history(self, value: RunHistory) -> None:
        self._history = value

    def _decode(self, p: _Pending) -> None:
        # Scope lists come from `self._decoder`: the same objects while the tensors stay; numbers
        # are numpy rows or lists. Neither is changed after it is handed on.
        values: dict[str, tuple[list[str], object]] = {}
        if p.rows is not None:
            rows = np.asarray(p.rows.numpy(), dtype=np.float64)  # a host copy of its own
            # Tensors the step did not update (no gradient) have no values this step.
            stepped_rows, stepped = self._decoder.stepped(rows, p.active, p.scopes)
            if self._skip_reasons is None:
                self._note_skipped(stepped_rows)
            values.update(self._decoder.tensor_values(stepped_rows, stepped, self._skip_reasons))
            figures, cuda = p.state_bytes
            shared = self.caps.shared_state_bytes
            values["state_bytes"] = (self._decoder.state_scopes(p.scopes, figures.per_key),
                                     [figures.total + (int(shared()) if shared else 0),
                                      *figures.tail])
            glob = self._decoder.GLOBAL
            if cuda is not None:
                values["cuda_memory_allocated"] = (glob, [cuda])
            values["lr"] = (self._decoder.group_scopes(len(p.lrs)), p.lrs)
            skipped = p.skipped_host + (int(p.skipped_device.item()) if p.skipped_device is not None else 0)
            values["skipped_steps"] = (glob, [skipped])
        for name, value in p.scalars.items():
            values[name] = (self._decoder.GLOBAL,
                            [float(value.item()) if isinstance(value, Tensor) else float(value)])

        self._history.add_sample(p.step, values)  # (the property would wait for the worker)
        hists = (histograms_of(stepped_rows, stepped)  # NaN columns when the probe is off
                 if p.rows is not None and self.collector.range_probes else {})
        self.writer.write_sample(p.step, p.time, values, hists)
        self._emit("on_sample", p.step, p.time, values)
        if hists:  # monitor/ranges.py
            self._history.add_histograms(p.step, hists)
            self._emit("on_histograms", p.step, hists)
        if p.rows is not None:
            alerts = self.rules.check(p.step, values, skipped - self._skipped_reported)
            self._skipped_reported = skipped
            for alert in alerts:
                self._alert(alert)

    def _alert(self, alert: Alert) -> None:
        self._worker.flush()  # after the samples before it (at once on the worker)
        self._history.alerts.append(alert)
        self.writer.write_alert(alert)
        self._emit("on_alert", alert)
        log.warning("optiscope: %s", alert.message)

    def _note_skipped(self, rows: np.ndarray) -> None:
        """Says once which metrics this optimizer cannot have, and why."""
        cls = type(self.optimizer).__name__
        reasons = skip_reasons(self.optimizer, self.slots, self.collector, rows, self.freeze_probe)
        self._skip_reasons = reasons
        self._history.meta["skipped_metrics"] = reasons
        self.writer.update_meta({"skipped_metrics": reasons})
        self._emit("on_meta", {"skipped_metrics": reasons})
        if reasons:
            log.info("optiscope: not recorded for %s: %s", cls,
                     "; ".join(f"{k} ({v})" for k, v in reasons.items()))

    # ----------------------------------------------------------------------------- setup
    def _names(self) -> dict[int, str]:
        names: dict[int, str] = {}
        if self.model is not None:
            for name, p in unwrap_model(self.model).named_parameters():
                names.setdefault(id(p), name)
        return names

    def _slots(self) -> list[TensorSlot]:
        names = self._names()
        slots, seen = [], set()
        for gi, group in enumerate(self.optimizer.param_groups):
            given = group.get("param_names")
            for j, p in enumerate(group["params"]):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                name = names.get(id(p)) or (given[j] if given else f"group{gi}.param{j}")
                if p.is_complex():
                    raise TypeError(
                        f"OptimizerMonitor: parameter {name!r} is "
                        f"{str(p.dtype).replace('torch.', '')}; the monitor's statistics are of "
                        "real tensors: give the optimizer its real view (torch.view_as_real) as "
                        "the parameter, or watch an optimizer without it")
                slots.append(TensorSlot(name, p))
        return slots

    def _refresh_slots(self) -> None:
        """A param group was added: track its tensors too, keeping what the others hold."""
        old = {id(s.param): s for s in self.slots}
        self.slots[:] = [old.get(id(s.param), s) for s in self._slots()]
        self._scope_names = None
        self._state_sizes.reset()
        self.topology.track([s.param for s in self.slots])

    def _watch_scaler(self, scaler) -> None:
        """Counts the steps a GradScaler skips: ``scaler.step(opt)`` that never ran ``opt.step``.

        Wraps the scaler's ``step`` on this instance only (undone by `close`); the optimizer's
        own ``step`` is never touched.
        """
        original = scaler.step

        def step(optimizer, *args, **kwargs):
            before = self._calls
            out = original(optimizer, *args, **kwargs)
            if optimizer is self.optimizer and self._calls == before:
                self._skipped += 1
            return out

        scaler.step = step

    def _scopes(self) -> list[str]:
        """The slots' names (one list until the slots change)."""
        if self._scope_names is None:
            self._scope_names = [s.scope for s in self.slots]
        return self._scope_names

    def _cuda_allocated(self) -> int | None:
        device = local(self.slots[0].param).device if self.slots else torch.device("cpu")
        return torch.cuda.memory_allocated(device) if device.type == "cuda" else None
