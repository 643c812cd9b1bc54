"""The sampled step of many small tensors in a constant number of ops: laid end to end.

A model's small tensors (biases, norms, small matrices: up to `FLAT_MAX` entries each, most of
GPT-2's 148) cost the monitor per-tensor launches and Python, not bandwidth. Here each
quantity (gradients, θ before and after the step, m, v) of all of them is one concatenation
(`torch._utils._flatten_dense_tensors`: one ``cat``), and every per-tensor figure is one
segmented reduction over it (``segment_reduce`` with the tensors' lengths): Σx², max |x|, the
non-finite count. The coordinate samples are one gather with a flat index made once
(`Segments.sample_index`: each tensor's sample shifted by its offset), the top-k probe one
``topk`` for the full blocks and one for the tails, all with index tensors made once per set of
tensors (`FlatPlan`, rebuilt only when the set of tensors with a gradient changes).

A tensor larger than `FLAT_MAX` stays on the per-tensor path of `optiscope.monitor.collect`: a
concatenation would copy it every sampled step. There, on a GPU, the sums and the gathers of all
such tensors are one Triton launch per dtype (`monitor.pertensor`: `kernels.sums`,
`kernels.gather`).

Where additions go: the concatenations of a step are kept on the plan's `StepData`
(``grads``: the gradients of `FlatPlan.slots`, flat, in their dtype; ``v`` / ``v_sample``: the
second moments of `FlatPlan.v_slots` and their sampled values, float32), with the `Segments` to
reduce them per tensor. A new per-tensor statistic of these tensors reads them there and adds one
column to the ``columns`` dict it returns, as `FlatPlan.grad_columns` and `FlatPlan.moment_columns`
do: a few ops, whatever the number of tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from operator import getitem, is_

import numpy as np
import torch
from torch import Tensor
from torch._utils import _flatten_dense_tensors

from optiscope.contract import Stat
from optiscope.kernels import cpu_many
from optiscope.monitor import flat_cpu
from optiscope.monitor.metrics import Col

__all__ = ["FLAT_MAX", "Segments", "FlatPlan", "StepData", "flat_eligible", "flatten"]

# Largest tensor laid end to end with the others (entries): 16 top-k blocks of 4096.
FLAT_MAX = 1 << 16


def flat_eligible(t) -> bool:
    """Exactly a dense strided tensor (or Parameter) of a real dtype, up to `FLAT_MAX` entries:
    no DTensor, no subclass (those go through `collect.readable` one by one)."""
    return (type(t) in (Tensor, torch.nn.Parameter) and t.layout == torch.strided
            and t.numel() <= FLAT_MAX and not t.is_complex())


def _plain_values(t, slot) -> bool:
    """A moment the flat path can sum as it is: a plain floating tensor of the parameter's size."""
    return flat_eligible(t) and t.is_floating_point() and t.numel() == slot.param.numel()


def flatten(tensors: list[Tensor]) -> Tensor:
    """The tensors' entries end to end (one ``cat``; mixed dtypes promoted, values exact).
    Called under ``torch.no_grad()`` (the collector's hooks): no detach per tensor."""
    if len(tensors) == 1:
        return tensors[0].detach().reshape(-1)
    return _flatten_dense_tensors(tensors)


