"""What `OptimizerMonitor` checks at the call that receives a user's input: the constructor's
arguments and `log_scalar`'s name and value, each refused with an error that names the value and
the fix; and the guard that holds a Ctrl-C back while the monitor records a step.
"""

from __future__ import annotations

import numbers
import os
import re
import threading
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from optiscope.monitor.metrics import MONITOR_SERIES

try:
    import _signal
except ImportError:  # not CPython
    import signal as _signal
_SIGINT = int(_signal.SIGINT)

__all__ = ["DeferInterrupt", "check_args", "check_sink_args", "check_scalar_name",
           "check_scalar_value"]


class DeferInterrupt:
    """Holds a Ctrl-C back while the monitor processes a step, then raises it: an interrupt in
    the middle would lose the record of a step that completed, or write half of it.

    Only in the main thread (where Python runs signal handlers), and only while SIGINT has
    Python's default handler: a handler of the user's (or a trainer's) is left alone.

    It runs twice per sampled step: the handlers are read and set through `_signal`, the C
    module under `signal`, whose wrappers convert every handler to an enum and back (a caught
    ValueError for each function handler: most of the cost).
    """

    __slots__ = ("previous", "hit")

    def __enter__(self) -> "DeferInterrupt":
        self.previous, self.hit = None, False
        if (threading.current_thread() is threading.main_thread()
                and _signal.getsignal(_SIGINT) is _signal.default_int_handler):
            self.previous = _signal.signal(_SIGINT, self._note)
        return self

    def _note(self, signum, frame) -> None:
        self.hit = True

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.previous is not None:
            _signal.signal(_SIGINT, self.previous)
            if self.hit:
                raise KeyboardInterrupt



