"""Resuming a run where its checkpoint left it, and the wrappers trainers put around objects.

A resumed run continues at the checkpoint's step k, not at the last step the crashed attempt
recorded: the run log gets a ``{"type": "resume", "step": k}`` record, and `load_run` voids every
earlier sample, histogram and alert of a step after k (the log itself stays append-only); the
monitor's history in memory drops them too (`RunHistory.drop_after`).
"""

from __future__ import annotations

import torch

__all__ = ["unwrap_model", "unwrap_optimizer"]


def unwrap_optimizer(optimizer):
    """The torch optimizer inside Accelerate's ``AcceleratedOptimizer`` or Lightning's
    ``LightningOptimizer``: the wrappers do not hold the step hooks the monitor needs (they
    subclass `torch.optim.Optimizer` without running its ``__init__``)."""
    seen = 0
    while seen < 8 and not hasattr(optimizer, "_optimizer_step_pre_hooks"):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None:
            inner = getattr(optimizer, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer, seen = inner, seen + 1
    return optimizer


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The user's model inside torch.compile / DDP / DataParallel wrappers, whose parameter
    names would otherwise start with ``_orig_mod.`` or ``module.``."""
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    while True:
        if isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, wrappers):
            model = model.module
        else:
            return model
