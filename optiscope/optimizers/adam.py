"""Adam (Kingma & Ba, 2015, arXiv 1412.6980) and AdamW (Loshchilov & Hutter, 2019, arXiv 1711.05101).

Same semantics as `torch.optim.Adam` / `torch.optim.AdamW`: weight-decay order, eps placement,
``amsgrad``, ``maximize``, per-group hyperparameters, LR schedulers, and a state layout that loads
into either (``step`` a float32 0-d CPU tensor, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from optiscope.contract import MomentLayout, Stat, StatsRows
from optiscope.kernels import cpu_many
from optiscope.kernels.backend import resolve_backend
from optiscope.kernels.cpu import (ADAM_STATS, RANGE_FIELDS, BlockSums, adam_f32, kernel,
                                   range_buffer)
from optiscope.kernels.launch import densify, launch_groups, local_all, uniform_groups, write_back
from optiscope.kernels.ranges import range_levels
from optiscope.optimizers._base import (OptiscopeOptimizer, advance_steps,
                                        check_adam_hyperparameters)

__all__ = ["Adam", "AdamW", "adam"]


class Adam(OptiscopeOptimizer):
    r"""Adam, optionally with decoupled weight decay (then it is AdamW).

    Per parameter, with gradient :math:`g_t` and step :math:`t`:

    .. math::
        g &\leftarrow -g \text{ if maximize};\quad
        \theta \leftarrow \theta(1 - \eta\lambda) \text{ (decoupled) or } g \leftarrow g + \lambda\theta \\
        m &\leftarrow \beta_1 m + (1-\beta_1) g,\qquad v \leftarrow \beta_2 v + (1-\beta_2) g^2
           ,\qquad \bar v \leftarrow \max(\bar v, v) \text{ if amsgrad} \\
        \theta &\leftarrow \theta - \frac{\eta}{1-\beta_1^t}\,
           \frac{m}{\sqrt{\bar v}/\sqrt{1-\beta_2^t} + \epsilon}

    As in torch, the decoupled decay uses the scheduled lr: θ(1 − lr·λ), not only the schedule's
    multiplier (Loshchilov & Hutter's Algorithm 2 decouples lr and λ fully).

    State dtype: the parameter's dtype, as in torch (bf16 parameters keep bf16 moments); the
    arithmetic is float32 on both backends. State tensors live on the parameter's device.

    Args:
        params: parameters or parameter groups (dicts), as for any torch optimizer.
        lr: learning rate (default 1e-3).
        betas: decay rates of the first and second moment (default (0.9, 0.999)).
        eps: added to the bias-corrected √v (default 1e-8).
        weight_decay: L2 penalty, or decoupled decay when ``decoupled_weight_decay`` (default 0).
        amsgrad: use the running maximum of v (default False).
        maximize: maximize the objective (default False).
        decoupled_weight_decay: AdamW's decay (default False; `AdamW` sets it).
        backend: ``"auto"`` (Triton on CUDA when importable, else torch), ``"triton"`` or
            ``"torch"`` (default ``"auto"``). The Triton backend launches once per launch group of
            tensors; the torch backend runs, for float32 CPU tensors, optiscope's one-pass C
            kernel (`optiscope.kernels.cpu`, compiled on first use) and elsewhere torch's own
            fused Adam kernel. Both Triton and the C kernel compute the monitor's statistics in
            the same pass as the update.
    """

    stat_columns: ClassVar[frozenset[Stat]] = frozenset(Stat(i) for i in range(8))
    roles: ClassVar[tuple[str, ...]] = ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps")
    state_layouts: ClassVar[tuple[MomentLayout, ...]] = (
        MomentLayout("adam", m="exp_avg", v="exp_avg_sq"),)

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, *,
                 maximize: bool = False, decoupled_weight_decay: bool = False,
                 backend: str = "auto"):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults, backend=backend)

    def _validate_group(self, group: dict[str, Any]) -> None:
        owner = type(self).__name__
        check_adam_hyperparameters(owner, group)

    def _init_state(self, state: dict, p: Tensor, group: dict[str, Any]) -> None:
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _gather_states(self, states: list[dict], group: dict[str, Any]) -> dict[str, list]:
        return dict(exp_avgs=[s["exp_avg"] for s in states],
                    exp_avg_sqs=[s["exp_avg_sq"] for s in states],
                    max_exp_avg_sqs=([s["max_exp_avg_sq"] for s in states] if group["amsgrad"]
                                     else []),
                    steps=[s["step"] for s in states])

    def _step_group(self, group: dict[str, Any], t: dict[str, list],
                    stats: StatsRows | None) -> None:
        beta1, beta2 = group["betas"]
        adam(t["params"], t["grads"], t["exp_avgs"], t["exp_avg_sqs"],
             t["max_exp_avg_sqs"] if group["amsgrad"] else None, t["steps"],
             lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
             weight_decay=group["weight_decay"],
             decoupled_weight_decay=group["decoupled_weight_decay"],
             maximize=group["maximize"], backend=self.backend, stats=stats)


class AdamW(Adam):
    """Adam with decoupled weight decay, as `torch.optim.AdamW`: see `Adam` (weight_decay default
    1e-2, ``decoupled_weight_decay=True``)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False, backend: str = "auto"):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         decoupled_weight_decay=True, backend=backend)


