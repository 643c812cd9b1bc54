"""A sampled step on its way to the host, and the copy that brings it there."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["_Pending", "_to_host"]


@dataclass
class _Pending:
    """A sampled step whose numbers are on their way to the host."""

    step: int
    time: float
    rows: Tensor | None = None            # [n_tensors, NUM_COLS] (host, or pinned when CUDA)
    active: list[int] = field(default_factory=list)  # the tensors the step updated
    skipped_device: Tensor | None = None  # found_inf total of fused steps, host copy
    scalars: dict[str, object] = field(default_factory=dict)
    lrs: list[float] = field(default_factory=list)
    state_bytes: tuple | None = None
    skipped_host: int = 0
    event: object = None                  # torch.cuda.Event once sealed, on CUDA
    sealed: bool = False
    checked: bool = False                 # on_nonfinite="raise" looked before the update


def _to_host(t: Tensor) -> Tensor:
    """Starts a device-to-host copy without waiting for it (a plain copy on CPU)."""
    if t.device.type == "cpu":
        return t.clone()
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out