class Segments:
    """Tensors laid end to end: their lengths, and a flat index of their coordinate samples.

    Args:
        numels: the tensors' sizes.
        samples: their `CoordinateSample`s.
        device: where the index tensors live.
    """

    def __init__(self, numels: list[int], samples: list, device: torch.device, wide: torch.dtype):
        self.numels = numels
        self.total = sum(numels)
        self.lengths = torch.tensor(numels, dtype=torch.int64, device=device)
        offsets = [0]
        for n in numels[:-1]:
            offsets.append(offsets[-1] + n)
        self.offsets = offsets
        parts = []
        for offset, n, s in zip(offsets, numels, samples):
            parts.append(torch.arange(offset, offset + n, device=device) if s.index is None
                         else s.index.to(device=device, dtype=torch.int64) + offset)
        index = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=device)
        # int32 where it fits: half the bytes kept between steps
        self.sample_index = index.to(torch.int32) if self.total < 2**31 else index
        self.sample_lengths = torch.tensor([s.count for s in samples], dtype=torch.int64,
                                           device=device)
        self.sample_scale = torch.tensor([s.scale for s in samples], dtype=wide, device=device)

    def sq(self, flat: Tensor, wide: torch.dtype) -> Tensor:
        """Σx² of each tensor, in ``wide``."""
        x = flat.to(wide)
        return torch.segment_reduce(x * x, "sum", lengths=self.lengths)

    def take(self, flat: Tensor) -> Tensor:
        """The sampled entries of each tensor, end to end, as float32."""
        return flat.index_select(0, self.sample_index).to(torch.float32)

    def sample_sq(self, x: Tensor, wide: torch.dtype) -> Tensor:
        """Σx² over each tensor's sample, scaled to the tensor (x: a `take` result)."""
        x = x.to(wide)
        return torch.segment_reduce(x * x, "sum", lengths=self.sample_lengths) * self.sample_scale

    def sample_diff_sq(self, a: Tensor, b: Tensor, wide: torch.dtype) -> Tensor:
        """Σ(a − b)² over each tensor's sample, scaled to the tensor."""
        d = a.to(wide) - b.to(wide)
        return torch.segment_reduce(d * d, "sum", lengths=self.sample_lengths) * self.sample_scale

    def nbytes(self) -> int:
        return self.sample_index.numel() * self.sample_index.element_size()


def _rows(g: Tensor, index: Tensor) -> Tensor:
    """``g[index]`` for a 2-D index, by index_select on the flat index (CPU: 0.1 ms where
    advanced indexing took 0.8 for GPT-2's tails at d_model 16)."""
    return g.index_select(0, index.reshape(-1)).view(index.shape)


@dataclass
class _Tails:
    """Tail rows of one length group: where they start, their lengths, k per row as a mask.
    The ``[rows, width]`` gather index and padding mask are made at each use, not kept: kept,
    they cost up to 9 bytes per gradient entry of the small tensors."""

    starts: Tensor   # [rows, 1] into the flat gradient
    lengths: Tensor  # [rows, 1]
    columns: Tensor  # [width]: 0 .. the longest tail - 1
    last: int        # the last entry of the flat gradient (padding reads stop there)
    k: int           # the largest k of the group
    kmask: Tensor    # [rows, k]: 1 for the first ceil(ρ·length) of the sorted values
    of: Tensor       # [rows]: the tensor of each row