def adam(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
         exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor] | None,
         state_steps: list[Tensor], *, lr: float, beta1: float, beta2: float, eps: float,
         weight_decay: float, decoupled_weight_decay: bool, maximize: bool,
         backend: str = "auto", stats: StatsRows | None = None) -> None:
    """Functional Adam/AdamW over tensors on one device: increments ``state_steps`` and updates
    parameters and state in place.

    Args:
        params, grads, exp_avgs, exp_avg_sqs: one entry per parameter.
        max_exp_avg_sqs: amsgrad maxima, or None without amsgrad.
        state_steps: float32 0-d CPU tensors, the step count of each parameter.
        lr, beta1, beta2, eps, weight_decay: hyperparameters.
        decoupled_weight_decay: AdamW's decay.
        maximize: ascend instead of descend.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (default ``"auto"``).
        stats: where to write statistics rows (`optiscope.kernels.stats.Stat` 0..7), or None.
    """
    # Elementwise: a sharded parameter (FSDP2's DTensor) is stepped shard by shard, and its
    # statistics are those of the local shard, which the monitor reduces across ranks.
    params, grads, exp_avgs, exp_avg_sqs = (local_all(ts) for ts in
                                            (params, grads, exp_avgs, exp_avg_sqs))
    if max_exp_avg_sqs is not None:
        max_exp_avg_sqs = local_all(max_exp_avg_sqs)
    chosen = resolve_backend(backend, params[0].device, "Adam")
    if backend == "auto" and any(p.dtype == torch.float64 for p in params):
        # The Triton kernel computes in float32; torch's fused kernel keeps float64 in float64.
        chosen = "torch"
    impl = {"triton": _adam_triton, "torch": _adam_torch}[chosen]
    impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr=lr, beta1=beta1,
         beta2=beta2, eps=eps, weight_decay=weight_decay,
         decoupled_weight_decay=decoupled_weight_decay, maximize=maximize, stats=stats)


def _adam_triton(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr, beta1,
                 beta2, eps, weight_decay, decoupled_weight_decay, maximize, stats):
    from optiscope.kernels.adam import adam_step

    steps = advance_steps(state_steps)
    columns = [[t.dtype for t in ts] for ts in (params, grads, exp_avgs)] + [steps]
    groups = uniform_groups(columns, len(params)) or launch_groups(list(zip(*columns)))
    for (_, _, _, step), idx in groups.items():
        whole = len(idx) == len(params)  # the usual step: one launch group, no lists to copy

        def pick(ts):
            return ts if whole or ts is None else [ts[i] for i in idx]
        adam_step(pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs),
                  pick(max_exp_avg_sqs), step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                  weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
                  maximize=maximize,
                  stats=stats if whole or stats is None else stats.subset(idx))


