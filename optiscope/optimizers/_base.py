"""What every bundled optimizer shares: argument checks, lazily created state, statistics requests.

A bundled optimizer is a thin `torch.optim.Optimizer` subclass: it validates its arguments, gathers
the tensors of each parameter group and calls one functional step. This base adds the part the
monitor relies on: `request_stats` asks the next step to write per-tensor statistics into a small
device buffer, which the step leaves in `last_stats`.
"""

from __future__ import annotations

import math
from itertools import chain
from operator import attrgetter
from typing import Any, ClassVar

import torch
from torch import Tensor

from optiscope.contract import Stat, StatsRows, StepStats
from optiscope.kernels import cpu_many
from optiscope.kernels.backend import check_backend
from optiscope.kernels.launch import is_sharded
from optiscope.kernels.ranges import RANGE_BLOCK, RANGE_QUANTITIES
from optiscope.kernels.stats import NUM_STATS

__all__ = ["OptiscopeOptimizer", "StepStatsBuffer", "check_adam_hyperparameters", "check_range",
           "advance_steps"]

_IS_SPARSE = attrgetter("is_sparse")


def advance_steps(steps: list[Tensor]) -> list[int]:
    """Adds 1 to every step count (float32 0-d CPU tensors, torch.optim's layout) and returns
    the new counts.

    One C call over their addresses when optiscope's C kernels are built and every count is a
    plain float32 CPU scalar; else one add per tensor (``torch._foreach_add_`` on CPU scalars
    dispatches each: at 148 counters on the 2-core Xeon, 180 us against 58 for the C call, with
    the reading of the counts; it was a quarter of the Triton AdamW step's host time, which
    benchmarks/host_step.py measures).
    """
    counts = cpu_many.steps_add_one(steps)
    if counts is not None:
        return counts
    torch._foreach_add_(steps, 1)
    return [int(s.item()) for s in steps]


def check_range(owner: str, name: str, value: Any, low: float, high: float | None = None, *,
                high_inclusive: bool = False) -> None:
    """Raises a ValueError naming ``value`` unless ``low <= value < high`` (or ``<= high``)."""
    if isinstance(value, Tensor):
        raise TypeError(f"{owner}: {name} must be a Python number, got a Tensor; pass "
                        f"{name}=float(...)")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise TypeError(f"{owner}: {name} must be a number, got {value!r}")
    if high is None:
        ok, band = value >= low, f">= {low}"
    elif high_inclusive:
        ok, band = low <= value <= high, f"in [{low}, {high}]"
    else:
        ok, band = low <= value < high, f"in [{low}, {high})"
    if not ok:
        raise ValueError(f"{owner}: {name} must be {band}, got {value}")


def check_adam_hyperparameters(owner: str, group: dict[str, Any], *, lr: bool = True,
                               weight_decay: bool = True) -> None:
    """Checks an Adam-style group in this order: lr >= 0, betas a pair with each in [0, 1),
    eps >= 0, weight_decay >= 0. ``lr=False`` / ``weight_decay=False`` skip those two, for an
    optimizer whose base class already checked them."""
    if lr:
        check_range(owner, "lr", group["lr"], 0.0)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{owner}: betas must be a pair (beta1, beta2), got {betas!r}")
    check_range(owner, "betas[0]", betas[0], 0.0, 1.0)
    check_range(owner, "betas[1]", betas[1], 0.0, 1.0)
    check_range(owner, "eps", group["eps"], 0.0)
    if weight_decay:
        check_range(owner, "weight_decay", group["weight_decay"], 0.0)


