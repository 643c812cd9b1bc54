"""Gradient statistics from before clipping: the monitor sees the gradient backward produced.

Gradient clipping runs between backward and ``optimizer.step``, so the step hooks only ever see
the clipped gradient: with ``max_grad_norm=1.0`` the recorded ``grad_norm`` would sit at 1, a
spike could never be seen, and a NaN in one tensor (which makes the clip coefficient NaN and so
every gradient NaN) would be blamed on all of them.

While a monitor is open, the clipping functions of ``torch.nn.utils`` are replaced by thin
wrappers, looked up by the name callers use at call time:

* ``torch.nn.utils.clip_grad_norm_`` (plain loops, Lightning's norm clipping),
* ``torch.nn.utils.clip_grads_with_norm_`` (Accelerate's ``Accelerator.clip_grad_norm_`` and so
  the Hugging Face Trainer: they compute the norm with ``get_total_norm`` and clip with this),
* ``torch.nn.utils.clip_grad_value_`` (Lightning's value clipping).

On a step the monitor samples, the wrapper first takes the gradient statistics (Σg², max|g|,
non-finite count per tensor) of the tensors being clipped, then clips, and keeps the factor that
clipping applied (``clip_coef``: torch's ``min(1, max_norm / (‖g‖ + 1e-6))``; for value clipping
‖g_after‖ / ‖g_before‖). On other steps the wrapper calls the original at once: no device work.
The first capture of a tensor in a step wins, so a second clip call sees nothing new.

Limits: a trainer that clips with code of its own (not these functions), or a module that bound
the function by name before the monitor was created (``from torch.nn.utils import
clip_grad_norm_`` at import time), is not seen: the monitor then records the clipped gradient,
as the step consumes it, and ``clip_coef`` 1.
"""

from __future__ import annotations

import functools
import threading
import weakref

import torch

__all__ = ["register", "unregister", "active", "Capture"]

_lock = threading.Lock()
_monitors: "weakref.WeakSet" = weakref.WeakSet()
_originals: dict[tuple[object, str], object] = {}


def active() -> bool:
    """Whether the clipping functions are wrapped now (for a monitor still alive: those of
    monitors dropped without `close` are restored here)."""
    with _lock:
        if _originals and not len(_monitors):
            _restore()
        return bool(_originals)


def register(monitor) -> None:
    """Lets ``monitor`` see clip calls (installs the wrappers on first use)."""
    with _lock:
        _monitors.add(monitor)
        if not _originals:
            _install()


def unregister(monitor) -> None:
    """Stops ``monitor`` seeing clip calls (restores torch's functions after the last one)."""
    with _lock:
        _monitors.discard(monitor)
        if not len(_monitors) and _originals:
            _restore()


def _restore() -> None:
    for (module, name), fn in _originals.items():
        setattr(module, name, fn)
    _originals.clear()


def _listening(params: list) -> list:
    """(monitor, token) for each open monitor that wants this clip call's statistics."""
    out = []
    for monitor in list(_monitors):
        token = monitor._clip_begin(params)
        if token is not None:
            out.append((monitor, token))
    return out


def _materialise(parameters) -> list:
    if isinstance(parameters, torch.Tensor):
        return [parameters]
    return list(parameters)


def _observed(fn, parameters, leading: tuple, args: tuple, kwargs: dict, coef):
    """Calls torch's clip function ``fn(params, *leading, *args, **kwargs)`` and tells each
    listening monitor the clip coefficient, ``coef(fn's result)``, computed only when one
    listens."""
    params = _materialise(parameters)
    listeners = _listening(params) if _monitors else []
    out = fn(params, *leading, *args, **kwargs)
    if listeners:
        c = coef(out)
        for monitor, token in listeners:
            monitor._clip_end(token, c)
    return out


def _install() -> None:
    utils = torch.nn.utils
    clip_grad = torch.nn.utils.clip_grad
    norm_fn = utils.clip_grad_norm_
    with_norm_fn = utils.clip_grads_with_norm_
    value_fn = utils.clip_grad_value_

    @functools.wraps(norm_fn)
    def clip_grad_norm_(parameters, max_norm, *args, **kwargs):
        return _observed(norm_fn, parameters, (max_norm,), args, kwargs,
                         lambda total: _norm_coef(max_norm, total))

    @functools.wraps(with_norm_fn)
    def clip_grads_with_norm_(parameters, max_norm, total_norm, *args, **kwargs):
        return _observed(with_norm_fn, parameters, (max_norm, total_norm), args, kwargs,
                         lambda _: _norm_coef(max_norm, total_norm))

    @functools.wraps(value_fn)
    def clip_grad_value_(parameters, clip_value, *args, **kwargs):
        # no coefficient: the monitor compares ‖g‖ after with before
        return _observed(value_fn, parameters, (clip_value,), args, kwargs, lambda _: None)

    for module, name, fn in ((utils, "clip_grad_norm_", clip_grad_norm_),
                             (clip_grad, "clip_grad_norm_", clip_grad_norm_),
                             (utils, "clip_grads_with_norm_", clip_grads_with_norm_),
                             (utils, "clip_grad_value_", clip_grad_value_),
                             (clip_grad, "clip_grad_value_", clip_grad_value_)):
        _originals[(module, name)] = getattr(module, name)
        setattr(module, name, fn)


