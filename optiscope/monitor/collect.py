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

import torch
from torch import Tensor

from optiscope.kernels import cpu
from optiscope.kernels.launch import local
from optiscope.contract import Capabilities, MomentLayout, Stat, capabilities
from optiscope.kernels.stats import SUM_ROW
from optiscope.monitor.compression import CompressionProbes, decoded_state
from optiscope.monitor.layouts import find_layout
from optiscope.monitor.metrics import ROW_COLS, Col
from optiscope.monitor.ranges import RangeProbe
from optiscope.monitor.sampling import CoordinateSample, sample_count

__all__ = ["TensorSlot", "Collector", "kept_bytes", "local", "readable", "storage_parts", "sums_dtype"]

_UNRESOLVED = object()


def _amp_arg(optimizer, kwargs: dict, name: str) -> Tensor | None:
    """``grad_scale`` / ``found_inf`` of a fused optimizer under a GradScaler.

    torch's fused optimizers declare ``_step_supports_amp_scaling``; GradScaler then skips its
    own unscaling and hands them the scale and the inf flag (as attributes of the optimizer, or
    as step kwargs), and their kernel unscales and skips. The gradients the hooks see are then
    still scaled.
    """
    value = kwargs.get(name)
    return value if value is not None else getattr(optimizer, name, None)


def sums_dtype(device: torch.device) -> torch.dtype:
    """The monitor's sums' dtype: float64 (a finite tensor's Σx² is finite: float32's range ends
    at 3.4e38, and gradients of 1e30 summed to inf, of 1e-30 to 0), where the device has it."""
    return torch.float32 if device.type == "mps" else torch.float64