def _stats_dtype(device: torch.device) -> torch.dtype:
    """The rows' dtype: float64, so that a sum beyond float32's range (Σg² of gradients of 1e30)
    stays finite; the kernels write their float32 partials through torch indexing, which casts.
    MPS has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


class StepStatsBuffer:
    """The statistics buffer of one step: one row per parameter tensor that has a gradient."""

    def __init__(self, params: list[Tensor], produced: frozenset[Stat], ranges: bool = False):
        self.params = params
        self.produced = produced
        self._row = {id(p): i for i, p in enumerate(params)}
        self.values = torch.full((len(params), NUM_STATS), math.nan,
                                 dtype=_stats_dtype(params[0].device), device=params[0].device)
        # the dynamic-range counts (`request_ranges`), host memory
        self.ranges = (torch.full((len(params), len(RANGE_QUANTITIES), RANGE_BLOCK), math.nan,
                                  dtype=torch.float64) if ranges else None)
        self._elsewhere: list[tuple[list[int], StatsRows]] = []

    def rows_for(self, params: list[Tensor]) -> StatsRows:
        """Where the statistics of ``params`` (one device) go."""
        rows = [self._row[id(p)] for p in params]
        if params[0].device == self.values.device:
            return StatsRows(self.values, rows, self.ranges)
        # A group on another device writes into its own buffer, copied over in `finish`.
        local = StatsRows(torch.full((len(params), NUM_STATS), math.nan,
                                     dtype=_stats_dtype(params[0].device),
                                     device=params[0].device), list(range(len(params))))
        self._elsewhere.append((rows, local))
        return local

    def finish(self, step: int) -> StepStats:
        for rows, local in self._elsewhere:
            self.values[torch.tensor(rows, device=self.values.device)] = local.values.to(
                self.values.device, non_blocking=True)
        return StepStats(self.params, self.values, self.produced, step, self.ranges)


class OptiscopeOptimizer(torch.optim.Optimizer):
    """Base of the bundled optimizers.

    Subclasses declare `stat_columns` (the statistics their step can produce) and `roles` (the
    per-parameter state lists their functional step takes, ``"steps"`` among them), and
    implement `_validate_group` (hyperparameter checks, run for every group, including ones
    added later), `_init_state`, `_state_tensors` (or `_gather_states`) and `_step_group`;
    `step` is shared.
    """

    stat_columns: ClassVar[frozenset[Stat]] = frozenset()
    roles: ClassVar[tuple[str, ...]] = ("steps",)

    def __init__(self, params, defaults: dict[str, Any], *, backend: str):
        self.backend = check_backend(backend, type(self).__name__)
        self._stats_requested = False
        self.last_stats: StepStats | None = None
        super().__init__(params, defaults)

    # ----------------------------------------------------------------------------- validation
    def _validate_group(self, group: dict[str, Any]) -> None:
        """Checks one group's hyperparameters; raises ValueError naming the bad value."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        owner = type(self).__name__
        self._validate_group(group)
        devices = set()
        for j, p in enumerate(group["params"]):
            label = self.param_label(len(self.param_groups) - 1, j)
            if p.is_complex():
                raise TypeError(f"{owner}: parameter {label} is complex ({p.dtype}); optiscope's "
                                "optimizers take real floating-point parameters (view it with "
                                "torch.view_as_real)")
            if not p.is_floating_point():
                raise TypeError(f"{owner}: parameter {label} has dtype {p.dtype}; optimizers "
                                "update floating-point tensors only (float32, bfloat16, float16)")
            devices.add(p.device)
        if len(devices) > 1:
            raise ValueError(f"{owner}: the tensors of parameter group {len(self.param_groups) - 1} "
                             f"are on different devices ({sorted(map(str, devices))}); put each "
                             "device's parameters in a group of their own")

    def _saved_state(self, state_dict: dict[str, Any]):
        """Yields ``(param, key, value)`` for each saved state entry, pairing the saved ids with
        this optimizer's parameters in group order (as `load_state_dict` does)."""
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                yield p, key, value

    def param_label(self, group_index: int, param_index: int) -> str:
        """The parameter's name when the optimizer was given names, else ``group{i}.param{j}``."""
        names = self.param_groups[group_index].get("param_names")
        return names[param_index] if names else f"group{group_index}.param{param_index}"

    def _refuse_sharded(self, group: dict[str, Any], why: str) -> None:
        """Raises for a sharded parameter (a DTensor) in the group being added, saying ``why``
        this optimizer needs whole tensors."""
        for j, p in enumerate(group["params"]):
            if is_sharded(p):
                raise ValueError(
                    f"{type(self).__name__}: parameter "
                    f"{self.param_label(len(self.param_groups) - 1, j)} is sharded (a DTensor, "
                    f"e.g. from FSDP2); {why}, which a shard does not hold; use AdamW for "
                    "sharded parameters, or keep these replicated")

    def _check_grad(self, p: Tensor, group_index: int, param_index: int) -> None:
        if p.grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__}: parameter "
                               f"{self.param_label(group_index, param_index)} has a sparse "
                               "gradient, which this optimizer does not support; use "
                               "torch.optim.SparseAdam for sparse embeddings")

    # ----------------------------------------------------------------------------- the step
    def _init_state(self, state: dict, p: Tensor, group: dict[str, Any]) -> None:
        """Creates ``state`` for ``p`` at its first step (and anything a group change adds)."""
        raise NotImplementedError

    def _state_tensors(self, state: dict, group: dict[str, Any]) -> dict[str, Any]:
        """``role -> tensor`` of one parameter for the functional step (a role left out stays
        an empty list)."""
        raise NotImplementedError

    def _gather_states(self, states: list[dict], group: dict[str, Any]) -> dict[str, list]:
        """``role -> list`` over one group's parameters (`_state_tensors` of each); a subclass
        may gather a role's list at once instead."""
        out: dict[str, list] = {role: [] for role in self.roles}
        for state in states:
            for role, value in self._state_tensors(state, group).items():
                out[role].append(value)
        return out

    def _step_group(self, group: dict[str, Any], tensors: dict[str, list],
                    stats: StatsRows | None) -> None:
        """Runs the functional step on one group's gathered ``tensors`` (``params``, ``grads``
        and the `roles`)."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        """Performs one optimization step.

        Args:
            closure: re-evaluates the model and returns the loss (default None).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        # List by list, not parameter by parameter: at a model's hundreds of tensors the host's
        # Python is what a GPU step waits for (benchmarks/host_step.py)
        for gi, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if any(map(_IS_SPARSE, grads)):
                for j, p in enumerate(group["params"]):
                    if p.grad is not None:
                        self._check_grad(p, gi, j)
            states = [self.state[p] for p in params]
            init = self._init_state
            for p, state in zip(params, states):
                init(state, p, group)
            tensors = {"params": params, "grads": grads, **self._gather_states(states, group)}
            work.append((group, tensors))
        buffer = self._stats_buffer([p for _, t in work for p in t["params"]])
        for group, tensors in work:
            self._step_group(group, tensors,
                             buffer.rows_for(tensors["params"]) if buffer else None)
        if buffer is not None:
            self.last_stats = buffer.finish(int(work[0][1]["steps"][0].item()))
        return loss

    # ----------------------------------------------------------------------------- statistics
    def request_stats(self) -> None:
        """Asks the next `step` to compute per-tensor statistics into `last_stats`.

        Only that step pays for them; on other steps the optimizer does no extra work.
        """
        self._stats_requested = True

    def request_ranges(self) -> None:
        """With `request_stats`: asks the next step to count the dynamic range of g, θ⁺ − θ⁻
        and v over every entry into ``last_stats.ranges``: in the update's pass where it is a
        kernel of optiscope's (Adam's and MicroAdam's C and Triton kernels, Adafactor's Triton
        kernel), by an extra pass where the step is torch ops (docs/optimizers.md has the
        table); tensors a step does not count (Adam on torch's fused kernel) keep NaN rows."""
        self._ranges_requested = True

    def _stats_buffer(self, params: list[Tensor]) -> StepStatsBuffer | None:
        """A statistics buffer for this step if one was requested (and clears the requests)."""
        requested, self._stats_requested = self._stats_requested, False
        ranges, self._ranges_requested = getattr(self, "_ranges_requested", False), False
        if not requested or not params:
            return None
        return StepStatsBuffer(params, self.stat_columns, ranges)
