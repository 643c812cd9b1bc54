"""Where an optimizer keeps its first and second moment, so the monitor can read m and v.

Bundled optimizers declare their layout (``state_layouts`` on the class). For any other optimizer
the monitor recognises torch.optim's layouts from the keys of ``optimizer.state[p]``: a subclass
or a re-implementation that keeps torch's key names is read correctly, whatever its class name.

A factored second moment (Adafactor) is reconstructed where it is needed: Σv² exactly from the
factors, v at a set of coordinates from the row and column entries they touch; the full v is never
materialised. A second moment the state does not hold at all (MicroAdam re-estimates it from a
window of sparse gradients) is computed by the optimizer itself, through the method the layout
names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from optiscope.kernels import cpu

__all__ = ["MomentLayout", "FOREIGN_LAYOUTS", "find_layout"]


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
        v_method: name of an optimizer method ``(param, index) -> v`` that computes a second
            moment the state does not store, at flat coordinates ``index`` (all when None), as
            float32; the layout is then recognised by ``requires`` alone.
        v_unfrozen_method: for an optimizer that freezes v (OneBitAdam), the name of its method
            ``(param, index) -> v`` giving, at flat coordinates ``index``, the second moment it
            would have had without freezing (the real v before the freeze). The first call
            chooses the coordinates the optimizer then tracks at every step; with it, the
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
    v_method: str | None = None
    v_unfrozen_method: str | None = None

    def applies(self, state: dict) -> bool:
        """True when ``state`` has this layout's keys."""
        keys = set(state)
        if not keys.issuperset(self.requires):
            return False
        if self.v_method is not None:
            return bool(self.requires)
        if self.v_row is not None and self.v_row in keys:
            return self.v_col in keys
        needed = [k for k in (None if self.m_optional else self.m, self.v) if k is not None]
        return bool(needed) and keys.issuperset(needed)

    def first(self, state: dict) -> Tensor | None:
        """The first moment, or None when the layout has none."""
        return state.get(self.m) if self.m is not None else None

    def has_second(self, state: dict) -> bool:
        return (self.v_method is not None or (self.v is not None and self.v in state)
                or self._factored(state))

    def second_tensor(self, state: dict) -> Tensor | None:
        """The second moment when the state holds it as one full tensor (None when it is
        factored or computed by the optimizer)."""
        if self.v_method is not None or self.v is None or self._factored(state):
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


# torch.optim's layouts, most specific first.
FOREIGN_LAYOUTS: tuple[MomentLayout, ...] = (
    MomentLayout("adam", m="exp_avg", v="exp_avg_sq"),  # Adam, AdamW, NAdam, RAdam
    MomentLayout("adamax (v = exp_inf, the infinity-norm moment)", m="exp_avg", v="exp_inf"),
    MomentLayout("adafactor (torch.optim)", v="variance", v_row="row_var", v_col="col_var",
                 row_keepdim=True),
    MomentLayout("adafactor (transformers)", m="exp_avg", v="exp_avg_sq", v_row="exp_avg_sq_row",
                 v_col="exp_avg_sq_col", m_optional=True),
    MomentLayout("rmsprop", m="momentum_buffer", v="square_avg", requires=("momentum_buffer",)),
    MomentLayout("rmsprop / adadelta", v="square_avg"),
    MomentLayout("adagrad (v = sum of squared gradients)", v="sum"),
    MomentLayout("sgd momentum", m="momentum_buffer"),
)


def find_layout(state: dict, declared: tuple[MomentLayout, ...] = ()) -> MomentLayout | None:
    """The first layout (declared ones first) whose keys ``state`` has, or None."""
    for layout in (*declared, *FOREIGN_LAYOUTS):
        if layout.applies(state):
            return layout
    return None
