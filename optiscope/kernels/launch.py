"""Shared launch helpers for the multi-tensor Triton kernels.

One launch updates many tensors. The launcher passes a table of element addresses (one row per
role: parameter, gradient, each state tensor; one column per tensor) and a chunk map that assigns
every program one chunk of `CHUNK` elements of one tensor. Real models have hundreds of small
tensors, and a launch per tensor is what makes per-tensor optimizers slow: the kernel count, not
the bytes, dominates their step time.

The chunk map depends only on the tensors' sizes, so it is built once per layout and cached; the
address table is cached on its device by the addresses it holds (`launch_addresses`): it changes
only when a tensor moves (a gradient re-allocated by ``zero_grad(set_to_none=True)`` mostly gets
its old block back), and then costs a few hundred int64 values and one small copy to the device.
"""

from __future__ import annotations

import functools
import operator
from collections import OrderedDict
from dataclasses import dataclass
from itertools import chain

import torch
from torch import Tensor

__all__ = ["BLOCK", "CHUNK", "NUM_WARPS", "ChunkMap", "chunk_map", "address_table",
           "launch_addresses", "tl_dtype", "densify", "write_back", "is_dense",
           "plain_on", "launch_groups", "uniform_groups", "local", "local_all", "is_sharded"]

# Elements one program handles per inner iteration, and per chunk (CHUNK // BLOCK iterations).
# 4 iterations of 1024 keep a program's loads in flight while the grid stays large enough for
# every SM at 10^6+ elements.
BLOCK = 1024
CHUNK = 4 * BLOCK
NUM_WARPS = 4


_DATA_PTR = Tensor.data_ptr
_IS_CONTIGUOUS = Tensor.is_contiguous
_NUMEL = Tensor.numel
_PLAIN = (Tensor, torch.nn.Parameter)
_PLAIN_OR_NONE = frozenset((*_PLAIN, type(None)))
_PRESENT = functools.partial(operator.is_not, None)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor; any other tensor as it is."""
    if type(t) in _PLAIN:
        return t
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def local_all(tensors: list[Tensor | None]) -> list[Tensor | None]:
    """`local` of each tensor (None stays None): the list itself when none is a subclass (one
    C-level pass over the types, not a call per tensor)."""
    if set(map(type, tensors)) <= _PLAIN_OR_NONE:
        return tensors
    return [local(t) if t is not None else None for t in tensors]


def is_sharded(t: Tensor) -> bool:
    """True for a DTensor sharded along some mesh dimension (FSDP2's parameters)."""
    placements = getattr(t, "placements", None)
    return placements is not None and any(pl.is_shard() for pl in placements)


def tl_dtype(dtype: torch.dtype):
    """The Triton element type of a torch floating dtype."""
    import triton.language as tl

    table = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
             torch.float64: tl.float64}
    if dtype not in table:
        raise TypeError(f"optiscope: the Triton kernels take float32/float16/bfloat16/float64 "
                        f"tensors, got {dtype}; pass backend='torch'")
    return table[dtype]


@dataclass(frozen=True)
class ChunkMap:
    """Which tensor, and which chunk of it, each program of a multi-tensor launch handles.

    Attributes:
        numels: int64 ``[T]``, elements of each tensor.
        chunk_tensor: int32 ``[C]``, the tensor of each chunk.
        chunk_first: int32 ``[T + 1]``, the first chunk of each tensor (and the total at the end).
        counts: int64 ``[T]``, chunks per tensor.
        n_chunks: ``C``, the launch grid.
        chunk: elements per chunk.
    """

    numels: Tensor
    chunk_tensor: Tensor
    chunk_first: Tensor
    counts: Tensor
    n_chunks: int
    chunk: int


