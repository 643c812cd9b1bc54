"""What the monitor computes on a sampled step, on the device, into one tensor of sums.

For a bundled optimizer the fused kernel already produced its `Stat` columns; the collector adds
only what the optimizer does not produce. For any other optimizer it computes everything from
the tensors: gradient statistics and Σθ⁻² before the step, the rest after it. Nothing here moves
data to the host: the monitor copies the finished ``[n_tensors, ROW_COLS]`` tensor once.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from itertools import compress, repeat
from operator import attrgetter, is_not

import numpy as np
import torch
from torch import Tensor

from optiscope.kernels.launch import local
from optiscope.contract import Capabilities, MomentLayout, Stat, capabilities
from optiscope.monitor.compression import CompressionProbes, decoded_state
from optiscope.monitor.flat import FlatPlan, flat_eligible
from optiscope.monitor.pertensor import (dense as _dense, grad_stats as _grad_stats,
                                         segment_diff_sq as _segment_diff_sq,
                                         segment_sq as _segment_sq, sq_norms as _sq_norms,
                                         sums_dtype, take_all as _take_all, topk_sums as _topk)
from optiscope.monitor.layouts import find_layout
from optiscope.monitor.metrics import NUM_COLS, ROW_COLS, Col
from optiscope.monitor.ranges import RangeProbe
from optiscope.monitor.sampling import CoordinateSample, sample_count
from optiscope.monitor.stateread import dequantized as _dequantized, readable, storage_parts

__all__ = ["TensorSlot", "Collector", "kept_bytes", "local", "readable", "storage_parts", "sums_dtype"]

_UNRESOLVED = object()
_PARAM_GRAD = attrgetter("param.grad")


def _amp_arg(optimizer, kwargs: dict, name: str) -> Tensor | None:
    """``grad_scale`` / ``found_inf`` of a fused optimizer under a GradScaler.

    torch's fused optimizers declare ``_step_supports_amp_scaling``; GradScaler then skips its
    own unscaling and hands them the scale and the inf flag (as attributes of the optimizer, or
    as step kwargs), and their kernel unscales and skips. The gradients the hooks see are then
    still scaled.
    """
    value = kwargs.get(name)
    return value if value is not None else getattr(optimizer, name, None)


@dataclass
class TensorSlot:
    """One parameter tensor as the monitor tracks it."""

    scope: str
    param: Tensor
    sample: CoordinateSample | None = None
    blocks: Tensor | None = None          # sampled top-k block indices; None: every block
    layout: object = _UNRESOLVED          # MomentLayout, or None when the state is unreadable
    v_prev: Tensor | None = None
    v_frozen: Tensor | None = None

    def buffers(self) -> list[Tensor]:
        """The tensors the monitor keeps for this tensor between steps (some are views of one
        buffer shared by all tensors: `Collector` concatenates the samples of a step)."""
        kept = [t for t in (self.v_prev, self.v_frozen, self.blocks) if t is not None]
        if self.sample is not None and self.sample.index is not None:
            kept.append(self.sample.index)
        return kept


def kept_bytes(slots: list[TensorSlot], extra: list[Tensor] = ()) -> int:
    """Bytes the monitor keeps for ``slots`` between steps (and in ``extra``: the flat plan's
    buffers), each storage counted once (the saved moments of a step are views of one buffer)."""
    storages = {}
    for t in [t for slot in slots for t in slot.buffers()] + list(extra):
        storage = t.untyped_storage()
        storages[(t.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


class Collector:
    """Computes one sampled step's per-tensor sums.

    Args:
        optimizer: the watched optimizer.
        slots: the tracked tensors, in scope order.
        caps: what the optimizer provides of the contract (`optiscope.contract.capabilities`,
            read here when None): the sums its step produces itself (``stat_columns``), its
            moment layouts (``state_layouts``, tried before torch.optim's), a second moment it
            computes.
        sample_size: coordinates per tensor for copy-based statistics (None: automatic budget).
        topk_density, topk_block: the top-k probe (density ρ and block size B), or density None
            for no probe.
        freeze_step: the step T whose v the drift-since-freeze compares with, or None.
        seed: seeds the coordinate samples.
        quant_probes: run the int8/int4 probes of uncompressed moments (`CompressionProbes`).
        range_probes: count the dynamic range of g, θ⁺ − θ⁻ and v (`RangeProbe`) on the
            samples; ``"exact"``: every entry of the tensors a bundled optimizer counts (in its
            pass, or by one of its own: `request_ranges`), the samples elsewhere.
    """

    def __init__(self, optimizer, slots: list[TensorSlot], *, caps: Capabilities | None = None,
                 sample_size: int | None, topk_density: float | None, topk_block: int,
                 freeze_step: int | None, seed: int, quant_probes: bool = False,
                 range_probes: bool | str = False):
        self.optimizer = optimizer
        self.slots = slots
        self.caps = capabilities(optimizer) if caps is None else caps
        self.declared = self.caps.state_layouts
        self.produced = self.caps.stat_columns
        self.sample_size = sample_size
        self.topk_density = topk_density
        self.topk_block = topk_block
        self.freeze_step = freeze_step
        self.generator = torch.Generator().manual_seed(seed)
        self._found_inf: list[Tensor] = []  # found_inf flags of fused steps since the last sample
        self._pre: dict[Col, Tensor] = {}
        self._before: list[Tensor] = []
        self._active: list[int] = []
        self._rest: list[int] = []            # active tensors not on the flat path
        self._plan: FlatPlan | None = None    # the flat path (`optiscope.monitor.flat`)
        self._plan_key: tuple | None = None
        self._flat_pre: dict[Col, Tensor | None] = {}  # None: in the host rows already
        self._rows_begun = False  # `begin` prepared the host rows of this step
        self._override: dict[Col, Tensor] = {}
        self._stats_where: tuple | None = None
        self._constants: dict[tuple, Tensor] = {}
        self._rows: Tensor | None = None  # the CPU rows' buffer (`_host_rows`)
        self._rows_np: np.ndarray | None = None  # ... and its numpy array
        # metric -> why it is not recorded: state tensors the monitor cannot read (see `readable`)
        self.unreadable: dict[str, str] = {}
        self.dequantized: set[str] = set()  # subclasses of state read through dequantize()
        self.compression = CompressionProbes(self, probes=quant_probes)
        self.ranges = RangeProbe(self._on)  # dynamic range, from the samples (monitor/ranges.py)
        self.range_probes = range_probes

    # ----------------------------------------------------------------------------- helpers
    def _prepare(self, slot: TensorSlot) -> None:
        if slot.sample is None:
            p = local(slot.param)
            slot.sample = CoordinateSample.draw(p.numel(), sample_count(p.numel(), self.sample_size),
                                                p.device, self.generator)
            if self.topk_density is not None:
                n_full = p.numel() // self.topk_block
                wanted = math.ceil(slot.sample.count / self.topk_block)
                if n_full > wanted:
                    slot.blocks = torch.randperm(n_full, generator=self.generator)[:wanted].sort(
                    ).values.to(p.device)

    def layout(self, slot: TensorSlot) -> MomentLayout | None:
        """The moment layout of a tensor's state, found once the state exists."""
        if slot.layout is _UNRESOLVED:
            state = self.optimizer.state.get(slot.param)
            if not state:
                return None
            slot.layout = find_layout(state, self.declared)
        return slot.layout

    def _on(self, values: list, device) -> Tensor:
        """A small host list as a tensor on ``device``, made once per distinct list: int64 when
        every value is an int (lengths, indices), else float32 (scales).

        The key holds the dtype and each value's exact bits: ``(1,) == (1.0,)`` in Python, and a
        cache keyed on the values alone returned a float tensor where indices were expected.
        """
        # `type(v) is int` first: an ABC isinstance per value cost the range probes 0.1 ms a
        # sampled step on their 148-entry lists
        integral = (all(type(v) is int for v in values)
                    or all(isinstance(v, numbers.Integral) for v in values))
        dtype = torch.int64 if integral else torch.float32
        bits = (tuple(map(int, values)) if integral  # the floats' exact bits, in one call:
                else np.asarray(values, dtype=np.float64).tobytes())  # a hex per value: 80 us
        key = (str(device), dtype, bits)
        t = self._constants.get(key)
        if t is None:
            if len(self._constants) > 64:  # the active set changed many times: start over
                self._constants.clear()
            t = self._constants[key] = torch.tensor(values, dtype=dtype, device=device)
        return t

    # ----------------------------------------------------------------------------- the step
    def note_step(self, kwargs: dict) -> None:
        """Every step, sampled or not: keeps a reference to a fused step's found_inf flag (no
        device work; summed on the next sampled step)."""
        found_inf = _amp_arg(self.optimizer, kwargs, "found_inf")
        if found_inf is not None:
            self._found_inf.append(found_inf)

    def skipped_since_last(self) -> Tensor | None:
        """Steps a GradScaler skipped inside fused optimizer steps since the last call."""
        if not self._found_inf:
            return None
        flags, self._found_inf = self._found_inf, []
        return torch.stack([f.detach().float().reshape(()) for f in flags]).sum()

    @property
    def active(self) -> list[int]:
        """Indices of the tensors the current step updates (those with a gradient)."""
        return self._active

    def _flat_plan(self) -> FlatPlan | None:
        """The flat path's plan for the active tensors (made again when they change), and
        ``self._rest``: the active tensors it does not take."""
        key = tuple(self._active)
        if self._plan_key == key:
            return self._plan
        if self._plan is not None:
            self._plan.release()
        device = local(self.slots[self._active[0]].param).device if self._active else None
        fast, rest = [], []
        for i in self._active:
            p, g = self.slots[i].param, self.slots[i].param.grad
            ok = (flat_eligible(p) and flat_eligible(g) and p.device == device
                  and g.device == device and g.numel() == p.numel())
            (fast if ok else rest).append(i)
        self._plan_key, self._rest = key, rest
        self._plan = None
        if len(fast) > 1:
            topk = (self.topk_block, self.topk_density) if self.topk_density is not None else None
            self._plan = FlatPlan(fast, [self.slots[i] for i in fast], device,
                                  sums_dtype(device), topk)
        else:
            self._rest = list(self._active)
        return self._plan

    def kept_bytes(self) -> int:
        """Bytes kept between steps: the slots' samples and saved moments, the flat plan's."""
        extra = self._plan.buffers() if self._plan is not None else []
        return kept_bytes(self.slots, extra + self.compression.buffers())

    @torch.no_grad()
    def begin(self, kwargs: dict) -> None:
        """Before the optimizer step: the sums (`_begin_sums`), then the readiness probes."""
        self._begin_sums(kwargs)
        if not self._active:
            return
        grad_scale = _amp_arg(self.optimizer, kwargs, "grad_scale")
        if self.range_probes:  # dynamic range, from the samples: the flat plan's taken already
            rest, plan = self._rest, self._plan
            self.ranges.begin(rest, [self.slots[i].sample for i in rest],
                              [local(self.slots[i].param.grad) for i in rest],
                              [local(self.slots[i].param) for i in rest], grad_scale, None)
            if plan is not None and plan.step.g_sample is not None:
                x = plan.step.g_sample
                if grad_scale is not None:  # a fused step's gradients are still scaled
                    x = x / grad_scale.detach().to(x.device, torch.float32).reshape(())
                self.ranges.add("grad", plan.where, x, plan.sample_counts, plan.sample_scales)
        self.compression.begin(grad_scale)  # compressed moments before the step

    def _end_probes(self, rows: Tensor, device) -> None:
        """After the step: the requantization error, the int8/int4 probes and the dynamic range
        (per tensor: gathers of each tensor's sample; off with quant_probes / range_probes)."""
        columns = self.compression.end()
        if columns:
            self._put(rows, self._on(self._active, device), columns)
        if self.range_probes:
            plan, rest = self._plan, self._rest
            if plan is not None and plan.step.range_update is not None:
                self.ranges.add("update", plan.where, plan.step.range_update, plan.sample_counts,
                                plan.sample_scales)
                plan.step.range_update = None
            self.ranges.end(rows, rest, [self.slots[i].sample for i in rest],
                            [local(self.slots[i].param) for i in rest], None)

    def _begin_sums(self, kwargs: dict) -> None:
        """Before the optimizer step: what needs the gradient or θ before the update.

        Additions that need this step's gradients of every tensor read the flat plan's
        `StepData` (``self._plan.step.grads``) after `FlatPlan.grad_columns`, and those of the
        tensors in ``self._rest`` (large ones, DTensor shards, subclasses) one by one.
        """
        if self.produced and self.caps.request_stats is not None:
            self.caps.request_stats()
            if self.range_probes == "exact" and self.caps.request_ranges is not None:
                self.caps.request_ranges()  # every entry's range, in the update's pass
        self._rows_begun = False
        # in C over the tensors (attrgetter, map, compress): this runs at every sampled step
        all_grads = list(map(_PARAM_GRAD, self.slots))
        self._active = list(compress(range(len(all_grads)), map(is_not, all_grads, repeat(None))))
        for i in [i for i in self._active if self.slots[i].sample is None]:
            self._prepare(self.slots[i])
        self._pre = {}
        self._flat_pre = {}
        self._override = {}
        if not self._active:
            return
        plan = self._flat_plan()
        if plan is not None:
            plan.want_ranges = bool(self.range_probes)
        grad_scale = _amp_arg(self.optimizer, kwargs, "grad_scale")
        want_update = Stat.UPDATE_SQ not in self.produced
        if plan is not None:
            host = self._begin_rows()  # the C sums write into the rows from here on
            self._flat_pre = plan.grad_columns(list(map(all_grads.__getitem__, plan.where)),
                                               self.produced, grad_scale, want_update, host)
        rest = self._rest
        params = [local(self.slots[i].param) for i in rest]
        grads = [_dense(local(self.slots[i].param.grad)) for i in rest]
        if not grads:
            self._before = []
            return
        if Stat.GRAD_SQ not in self.produced:
            stats = _grad_stats(grads)
            if grad_scale is not None:
                inv = 1.0 / grad_scale.detach().to(sums_dtype(grads[0].device)).reshape(())
                stats[Stat.GRAD_SQ] = stats[Stat.GRAD_SQ] * inv * inv
                stats[Stat.GRAD_ABSMAX] = stats[Stat.GRAD_ABSMAX] * inv
            self._pre.update({Col(int(k)): v for k, v in stats.items()})
        if Stat.PARAM_SQ_BEFORE not in self.produced:
            self._pre[Col.PARAM_SQ_BEFORE] = _sq_norms(params)
        self._before = (_take_all([self.slots[i].sample for i in rest], params)
                        if want_update else [])
        if self.topk_density is not None and Stat.TOPK_KEPT_SQ not in self.produced:
            kept, total = _topk([self.slots[i] for i in rest], grads, self.topk_block,
                                self.topk_density, self._on)
            self._pre[Col.TOPK_KEPT_SQ] = kept
            self._pre[Col.TOPK_TOTAL_SQ] = total

    def pre_column(self, col: Col) -> Tensor | None:
        """A column computed before the step, per tensor of `active` (None if not computed)."""
        if col in self._override:
            return self._override[col]
        parts, order = [], []
        if self._plan is not None and self._flat_pre:
            if col not in self._flat_pre:
                return None
            value = self._flat_pre[col]
            if value is None:  # written into the host rows by the C sums
                value = self._rows.numpy()[self._plan.where_host, int(col)]
            parts.append(torch.as_tensor(value))
            order += self._plan.where
        if self._rest:
            if col not in self._pre:
                return None
            parts.append(self._pre[col])
            order += self._rest
        if not parts:
            return None
        position = {row: k for k, row in enumerate(order)}
        return torch.cat(parts)[self._on([position[i] for i in self._active], parts[0].device)]

    def override_pre(self, columns: dict[Col, Tensor]) -> None:
        """Columns per tensor of `active` that replace what `begin` computed (the gradient
        before clipping)."""
        self._override.update(columns)

    def _begin_rows(self) -> np.ndarray | None:
        """On the CPU: the host rows, NaN again, that this step's sums are written into from
        `begin` on (`end` then keeps them); elsewhere None."""
        self._rows_begun = local(self.slots[0].param).device.type == "cpu"
        return self._np(self._host_rows()) if self._rows_begun else None

    def _host_rows(self) -> Tensor:
        """The CPU rows, one buffer kept from step to step (the monitor copies what it reads
        before the next step: `pending._to_host`), NaN again where this step may write: a fresh
        buffer of 148 tensors' rows (588 KB with the range columns) cost more than the sums."""
        n = len(self.slots)
        if self._rows is None or self._rows.shape[0] != n:
            self._rows_np = np.full((n, ROW_COLS), math.nan, dtype=np.float64)
            self._rows = torch.from_numpy(self._rows_np)
        else:  # the range columns stay NaN while nothing writes them
            self._rows_np[:, :ROW_COLS if self.range_probes else NUM_COLS] = math.nan
        return self._rows

    def _np(self, rows: Tensor) -> np.ndarray:
        """The CPU ``rows`` as numpy: the kept buffer's one array (the C sums' writers are
        cached by it), else a view made now."""
        return self._rows_np if rows is self._rows else rows.numpy()

    def _put(self, rows: Tensor, where, columns: dict[Col, object]) -> None:
        """Writes per-tensor ``columns`` into ``rows`` at ``where``: one stack, one index_put
        (on the CPU in numpy, on the rows' memory: no torch op; the C sums give numpy arrays)."""
        if not columns:
            return
        cols = sorted(columns)
        if rows.device.type == "cpu":  # a column at a time: no stacked copy
            at = where.numpy() if isinstance(where, Tensor) else where
            host = self._np(rows)
            for c in cols:
                host[at, c] = columns[c]
            return
        values = torch.stack([columns[c].to(rows.dtype) for c in cols], dim=1)
        rows[where[:, None], self._on([int(c) for c in cols], rows.device)[None, :]] = values

    @torch.no_grad()
    def end(self, step: int) -> Tensor:
        """After the optimizer step: the ``[n_tensors, ROW_COLS]`` float64 sums on the device."""
        device = local(self.slots[0].param).device
        if device.type == "cpu":  # numpy and the C sums fill it without a torch op
            begun, self._rows_begun = self._rows_begun, False
            rows = (self._rows if begun and self._rows is not None
                    and self._rows.shape[0] == len(self.slots) else self._host_rows())
        else:
            rows = torch.full((len(self.slots), ROW_COLS), math.nan, dtype=sums_dtype(device),
                              device=device)
        if not self._active:
            return rows
        stats = self.caps.last_stats() if self.produced else None
        if stats is not None:
            key = tuple(map(id, stats.params))
            if self._stats_where is None or self._stats_where[0] != key:
                position = {id(s.param): i for i, s in enumerate(self.slots)}
                self._stats_where = (key, torch.tensor([position[k] for k in key], device=device))
            where = self._stats_where[1]
            produced = self._on(sorted(int(c) for c in self.produced), device)
            values = stats.values.to(device, rows.dtype)
            if device.type == "cpu":  # numpy: no torch op
                at = produced.numpy()
                rows.numpy()[where.numpy()[:, None], at] = values.numpy()[:, at]
            else:
                rows[where[:, None], produced[None, :]] = values[:, produced]

        plan = self._plan
        if plan is not None:
            host = self._np(rows) if device.type == "cpu" else None
            columns = {c: v for c, v in self._flat_pre.items() if v is not None}
            columns.update(plan.param_columns(self.produced, host))
            self._put(rows, plan.index, columns)
            self._flat_pre = {}
        rest = self._rest
        columns: dict[Col, Tensor] = dict(self._pre)
        params = [local(self.slots[i].param) for i in rest]
        if params and Stat.PARAM_SQ_AFTER not in self.produced:
            columns[Col.PARAM_SQ_AFTER] = _sq_norms(params)
        if self._before:
            samples = [self.slots[i].sample for i in rest]
            after = _take_all(samples, params)
            columns[Col.UPDATE_SQ] = _segment_diff_sq(
                after, self._before, self._on([x.count for x in samples], device)
            ) * self._on([x.scale for x in samples], device)
            self._before = []
        if rest:
            self._put(rows, self._on(rest, device), columns)
        if self._override:
            self._put(rows, self._on(self._active, device), self._override)
            self._override = {}
        self._moments(step, rows, device)
        self._end_probes(rows, device)
        if stats is not None and stats.ranges is not None:
            self.ranges.exact(rows, self._stats_where[1], stats.ranges)
        return rows

    def no_quant_error_reason(self, cls: str) -> str:
        """Why an optimizer that produces no quantization error has none."""
        if not self.dequantized:
            return f"{cls} does not compress its state"
        return (f"{cls} keeps quantized state ({', '.join(sorted(self.dequantized))}): its "
                "requantization error is moment1_quant_error and moment2_quant_error")

    def _unreadable(self, metrics: tuple[str, ...], key: str, value: Tensor) -> None:
        why = (f"the optimizer's state {key!r} is a {type(value).__module__}."
               f"{type(value).__qualname__}, a tensor subclass without dequantize(): optiscope "
               "does not read values a subclass does not describe")
        for metric in metrics:
            self.unreadable.setdefault(metric, why)

    def _moments(self, step: int, rows: Tensor, device) -> None:
        """Moment norms (when the optimizer does not produce them) and second-moment drift.

        The flat plan's tensors with a plain m and v: a few ops for all of them
        (`FlatPlan.moment_columns`; additions that need every tensor's v read its `StepData`).
        The others one by one: v gathered at each tensor's sample, the sums that compare it with
        the saved samples one reduction over those tensors.
        """
        want_m1 = Stat.MOMENT1_SQ not in self.produced
        want_m2 = Stat.MOMENT2_SQ not in self.produced
        freeze_now = self.freeze_step is not None and step == self.freeze_step
        plan = self._plan
        skip_m: set = set()
        skip_v: set = set()
        if plan is not None:
            if not plan.moments_ready:
                plan.find_moments(self)
            host = self._np(rows) if device.type == "cpu" else None
            for where, columns in plan.moment_columns(self.optimizer.state, want_m1, want_m2,
                                                      freeze_now, host):
                self._put(rows, where, columns)
            skip_m, skip_v = plan.m_rows, plan.v_rows
            if self.range_probes and plan.step.v_sample is not None:  # v of the flat tensors
                self.ranges.moment2(rows, [r for r in plan.where if r in plan.v_rows],
                                    plan.step.v_sample, [s.sample.count for s in plan.v_slots],
                                    [s.sample.scale for s in plan.v_slots])
            visit = plan.loop + self._rest
        else:
            visit = self._active
        m1: list[tuple[int, Tensor]] = []  # (row, moment) summed in one call per moment
        m2: list[tuple[int, Tensor]] = []
        taken: list[tuple[int, TensorSlot, Tensor, Tensor]] = []  # (row, slot, v, v to compare)
        deferred: list[tuple[int, TensorSlot, Tensor]] = []  # (row, slot, v): one gather on a GPU
        for i in visit:
            slot = self.slots[i]
            layout = self.layout(slot)
            if layout is None:
                continue
            state = decoded_state(self.optimizer.state[slot.param])  # bitsandbytes' codes
            if want_m1 and i not in skip_m and (m := layout.first(state)) is not None:
                values = readable(m)
                if values is None:
                    self._unreadable(("moment1_norm",), layout.m, m)
                elif not _dequantized(m):
                    m1.append((i, values))
                else:  # a dequantized copy: summed now, freed before the next one is made
                    rows[i, Col.MOMENT1_SQ] = _sq_norms([values])[0].to(device)
                    self.dequantized.add(type(local(m)).__qualname__)
            if i in skip_v or not layout.has_second(state):
                continue
            if layout.v_computed:  # computed by the optimizer (MicroAdam's window)
                compute = self.caps.moment2_at
                if want_m2:
                    rows[i, Col.MOMENT2_SQ] = torch.linalg.vector_norm(
                        compute(slot.param, None), dtype=rows.dtype).square().to(device)
                v = compute(slot.param, slot.sample.index)
            else:
                keys = {layout.v, layout.v_row, layout.v_col}
                local_state = {k: (readable(v) if k in keys else local(v))
                               if isinstance(v, Tensor) else v for k, v in state.items()}
                lost = [k for k in keys if k in state and local_state[k] is None]
                if lost:
                    self._unreadable(("moment2_norm", "moment2_drift",
                                      "moment2_drift_since_freeze"), lost[0], state[lost[0]])
                    continue
                if want_m2:
                    if (full := layout.second_tensor(local_state)) is None:
                        rows[i, Col.MOMENT2_SQ] = layout.second_sq_sum(local_state).to(device)
                    elif not _dequantized(state[layout.v]):
                        m2.append((i, full))  # summed with the others below
                    else:  # a dequantized copy: summed now
                        rows[i, Col.MOMENT2_SQ] = _sq_norms([full])[0].to(device)
                whole = layout.second_tensor(local_state)
                if (whole is not None and slot.sample.index is not None and not layout.v_unfrozen
                        and not _dequantized(state[layout.v])):
                    deferred.append((i, slot, whole))  # sampled with the others below
                    continue
                v = layout.second_at(local_state, slot.sample.index)
            if layout.v_unfrozen:
                # v itself is frozen: compare v_T with the v the optimizer would have had
                v_now = self.caps.unfrozen_second_at(slot.param, slot.sample.index)
            else:
                v_now = v
            taken.append((i, slot, v.to(device), v_now.to(device)))
        if deferred:
            values = _take_all([s.sample for _, s, _ in deferred], [v for _, _, v in deferred])
            taken += [(i, s, v.to(device), v.to(device)) for (i, s, _), v in zip(deferred, values)]
        if m1 or m2:  # m and v summed in one call (on a GPU, one launch per dtype)
            sq = _sq_norms([x for _, x in m1 + m2]).to(device, rows.dtype)
            for column, moments, part in ((Col.MOMENT1_SQ, m1, sq[:len(m1)]),
                                          (Col.MOMENT2_SQ, m2, sq[len(m1):])):
                if moments:
                    rows[self._on([i for i, _ in moments], device), column] = part
        if not taken:
            return
        self._compare(taken, rows, device, freeze_now)

    def _compare(self, taken: list[tuple[int, TensorSlot, Tensor, Tensor]], rows: Tensor, device,
                 freeze_now: bool) -> None:
        """Drift sums of the tensors in ``taken``: v against the previous sample's v, and the v
        to compare against v at the freeze step; then saves v."""
        drift = [(i, slot, v) for i, slot, v, _ in taken if slot.v_prev is not None]
        if drift:
            lengths = self._on([v.numel() for _, _, v in drift], device)
            scale = self._on([slot.sample.scale for _, slot, _ in drift], device)
            where = self._on([i for i, _, _ in drift], device)
            prev = [slot.v_prev for _, slot, _ in drift]
            rows[where, Col.DRIFT_DIFF_SQ] = _segment_diff_sq([v for _, _, v in drift], prev,
                                                              lengths) * scale
            rows[where, Col.DRIFT_PREV_SQ] = _segment_sq(prev, lengths) * scale
        lengths = [v.numel() for _, _, v, _ in taken]
        concatenated = torch.cat([v for _, _, v, _ in taken])
        if self.range_probes:
            self.ranges.moment2(rows, [i for i, _, _, _ in taken], concatenated, lengths,
                                [slot.sample.scale for _, slot, _, _ in taken])
        saved = concatenated.split(lengths)
        for (_, slot, _, _), v in zip(taken, saved):
            slot.v_prev = v
            if freeze_now:
                slot.v_frozen = v
        frozen = [(i, slot, v_now) for i, slot, _, v_now in taken if slot.v_frozen is not None]
        if frozen:
            lengths = self._on([v.numel() for _, _, v in frozen], device)
            scale = self._on([slot.sample.scale for _, slot, _ in frozen], device)
            where = self._on([i for i, _, _ in frozen], device)
            ref = [slot.v_frozen for _, slot, _ in frozen]
            rows[where, Col.FREEZE_DIFF_SQ] = _segment_diff_sq([v for _, _, v in frozen], ref,
                                                               lengths) * scale
            rows[where, Col.FREEZE_REF_SQ] = _segment_sq(ref, lengths) * scale
