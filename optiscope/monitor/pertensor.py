"""Per-tensor sums for the tensors the flat path (`optiscope.monitor.flat`) does not take:
large tensors, DTensor shards, sparse gradients, subclasses. Σx², max |x| and the non-finite
count of each tensor, accumulated in float64; in C for float32 CPU tensors."""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from optiscope.kernels import cpu
from optiscope.kernels.backend import triton_available
from optiscope.kernels.stats import SUM_ROW
from optiscope.contract import Stat

__all__ = ["sums_dtype", "sq_norms", "grad_stats", "dense", "segment_sq", "segment_diff_sq",
           "topk_sums", "take_all", "KERNEL_DEVICES"]


def sums_dtype(device: torch.device) -> torch.dtype:
    """The monitor's sums' dtype: float64 (a finite tensor's Σx² is finite: float32's range ends
    at 3.4e38, and gradients of 1e30 summed to inf, of 1e-30 to 0), where the device has it."""
    return torch.float32 if device.type == "mps" else torch.float64


log = logging.getLogger("optiscope.monitor")

# Devices whose tensors are summed (`kernels.sums`) and gathered (`kernels.gather`) by one
# Triton launch per dtype rather than a few torch ops per tensor: on a GPU each op is a launch
# and host time, which at GPT-2's 148 tensors cost the monitor tens of milliseconds per sampled
# step (benchmarks/results/cuda-nvidia-h200.json). The tests add "cpu" to run the kernels under
# the interpreter.
KERNEL_DEVICES = ("cuda",)
# Fewer tensors than this are summed with torch ops: a launch's own few ops (the address
# table, the reduction of its chunks) cost more than two norms (`benchmarks.monitor_gpu_path`)
KERNEL_MIN_TENSORS = 3
_failed: set[str] = set()


def _kernel(name: str, tensors: list[Tensor], run) -> Tensor | None:
    """``run()`` (a launch of the Triton kernel ``name``) where the kernels apply to ``tensors``,
    else None. A failed launch is logged once and the torch ops take over for the rest of the
    run: the monitor never takes the training down."""
    if (name in _failed or len(tensors) < KERNEL_MIN_TENSORS
            or tensors[0].device.type not in KERNEL_DEVICES):
        return None
    if not triton_available():
        return None
    try:
        return run()
    except Exception:  # a Triton that cannot compile or launch here: torch ops from now on
        _failed.add(name)
        log.warning("optiscope: the Triton %s kernel failed; the monitor uses torch ops for it "
                    "from now on", name, exc_info=True)
        return None


def _kernel_sums(tensors: list[Tensor]):
    """`kernels.sums.tensor_sums` of ``tensors`` (float64 columns: Σx², max |x|, non-finite
    count) where it applies, else None."""
    def run():
        from optiscope.kernels import sums

        return sums.tensor_sums(tensors) if sums.applies(tensors, KERNEL_DEVICES) else None
    return _kernel("sums", tensors, run)


def _kernel_gather(tensors: list[Tensor], indices: list[Tensor], row: int = 1) -> Tensor | None:
    """`kernels.gather.gather` (float32, concatenated) where it applies, else None."""
    def run():
        from optiscope.kernels import gather

        if not gather.applies(tensors, indices, KERNEL_DEVICES):
            return None
        return gather.gather(tensors, indices, row)
    return _kernel("gather", tensors, run)


def take_all(samples: list, tensors: list[Tensor]) -> list[Tensor]:
    """``samples[i].take(tensors[i])`` for each ``i`` (`CoordinateSample.take`: float32 copies
    of the sampled entries); on a GPU the sampled tensors in one gather launch per dtype, their
    results views of one buffer."""
    picked = [k for k, s in enumerate(samples) if s.index is not None]
    got = _kernel_gather([tensors[k] for k in picked], [samples[k].index for k in picked])
    if got is None:
        return [s.take(t) for s, t in zip(samples, tensors)]
    parts = dict(zip(picked, got.split([samples[k].count for k in picked])))
    return [parts[k] if k in parts else s.take(t)
            for k, (s, t) in enumerate(zip(samples, tensors))]