@functools.lru_cache(maxsize=128)
def chunk_map(numels: tuple[int, ...], chunk: int, device: torch.device) -> ChunkMap:
    """The chunk map of tensors with these sizes; cached, since sizes do not change between steps."""
    counts = [max(1, -(-n // chunk)) for n in numels]  # an empty tensor still gets its stats row
    first = [0]
    for c in counts:
        first.append(first[-1] + c)
    chunk_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32),
                                           torch.tensor(counts))
    return ChunkMap(
        numels=torch.tensor(numels, dtype=torch.int64).to(device),
        chunk_tensor=chunk_tensor.to(device),
        chunk_first=torch.tensor(first, dtype=torch.int32).to(device),
        counts=torch.tensor(counts, dtype=torch.int64).to(device),
        n_chunks=first[-1],
        chunk=chunk,
    )


def address_table(roles: list[list[Tensor | None] | None], n: int, device: torch.device) -> Tensor:
    """int64 ``[len(roles), n]`` of element addresses; a role given as None, or a None entry in a
    role, is 0 (the kernel does not touch it: the flag that would read it is off)."""
    return launch_addresses(roles, n, device)[0]


def _pointers(role: list[Tensor | None] | None, n: int) -> tuple[int, ...]:
    if role is None:
        return (0,) * n
    try:
        return tuple(map(_DATA_PTR, role))
    except TypeError:  # a None entry among them
        return tuple(t.data_ptr() if t is not None else 0 for t in role)


# Address tables already on their device, by (device, addresses). Parameters and state keep
# their storage from step to step, and the caching allocator mostly hands a re-allocated
# gradient its old block, so a training loop finds its table here: no host list, no copy to
# the device. A table holds nothing but the addresses of its key, so a hit is always right.
_TABLES: OrderedDict = OrderedDict()
_TABLES_KEPT = 32


def launch_addresses(roles: list[list[Tensor | None] | None], n: int,
                     device: torch.device) -> tuple[Tensor, bool]:
    """`address_table` of ``roles`` on ``device``, and whether every address is a multiple of
    16 (CUDA allocations are; a view at an odd offset is not), so that a kernel may load and
    store 16 bytes at a time; the table is cached by its addresses."""
    pointers = tuple(_pointers(role, n) for role in roles)
    key = (device, pointers)
    hit = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        return hit
    table = torch.tensor(pointers, dtype=torch.int64).to(device, non_blocking=True)
    hit = (table, all(p % 16 == 0 for p in chain.from_iterable(pointers)))
    _TABLES[key] = hit
    if len(_TABLES) > _TABLES_KEPT:
        _TABLES.popitem(last=False)
    return hit


def plain_on(tensors: list[Tensor], devices: tuple[str, ...]) -> bool:
    """True when ``tensors`` are plain strided floating tensors (no subclass: raw pointers see
    only those) all on one device of a type in ``devices``."""
    if not tensors:
        return False
    device = tensors[0].device
    return device.type in devices and all(
        t.device == device and t.dtype in _FLOATS and t.layout == torch.strided
        and type(t) in (Tensor, torch.nn.Parameter) for t in tensors)


_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def is_dense(t: Tensor) -> bool:
    """True when ``t`` covers exactly ``numel`` consecutive elements from ``data_ptr``."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def densify(roles: list[list[Tensor | None] | None], *, writable: list[bool] | None = None,
            row_major: bool = False
            ) -> tuple[list[list[Tensor | None] | None], list[tuple[Tensor, Tensor]]]:
    """Makes every column of ``roles`` safe to treat as flat storage.

    A kernel walks each tensor as ``numel`` consecutive elements. That is right when the tensors
    of one column (a parameter, its gradient, its state) are dense with the same strides, which
    is the usual case (state is allocated ``zeros_like`` the parameter). Any other column is
    replaced by contiguous copies; `write_back` copies them into the originals after the launch.

    Args:
        roles: one list per role (parameters, gradients, each state), or None for an absent
            role; a None entry is an absent tensor.
        writable: per role, whether the launch writes it (default: all); only written roles
            are copied back.
        row_major: require contiguity, not just a shared dense layout (kernels that index rows
            and columns).

    Returns:
        The roles to launch on, and the (original, copy) pairs to write back.
    """
    writable = writable if writable is not None else [True] * len(roles)
    present = [role for role in roles if role is not None]
    if all(map(_IS_CONTIGUOUS, filter(_PRESENT, chain.from_iterable(present)))):
        return [list(role) if role is not None else None for role in roles], []  # no copy
    lengths = {len(role) for role in roles if role is not None}
    n = lengths.pop() if lengths else 0
    out = [list(role) if role is not None else None for role in roles]
    pairs: list[tuple[Tensor, Tensor]] = []
    for i in range(n):
        column = [role[i] for role in roles if role is not None and role[i] is not None]
        stride = column[0].stride()
        if all(t.is_contiguous() for t in column) or (not row_major and all(
                is_dense(t) and t.stride() == stride for t in column)):
            continue
        for role, write in zip(out, writable):
            if role is not None and role[i] is not None and not role[i].is_contiguous():
                copy = role[i].contiguous()
                if write:
                    pairs.append((role[i], copy))
                role[i] = copy
    return out, pairs


def write_back(pairs: list[tuple[Tensor, Tensor]]) -> None:
    """Copies the results computed on contiguous copies back into the original tensors."""
    for original, copy in pairs:
        original.copy_(copy)


def uniform_groups(columns: list[list], n: int) -> dict | None:
    """``{key: range(n)}`` when every list of ``columns`` holds one value throughout (the key
    is those values), else None: `launch_groups` without a key per tensor, for the usual step
    where every tensor shares dtypes and step count."""
    key = []
    for column in columns:
        values = set(column)
        if len(values) != 1:
            return None
        key.append(values.pop())
    return {tuple(key): list(range(n))}


def launch_groups(keys: list) -> dict:
    """Indices grouped by key, in first-seen order: ``["a", "b", "a"] -> {"a": [0, 2], "b": [1]}``.

    A launch needs one element type per role and one set of scalars, so tensors are launched in
    launch groups of equal (device, dtypes, step).
    """
    out: dict = {}
    for i, key in enumerate(keys):
        out.setdefault(key, []).append(i)
    return out
