"""Where an optimizer keeps its first and second moment, so the monitor can read m and v.

Bundled optimizers declare their layout (``state_layouts`` on the class). For any other optimizer
the monitor recognises torch.optim's layouts from the keys of ``optimizer.state[p]``: a subclass
or a re-implementation that keeps torch's key names is read correctly, whatever its class name.

The layout itself (`MomentLayout`) is part of the contract (`optiscope.contract`), re-exported
here.
"""

from __future__ import annotations

from optiscope.contract import MomentLayout

__all__ = ["MomentLayout", "FOREIGN_LAYOUTS", "find_layout"]


# torch.optim's layouts, most specific first.
FOREIGN_LAYOUTS: tuple[MomentLayout, ...] = (
    MomentLayout("adam", m="exp_avg", v="exp_avg_sq"),  # Adam, AdamW, NAdam, RAdam
    # bitsandbytes' Adam family (8-bit: uint8 codes that monitor/compression.py decodes)
    MomentLayout("adam (bitsandbytes)", m="state1", v="state2"),
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
