"""The flat path's sums on the CPU in C, for float32 tensors: no concatenation, no torch op.

`optiscope.monitor.flat` lays the small tensors end to end and reduces them with a few torch
ops: on a GPU that is a few launches whatever the number of tensors. On a CPU each of those ops
costs 100-300 us for GPT-2's 148 small tensors (44,000 entries), most of it fixed cost, which made
a sampled step cost milliseconds. Here each quantity is one call into the C library
(`optiscope.kernels.cpu_many`) that reads the tensors where they lie and writes each tensor's
sums straight into the monitor's host rows (the samples' sums too): a sampled step of 148
tensors does its arithmetic in tens of microseconds, and no numpy call scatters, bins or scales
its results afterwards (after the optimizer's step, each such call meets cold caches). The
results are those of the torch path up to the order of additions (sums in double; Σx² per block
of 4096 in float lanes, as the C kernels' other sums).

Every tensor is checked before its address is read (`cpu_many.f32_addresses`): a tensor that is
not a plain contiguous float32 CPU tensor of its plan's length sends that step to the torch path.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from optiscope.contract import Stat
from optiscope.kernels import cpu_many
from optiscope.monitor.metrics import Col

__all__ = ["HostSegments", "HostTopK", "host_sums_apply"]


def host_sums_apply(device, wide) -> bool:
    """The C sums can run: the CPU, float64 sums, the library loaded."""
    return device.type == "cpu" and wide == torch.float64 and cpu_many.available()


class HostSegments:
    """Tensors of one set (the plan's, or those with an m or a v) for the C calls: their lengths,
    their samples' local indices end to end, their sample counts and scales.

    Args:
        numels: the tensors' sizes.
        samples: their `CoordinateSample`s.
    """

    def __init__(self, numels: list[int], samples: list):
        self.n = len(numels)
        self.numels = cpu_many.kept(np.array(numels, dtype=np.int64))
        parts = [np.arange(n, dtype=np.int32) if s.index is None
                 else s.index.cpu().numpy().astype(np.int32) for n, s in zip(numels, samples)]
        self.index = cpu_many.kept(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32))
        self.counts = cpu_many.kept(np.array([len(p) for p in parts], dtype=np.int64))
        self.scale = cpu_many.kept(np.array([s.scale for s in samples], dtype=np.float64))
        self._numels = list(numels)
        self._caches: dict[str, cpu_many.AddressCache] = {}
        self._set = cpu_many.SampleSet(self.numels, self.index, self.counts, self.scale)

    def addresses(self, tensors: list, kept: str | None = None) -> np.ndarray | None:
        """The tensors' checked addresses (None: not all plain float32 of their lengths);
        ``kept``: the name of a quantity whose tensors keep their storage between steps (θ, m,
        v), checked again only when an address changes."""
        if kept is None:
            return cpu_many.f32_addresses(tensors, self._numels)
        cache = self._caches.get(kept)
        if cache is None:
            cache = self._caches[kept] = cpu_many.AddressCache(self._numels)
        return cache(tensors)

    def take(self, addresses: np.ndarray) -> np.ndarray:
        return cpu_many.take(addresses, self.index, self.counts)

    def sq_take(self, addresses: np.ndarray, out: cpu_many.Rows, col_sq: int, *refs) -> np.ndarray:
        """`cpu_many.SampleSet.sq_take` over these tensors (``refs``: its optional arguments)."""
        return self._set.sq_take(addresses, out, col_sq, *refs)


_GRAD_TOPK = (Col.GRAD_SQ, Col.GRAD_ABSMAX, Col.GRAD_NONFINITE, Col.TOPK_KEPT_SQ,
              Col.TOPK_TOTAL_SQ)
_COLS = cpu_many.kept(np.array([int(c) for c in _GRAD_TOPK], dtype=np.int64))


class HostTopK:
    """The top-k probe's rows as `flat._TopK` makes them (every full block of a tensor, or its
    sampled blocks, and the tail of a tensor whose blocks are all used), for one C call."""

    def __init__(self, numels: list[int], slots: list, block: int, rho: float):
        of, starts, lengths, ks, scales = [], [], [], [], []
        k_block = math.ceil(rho * block)
        for j, (slot, n) in enumerate(zip(slots, numels)):
            n_full = n // block
            if slot.blocks is not None:
                chosen = slot.blocks.tolist()
                scales.append(n / (len(chosen) * block))
            else:
                chosen = list(range(n_full))
                scales.append(1.0)
                if n > n_full * block:
                    of.append(j)
                    starts.append(n_full * block)
                    lengths.append(n - n_full * block)
                    ks.append(math.ceil(rho * (n - n_full * block)))
            for b in chosen:
                of.append(j)
                starts.append(b * block)
                lengths.append(block)
                ks.append(k_block)
        self.n = len(numels)
        self.of = cpu_many.kept(np.array(of, dtype=np.int64))
        self.starts = cpu_many.kept(np.array(starts, dtype=np.int64))
        self.lengths = cpu_many.kept(np.array(lengths, dtype=np.int64))
        self.ks = cpu_many.kept(np.array(ks, dtype=np.int64))
        self.scales = cpu_many.kept(np.array(scales, dtype=np.float64))
        self.scratch = cpu_many.kept(np.empty(max(lengths + [1]), dtype=np.float64))

    def write_with_grad(self, addresses: np.ndarray, numels: np.ndarray, inv_scale,
                        out: cpu_many.Rows) -> None:
        """`write` and the gradients' sums (`cpu_many.rows_grad`) in one walk."""
        cpu_many.rows_grad_topk(addresses, numels, inv_scale, self.of, self.starts,
                                self.lengths, self.ks, self.scratch, self.scales, out, _COLS)

    def write(self, addresses: np.ndarray, out: cpu_many.Rows) -> None:
        """The kept and total squared mass of each tensor into ``out``'s top-k columns."""
        cpu_many.rows_topk(addresses, self.of, self.starts, self.lengths, self.ks, self.scratch,
                           self.scales, out, Col.TOPK_KEPT_SQ, Col.TOPK_TOTAL_SQ)


