"""Values for the run's metadata: a bundled optimizer's backend in words, hyperparameters as
JSON values."""

from __future__ import annotations

from torch import Tensor

from optiscope.kernels.launch import local

__all__ = ["backend_words", "jsonable"]


def backend_words(optimizer, backend: str | None, slots) -> str | None:
    """A bundled optimizer's backend and what runs under it, e.g. ``"auto: torch (C kernel)"``."""
    if backend != "auto" or not slots:
        return backend
    from optiscope.kernels.backend import describe_backend
    return describe_backend(backend, local(slots[0].param).device, type(optimizer).__name__)


def jsonable(v):
    if isinstance(v, Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, (tuple, list)):
        return [jsonable(x) for x in v]
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return repr(v)