def _adam_torch(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr, beta1,
                beta2, eps, weight_decay, decoupled_weight_decay, maximize, stats):
    # One pass per tensor: optiscope's C kernel for float32 CPU tensors (statistics in the same
    # pass), torch's fused kernel otherwise; either is faster than the for-loop
    # torch.optim.AdamW (benchmarks/results/cpu-intel-xeon.json has the figures).
    fused = torch._fused_adamw_ if decoupled_weight_decay else torch._fused_adam_
    device = params[0].device
    if device.type == "cpu" and kernel() is not None and _adam_cpu_many(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr=lr,
            beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay, maximize=maximize, stats=stats):
        return
    counts = advance_steps(state_steps)
    # torch's fused kernel walks each tensor's storage flat: a gradient laid out unlike its
    # parameter (a contiguous gradient of a transposed parameter) silently gets the wrong
    # entries paired (torch.optim.AdamW(fused=True) has this bug on CPU). Such columns run on
    # contiguous copies, written back after the step.
    (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs), pairs = densify(
        [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs],
        writable=[True, False, True, True, True])
    if device.type == "cpu":
        steps = state_steps
    else:  # the fused kernel reads the step on the parameters' device; one copy per step value
        on_device = {}
        for c, s in zip(counts, state_steps):
            if c not in on_device:
                on_device[c] = s.to(device, non_blocking=True)
        steps = [on_device[c] for c in counts]
    kwargs = dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
                  amsgrad=max_exp_avg_sqs is not None, maximize=maximize)
    vmax = max_exp_avg_sqs if max_exp_avg_sqs is not None else []
    if _cpu_kernel_applies(params, grads, exp_avgs, exp_avg_sqs, vmax):
        blocks = BlockSums([p.numel() for p in params], ADAM_STATS) if stats is not None else None
        ranges = (range_buffer(len(params))
                  if stats is not None and stats.ranges is not None else None)
        for i, p in enumerate(params):
            adam_f32(p, grads[i], exp_avgs[i], exp_avg_sqs[i], vmax[i] if vmax else None, lr=lr,
                     beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                     step=counts[i], decoupled=decoupled_weight_decay,
                     maximize=maximize, stats=blocks, index=i,
                     ranges=ranges[i] if ranges is not None else None)
        write_back(pairs)
        _write_cpu_stats(stats, blocks, ranges)
        return

    if stats is None:
        fused(params, grads, exp_avgs, exp_avg_sqs, vmax, steps, **kwargs)
        write_back(pairs)
        return

    # With statistics: the same kernel over cache-sized chunks of each tensor, and every
    # statistic of a chunk taken while it is still in cache, so the step's memory traffic stays
    # close to the unmonitored step's (separate passes read each tensor ~10 times against the
    # fused step's 7). Per element the arithmetic is the kernel's own, so the trajectory is
    # bit-identical to an unmonitored step's.
    rows = [_adam_chunk_stats(fused, p, grads[i], exp_avgs[i], exp_avg_sqs[i],
                              vmax[i] if vmax else None, steps[i], kwargs)
            for i, p in enumerate(params)]
    write_back(pairs)
    table = torch.stack(rows)
    columns = {stat: table[:, k] for k, stat in enumerate(_CHUNK_STATS)}
    stats.write(columns)


def _adam_cpu_many(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr,
                   beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize,
                   stats) -> bool:
    """Every tensor's step in one call of the C kernel, when all are plain contiguous float32
    (else False, nothing done): the one-tensor kernel's arithmetic, without a validated call per
    tensor, which at hundreds of small tensors cost more than their arithmetic."""
    blocks = BlockSums([p.numel() for p in params], ADAM_STATS) if stats is not None else None
    ranges = (range_buffer(len(params))
              if stats is not None and stats.ranges is not None else None)
    if not cpu_many.adam_f32_many(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                  state_steps,
                                  lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                  weight_decay=weight_decay, decoupled=decoupled_weight_decay,
                                  maximize=maximize, stats=blocks, ranges=ranges):
        return False
    _write_cpu_stats(stats, blocks, ranges)
    return True


def _write_cpu_stats(stats, blocks, ranges) -> None:
    """The C kernel's per-block sums and range counts into the step's statistics rows."""
    if ranges is not None:  # the whole tensors' counts, in kernels/ranges.py's layout
        counts = torch.from_numpy(ranges.astype(np.int64))
        where = torch.tensor(stats.rows)
        for q in range(counts.shape[1]):
            stats.ranges[where, q] = range_levels(counts[:, q, :RANGE_FIELDS],
                                                  counts[:, q, RANGE_FIELDS:])
    if blocks is not None:
        sums = blocks.reduce_numpy(max_columns=(1,))  # float64: Σg² may exceed float32's range
        sums[sums[:, 2] > 0, 1] = np.inf
        stats.write_table(sums, _CHUNK_STATS)


