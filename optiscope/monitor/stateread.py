"""How the monitor reads an optimizer's state tensors: plain ones as they are, a DTensor's local
shard, a low-bit subclass through its ``dequantize()``, and the bytes each really keeps."""

from __future__ import annotations

import torch
from torch import Tensor

from optiscope.kernels.launch import local

__all__ = ["readable", "dequantized", "storage_parts"]


def _plain(t) -> bool:
    """Exactly a tensor (or a Parameter) of the strided layout: what kernels and torch's
    reductions read as they are. A subclass reports sizes and dtypes of values it may not store
    (torchao's OptimState8bit holds uint8 codes behind a float32 face, with ``data_ptr`` 0)."""
    return type(t) in (Tensor, torch.nn.Parameter) and t.layout == torch.strided


def readable(t: Tensor) -> Tensor | None:
    """A state tensor as values the monitor can sum: a DTensor's local shard; a tensor subclass
    that implements ``dequantize()`` (torchao's low-bit optimizer states) its dequantized values,
    a transient copy; a plain tensor as it is. None for any other subclass: the monitor skips
    the metric rather than read memory the subclass does not describe."""
    t = local(t)
    if _plain(t) or t.is_sparse:
        return t
    if type(t).dequantize is not Tensor.dequantize:  # the subclass's own, not aten's
        values = t.dequantize()
        if _plain(values) and values.shape == t.shape:
            return values
    return None


def dequantized(t: Tensor) -> bool:
    """True when `readable` returns a copy of ``t``'s values rather than ``t`` (or its shard)."""
    t = local(t)
    return not (_plain(t) or t.is_sparse)


def storage_parts(t: Tensor) -> list[tuple[object, int]]:
    """(identity, bytes) of the storages holding ``t``'s values, for state memory: a plain
    tensor's own storage; a traceable subclass's inner tensors (torchao's codes, scales and
    quantization map: the bytes it really keeps, not numel × the float32 it poses as); a
    tensor without readable storage counts numel × element size."""
    t = local(t)
    if not _plain(t) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return [part for name in names for part in storage_parts(getattr(t, name))]
    try:
        storage = t.untyped_storage()
        pointer = storage.data_ptr()
    except (RuntimeError, NotImplementedError):
        return [(id(t), t.numel() * t.element_size())]
    return [((t.device, pointer) if pointer else id(storage), storage.nbytes())]