def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_args(optimizer, model, every, sample_size, topk_density, topk_block, freeze_probe,
                spike_factor, update_ratio_band, seed=0, resume=False, strict=False,
                log_dir=None, process_group=None, scaler=None, quant_probes=False,
                range_probes=False) -> tuple:
    """Every constructor argument, before anything is attached or written: its type (numpy
    integers are integers, a bool is not), then its range. Returns the numbers as Python ints
    and floats: ``(every, sample_size, topk_density, topk_block, freeze_probe, spike_factor,
    update_ratio_band, seed)``."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"OptimizerMonitor: optimizer must be a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    if model is not None and not isinstance(model, torch.nn.Module):
        raise TypeError(f"OptimizerMonitor: model must be a torch.nn.Module or None, got "
                        f"{type(model).__name__}")
    for name, value, low in (("every", every, 1), ("topk_block", topk_block, 1)):
        if not _is_int(value):
            raise TypeError(f"OptimizerMonitor: {name} must be an integer >= {low}, got {value!r}")
        if value < low:
            raise ValueError(f"OptimizerMonitor: {name} must be an integer >= {low}, got {value!r}")
    if sample_size is not None and not (_is_int(sample_size) and sample_size >= 1):
        error = ValueError if _is_int(sample_size) else TypeError
        raise error(f"OptimizerMonitor: sample_size must be a positive integer or None "
                    f"(automatic), got {sample_size!r}")
    if freeze_probe is not None and not (_is_int(freeze_probe) and freeze_probe >= 1):
        error = ValueError if _is_int(freeze_probe) else TypeError
        raise error(f"OptimizerMonitor: freeze_probe must be a step >= 1 or None, got "
                    f"{freeze_probe!r}")
    if topk_density is not None and not (_is_real(topk_density) and 0 < topk_density <= 1):
        error = ValueError if _is_real(topk_density) else TypeError
        raise error(f"OptimizerMonitor: topk_density must be in (0, 1] or None, got "
                    f"{topk_density!r}")
    for name, value in (("spike_factor", spike_factor), ("update_ratio_band", update_ratio_band)):
        if not (_is_real(value) and value > 1):
            error = ValueError if _is_real(value) else TypeError
            raise error(f"OptimizerMonitor: {name} must be a number > 1, got {value!r}")
    if not (_is_int(seed) and 0 <= seed < 2**64):
        error = ValueError if _is_int(seed) else TypeError
        raise error(f"OptimizerMonitor: seed must be an integer in [0, 2**64), got {seed!r}")
    for name, value in (("resume", resume), ("strict", strict), ("quant_probes", quant_probes)):
        if not isinstance(value, bool):
            raise TypeError(f"OptimizerMonitor: {name} must be True or False, got {value!r}")
    if not (isinstance(range_probes, bool) or range_probes == "exact"):
        raise TypeError(f"OptimizerMonitor: range_probes must be True, False or \"exact\", got "
                        f"{range_probes!r}")
    if log_dir is not None:
        if not isinstance(log_dir, (str, os.PathLike)):
            raise TypeError(f"OptimizerMonitor: log_dir must be a directory path or None, got "
                            f"{log_dir!r}")
        if os.fspath(log_dir) in ("", b""):
            raise ValueError("OptimizerMonitor: log_dir must be a directory path or None, got ''; "
                             "pass '.' to write into the working directory, or None for memory "
                             "only")
    if process_group is not None:
        group_type = (torch.distributed.ProcessGroup if torch.distributed.is_available()
                      else ())
        if not isinstance(process_group, group_type):
            raise TypeError(f"OptimizerMonitor: process_group must be None or a "
                            f"torch.distributed.ProcessGroup, got {process_group!r}")
    if scaler is not None and not callable(getattr(scaler, "step", None)):
        raise TypeError(f"OptimizerMonitor: scaler must be a torch.amp.GradScaler or None, got "
                        f"{scaler!r}")
    if not any(group["params"] for group in optimizer.param_groups):
        raise ValueError("OptimizerMonitor: the optimizer has no parameters, so there is nothing "
                         "to watch; create the optimizer after the model, with "
                         "model.parameters(), then the monitor")

    def maybe(x, kind):
        return None if x is None else kind(x)
    return (int(every), maybe(sample_size, int), maybe(topk_density, float), int(topk_block),
            maybe(freeze_probe, int), float(spike_factor), float(update_ratio_band), int(seed))

_SCALAR_NAME = re.compile(r"[\w.:/-]+")


def check_scalar_name(name, value) -> None:
    """`OptimizerMonitor.log_scalar`'s name: one that cannot break a JSON line, a TensorBoard tag,
    a rich console line or a built-in series."""
    if not isinstance(name, str):
        hint = (" (were the arguments swapped? the call is log_scalar(name, value))"
                if isinstance(name, (int, float, Tensor))
                and isinstance(value, (int, float, Tensor)) and not isinstance(value, bool)
                else "")
        raise TypeError(f"optiscope: log_scalar: name must be a str, got {name!r} "
                        f"({type(name).__name__}){hint}; the call is log_scalar(name, value)")
    if not name:
        raise ValueError("optiscope: log_scalar: name must be a non-empty str such as 'loss'")
    if len(name) > 200:
        raise ValueError(f"optiscope: log_scalar: name {name[:40]!r}... must be at most 200 "
                         "characters")
    if not _SCALAR_NAME.fullmatch(name):
        raise ValueError(f"optiscope: log_scalar: name {name!r} may hold only letters, digits and "
                         "'_', '.', '-', ':', '/' (no spaces, quotes or brackets); e.g. 'val_loss'")
    if name.startswith("/") or name.endswith("/") or "//" in name:
        raise ValueError(f"optiscope: log_scalar: name {name!r} cannot start or end with '/' or "
                         "hold '//'; e.g. 'train/loss'")
    if name in MONITOR_SERIES:
        raise ValueError(f"optiscope: log_scalar: {name!r} is a metric the monitor records itself "
                         f"and cannot be replaced; log your own value under another name, e.g. "
                         f"'trainer/{name}'")


def check_scalar_value(name: str, value):
    """`OptimizerMonitor.log_scalar`'s value as a float, or a one-element real tensor (left on
    its device: read only on sampled steps). Only metadata of a tensor is looked at."""
    if isinstance(value, Tensor):
        if value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"optiscope: log_scalar({name!r}): value is a "
                            f"{str(value.dtype).replace('torch.', '')} tensor; pass a real number "
                            "or a real tensor")
        if value.numel() != 1:
            raise ValueError(f"optiscope: log_scalar({name!r}) takes one number, got a tensor of "
                             f"shape {tuple(value.shape)}; pass value.mean() or a float")
        return value
    if isinstance(value, np.ndarray) and value.dtype.kind in "iuf":
        if value.size != 1:
            raise ValueError(f"optiscope: log_scalar({name!r}) takes one number, got an array of "
                             f"{value.size} elements; pass one of them, or their mean")
        value = value.reshape(()).item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        hint = "; pass float(value) for a flag" if isinstance(value, bool) else ""
        raise TypeError(f"optiscope: log_scalar({name!r}): value must be a real number or a "
                        f"one-element tensor, got {_short(value)} ({type(value).__name__}){hint}")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"optiscope: log_scalar({name!r}): value {_short(value)} is out of "
                         "float64's range; pass a float (inf if it is meant to be infinite)"
                         ) from None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_sink_args(console, tensorboard, report, sinks, Sink: type) -> None:
    """``Sink``: `optiscope.dashboards.Sink`, passed in (the dashboards sit above this module)."""
    from rich.console import Console
    if not (console in (True, False, None, "auto") or isinstance(console, (Console, Sink))):
        raise ValueError(f"OptimizerMonitor: console must be 'auto', True, False, a rich Console "
                         f"or a ConsoleDashboard, got {console!r}")
    for name, value in (("tensorboard", tensorboard), ("report", report)):
        if not isinstance(value, bool):
            raise TypeError(f"OptimizerMonitor: {name} must be True or False, got {value!r}")
    if isinstance(sinks, (Sink, str)) or not isinstance(sinks, Sequence):
        raise TypeError(f"OptimizerMonitor: sinks must be a list of optiscope.dashboards.Sink "
                        f"instances, got {sinks!r}; pass [sink] for one")
    for sink in sinks:
        if not isinstance(sink, Sink):
            raise TypeError(f"OptimizerMonitor: sinks must be optiscope.dashboards.Sink "
                            f"instances, got {type(sink).__name__}; subclass Sink and override "
                            "on_sample / on_alert / on_meta / close")