class _TopK:
    """Index tensors of the top-k probe over a flat gradient: every full block of a tensor (or
    its sampled blocks) as a row of ``block`` entries, every tail (the last, partial block of a
    tensor whose blocks are all used) as a row padded to the longest tail."""

    def __init__(self, seg: Segments, slots: list, block: int, rho: float, device, wide):
        starts, counts, scales = [], [], []
        tail_starts, tail_lengths, tail_of = [], [], []
        for j, (slot, n, offset) in enumerate(zip(slots, seg.numels, seg.offsets)):
            n_full = n // block
            if slot.blocks is not None:
                chosen = slot.blocks.tolist()
                scales.append(n / (len(chosen) * block))
            else:
                chosen = range(n_full)
                scales.append(1.0)
                if n > n_full * block:
                    tail_starts.append(offset + n_full * block)
                    tail_lengths.append(n - n_full * block)
                    tail_of.append(j)
            starts.extend(offset + b * block for b in chosen)
            counts.append(len(chosen))
        self.k = math.ceil(rho * block)
        columns = torch.arange(block, device=device)
        # row starts; the [rows, block] index is made at each use (kept: 8 bytes an entry)
        self.full = (torch.tensor(starts, dtype=torch.int64, device=device)[:, None]
                     if starts else None)
        self.columns = columns
        self.counts = torch.tensor(counts, dtype=torch.int64, device=device)
        self.scales = torch.tensor(scales, dtype=wide, device=device)
        # tails in at most 3 groups of similar length (1-15, 16-255, 256-4095 entries), each
        # padded to its longest: a few topk calls whatever the number of tensors, at most 16x
        # padding (GPT-2's tails at d_model 16: 3.4x in one group, 1.3x in two)
        groups: dict[int, list[int]] = {}
        for t, n in enumerate(tail_lengths):
            groups.setdefault(n.bit_length() // 4, []).append(t)
        self.tails = []
        for members in groups.values():
            lengths = [tail_lengths[t] for t in members]
            columns = torch.arange(max(lengths), device=device)
            size = torch.tensor(lengths, device=device)[:, None]
            first = torch.tensor([tail_starts[t] for t in members], device=device)[:, None]
            ks = [math.ceil(rho * n) for n in lengths]
            kmask = (torch.arange(max(ks), device=device)[None, :]
                     < torch.tensor(ks, device=device)[:, None]).to(wide)
            self.tails.append(_Tails(first, size, columns, seg.total - 1, max(ks), kmask,
                                     torch.tensor([tail_of[t] for t in members], device=device)))

    def __call__(self, g: Tensor, n: int, wide) -> tuple[Tensor, Tensor]:
        """(kept, total) squared mass of each tensor's blockwise top-k, scaled to the tensor
        (``g``: the flat gradients in ``wide``)."""
        if self.full is not None:
            square = _rows(g, self.full + self.columns).square_()
            kept_rows = square.topk(self.k, dim=1, sorted=False).values.sum(dim=1)
            kept = torch.segment_reduce(kept_rows, "sum", lengths=self.counts) * self.scales
            total = torch.segment_reduce(square.sum(dim=1), "sum", lengths=self.counts) * self.scales
        else:
            kept = torch.zeros(n, dtype=wide, device=g.device)
            total = torch.zeros(n, dtype=wide, device=g.device)
        for tails in self.tails:
            # padding reads the next tensor's entries: masked by where (NaN·0 would be NaN)
            index = (tails.starts + tails.columns).clamp_(max=tails.last)
            square = _rows(g, index).square_().masked_fill_(tails.columns >= tails.lengths, 0.0)
            top = square.topk(tails.k, dim=1, sorted=True).values  # largest first
            kept.index_add_(0, tails.of, (top * tails.kmask).sum(dim=1))
            total.index_add_(0, tails.of, square.sum(dim=1))
        return kept, total


@dataclass
class StepData:
    """One sampled step's concatenations (see the module: where additions read them)."""

    grads: Tensor | None = None      # gradients of FlatPlan.slots, end to end, their dtype
    before: Tensor | None = None     # θ at the samples before the step, float32 (update norms)
    g_sample: Tensor | None = None   # g at the samples, float32 (the range probes)
    range_before: Tensor | None = None  # θ at the samples before the step (the range probes)
    range_update: Tensor | None = None  # θ⁺ − θ⁻ at the samples, float32 (the range probes)
    v: Tensor | None = None          # second moments of FlatPlan.v_slots, end to end
    v_sample: Tensor | None = None   # v at the samples of FlatPlan.v_slots, float32


class FlatPlan:
    """The flat path for one set of tensors (the active tensors at most `FLAT_MAX` entries).

    Args:
        where: the tensors' row indices in the monitor's rows.
        slots: their `TensorSlot`s.
        device, wide: the device and the sums' dtype.
        topk: (block, density) of the top-k probe, or None.
    """

    def __init__(self, where: list[int], slots: list, device, wide, topk: tuple | None):
        self.where = where
        self.slots = slots
        self.device = device
        self.wide = wide
        self.index = torch.tensor(where, dtype=torch.int64, device=device)
        self.seg = Segments([s.param.numel() for s in slots], [s.sample for s in slots], device,
                            wide)
        self.topk = _TopK(self.seg, slots, topk[0], topk[1], device, wide) if topk else None
        self.params = [s.param for s in slots]
        self.sample_counts = [s.sample.count for s in slots]
        self.sample_scales = [s.sample.scale for s in slots]
        self.want_ranges = False  # the collector's range probes: g and θ⁺ − θ⁻ at the samples
        # On the CPU, float32 tensors are summed in C where they lie (`flat_cpu`); any step whose
        # tensors are not plain float32 takes the torch ops below.
        self.host = self.host_topk = None
        if (flat_cpu.host_sums_apply(device, wide)
                and all(p.dtype == torch.float32 for p in self.params)):
            numels = [p.numel() for p in self.params]
            self.host = flat_cpu.HostSegments(numels, [s.sample for s in slots])
            if topk:
                self.host_topk = flat_cpu.HostTopK(numels, slots, topk[0], topk[1])
        self.m_host = self.v_host = None
        self.where_host = np.array(where, dtype=np.int64)
        self.m_where_host = self.v_where_host = None
        self._outs: dict[str, cpu_many.Rows] = {}  # which set -> where it writes (`host_out`)
        self._dicts: dict[str, tuple] = {}  # which set -> (state keys, state values, its dicts)
        self.step = StepData()
        self.moments_ready = False   # m and v partitions are found at the first end()
        self.m_where: Tensor | None = None
        self.m_slots: list = []
        self.m_seg: Segments | None = None
        self.m_keys: list = []
        self.v_where: Tensor | None = None
        self.v_slots: list = []
        self.v_seg: Segments | None = None
        self.v_keys: list = []
        self.v_prev: Tensor | None = None
        self.v_frozen: Tensor | None = None
        self.m_rows: set = set()
        self.v_rows: set = set()
        self.loop: list[int] = []

    # ------------------------------------------------------------------------- before the step
    def grad_columns(self, grads: list[Tensor], produced, grad_scale: Tensor | None,
                     want_update: bool, rows: np.ndarray | None = None
                     ) -> dict[Col, Tensor | None]:
        """Gradient statistics, Σθ² before, the top-k probe, θ's sample; Col -> per tensor.
        On the CPU (``rows``: the monitor's host rows) the C sums write into ``rows`` itself,
        and those columns map to None."""
        wide, seg = self.wide, self.seg
        params = self.params
        want_topk = self.topk is not None and Stat.TOPK_KEPT_SQ not in produced
        if self.host is not None and rows is not None:
            columns = flat_cpu.grad_columns(self, grads, produced, grad_scale, want_update,
                                            want_topk, rows)
            if columns is not None:
                self.step.grads = None
                return columns
        columns: dict[Col, Tensor] = {}
        g = self.step.grads = flatten(grads)
        self.step.g_sample = seg.take(g) if self.want_ranges else None
        x = g.to(wide)
        if Stat.GRAD_SQ not in produced:
            sq = torch.segment_reduce(x * x, "sum", lengths=seg.lengths)
            absmax = torch.segment_reduce(x.abs(), "max", lengths=seg.lengths, initial=0)
            nonfinite = torch.segment_reduce((~torch.isfinite(x)).to(wide), "sum",
                                             lengths=seg.lengths)
            absmax = torch.where(nonfinite > 0, math.inf, absmax)
            if grad_scale is not None:
                inv = 1.0 / grad_scale.detach().to(wide).reshape(())
                sq = sq * inv * inv
                absmax = absmax * inv
            columns.update({Col.GRAD_SQ: sq, Col.GRAD_ABSMAX: absmax,
                            Col.GRAD_NONFINITE: nonfinite})
        take_before = want_update or self.want_ranges
        if Stat.PARAM_SQ_BEFORE not in produced or take_before:
            p = flatten(params)
            if Stat.PARAM_SQ_BEFORE not in produced:
                columns[Col.PARAM_SQ_BEFORE] = seg.sq(p, wide)
            before = seg.take(p) if take_before else None
            self.step.before = before if want_update else None
            self.step.range_before = before if self.want_ranges else None
        if want_topk:
            kept, total = self.topk(x, len(self.slots), wide)
            columns[Col.TOPK_KEPT_SQ], columns[Col.TOPK_TOTAL_SQ] = kept, total
        return columns

    # ------------------------------------------------------------------------- after the step
    def param_columns(self, produced, rows: np.ndarray | None = None) -> dict[Col, Tensor]:
        """Σθ² after the step and the update's Σ(Δθ)² at the samples (on the CPU written into
        the host ``rows``: nothing returned)."""
        want_after = Stat.PARAM_SQ_AFTER not in produced
        step = self.step
        if not want_after and step.before is None and step.range_before is None:
            return {}
        if self.host is not None and rows is not None and flat_cpu.param_columns(self, produced,
                                                                                 rows):
            return {}
        columns: dict[Col, Tensor] = {}
        p = flatten(self.params)
        if want_after:
            columns[Col.PARAM_SQ_AFTER] = self.seg.sq(p, self.wide)
        after = self.seg.take(p) if step.before is not None or step.range_before is not None else None
        if step.before is not None:
            columns[Col.UPDATE_SQ] = self.seg.sample_diff_sq(after, step.before, self.wide)
            step.before = None
        if step.range_before is not None:
            step.range_update, step.range_before = after - step.range_before, None
        return columns

    def find_moments(self, collector) -> None:
        """Which of the plan's tensors have a plain m and a plain full v (the others, and the
        tensors without state yet, go through the per-tensor path)."""
        m_rows, v_rows = [], []
        for row, slot in zip(self.where, self.slots):
            layout = collector.layout(slot)
            if layout is None or layout.v_computed or layout.v_unfrozen:
                continue
            state = collector.optimizer.state[slot.param]
            m = layout.first(state)
            # codes (bitsandbytes' uint8 state) are not values: those go one by one, decoded
            if m is not None and _plain_values(m, slot):
                m_rows.append((row, slot, layout.m))
            v = layout.second_tensor(state) if layout.has_second(state) else None
            if v is not None and _plain_values(v, slot):
                v_rows.append((row, slot, layout.v))
        device = self.device
        self.m_slots = [s for _, s, _ in m_rows]
        self.m_keys = [k for _, _, k in m_rows]
        self.m_where = torch.tensor([r for r, _, _ in m_rows], dtype=torch.int64, device=device)
        self.m_seg = self._segments(self.m_slots)
        self.v_slots = [s for _, s, _ in v_rows]
        self.v_keys = [k for _, _, k in v_rows]
        self.v_where = torch.tensor([r for r, _, _ in v_rows], dtype=torch.int64, device=device)
        self.v_seg = self._segments(self.v_slots)
        if self.host is not None:
            self.m_host, self.v_host = self._host_segments(self.m_slots), self._host_segments(self.v_slots)
            self.m_where_host = np.array([r for r, _, _ in m_rows], dtype=np.int64)
            self.v_where_host = np.array([r for r, _, _ in v_rows], dtype=np.int64)
        # samples saved by an earlier plan (or the per-tensor path): NaN where none, so that
        # tensor's drift stays unrecorded this step
        self.m_rows = {r for r, _, _ in m_rows}
        self.v_rows = {r for r, _, _ in v_rows}
        # the rows the per-tensor loop still visits: on this path without m or without v
        self.loop = [r for r in self.where if r not in self.m_rows or r not in self.v_rows]
        self.v_prev = self._gather_saved("v_prev")
        self.v_frozen = self._gather_saved("v_frozen")
        for slot in self.v_slots:
            slot.v_prev = slot.v_frozen = None  # the plan holds them now
        self.moments_ready = True

    def _segments(self, slots: list) -> Segments:
        """The plan's own `Segments` when ``slots`` are all its tensors (one index kept)."""
        if len(slots) == len(self.slots):
            return self.seg
        return Segments([s.param.numel() for s in slots], [s.sample for s in slots], self.device,
                        self.wide)

    def _host_segments(self, slots: list) -> flat_cpu.HostSegments:
        if len(slots) == len(self.slots):
            return self.host
        return flat_cpu.HostSegments([s.param.numel() for s in slots], [s.sample for s in slots])

    def _gather_saved(self, name: str) -> Tensor | None:
        saved = [getattr(s, name) for s in self.v_slots]
        if all(x is None for x in saved):
            return None
        return torch.cat([x.to(self.device, torch.float32) if x is not None and
                          x.numel() == s.sample.count else
                          torch.full((s.sample.count,), math.nan, device=self.device)
                          for x, s in zip(saved, self.v_slots)])

    def release(self) -> None:
        """Hands the saved samples back to the slots (views of the plan's buffers), before the
        plan is replaced by one for another set of tensors."""
        if not self.moments_ready:
            return
        counts = [s.sample.count for s in self.v_slots]
        for name, flat in (("v_prev", self.v_prev), ("v_frozen", self.v_frozen)):
            if flat is None:
                continue
            for slot, part in zip(self.v_slots, flat.split(counts)):
                setattr(slot, name, None if part.isnan().all() else part)
        self.v_prev = self.v_frozen = None

    def moment_columns(self, state: dict, want_m1: bool, want_m2: bool, freeze_now: bool,
                       rows: np.ndarray | None = None) -> list[tuple[Tensor, dict[Col, Tensor]]]:
        """Σm², Σv² and the drift sums of v at the samples: [(row indices, Col -> values)] (on
        the CPU written into the host ``rows``: nothing returned)."""
        if self.host is not None and rows is not None and flat_cpu.moment_columns(
                self, state, want_m1, want_m2, freeze_now, rows):
            return []
        wide, out = self.wide, []
        if want_m1 and self.m_slots:
            m = flatten(self.moment_tensors(state, "m"))
            out.append((self.m_where, {Col.MOMENT1_SQ: self.m_seg.sq(m, wide)}))
        if not self.v_slots:
            return out
        seg = self.v_seg
        v = self.step.v = flatten(self.moment_tensors(state, "v"))
        sample = self.step.v_sample = seg.take(v)
        columns: dict[Col, Tensor] = {}
        if want_m2:
            columns[Col.MOMENT2_SQ] = seg.sq(v, wide)
        if self.v_prev is not None:
            columns[Col.DRIFT_DIFF_SQ] = seg.sample_diff_sq(sample, self.v_prev, wide)
            columns[Col.DRIFT_PREV_SQ] = seg.sample_sq(self.v_prev, wide)
        self.v_prev = sample
        if freeze_now:
            self.v_frozen = sample
        if self.v_frozen is not None:
            columns[Col.FREEZE_DIFF_SQ] = seg.sample_diff_sq(sample, self.v_frozen, wide)
            columns[Col.FREEZE_REF_SQ] = seg.sample_sq(self.v_frozen, wide)
        out.append((self.v_where, columns))
        return out

    def moment_tensors(self, state: dict, which: str) -> list[Tensor]:
        """The optimizer's m (``which="m"``) or v of the tensors that have a plain one."""
        slots, keys = (self.m_slots, self.m_keys) if which == "m" else (self.v_slots, self.v_keys)
        return list(map(getitem, self._state_dicts(state, which, slots), keys))

    def _state_dicts(self, state: dict, which: str, slots: list) -> list[dict]:
        """``[state[s.param] for s in slots]``, without hashing a parameter (`Tensor.__hash__`
        is Python code: 148 lookups cost more than the sums they serve): kept while the state's
        keys and values are the very objects they were (compared by identity, in C)."""
        keys, values = list(state), list(state.values())
        cached = self._dicts.get(which)
        if (cached is None or len(keys) != len(cached[0]) or not all(map(is_, keys, cached[0]))
                or not all(map(is_, values, cached[1]))):
            dicts = [state[s.param] for s in slots]
            cached = self._dicts[which] = (keys, values, dicts)
        return cached[2]

    def host_out(self, rows: np.ndarray, which: str) -> cpu_many.Rows:
        """Where the C sums of a set (``"plan"``, ``"m"``, ``"v"``) write in the host rows."""
        where = (self.where_host if which == "plan" else self.m_where_host if which == "m"
                 else self.v_where_host)
        out = self._outs.get(which)
        if out is None or out.rows is not rows or out.where is not where:  # (compared by
            out = self._outs[which] = cpu_many.Rows(rows, where)  # identity: the collector
        return out  # passes one array, kept; find_moments makes new rows for m and v)

    def buffers(self) -> list[Tensor]:
        """What the plan keeps between steps (for the monitor's memory figure)."""
        kept = [t for t in (self.v_prev, self.v_frozen) if t is not None]
        kept += [s.sample_index for s in (self.seg, self.m_seg, self.v_seg) if s is not None]
        if self.topk is not None:
            kept += [t for tails in self.topk.tails for t in (tails.starts, tails.kmask)]
            kept += [self.topk.full] if self.topk.full is not None else []
        return kept