def _norm_coef(max_norm, total_norm) -> torch.Tensor:
    """The factor norm clipping multiplies the gradients by (torch's formula; on the device)."""
    total = total_norm if isinstance(total_norm, torch.Tensor) else torch.tensor(float(total_norm))
    if hasattr(total, "full_tensor"):  # a DTensor norm (FSDP2): the same on every rank
        total = total.full_tensor()
    total = total.detach().float()
    return torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)


class Capture:
    """The pre-clip gradient statistics that clip calls captured for one sampled step.

    Args:
        step: the optimizer step the clip calls belong to.
    """

    def __init__(self, step: int):
        self.step = step
        self.rows: dict[int, torch.Tensor] = {}   # slot index -> [Σg², max|g|, non-finite]
        self.coefs: list[torch.Tensor] = []
        self.seen: dict[int, tuple[int, int]] = {}  # slot index -> its grad's (id, version)

    def _new_backward(self, slots) -> bool:
        """Whether a gradient captured earlier has changed since its clip call: a new backward
        for the same step number (a GradScaler skipped the step in between: no step was taken),
        so what was captured is stale."""
        for i, (ident, version) in self.seen.items():
            g = slots[i].param.grad
            if g is None or id(g) != ident or g._version != version:
                return True
        return False

    def take(self, slots, params: list):
        """Captures the statistics of the tracked tensors among ``params`` not captured yet;
        returns a token for `finish`, or None when none of ``params`` is tracked."""
        from optiscope.kernels.launch import local
        from optiscope.monitor.pertensor import dense as _dense, grad_stats as _grad_stats
        from optiscope.kernels.stats import Stat

        ids = {id(p) for p in params}
        tracked = [i for i, s in enumerate(slots) if id(s.param) in ids]
        if not tracked:
            return None
        if self.seen and self._new_backward(slots):
            self.rows, self.coefs, self.seen = {}, [], {}
        fresh = [i for i in tracked if slots[i].param.grad is not None and i not in self.rows]
        if fresh:
            with torch.no_grad():
                grads = [_dense(local(slots[i].param.grad)) for i in fresh]
                stats = _grad_stats(grads)
                block = torch.stack([stats[Stat.GRAD_SQ].float(), stats[Stat.GRAD_ABSMAX].float(),
                                     stats[Stat.GRAD_NONFINITE].float()], dim=1)
            for j, i in enumerate(fresh):
                self.rows[i] = block[j]
        return fresh

    def finish(self, slots, token: list, coef) -> None:
        """Keeps the factor one clip call applied (None: value clipping, measured here as
        ‖g after‖ / ‖g before‖ over the tensors it captured)."""
        for i in token:  # clipping changed them in place: remember their version after it
            g = slots[i].param.grad
            if g is not None:
                self.seen[i] = (id(g), g._version)
        if coef is None:
            if not token:
                return
            from optiscope.kernels.launch import local
            from optiscope.monitor.pertensor import dense as _dense
            with torch.no_grad():
                before = torch.stack([self.rows[i][0] for i in token]).sum()
                after = sum(_dense(local(slots[i].param.grad)).detach().float().square().sum()
                            .to(before.device) for i in token)
                coef = torch.sqrt(after / before)
        self.coefs.append(coef.detach().float().reshape(()))

    def coef(self) -> torch.Tensor | float:
        """The clip coefficient of the step: 1 without a clip call; the smallest when several
        calls clipped parts of the model."""
        if not self.coefs:
            return 1.0
        device = self.coefs[0].device
        return torch.stack([c.to(device) for c in self.coefs]).amin()

    def columns(self, slots, active: list[int]) -> dict[int, torch.Tensor] | None:
        """``Col -> [len(active)]`` pre-clip gradient columns for the step's tensors (the ones
        no clip call saw are taken now: their gradient was not clipped), or None when no clip
        call saw any of them."""
        if not any(i in self.rows for i in active):
            return None
        from optiscope.kernels.launch import local
        from optiscope.monitor.pertensor import dense as _dense, grad_stats as _grad_stats
        from optiscope.kernels.stats import Stat
        from optiscope.monitor.metrics import Col

        missing = [i for i in active if i not in self.rows]
        rows = dict(self.rows)
        if missing:
            stats = _grad_stats([_dense(local(slots[i].param.grad)) for i in missing])
            device = next(iter(self.rows.values())).device
            for j, i in enumerate(missing):
                rows[i] = torch.stack([stats[Stat.GRAD_SQ][j].float(), stats[Stat.GRAD_ABSMAX][j].float(),
                                       stats[Stat.GRAD_NONFINITE][j].float()]).to(device)
        block = torch.stack([rows[i] for i in active])
        return {Col.GRAD_SQ: block[:, 0], Col.GRAD_ABSMAX: block[:, 1],
                Col.GRAD_NONFINITE: block[:, 2]}
