"""Backend selection for the bundled optimizers: ``backend="auto" | "triton" | "torch"``.

``"auto"`` picks Triton for CUDA tensors when Triton is importable, else the torch reference
(said once, at WARNING, for CUDA tensors: triton is an optional dependency, ``optiscope[triton]``,
which CUDA builds of torch already bring). An explicit choice is never overridden: when it cannot be honoured the error says what to do.
Under ``TRITON_INTERPRET=1`` the Triton backend also runs on CPU tensors, through the Triton
interpreter; that is how the test suite exercises every kernel without a GPU.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

__all__ = ["BACKENDS", "check_backend", "resolve_backend", "triton_available",
           "triton_unavailable_reason", "interpreter_active", "describe_backend"]

log = logging.getLogger("optiscope.kernels")

BACKENDS = ("auto", "triton", "torch")


@functools.lru_cache(maxsize=1)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising something else
        return f"{type(exc).__name__}: {exc}"
    return None


def triton_available() -> bool:
    """True when ``import triton`` works in this process."""
    return _triton_import_error() is None


def triton_unavailable_reason() -> str | None:
    """Why ``import triton`` fails here (None when it works)."""
    return _triton_import_error()


@functools.lru_cache(maxsize=1)
def _say_cuda_without_triton() -> None:
    log.warning("optiscope: backend='auto' runs CUDA tensors on the torch backend (torch's fused "
                "kernels, statistics by torch reductions): triton does not import here (%s). For "
                "the Triton kernels install triton: pip install 'optiscope[triton]' (CUDA builds "
                "of torch already bring it)", _triton_import_error())


def interpreter_active() -> bool:
    """True when the Triton interpreter is on (``TRITON_INTERPRET=1`` before Triton's import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_backend(backend: str, owner: str) -> str:
    """Validates a ``backend`` argument at construction time and returns it.

    Args:
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
        owner: the class name to put in error messages.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{owner}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton" and not triton_available():
        raise RuntimeError(
            f"{owner}: backend='triton' needs the triton package, which does not import here "
            f"({_triton_import_error()}); install triton (Linux x86-64) or pass backend='auto' "
            "or backend='torch'"
        )
    return backend


def resolve_backend(backend: str, device: torch.device, owner: str) -> str:
    """Returns the backend that runs tensors on ``device``: ``"triton"`` or ``"torch"``.

    Args:
        backend: the optimizer's ``backend`` argument, already validated by `check_backend`.
        device: the device of the tensors about to be updated.
        owner: the class name to put in error messages.
    """
    if backend == "torch":
        return "torch"
    if backend == "auto":
        if device.type == "cuda" and not triton_available():
            _say_cuda_without_triton()
            return "torch"
        return "triton" if device.type == "cuda" else "torch"
    if device.type == "cuda" or (device.type == "cpu" and interpreter_active()):
        return "triton"
    raise RuntimeError(
        f"{owner}: backend='triton' runs on CUDA tensors (or on CPU tensors under "
        f"TRITON_INTERPRET=1), got tensors on {device}; move the parameters to a GPU or pass "
        "backend='auto' or backend='torch'"
    )


def describe_backend(backend: str, device: torch.device, owner: str) -> str:
    """What ``backend="auto"`` runs ``owner``'s tensors on ``device`` with, for the run's
    metadata: ``"auto: triton"``, ``"auto: torch (C kernel)"``, ``"auto: torch (fallback: <why
    there is no C kernel>)"``, ``"auto: torch (no triton: <why>)"``. An explicit choice is
    returned as it is (a missing C kernel is still said once, at WARNING)."""
    from optiscope.kernels import cpu

    if backend != "auto":
        return backend
    try:
        chosen = resolve_backend(backend, device, owner)
    except Exception:  # the step will say what is wrong; the metadata just says the choice
        return backend
    prefix = f"auto: {chosen}"
    if chosen == "triton":
        return prefix
    if device.type == "cpu":
        if cpu.kernel() is not None:
            return f"{prefix} (C kernel)"
        return f"{prefix} (fallback: {cpu.unavailable_reason() or 'no C kernel'})"
    if device.type == "cuda" and not triton_available():
        return f"{prefix} (no triton: {triton_unavailable_reason()})"
    return prefix