def _sq_norms(tensors: list[Tensor]) -> Tensor:
    """Σx² of each tensor, accumulated in float64 (`sums_dtype`): in C for float32 CPU tensors,
    else a norm over float64 (torch's float32 norm squares in float32: inf for entries of 1e30)."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    if cpu.sums_apply(tensors):
        return cpu.sq_sums_f32(tensors)
    wide = sums_dtype(tensors[0].device)
    if all(t.numel() <= SUM_ROW for t in tensors):  # one call for many small tensors
        return torch.stack(torch._foreach_norm(tensors, 2, dtype=wide)).square()
    return torch.stack([torch.linalg.vector_norm(t.reshape(-1), dtype=wide).square()
                        for t in tensors])


def _wide_grad_stats(grads: list[Tensor]) -> dict[Stat, Tensor]:
    """`torch_grad_stats` with Σg² in float64 (`_sq_norms`), all three columns float64."""
    if cpu.sums_apply(grads):  # the three in one pass per tensor, in C
        sums = cpu.grad_sums_f32(grads)
        nonfinite = sums[:, 2]
        absmax = torch.where(nonfinite > 0, math.inf, sums[:, 1])
        return {Stat.GRAD_SQ: sums[:, 0], Stat.GRAD_ABSMAX: absmax, Stat.GRAD_NONFINITE: nonfinite}
    wide = sums_dtype(grads[0].device)
    sq = _sq_norms(grads)
    extremes = [torch.aminmax(g) for g in grads]  # 12x faster than the infinity norm on CPU
    absmax = torch.stack([torch.maximum(-lo, hi).to(wide) for lo, hi in extremes])
    if grads[0].device.type == "cpu":  # a branch costs no synchronisation here
        nonfinite = torch.zeros(len(grads), dtype=wide)
        for i in (~torch.isfinite(sq)).nonzero().flatten().tolist():
            nonfinite[i] = torch.count_nonzero(~torch.isfinite(grads[i]))
    else:
        nonfinite = torch.stack([torch.count_nonzero(~torch.isfinite(g)) for g in grads]).to(wide)
    absmax = torch.where(nonfinite > 0, math.inf, absmax)
    return {Stat.GRAD_SQ: sq, Stat.GRAD_ABSMAX: absmax, Stat.GRAD_NONFINITE: nonfinite}


def _grad_stats(grads: list[Tensor]) -> dict[Stat, Tensor]:
    """`_wide_grad_stats`, with zeros for empty tensors.

    A rank's local shard of a DTensor is empty when the tensor has fewer rows than there are
    ranks (FSDP2 gives rank 1 of 2 nothing of a ``[1, n]`` weight), and torch's infinity norm
    refuses an empty tensor. Zero is the identity of the cross-rank SUM and, as |g| >= 0, of
    the MAX, so the other ranks' shards make the figure.
    """
    present = [i for i, g in enumerate(grads) if g.numel()]
    if len(present) == len(grads):
        return _wide_grad_stats(grads)
    device = grads[0].device
    stats = {s: torch.zeros(len(grads), dtype=sums_dtype(device), device=device)
             for s in (Stat.GRAD_SQ, Stat.GRAD_ABSMAX, Stat.GRAD_NONFINITE)}
    if present:
        index = torch.tensor(present, device=device)
        for s, column in _wide_grad_stats([grads[i] for i in present]).items():
            stats[s][index] = column
    return stats


def _dense(g: Tensor) -> Tensor:
    """The stored values of a sparse gradient (zeros elsewhere add nothing to the sums)."""
    return g.coalesce().values() if g.is_sparse else g


def _plain(t) -> bool:
    """Exactly a tensor (or a Parameter) of the strided layout: what kernels and torch's
    reductions read as they are. A subclass reports sizes and dtypes of values it may not store
    (torchao's OptimState8bit holds uint8 codes behind a float32 face, with ``data_ptr`` 0)."""
    return type(t) in (Tensor, torch.nn.Parameter) and t.layout == torch.strided


def readable(t: Tensor) -> Tensor | None:
    """A state tensor as values the monitor can sum: a DTensor's local shard; a tensor subclass
    that implements ``dequantize()`` (torchao's low-bit optimizer states) its dequantized values,
    a transient copy; a plain tensor as it is. None for any other subclass: the monitor skips
    the metric rather than read memory the subclass does not describe."""
    t = local(t)
    if _plain(t) or t.is_sparse:
        return t
    if type(t).dequantize is not Tensor.dequantize:  # the subclass's own, not aten's
        values = t.dequantize()
        if _plain(values) and values.shape == t.shape:
            return values
    return None


def _dequantized(t: Tensor) -> bool:
    """True when `readable` returns a copy of ``t``'s values rather than ``t`` (or its shard)."""
    t = local(t)
    return not (_plain(t) or t.is_sparse)


def storage_parts(t: Tensor) -> list[tuple[object, int]]:
    """(identity, bytes) of the storages holding ``t``'s values, for state memory: a plain
    tensor's own storage; a traceable subclass's inner tensors (torchao's codes, scales and
    quantization map: the bytes it really keeps, not numel × the float32 it poses as); a
    tensor without readable storage counts numel × element size."""
    t = local(t)
    if not _plain(t) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return [part for name in names for part in storage_parts(getattr(t, name))]
    try:
        storage = t.untyped_storage()
        pointer = storage.data_ptr()
    except (RuntimeError, NotImplementedError):
        return [(id(t), t.numel() * t.element_size())]
    return [((t.device, pointer) if pointer else id(storage), storage.nbytes())]


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


def kept_bytes(slots: list[TensorSlot]) -> int:
    """Bytes the monitor keeps for ``slots`` between steps, each storage counted once (the saved
    moments of a step are views of one buffer)."""
    storages = {}
    for slot in slots:
        for t in slot.buffers():
            storage = t.untyped_storage()
            storages[(t.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def _segment_sq(parts: list[Tensor], lengths: Tensor) -> Tensor:
    """Σx² of each of ``parts`` (1-D samples), as one float64 reduction over their
    concatenation."""
    x = torch.cat(parts)
    return torch.segment_reduce(x.to(sums_dtype(x.device)).square_(), "sum", lengths=lengths)


def _segment_diff_sq(a: list[Tensor], b: list[Tensor], lengths: Tensor) -> Tensor:
    """Σ(a − b)² of each pair of ``a``, ``b``: two concatenations and one float64 reduction."""
    x, y = torch.cat(a), torch.cat(b)
    wide = sums_dtype(x.device)
    return torch.segment_reduce((x.to(wide) - y.to(wide)).square_(), "sum", lengths=lengths)


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
    """

    def __init__(self, optimizer, slots: list[TensorSlot], *, caps: Capabilities | None = None,
                 sample_size: int | None, topk_density: float | None, topk_block: int,
                 freeze_step: int | None, seed: int, quant_probes: bool = True):
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
        self._constants: dict[tuple, Tensor] = {}
        # metric -> why it is not recorded: state tensors the monitor cannot read (see `readable`)
        self.unreadable: dict[str, str] = {}
        self.dequantized: set[str] = set()  # subclasses of state read through dequantize()
        self.compression = CompressionProbes(self, probes=quant_probes)
        self.ranges = RangeProbe(self._on)  # dynamic range, from the samples (monitor/ranges.py)

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
        integral = all(isinstance(v, numbers.Integral) for v in values)
        dtype = torch.int64 if integral else torch.float32
        bits = tuple(map(int, values)) if integral else tuple(float(v).hex() for v in values)
        key = (str(device), dtype, bits)
        t = self._constants.get(key)
        if t is None:
            if len(self._constants) > 64:  # the active set changed many times: start over
                self._constants.clear()
            t = self._constants[key] = torch.tensor(values, dtype=dtype, device=device)
        return t

    def _topk(self, slots: list[TensorSlot], grads: list[Tensor]) -> tuple[Tensor, Tensor]:
        """(kept, total) squared mass of a blockwise top-k of each gradient, scaled to its tensor.

        The blocks of every tensor (its sampled blocks, or all of them for a small tensor) are
        gathered into one ``[rows, B]`` matrix and selected with one top-k; a small tensor's
        last, partial block goes with those of the same length. One top-k per tensor cost the
        GPT-2-small sample (148 tensors) 4.5 ms of per-call overhead on a CPU.
        """
        block, rho = self.topk_block, self.topk_density
        device = grads[0].device
        wide = sums_dtype(device)
        rows: list[Tensor] = []
        counts: list[int] = []
        scales: list[float] = []
        tails: dict[int, list[tuple[int, Tensor]]] = {}
        for j, (slot, g) in enumerate(zip(slots, grads)):
            flat = _dense(g).detach().reshape(-1)
            n_full = flat.numel() // block
            full = flat[: n_full * block].view(n_full, block)
            if slot.blocks is not None:  # sampled blocks
                rows.append(torch.index_select(full, 0, slot.blocks).to(wide))
                counts.append(slot.blocks.numel())
                scales.append(flat.numel() / (slot.blocks.numel() * block))
                continue
            rows.append(full.to(wide))  # every block: exact
            counts.append(n_full)
            scales.append(1.0)
            if flat.numel() > n_full * block:
                tail = flat[n_full * block:]
                tails.setdefault(tail.numel(), []).append((j, tail))
        square = torch.cat(rows).square_()
        kept_rows = square.topk(math.ceil(rho * block), dim=1, sorted=False).values.sum(dim=1)
        lengths = self._on(counts, device)
        scale = self._on(scales, device)
        kept = torch.segment_reduce(kept_rows, "sum", lengths=lengths) * scale
        total = torch.segment_reduce(square.sum(dim=1), "sum", lengths=lengths) * scale
        for length, items in tails.items():
            where = self._on([j for j, _ in items], device)
            square = torch.stack([t for _, t in items]).to(wide).square_()
            k = math.ceil(rho * length)
            kept.index_add_(0, where, square.topk(k, dim=1, sorted=False).values.sum(dim=1))
            total.index_add_(0, where, square.sum(dim=1))
        return kept, total

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

    @torch.no_grad()
    def begin(self, kwargs: dict) -> None:
        """Before the optimizer step: what needs the gradient or θ before the update."""
        if self.produced and self.caps.request_stats is not None:
            self.caps.request_stats()
        self._active = [i for i, s in enumerate(self.slots) if s.param.grad is not None]
        for i in self._active:
            self._prepare(self.slots[i])
        params = [local(self.slots[i].param) for i in self._active]
        grads = [_dense(local(self.slots[i].param.grad)) for i in self._active]
        self._pre = {}
        if not grads:
            return
        grad_scale = _amp_arg(self.optimizer, kwargs, "grad_scale")
        if Stat.GRAD_SQ not in self.produced:
            stats = _grad_stats(grads)
            if grad_scale is not None:
                inv = 1.0 / grad_scale.detach().to(sums_dtype(grads[0].device)).reshape(())
                stats[Stat.GRAD_SQ] = stats[Stat.GRAD_SQ] * inv * inv
                stats[Stat.GRAD_ABSMAX] = stats[Stat.GRAD_ABSMAX] * inv
            self._pre.update({Col(int(k)): v for k, v in stats.items()})
        if Stat.PARAM_SQ_BEFORE not in self.produced:
            self._pre[Col.PARAM_SQ_BEFORE] = _sq_norms(params)
        self._before = ([self.slots[i].sample.take(p) for i, p in zip(self._active, params)]
                        if Stat.UPDATE_SQ not in self.produced else [])
        self.ranges.begin(self._active, [self.slots[i].sample for i in self._active],
                          [local(self.slots[i].param.grad) for i in self._active], params,
                          grad_scale, self._before)
        if self.topk_density is not None and Stat.TOPK_KEPT_SQ not in self.produced:
            kept, total = self._topk([self.slots[i] for i in self._active], grads)
            self._pre[Col.TOPK_KEPT_SQ] = kept
            self._pre[Col.TOPK_TOTAL_SQ] = total
        self.compression.begin(grad_scale)  # compressed moments before the step

    @torch.no_grad()
    def end(self, step: int) -> Tensor:
        """After the optimizer step: the ``[n_tensors, ROW_COLS]`` float64 sums on the device."""
        device = local(self.slots[0].param).device
        rows = torch.full((len(self.slots), ROW_COLS), math.nan, dtype=sums_dtype(device),
                          device=device)
        if not self._active:
            return rows
        active = torch.tensor(self._active, device=device)
        columns: dict[Col, Tensor] = dict(self._pre)

        stats = self.caps.last_stats() if self.produced else None
        if stats is not None:
            position = {id(s.param): i for i, s in enumerate(self.slots)}
            where = torch.tensor([position[id(p)] for p in stats.params], device=device)
            produced = torch.tensor(sorted(int(c) for c in self.produced), device=device)
            values = stats.values.to(device, rows.dtype)
            rows[where[:, None], produced[None, :]] = values[:, produced]

        params = [local(self.slots[i].param) for i in self._active]
        if Stat.PARAM_SQ_AFTER not in self.produced:
            columns[Col.PARAM_SQ_AFTER] = _sq_norms(params)
        samples = [self.slots[i].sample for i in self._active]
        after = None
        if self._before:
            after = [x.take(p) for x, p in zip(samples, params)]
            columns[Col.UPDATE_SQ] = _segment_diff_sq(
                after, self._before, self._on([x.count for x in samples], device)
            ) * self._on([x.scale for x in samples], device)
            self._before = []
        self._moments(step, columns, rows, device)
        columns.update(self.compression.end())  # requantization error and probes
        self.ranges.end(rows, self._active, samples, params, after)
        for col, values in columns.items():
            rows[active, int(col)] = values.to(device=device, dtype=rows.dtype)
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

    def _moments(self, step: int, columns: dict[Col, Tensor], rows: Tensor, device) -> None:
        """Moment norms (when the optimizer does not produce them) and second-moment drift.

        v is gathered at each tensor's sample, one gather per tensor; the sums that compare it
        with the saved samples are one reduction over all tensors. The saved samples are views
        of this step's concatenation (one buffer, no copy per tensor).
        """
        want_m1 = Stat.MOMENT1_SQ not in self.produced
        want_m2 = Stat.MOMENT2_SQ not in self.produced
        freeze_now = self.freeze_step is not None and step == self.freeze_step
        m1: list[tuple[int, Tensor]] = []  # (row, moment) summed in one call per moment
        m2: list[tuple[int, Tensor]] = []
        taken: list[tuple[int, TensorSlot, Tensor, Tensor]] = []  # (row, slot, v, v to compare)
        for i in self._active:
            slot = self.slots[i]
            layout = self.layout(slot)
            if layout is None:
                continue
            state = decoded_state(self.optimizer.state[slot.param])  # bitsandbytes' codes
            if want_m1 and (m := layout.first(state)) is not None:
                values = readable(m)
                if values is None:
                    self._unreadable(("moment1_norm",), layout.m, m)
                elif not _dequantized(m):
                    m1.append((i, values))
                else:  # a dequantized copy: summed now, freed before the next one is made
                    rows[i, Col.MOMENT1_SQ] = _sq_norms([values])[0].to(device)
                    self.dequantized.add(type(local(m)).__qualname__)
            if not layout.has_second(state):
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
                v = layout.second_at(local_state, slot.sample.index)
            if layout.v_unfrozen:
                # v itself is frozen: compare v_T with the v the optimizer would have had
                v_now = self.caps.unfrozen_second_at(slot.param, slot.sample.index)
            else:
                v_now = v
            taken.append((i, slot, v.to(device), v_now.to(device)))
        for column, moments in ((Col.MOMENT1_SQ, m1), (Col.MOMENT2_SQ, m2)):
            if moments:
                where = self._on([i for i, _ in moments], device)
                rows[where, column] = _sq_norms([x for _, x in moments]).to(device, rows.dtype)
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
