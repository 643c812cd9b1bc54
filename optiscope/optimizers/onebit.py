"""1-bit Adam (Tang et al., ICML 2021, arXiv 2102.02888) over ``torch.distributed``.

Adam's second moment v settles early in training. 1-bit Adam runs plain Adam, with gradients
averaged over the data-parallel group, for ``freeze_step`` steps, then freezes v and from there on
communicates only the momentum, compressed to one sign bit per entry plus a scale per tensor, with
error feedback on both sides of the exchange, so that what compression loses at one step is added
back at the next.

The compressed all-reduce (`onebit_allreduce`, in `optiscope.optimizers.onebit_comm` and
exported here) is built on two collectives, ``all_to_all_single`` and ``all_gather``, so it runs
on NCCL on GPUs and on gloo on CPUs; with no process group it is the same algorithm over a world
of one. On CUDA tensors the sign bits are packed by a Triton kernel (`optiscope.kernels.onebit`),
elsewhere by torch ops; the two pack the same bytes.

Differences from the DeepSpeed reference (``deepspeed/runtime/fp16/onebit/adam.py``), on purpose:

* ``bias_correction`` is honoured (the reference accepts it and never corrects), and the first
  step is a real step (the reference's first call only allocates its buffers and drops the
  gradient).
* Scales are root-mean-squares over a tensor's real entries (the reference divides by the padded
  length), and padding never reaches an error buffer: the worker error has the parameter's size
  and the padded tail of a server chunk stays zero.
* Error buffers are per rank and saved in each rank's ``state_dict``; loading them back is
  checked against the rank and world size (the reference resets them on every load).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor

from optiscope.contract import MomentLayout, Stat, StatsRows
from optiscope.kernels.backend import resolve_backend
from optiscope.kernels.whole_ranges import whole_counts
from optiscope.optimizers._base import (OptiscopeOptimizer, advance_steps,
                                        check_adam_hyperparameters)
from optiscope.optimizers.onebit_comm import (CompressionReport, _world, chunk_size,
                                              compressed_bytes, onebit_allreduce, pack_signs,
                                              ring_allreduce_bytes, unpack_signs)

__all__ = ["OneBitAdam", "onebit_adam", "onebit_allreduce", "onebit_ddp_hook",
           "CompressionReport", "UnfrozenProbe", "chunk_size", "compressed_bytes", "ring_allreduce_bytes",
           "pack_signs", "unpack_signs"]


class OneBitAdam(OptiscopeOptimizer):
    r"""1-bit Adam: Adam for ``freeze_step`` steps, then a frozen v and a 1-bit momentum exchange.

    Per parameter, at step :math:`t` (1-based), with :math:`T` = ``freeze_step``, :math:`w` ranks
    and :math:`g^{(r)}` the local gradient of rank :math:`r`:

    .. math::
        \text{warmup } (t \le T):\quad & \bar g = \tfrac1w \textstyle\sum_r g^{(r)},\quad
            m \leftarrow \beta_1 m + (1-\beta_1)\bar g,\quad
            v \leftarrow \beta_2 v + (1-\beta_2)\bar g^2 \\
        \text{compression } (t > T):\quad & m^{(r)} \leftarrow \beta_1 m + (1-\beta_1) g^{(r)},
            \quad m \leftarrow \mathrm{C}\big(m^{(0)}, \dots, m^{(w-1)}\big),
            \quad v = v_T \text{ frozen} \\
        \text{both:}\quad & \theta \leftarrow \theta(1-\eta\lambda) - \frac{\eta}{c_1}
            \frac{m}{\sqrt{v}/\sqrt{c_2} + \epsilon}

    with :math:`c_1 = 1-\beta_1^t` and :math:`c_2 = 1-\beta_2^{\min(t, T)}` when
    ``bias_correction`` (v is frozen at step T, so is its correction), else :math:`c_1 = c_2 = 1`.
    C is the error-compensated compressed all-reduce of `onebit_allreduce`: every rank ends the
    step with the same m, hence the same θ.

    Where the gradients are averaged during warmup: by the optimizer (one all-reduce per
    parameter group), unless `onebit_ddp_hook` is registered on the model's
    ``DistributedDataParallel``, which averages them during backward and stops gradient
    communication after the freeze step::

        model = DistributedDataParallel(model)
        opt = OneBitAdam(model.parameters(), lr=1e-3, freeze_step=2000)
        model.register_comm_hook(opt, onebit_ddp_hook)

    Without a process group (``torch.distributed`` not initialized) the algorithm runs over a
    world of one: the same two rounds of compression and error feedback (DeepSpeed skips
    compression at world size 1). That shows what 1 bit does, not the momentum a multi-rank run
    ends with: on stationary gradients (4,096 entries, betas (0.9, 0.99), v frozen at step 600
    of 850) ``quant_error`` is 1.2-1.3 and ‖m‖ 2.3-2.7 times the exact momentum's
    (``python -m benchmarks.onebit --world-of-one``).

    Coordinates that never had a gradient (v_T exactly 0: unused embedding rows, padding) keep
    m = 0 on compressed steps, so they never move (their compressed momentum is ±scale, and
    m/(√0 + eps) would move them by lr·scale/eps). The test ``v == 0`` is made per tensor at
    each compressed step: no memory is kept for it beyond a transient bool per entry of the
    tensor being updated. Rows that did get gradients but should stay put (padding seen in
    warmup) take a per-group ``exp_avg_mask``, as in DeepSpeed: a float or bool tensor,
    broadcastable to every parameter of its group, that multiplies m after each compressed
    all-reduce (not during warmup)::

        OneBitAdam([{"params": [embedding.weight], "exp_avg_mask": keep[:, None]},
                    {"params": other_params}], lr=1e-3, freeze_step=2000)

    Weight decay, as in DeepSpeed, applies to every coordinate, masked or not.

    State per parameter: ``step`` (float32 0-d CPU tensor), ``exp_avg`` and ``exp_avg_sq``
    (float32, the parameter's shape), and from the first compressed step on ``worker_error``
    (float32, the parameter's shape), ``server_error`` (float32, the length of this rank's chunk,
    `chunk_size`), ``error_rank`` and ``error_world_size`` (ints). The error buffers are this
    rank's own: save ``state_dict()`` on every rank and load each rank's back on the same rank.
    `load_state_dict` refuses another rank's error buffers, and when the world size changed it
    resets them to zero and says so in a warning (the chunks they belong to no longer exist).

    Arithmetic is float32 whatever the parameter dtype (bf16 parameters are updated through a
    float32 copy); the sign of 0 is +1.

    What the monitor sees: ``quant_error`` is this rank's worker compression of x = m + worker
    error on compressed steps (`stat_columns`); ``moment2_drift_since_freeze`` compares v_T with
    the v the optimizer would have had without freezing, tracked on the monitor's coordinate
    sample from the true averaged gradient (`unfrozen_second_at`; over several ranks one small
    all-reduce per step, `CompressionReport.probe_bytes`). `last_compression` holds the last
    compressed step's `CompressionReport`: the bytes this rank sent against an fp32 ring
    all-reduce, and, on steps the monitor sampled, the worker and server compression errors.

    Args:
        params: parameters or parameter groups (dicts), as for any torch optimizer.
        lr: learning rate (default 1e-3).
        betas: decay rates of the first and second moment (default (0.9, 0.999)).
        eps: added to the (bias-corrected) √v (default 1e-8).
        weight_decay: decoupled weight decay λ, applied as θ(1 − lr·λ) before the update, as in
            AdamW (default 0.0).
        freeze_step: the number of warmup (Adam) steps T, an int >= 1; v is frozen at v_T. The
            paper and DeepSpeed recommend 15-25% of the run. Required: no default fits every run.
        bias_correction: divide m by 1 − β1^t and v by 1 − β2^min(t, T) (default True).
        process_group: the data-parallel group (default None: the default group when
            ``torch.distributed`` is initialized, else a world of one).
        backend: ``"auto"`` (Triton sign packing for CUDA tensors when Triton is importable, torch
            ops elsewhere), ``"triton"`` or ``"torch"`` (default ``"auto"``). The step itself is
            torch ops on both: the dynamic-range counts (`request_ranges`) are an extra pass
            over g, θ⁺ − θ⁻ and v on every backend.
    """

    stat_columns: ClassVar[frozenset[Stat]] = frozenset({Stat.QUANT_ERROR_SQ,
                                                         Stat.QUANT_INPUT_SQ})
    roles: ClassVar[tuple[str, ...]] = ("exp_avgs", "exp_avg_sqs", "worker_errors",
                                        "server_errors", "steps")
    state_layouts: ClassVar[tuple[MomentLayout, ...]] = (
        MomentLayout("adam (v frozen after freeze_step)", m="exp_avg", v="exp_avg_sq",
                     v_unfrozen=True),)
    _FLOAT32_STATE: ClassVar[tuple[str, ...]] = ("exp_avg", "exp_avg_sq", "worker_error",
                                                 "server_error")

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, freeze_step: int,
                 bias_correction: bool = True, process_group: Any = None, backend: str = "auto"):
        if process_group is not None and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("OneBitAdam: process_group was given but torch.distributed is not "
                               "initialized; call torch.distributed.init_process_group first, or "
                               "pass process_group=None for a world of one")
        self.process_group = process_group
        # exp_avg_mask is set per parameter group (a group's dict), as in DeepSpeed
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        freeze_step=freeze_step, bias_correction=bias_correction,
                        exp_avg_mask=None)
        # Set by `onebit_ddp_hook` when it averaged this backward's gradients; read by `step`.
        self._grads_averaged = False
        self.last_compression: CompressionReport | None = None
        # param -> the coordinates where the v without freezing is tracked (for the monitor)
        self._unfrozen: dict[Tensor, UnfrozenProbe] = {}
        super().__init__(params, defaults, backend=backend)

    # ----------------------------------------------------------------------------- arguments
    def _validate_group(self, group: dict[str, Any]) -> None:
        owner = type(self).__name__
        check_adam_hyperparameters(owner, group)
        freeze = group["freeze_step"]
        if isinstance(freeze, bool) or not isinstance(freeze, int) or freeze < 1:
            raise ValueError(f"{owner}: freeze_step must be an int >= 1 (the number of Adam "
                             f"warmup steps before v is frozen; 15-25% of the run is usual), "
                             f"got {freeze!r}")
        if not isinstance(group["bias_correction"], bool):
            raise TypeError(f"{owner}: bias_correction must be True or False, got "
                            f"{group['bias_correction']!r}")
        _check_mask(owner, group, len(self.param_groups) - 1)

    # ----------------------------------------------------------------------------- the group
    @property
    def world_size(self) -> int:
        """The number of ranks the momentum is averaged over (1 without a process group)."""
        return _world(self.process_group)[0]

    @property
    def rank(self) -> int:
        """This process's rank in the process group (0 without one)."""
        return _world(self.process_group)[1]

    @property
    def freeze_step(self) -> int:
        """The freeze step T (the smallest of the groups' when they differ)."""
        return min(group["freeze_step"] for group in self.param_groups)

    @property
    def compressing(self) -> bool:
        """True when the next step of every parameter with state is a compressed step.

        Before the first step (no state yet) it is False: the first step is an Adam step.
        """
        seen = False
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                seen = True
                if state["step"].item() + 1 <= group["freeze_step"]:
                    return False
        return seen

    def unfrozen_second_at(self, param: Tensor, index: Tensor | None) -> Tensor:
        """v at flat coordinates ``index`` as it would be had it not been frozen (float32).

        Before the freeze that is the real v. The first call for ``param`` (or a call with other
        coordinates) chooses the coordinates the optimizer tracks from then on: after each
        compressed step it updates v' ← β2·v' + (1 − β2)·ḡ² there, starting from v_T, with ḡ
        the true gradient averaged over the group at those coordinates (not the compressed
        momentum, whose error would dominate). That costs one gather of the sample per tracked
        tensor and, over several ranks, one float32 all-reduce of all the samples in one buffer
        per step (`CompressionReport.probe_bytes`); nothing when no coordinates are tracked.
        Every rank must track the same coordinates (the monitor, seeded alike, does). The
        tracked values are diagnostics: not in `state_dict`, and after a resume they start
        again from the frozen v. The monitor calls it because the layout says ``v_unfrozen``
        (`optiscope.contract.MonitoredOptimizer`).

        Args:
            param: one of the optimizer's parameters.
            index: int32 or int64 flat coordinates on the parameter's device, or None for all.
        """
        probe = self._unfrozen.get(param)
        if probe is None or not _same_index(probe.index, index):
            probe = self._unfrozen[param] = UnfrozenProbe(index)
        if probe.v is not None:
            return probe.v.clone()
        if "exp_avg_sq" not in self.state.get(param, {}):  # before the first step: v = 0
            return _take(torch.zeros_like(param, dtype=torch.float32), index)
        return _take(self.state[param]["exp_avg_sq"], index)

    # ----------------------------------------------------------------------------- state
    def _init_state(self, state: dict, p: Tensor, group: dict[str, Any]) -> None:
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        if state["step"].item() + 1 > group["freeze_step"] and "worker_error" not in state:
            # Created at the first compressed step: warmup steps carry no error buffers.
            world, rank = _world(self.process_group)
            state["worker_error"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            state["server_error"] = torch.zeros(chunk_size(p.numel(), world),
                                                dtype=torch.float32, device=p.device)
            state["error_rank"], state["error_world_size"] = rank, world

    def _state_tensors(self, state: dict, group: dict[str, Any]) -> dict[str, Any]:
        return dict(exp_avgs=state["exp_avg"], exp_avg_sqs=state["exp_avg_sq"],
                    worker_errors=state.get("worker_error"),
                    server_errors=state.get("server_error"), steps=state["step"])

    def _step_group(self, group: dict[str, Any], t: dict[str, list],
                    stats: StatsRows | None) -> None:
        beta1, beta2 = group["betas"]
        report = onebit_adam(
            t["params"], t["grads"], t["exp_avgs"], t["exp_avg_sqs"], t["worker_errors"],
            t["server_errors"], t["steps"], lr=group["lr"], beta1=beta1, beta2=beta2,
            eps=group["eps"], weight_decay=group["weight_decay"],
            freeze_step=group["freeze_step"], bias_correction=group["bias_correction"],
            process_group=self.process_group, grads_averaged=self._grads_averaged,
            backend=self.backend, stats=stats, exp_avg_mask=group.get("exp_avg_mask"))
        if report is not None:
            self.last_compression = report

    @torch.no_grad()
    def step(self, closure=None):
        """Performs one optimization step.

        Args:
            closure: re-evaluates the model and returns the loss (default None).
        """
        try:
            loss = super().step(closure)
            if self._unfrozen:
                self._track_unfrozen()
            return loss
        finally:
            self._grads_averaged = False

    def _track_unfrozen(self) -> None:
        """One step of the v without freezing at the tracked coordinates of the tensors that just
        took a compressed step, from their gradients (each rank's own after the freeze) averaged
        over the group: one gather per tensor, one all-reduce of all the samples together."""
        live = []
        for group in self.param_groups:
            for p in group["params"]:
                probe, state = self._unfrozen.get(p), self.state.get(p)
                if (probe is not None and p.grad is not None and state
                        and state["step"].item() > group["freeze_step"]):
                    live.append((p, probe, group["betas"][1]))
        if not live:
            return
        samples = [_take(p.grad, probe.index) for p, probe, _ in live]
        world = self.world_size
        if world > 1:
            flat = torch.cat([x.to(samples[0].device) for x in samples])
            dist.all_reduce(flat, group=self.process_group)
            samples = flat.div_(world).split([x.numel() for x in samples])
            if self.last_compression is not None:
                self.last_compression.probe_bytes = ring_allreduce_bytes([flat.numel()], world)
        for (p, probe, beta2), g in zip(live, samples):
            g = g.to(p.device)
            if probe.v is None:  # the first compressed step starts from v_T
                probe.v = _take(self.state[p]["exp_avg_sq"], probe.index)
            probe.v.mul_(beta2).addcmul_(g, g, value=1 - beta2)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state saved by `state_dict` on this rank (see the class docstring).

        Raises:
            ValueError: the error buffers were saved by another rank of a world of this size.
        """
        world, rank = _world(self.process_group)
        stale = []
        for index, saved in state_dict["state"].items():
            if "worker_error" not in saved:
                continue
            if saved["error_world_size"] != world:
                stale.append(index)
            elif saved["error_rank"] != rank:
                raise ValueError(
                    f"OneBitAdam: this state_dict holds the error buffers of rank "
                    f"{saved['error_rank']}, loaded on rank {rank}; error feedback is per rank: "
                    "save optimizer.state_dict() on every rank and load rank r's file on rank r")
        saved_world = {state_dict["state"][i]["error_world_size"] for i in stale}
        super().load_state_dict(state_dict)
        # torch casts floating state to the parameter's dtype; this optimizer keeps float32.
        saved_params = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for index, p in zip(saved_params, params):
            saved = state_dict["state"].get(index)
            if saved is None:
                continue
            state = self.state[p]
            for key in self._FLOAT32_STATE:
                if key in saved:
                    state[key] = saved[key].to(device=p.device, dtype=torch.float32, copy=True)
            if index in stale:
                for key in ("worker_error", "server_error", "error_rank", "error_world_size"):
                    state.pop(key)
        if stale:
            warnings.warn(
                f"OneBitAdam: the checkpoint's error buffers were saved over "
                f"{sorted(saved_world)} rank(s), this run has {world}; the worker and server "
                f"error feedback of {len(stale)} tensor(s) starts again from zero (m and the "
                "frozen v are kept)", stacklevel=2)


# ================================================================================ the step


def onebit_adam(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                exp_avg_sqs: list[Tensor], worker_errors: list[Tensor | None],
                server_errors: list[Tensor | None], state_steps: list[Tensor], *, lr: float,
                beta1: float, beta2: float, eps: float, weight_decay: float, freeze_step: int,
                bias_correction: bool, process_group: Any = None, grads_averaged: bool = False,
                backend: str = "auto", stats: StatsRows | None = None,
                exp_avg_mask: Tensor | None = None) -> CompressionReport | None:
    """Functional 1-bit Adam over the tensors of one parameter group (one device): increments
    ``state_steps`` and updates parameters and state in place. Every rank of the group must call
    it with tensors of the same shapes, in the same order.

    Args:
        params, grads, exp_avgs, exp_avg_sqs: one entry per parameter (moments float32).
        worker_errors, server_errors: float32 error buffers of the parameters whose step is a
            compressed step (None for the others).
        state_steps: float32 0-d CPU tensors, the step count of each parameter.
        lr, beta1, beta2, eps, weight_decay, freeze_step, bias_correction: hyperparameters.
        process_group: the data-parallel group, or None (default None; see `OneBitAdam`).
        grads_averaged: the gradients are already averaged over the group (by
            `onebit_ddp_hook`): warmup steps do not all-reduce them again (default False).
        backend: ``"auto"``, ``"triton"`` or ``"torch"``: how the sign bits are packed
            (default ``"auto"``).
        stats: where to write the worker compression's ``QUANT_ERROR_SQ`` and ``QUANT_INPUT_SQ``
            (compressed steps only), or None; with ``stats.ranges``, the range counts of the
            local g, θ⁺ − θ⁻ and v, by an extra pass.
        exp_avg_mask: multiplies m after each compressed all-reduce (broadcastable to every
            parameter of the group), or None (default None). Whatever it is, coordinates whose
            frozen v is exactly 0 keep m = 0 on compressed steps.

    Returns:
        The compressed all-reduce's `CompressionReport` when some tensor took a compressed step,
        else None.
    """
    impl = resolve_backend(backend, params[0].device, "OneBitAdam")
    world, _ = _world(process_group)
    steps = advance_steps(state_steps)
    warm = [i for i, t in enumerate(steps) if t <= freeze_step]
    frozen = [i for i, t in enumerate(steps) if t > freeze_step]

    if warm:
        g_bar = [grads[i].float() for i in warm]
        if world > 1 and not grads_averaged:
            g_bar = _average(g_bar, process_group, world)
        for k, i in enumerate(warm):
            exp_avgs[i].lerp_(g_bar[k], 1 - beta1)
            exp_avg_sqs[i].mul_(beta2).addcmul_(g_bar[k], g_bar[k], value=1 - beta2)

    report = None
    if frozen:
        for i in frozen:  # the local momentum, about to be averaged
            exp_avgs[i].lerp_(grads[i].float(), 1 - beta1)
        averaged, report = onebit_allreduce(
            [exp_avgs[i] for i in frozen], [worker_errors[i] for i in frozen],
            [server_errors[i] for i in frozen], process_group=process_group, backend=impl,
            with_errors=stats is not None)
        for i, m in zip(frozen, averaged):
            # A coordinate whose v_T is exactly 0 never had a gradient: its compressed momentum
            # is ±scale, and m/(√0 + eps) would move it by lr·scale/eps. It keeps m = 0 (the
            # same on every rank: m and v are). The comparison is made here, per tensor, rather
            # than kept as a mask: v is frozen, so it is the same set at every step.
            exp_avgs[i].copy_(m.masked_fill_(exp_avg_sqs[i] == 0, 0.0))
            if exp_avg_mask is not None:
                exp_avgs[i].mul_(exp_avg_mask)
        if stats is not None:
            stats.subset(frozen).write({Stat.QUANT_ERROR_SQ: report.worker_error_sq,
                                        Stat.QUANT_INPUT_SQ: report.worker_input_sq})

    # the range counts (`request_ranges`): the step is torch ops, with no pass of its own to
    # count in, so g, θ⁺ − θ⁻ and v are counted by an extra pass over each (`whole_counts`)
    counting = stats is not None and stats.ranges is not None
    for i, p in enumerate(params):
        before = p.detach().float().clone() if counting else None
        t = steps[i]
        bc1 = 1 - beta1**t if bias_correction else 1.0
        bc2 = 1 - beta2**min(t, freeze_step) if bias_correction else 1.0
        p32 = p if p.dtype == torch.float32 else p.float()
        if weight_decay != 0:
            p32.mul_(1 - lr * weight_decay)
        denom = (exp_avg_sqs[i].sqrt() / bc2**0.5).add_(eps)
        p32.addcdiv_(exp_avgs[i], denom, value=-lr / bc1)
        if p32 is not p:
            p.copy_(p32)
        if counting:
            stats.ranges[stats.rows[i]] = whole_counts(
                [grads[i], p.detach().float() - before, exp_avg_sqs[i]]).to(stats.ranges.device)
    return report


def _take(t: Tensor, index: Tensor | None) -> Tensor:
    """A float32 copy of ``t`` at flat coordinates ``index`` (all when None)."""
    flat = t.reshape(-1)
    return flat.float().clone() if index is None else torch.index_select(flat, 0, index).float()


def _check_mask(owner: str, group: dict[str, Any], index: int) -> None:
    """Refuses a group's ``exp_avg_mask`` unless it is a real tensor on the group's device that
    broadcasts to every parameter of the group (without changing the parameter's shape)."""
    mask = group.get("exp_avg_mask")
    if mask is None:
        return
    where = f"the exp_avg_mask of parameter group {index}"
    if not isinstance(mask, Tensor):
        raise TypeError(f"{owner}: {where} must be a tensor (1 where m is kept, 0 where it is "
                        f"zeroed), got {type(mask).__name__}")
    if not (mask.dtype == torch.bool or mask.is_floating_point()) or mask.is_complex():
        raise TypeError(f"{owner}: {where} has dtype {mask.dtype}; pass a float or bool tensor")
    if mask.is_floating_point() and not bool(torch.isfinite(mask).all()):
        raise ValueError(f"{owner}: {where} holds non-finite values; it multiplies the momentum")
    for j, p in enumerate(group["params"]):
        if mask.device != p.device:
            raise ValueError(f"{owner}: {where} is on {mask.device}, its parameter {j} on "
                             f"{p.device}; move the mask to {p.device}")
        try:
            fits = torch.broadcast_shapes(mask.shape, p.shape) == p.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"{owner}: {where} has shape {tuple(mask.shape)}, which does not broadcast to "
                f"its parameter {j} of shape {tuple(p.shape)}; give each masked parameter a "
                "group of its own with a mask of its shape (or one that broadcasts to it, e.g. "
                "(rows, 1) for whole rows)")


def _same_index(a: Tensor | None, b: Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a is b or (a.shape == b.shape and torch.equal(a, b))


def _average(tensors: list[Tensor], group: Any, world: int) -> list[Tensor]:
    """The mean over the group of each tensor (float32), in one all-reduce."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    flat.div_(world)
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


# ================================================================================ DDP


# No annotations on ``bucket`` and the result: DDP compares them with its own classes, and this
# module's postponed (string) annotations would fail that check.
def onebit_ddp_hook(state: OneBitAdam, bucket):
    """A ``DistributedDataParallel`` communication hook for `OneBitAdam`.

    During warmup it averages each gradient bucket over the group, as DDP's default hook does
    (overlapped with backward), and tells the optimizer that its gradients are averaged. Once
    every parameter is past the freeze step it sends nothing: each rank keeps its local gradient,
    and the optimizer communicates the compressed momentum instead. Register it with
    ``model.register_comm_hook(optimizer, onebit_ddp_hook)``; the model's process group should be
    the optimizer's. While some parameter group is still warming up, every bucket is averaged
    (the groups past their freeze step then start from averaged gradients: right, only not
    cheaper). Without the hook, DDP's own all-reduce keeps running after the freeze: the result
    is still right, but nothing is saved.

    Args:
        state: the optimizer.
        bucket: DDP's ``dist.GradBucket``.

    Returns:
        A ``torch.futures.Future`` of the bucket's (averaged, or local) gradients.
    """
    buffer = bucket.buffer()
    if state.compressing:
        done: torch.futures.Future = torch.futures.Future()
        done.set_result(buffer)
        return done
    state._grads_averaged = True
    buffer.div_(state.world_size)
    work = dist.all_reduce(buffer, group=state.process_group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


# ============================================================================ the monitor's probe


@dataclass
class UnfrozenProbe:
    """Where the second moment without freezing is tracked: flat coordinates ``index`` (None:
    all), and v there (None until the first compressed step, which starts it from v_T; then
    updated from the true averaged gradient after each compressed step)."""

    index: Tensor | None
    v: Tensor | None = None