def _cpu_kernel_applies(*tensor_lists) -> bool:
    """optiscope's one-pass CPU kernel takes float32 CPU tensors, when it compiled here."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32
                for ts in tensor_lists for t in ts) and kernel() is not None)


_CHUNK_STATS = (Stat.GRAD_SQ, Stat.GRAD_ABSMAX, Stat.GRAD_NONFINITE, Stat.PARAM_SQ_BEFORE,
                Stat.PARAM_SQ_AFTER, Stat.UPDATE_SQ, Stat.MOMENT1_SQ, Stat.MOMENT2_SQ)
# On a CPU, 2^18 elements: small enough that a chunk's tensors stay in cache while they are
# summed, large enough that per-op overheads do not dominate (of 2^15..2^22 the fastest
# measured). Chunk starts stay multiples of 64, so the kernel's vector/tail split, and with it
# the per-element arithmetic, is the same as for the whole tensor. On a GPU each of a chunk's
# dozen ops is a launch that costs more than its bytes: 2^18 made the H200 take 68 ms for one
# tensor of 10^8 (benchmarks/results/cuda-nvidia-h200.json), so there a chunk is 2^26 entries
# (a 256 MiB copy of θ at most).
_STATS_CHUNK = 1 << 18
_STATS_CHUNK_GPU = 1 << 26


def _adam_chunk_stats(fused, p, g, m, v, vmax, step, kwargs) -> Tensor:
    """One tensor's fused step, chunk by chunk, with its statistics (`_CHUNK_STATS` order).

    Per chunk: Σ of squares as BLAS dot products (faster than torch's CPU norm and more
    accurate: float32 sums of 2^18 entries), added over chunks in float64.
    """
    flat = [_flat(t) for t in (p, g, m, v, vmax) if t is not None]
    # θ⁻ in float32 at least: θ⁻ − θ⁺ of two fp16 values near zero is not exact in fp16
    wide = torch.promote_types(p.dtype, torch.float32)
    size = _STATS_CHUNK if p.device.type == "cpu" else _STATS_CHUNK_GPU
    before = torch.empty(min(p.numel(), size), dtype=wide, device=p.device)
    chunks = []
    for start in range(0, p.numel(), size):
        pc, gc, mc, vc, *xc = (t[start:start + size] for t in flat)
        b = before[: pc.numel()]
        b.copy_(pc)  # into one buffer: a fresh clone per chunk costs an allocation each time
        g_min, g_max = torch.aminmax(gc)  # one vectorised pass; the infinity norm is far slower
        pre = [_sq(gc), _sq(b)]
        fused([pc], [gc], [mc], [vc], xc, [step], **kwargs)
        b.sub_(pc)  # θ⁻ − θ⁺, in place, in float32
        chunks.append(torch.stack([*pre, torch.maximum(-g_min, g_max).float(),
                                   _sq(pc), _sq(b), _sq(mc), _sq(vc)]).double())
    if not chunks:  # an empty tensor
        return torch.zeros(len(_CHUNK_STATS), device=p.device)
    sums = torch.stack(chunks).sum(dim=0)
    g_sq = sums[0]
    # Counting non-finite entries is a pass of its own; it is needed only when Σg² is not
    # finite, and on a CPU that test costs no device synchronisation.
    if g.device.type != "cpu" or not torch.isfinite(g_sq):
        bad = torch.count_nonzero(~torch.isfinite(_flat(g))).double()
    else:
        bad = g_sq.new_zeros(())
    absmax = torch.where(bad > 0, float("inf"), torch.stack(chunks)[:, 2].max())
    return torch.stack([g_sq, absmax, bad, sums[1], sums[3], sums[4], sums[5], sums[6]]).float()


def _sq(x: Tensor) -> Tensor:
    """Σx² of one chunk: a BLAS dot for float32 and float64 (in their own precision), a
    float32-accumulated norm for the half types."""
    if x.dtype in (torch.float32, torch.float64):
        return torch.dot(x, x)
    return torch.linalg.vector_norm(x, dtype=torch.float32).square()


def _flat(t: Tensor) -> Tensor:
    """A 1-D view of a dense tensor's storage, in storage order (any layout `densify` allows)."""
    return t.view(-1) if t.is_contiguous() else t.as_strided((t.numel(),), (1,))