def sq_norms(tensors: list[Tensor]) -> Tensor:
    """Σx² of each tensor, accumulated in float64 (`sums_dtype`): in C for float32 CPU tensors,
    in one Triton launch per dtype on a GPU (`_kernel_sums`), else a norm over float64 (torch's
    float32 norm squares in float32: inf for entries of 1e30)."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    if cpu.sums_apply(tensors):
        return cpu.sq_sums_f32(tensors)
    if (sums := _kernel_sums(tensors)) is not None:
        return sums.sq
    wide = sums_dtype(tensors[0].device)
    if all(t.numel() <= SUM_ROW for t in tensors):  # one call for many small tensors
        return torch.stack(torch._foreach_norm(tensors, 2, dtype=wide)).square()
    return torch.stack([torch.linalg.vector_norm(t.reshape(-1), dtype=wide).square()
                        for t in tensors])


def _wide(grads: list[Tensor]) -> dict[Stat, Tensor]:
    """`kernels.stats.torch_grad_stats` with Σg² in float64 (`sq_norms`), all three float64."""
    if cpu.sums_apply(grads):  # the three in one pass per tensor, in C
        sums = cpu.grad_sums_f32(grads)
        nonfinite = sums[:, 2]
        absmax = torch.where(nonfinite > 0, math.inf, sums[:, 1])
        return {Stat.GRAD_SQ: sums[:, 0], Stat.GRAD_ABSMAX: absmax, Stat.GRAD_NONFINITE: nonfinite}
    if (sums := _kernel_sums(grads)) is not None:  # the three in one launch per dtype
        return {Stat.GRAD_SQ: sums.sq, Stat.GRAD_ABSMAX: sums.absmax,
                Stat.GRAD_NONFINITE: sums.nonfinite}
    wide = sums_dtype(grads[0].device)
    sq = sq_norms(grads)
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


def grad_stats(grads: list[Tensor]) -> dict[Stat, Tensor]:
    """`_wide`: `kernels.stats.torch_grad_stats` in float64, with zeros for empty tensors.

    A rank's local shard of a DTensor is empty when the tensor has fewer rows than there are
    ranks (FSDP2 gives rank 1 of 2 nothing of a ``[1, n]`` weight), and torch's infinity norm
    refuses an empty tensor. Zero is the identity of the cross-rank SUM and, as |g| >= 0, of
    the MAX, so the other ranks' shards make the figure.
    """
    present = [i for i, g in enumerate(grads) if g.numel()]
    if len(present) == len(grads):
        return _wide(grads)
    device = grads[0].device
    stats = {s: torch.zeros(len(grads), dtype=sums_dtype(device), device=device)
             for s in (Stat.GRAD_SQ, Stat.GRAD_ABSMAX, Stat.GRAD_NONFINITE)}
    if present:
        index = torch.tensor(present, device=device)
        for s, column in _wide([grads[i] for i in present]).items():
            stats[s][index] = column
    return stats


def dense(g: Tensor) -> Tensor:
    """The stored values of a sparse gradient (zeros elsewhere add nothing to the sums)."""
    return g.coalesce().values() if g.is_sparse else g


def segment_sq(parts: list[Tensor], lengths: Tensor) -> Tensor:
    """Σx² of each of ``parts`` (1-D samples), as one float64 reduction over their
    concatenation."""
    x = torch.cat(parts)
    return torch.segment_reduce(x.to(sums_dtype(x.device)).square_(), "sum", lengths=lengths)


def segment_diff_sq(a: list[Tensor], b: list[Tensor], lengths: Tensor) -> Tensor:
    """Σ(a − b)² of each pair of ``a``, ``b``: two concatenations and one float64 reduction."""
    x, y = torch.cat(a), torch.cat(b)
    wide = sums_dtype(x.device)
    return torch.segment_reduce((x.to(wide) - y.to(wide)).square_(), "sum", lengths=lengths)


def topk_sums(slots: list, grads: list[Tensor], block: int, rho: float, on
              ) -> tuple[Tensor, Tensor]:
    """(kept, total) squared mass of a blockwise top-k of each gradient, scaled to its tensor
    (``on``: a list as a tensor on a device, `Collector._on`).

    The blocks of every tensor (its sampled blocks, or all of them for a small tensor) are
    gathered into one ``[rows, B]`` matrix and selected with one top-k; a small tensor's
    last, partial block goes with those of the same length. One top-k per tensor cost the
    GPT-2-small sample (148 tensors) 4.5 ms of per-call overhead on a CPU.
    """
    device = grads[0].device
    wide = sums_dtype(device)
    rows: list[Tensor] = []
    counts: list[int] = []
    scales: list[float] = []
    tails: dict[int, list[tuple[int, Tensor]]] = {}
    sampled = [j for j, slot in enumerate(slots) if slot.blocks is not None]
    # on a GPU the sampled blocks of every tensor in one launch (`_kernel_gather`), which copies
    # into float32: float64 gradients keep index_select
    got = (_kernel_gather([dense(grads[j]).detach() for j in sampled],
                          [slots[j].blocks for j in sampled], row=block)
           if all(grads[j].dtype != torch.float64 for j in sampled) else None)
    gathered = (iter(got.to(wide).view(-1, block).split([slots[j].blocks.numel()
                                                          for j in sampled]))
                if got is not None else None)
    for j, (slot, g) in enumerate(zip(slots, grads)):
        flat = dense(g).detach().reshape(-1)
        n_full = flat.numel() // block
        full = flat[: n_full * block].view(n_full, block)
        if slot.blocks is not None:  # sampled blocks
            rows.append(next(gathered) if gathered is not None
                        else torch.index_select(full, 0, slot.blocks).to(wide))
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
    lengths = on(counts, device)
    scale = on(scales, device)
    kept = torch.segment_reduce(kept_rows, "sum", lengths=lengths) * scale
    total = torch.segment_reduce(square.sum(dim=1), "sum", lengths=lengths) * scale
    for length, items in tails.items():
        where = on([j for j, _ in items], device)
        square = torch.stack([t for _, t in items]).to(wide).square_()
        k = math.ceil(rho * length)
        kept.index_add_(0, where, square.topk(k, dim=1, sorted=False).values.sum(dim=1))
        total.index_add_(0, where, square.sum(dim=1))
    return kept, total