def grad_columns(plan, grads: list, produced, grad_scale, want_update: bool, want_topk: bool,
                 rows: np.ndarray) -> dict[Col, None] | None:
    """`FlatPlan.grad_columns` in C, written into the monitor's host ``rows``: the columns
    written (None: a tensor is not plain float32, nothing written; the torch path runs)."""
    seg: HostSegments = plan.host
    g = seg.addresses(grads)
    if g is None:
        return None
    want_before = Stat.PARAM_SQ_BEFORE not in produced
    take_before = want_update or plan.want_ranges
    p = None
    if want_before or take_before:
        p = seg.addresses(plan.params, "param")
        if p is None:
            return None
    out = plan.host_out(rows, "plan")
    written: dict[Col, None] = {}
    want_grad = Stat.GRAD_SQ not in produced
    inv = None if grad_scale is None else 1.0 / float(grad_scale)
    if want_grad and want_topk:  # one walk: each gradient read once
        plan.host_topk.write_with_grad(g, seg.numels, inv, out)
        written.update(dict.fromkeys(_GRAD_TOPK))
        want_grad = want_topk = False
    if want_grad:
        cpu_many.rows_grad(g, seg.numels, inv, out, Col.GRAD_SQ, Col.GRAD_ABSMAX,
                           Col.GRAD_NONFINITE)
        written.update(dict.fromkeys((Col.GRAD_SQ, Col.GRAD_ABSMAX, Col.GRAD_NONFINITE)))
    before = None
    if take_before:  # θ's sum and sample in one walk
        before = torch.from_numpy(seg.sq_take(p, out, Col.PARAM_SQ_BEFORE if want_before else -1))
    elif want_before:
        cpu_many.rows_sq(p, seg.numels, out, Col.PARAM_SQ_BEFORE)
    if want_before:
        written[Col.PARAM_SQ_BEFORE] = None
    plan.step.before = before if want_update else None
    plan.step.range_before = before if plan.want_ranges else None
    plan.step.g_sample = torch.from_numpy(seg.take(g)) if plan.want_ranges else None
    if want_topk:
        plan.host_topk.write(g, out)
        written.update(dict.fromkeys((Col.TOPK_KEPT_SQ, Col.TOPK_TOTAL_SQ)))
    return written


def param_columns(plan, produced, rows: np.ndarray) -> bool:
    """`FlatPlan.param_columns` in C, into ``rows`` (False: θ is not plain float32 now)."""
    seg: HostSegments = plan.host
    p = seg.addresses(plan.params, "param")
    if p is None:
        return False
    step = plan.step
    out = plan.host_out(rows, "plan")
    col_sq = Col.PARAM_SQ_AFTER if Stat.PARAM_SQ_AFTER not in produced else -1
    after = None
    if step.before is not None or step.range_before is not None:  # one walk: Σθ², sample, Σ(Δθ)²
        before = step.before.numpy() if step.before is not None else None
        after = seg.sq_take(p, out, col_sq, before, (Col.UPDATE_SQ, -1))
        step.before = None
    elif col_sq >= 0:
        cpu_many.rows_sq(p, seg.numels, out, col_sq)
    if step.range_before is not None:
        step.range_update = torch.from_numpy(after - step.range_before.numpy())
        step.range_before = None
    return True


def moment_columns(plan, state: dict, want_m1: bool, want_m2: bool, freeze_now: bool,
                   rows: np.ndarray) -> bool:
    """`FlatPlan.moment_columns` in C, into ``rows`` (False: a moment is not plain float32 now;
    nothing written, the torch path runs)."""
    m = v = None
    if want_m1 and plan.m_slots:
        m = plan.m_host.addresses(plan.moment_tensors(state, "m"), "m")
        if m is None:
            return False
    if plan.v_slots:
        v = plan.v_host.addresses(plan.moment_tensors(state, "v"), "v")
        if v is None:
            return False
    if m is not None:
        cpu_many.rows_sq(m, plan.m_host.numels, plan.host_out(rows, "m"), Col.MOMENT1_SQ)
    if v is None:
        return True
    seg: HostSegments = plan.v_host
    # one walk: Σv², v's sample, its drift from the last sample and from the frozen one (the
    # sample itself when it is frozen now)
    sample = np.empty(len(seg.index), dtype=np.float32)
    frozen = sample if freeze_now else (plan.v_frozen.numpy() if plan.v_frozen is not None
                                        else None)
    seg.sq_take(v, plan.host_out(rows, "v"), Col.MOMENT2_SQ if want_m2 else -1,
                plan.v_prev.numpy() if plan.v_prev is not None else None,
                (Col.DRIFT_DIFF_SQ, Col.DRIFT_PREV_SQ), frozen,
                (Col.FREEZE_DIFF_SQ, Col.FREEZE_REF_SQ), sample)
    plan.step.v_sample = plan.v_prev = torch.from_numpy(sample)
    if freeze_now:
        plan.v_frozen = plan.step.v_sample
    return True
