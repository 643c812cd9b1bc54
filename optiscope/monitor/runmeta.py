"""The metadata a run log starts with (its ``meta`` record)."""

from __future__ import annotations

import platform
import sys
import time

import torch
from torch import Tensor

from optiscope._version import __version__
from optiscope.kernels.launch import local
from optiscope.monitor.sampling import sample_count

__all__ = ["run_meta"]


def run_meta(monitor, sample_size, topk_density, topk_block) -> dict:
    """The run log's ``meta`` record at the start of a run: the optimizer, its hyperparameters,
    the tracked tensors, the monitor's settings and the versions and host that produced it."""
    opt = monitor.optimizer
    groups = [{k: _jsonable(v) for k, v in g.items() if k not in ("params", "param_names")}
              for g in opt.param_groups]
    params = [dict(name=s.scope, shape=list(s.param.shape), dtype=str(s.param.dtype).replace("torch.", ""),
                   numel=s.param.numel(), device=str(s.param.device),
                   sampled=sample_count(local(s.param).numel(), sample_size))
              for s in monitor.slots]
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return dict(
        optimizer=f"{type(opt).__module__}.{type(opt).__qualname__}",
        optimizer_name=type(opt).__name__,
        backend=_backend(opt, monitor.caps.backend, monitor.slots),
        hyperparameters=groups,
        params=params,
        n_params=sum(p["numel"] for p in params),
        param_bytes=sum(s.param.numel() * s.param.element_size() for s in monitor.slots),
        every=monitor.every, sample_size=sample_size, topk_density=topk_density,
        topk_block=topk_block, freeze_probe=monitor.freeze_probe,
        quant_probes=monitor.collector.compression.probes,
        range_probes=monitor.collector.range_probes,
        second_moment_frozen_at=monitor.caps.freeze_step,
        produced_by_optimizer=sorted(c.name.lower() for c in monitor.collector.produced),
        world_size=monitor.topology.world, sharded=monitor.topology.sharded,
        versions=dict(optiscope=__version__, torch=torch.__version__, triton=triton_version,
                      python=platform.python_version()),
        host=platform.node(), command=" ".join(sys.argv), start_time=time.time(),
    )


def _backend(optimizer, backend: str | None, slots) -> str | None:
    """A bundled optimizer's backend and what runs under it, e.g. ``"auto: torch (C kernel)"``."""
    if backend != "auto" or not slots:
        return backend
    from optiscope.kernels.backend import describe_backend
    return describe_backend(backend, local(slots[0].param).device, type(optimizer).__name__)


def _jsonable(v):
    if isinstance(v, Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return repr(v)
