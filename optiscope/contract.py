"""The contract between the bundled optimizers and the monitor (imports only `optiscope.kernels`).

What a monitored optimizer and the monitor agree on, declared in one place:

* `Stat`, the statistics columns a fused kernel can fill; `StatsRows`, where one step writes its
  rows; `StepStats`, the rows of the last step that was asked for them (from `kernels/stats.py`);
* `MomentLayout`, where an optimizer family keeps its first and second moment, so the monitor can
  read m and v (torch.optim's layouts are in `optiscope.monitor.layouts`);
* `MonitoredOptimizer`, the `typing.Protocol` of what an optimizer may provide to the monitor;
  every member is optional: any `torch.optim.Optimizer` can be monitored, and one that provides
  them gets its statistics from its own kernels;
* `capabilities(optimizer)`, the monitor's one way to read those members: a `Capabilities` of
  values and callables (None where the optimizer does not provide one), read once.

A factored second moment (Adafactor) is reconstructed where it is needed: Σv² exactly from the
factors, v at a set of coordinates from the row and column entries they touch; the full v is never
materialised. A second moment the state does not hold at all (MicroAdam re-estimates it from a
window of sparse gradients) is computed by the optimizer itself (`MonitoredOptimizer.moment2_at`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from optiscope.kernels import cpu
from optiscope.kernels.stats import Stat, StatsRows, StepStats

__all__ = ["Stat", "StatsRows", "StepStats", "MomentLayout", "MonitoredOptimizer", "Capabilities",
           "capabilities"]


@dataclass(frozen=True)
class MomentLayout:
    """The state keys of one optimizer family.

    Attributes:
        name: what the layout is (shown in the run metadata).
        m: key of the first moment, or None.
        v: key of the full second moment (for factored layouts: of 1-D tensors), or None.
        v_row, v_col: keys of a factored second moment (row and column statistics of the last two
            dimensions), or None.
        row_keepdim: the factors keep the reduced dimension (torch.optim.Adafactor:
            ``row_var`` is ``[..., R, 1]``) rather than dropping it (transformers: ``[..., R]``).
        requires: further keys whose presence identifies the layout.
        m_optional: the first moment is optional (Adafactor without ``beta1``): the layout is
            recognised by its second moment alone.
        v_computed: the state does not store the second moment: the optimizer computes it
            (`MonitoredOptimizer.moment2_at`); the layout is then recognised by ``requires``
            alone.
        v_unfrozen: the optimizer freezes v (OneBitAdam) and gives the second moment it would
            have had without freezing (`MonitoredOptimizer.unfrozen_second_at`); with it, the
            monitor's ``moment2_drift_since_freeze`` compares that v with v at the optimizer's
            ``freeze_step``.
    """

    name: str
    m: str | None = None
    v: str | None = None
    v_row: str | None = None
    v_col: str | None = None
    row_keepdim: bool = False
    requires: tuple[str, ...] = ()
    m_optional: bool = False
    v_computed: bool = False
    v_unfrozen: bool = False

    def applies(self, state: dict) -> bool:
        """True when ``state`` has this layout's keys."""
        keys = set(state)
        if not keys.issuperset(self.requires):
            return False
        if self.v_computed:
            return bool(self.requires)
        if self.v_row is not None and self.v_row in keys:
            return self.v_col in keys
        needed = [k for k in (None if self.m_optional else self.m, self.v) if k is not None]
        return bool(needed) and keys.issuperset(needed)

    def first(self, state: dict) -> Tensor | None:
        """The first moment, or None when the layout has none."""
        return state.get(self.m) if self.m is not None else None

    def has_second(self, state: dict) -> bool:
        return (self.v_computed or (self.v is not None and self.v in state)
                or self._factored(state))

    def second_tensor(self, state: dict) -> Tensor | None:
        """The second moment when the state holds it as one full tensor (None when it is
        factored or computed by the optimizer)."""
        if self.v_computed or self.v is None or self._factored(state):
            return None
        return state.get(self.v)

    def second_sq_sum(self, state: dict) -> Tensor:
        """Σ v² as a float32 0-d tensor, exact for factored layouts."""
        if not self._factored(state):
            return torch.linalg.vector_norm(state[self.v], dtype=torch.float32).square()
        row, col = self._factors(state)  # [B, R], [B, C]
        mean = row.mean(dim=1)
        return (row.square().sum(1) * col.square().sum(1) / mean.square()).sum()

    def second_at(self, state: dict, index: Tensor | None) -> Tensor:
        """v at flat coordinates ``index`` (all coordinates when None), as a float32 copy."""
        if not self._factored(state):
            flat = state[self.v].detach().reshape(-1)
            if index is None:
                return flat.to(torch.float32, copy=True)
            return cpu.take_f32(flat, index)
        row, col = self._factors(state)
        batch, rows = row.shape
        cols = col.shape[1]
        if index is None:
            index = torch.arange(batch * rows * cols, device=row.device)
        index = index.long()
        j = index % cols
        i = (index // cols) % rows
        b = index // (rows * cols)
        return row[b, i] / row.mean(dim=1)[b] * col[b, j]

    def _factored(self, state: dict) -> bool:
        return self.v_row is not None and self.v_row in state

    def _factors(self, state: dict) -> tuple[Tensor, Tensor]:
        row, col = state[self.v_row].detach().float(), state[self.v_col].detach().float()
        if self.row_keepdim:
            row, col = row.squeeze(-1), col.squeeze(-2)
        return row.reshape(-1, row.shape[-1]), col.reshape(-1, col.shape[-1])


@runtime_checkable
class MonitoredOptimizer(Protocol):
    """What an optimizer may provide to the monitor; each member is optional (the monitor reads
    them through `capabilities`), and the bundled optimizers provide those that apply to them.

    Attributes:
        stat_columns: the `Stat` columns the optimizer's step fills when asked (`request_stats`).
        state_layouts: where its moments live, tried before torch.optim's layouts.
        last_stats: the rows of the last step that was asked for statistics, or None.
        freeze_step: the step at which it freezes its second moment (with a layout that has
            ``v_unfrozen``).
        backend: the backend it was built with (``"auto"``, ``"torch"``, ``"triton"``), shown in
            the run metadata.
    """

    stat_columns: frozenset[Stat]
    state_layouts: tuple[MomentLayout, ...]
    last_stats: StepStats | None
    freeze_step: int
    backend: str

    def request_stats(self) -> None:
        """Asks the next step to write its `stat_columns` into `last_stats`."""

    def request_ranges(self) -> None:
        """With `request_stats`: asks the next step to count the dynamic range of g, θ⁺ − θ⁻
        and v over every entry into ``last_stats.ranges`` (in its pass, or by an extra pass
        where the step has none of its own to count in); NaN rows for tensors not counted."""

    def group_lrs(self) -> list[float | None]:
        """The learning rate each param group used at the last step, when ``group["lr"]`` is
        not it (Adafactor's relative step)."""

    def shared_state_bytes(self) -> int:
        """Bytes of optimizer state not held in ``optimizer.state[p]`` (buffers shared by all
        parameters)."""

    def moment2_at(self, param: Tensor, index: Tensor | None = None) -> Tensor:
        """For a layout with ``v_computed``: the second moment of ``param`` at flat coordinates
        ``index`` (all when None), as float32."""

    def unfrozen_second_at(self, param: Tensor, index: Tensor | None) -> Tensor:
        """For a layout with ``v_unfrozen``: at flat coordinates ``index``, the second moment
        ``param`` would have had without freezing (the real v before the freeze). The first call
        chooses the coordinates the optimizer then tracks at every step."""


@dataclass(frozen=True)
class Capabilities:
    """What one optimizer provides of `MonitoredOptimizer` (None or empty where it does not)."""

    stat_columns: frozenset[Stat]
    state_layouts: tuple[MomentLayout, ...]
    request_stats: Callable[[], None] | None
    request_ranges: Callable[[], None] | None
    last_stats: Callable[[], StepStats | None]
    group_lrs: Callable[[], list] | None
    shared_state_bytes: Callable[[], int] | None
    freeze_step: int | None
    backend: str | None
    moment2_at: Callable[[Tensor, Tensor | None], Tensor] | None
    unfrozen_second_at: Callable[[Tensor, Tensor | None], Tensor] | None


def capabilities(optimizer) -> Capabilities:
    """Reads what ``optimizer`` provides of `MonitoredOptimizer`, once. ``freeze_step`` counts
    only for an optimizer that declares a layout with ``v_unfrozen``."""
    def member(name: str):
        return getattr(optimizer, name, None)

    layouts = tuple(member("state_layouts") or ())
    unfrozen = any(layout.v_unfrozen for layout in layouts)
    return Capabilities(
        stat_columns=frozenset(member("stat_columns") or ()),
        state_layouts=layouts,
        request_stats=member("request_stats"),
        request_ranges=member("request_ranges"),
        last_stats=lambda: getattr(optimizer, "last_stats", None),
        group_lrs=member("group_lrs"),
        shared_state_bytes=member("shared_state_bytes"),
        freeze_step=member("freeze_step") if unfrozen else None,
        backend=member("backend"),
        moment2_at=member("moment2_at"),
        unfrozen_second_at=member("unfrozen_second_at") if unfrozen else None,
    )
