"""The monitor's sums over many small float32 CPU tensors in one C call each (``cpu_kernels.c``,
"many small tensors at once"): the tensors are read where they lie, through an array of their
addresses, so a model's 148 biases and small matrices cost one call per set of tensors (and
quantities read together in one walk) instead of a concatenation and a torch reduction per
quantity (each 100-300 us on a CPU, whatever the size).

Raw pointers only ever see plain tensors: `f32_addresses` checks every tensor each time it is
given new ones (`AddressCache` re-checks only when an address changes), and returns None for
anything else, which the caller then sums with torch ops.
"""

from __future__ import annotations

import ctypes
import weakref
from operator import attrgetter

import numpy as np
import torch

from optiscope.kernels import cpu

__all__ = ["available", "f32_addresses", "AddressCache", "grad_sums", "sq_sums", "take", "topk",
           "adam_f32_many", "kept", "Rows", "rows_grad", "rows_sq", "rows_sample_sums", "rows_topk",
           "rows_grad_topk"]

_P = ctypes.c_void_p
_SIGNATURES = {
    "optiscope_many_grad_sums": [_P, _P, ctypes.c_int64, _P],
    "optiscope_many_sq_sums": [_P, _P, ctypes.c_int64, _P],
    "optiscope_many_take": [_P, _P, _P, ctypes.c_int64, _P],
    "optiscope_many_topk": [_P] * 5 + [ctypes.c_int64] + [_P] * 3,
    "optiscope_rows_grad": [_P, _P, ctypes.c_int64, ctypes.c_int, ctypes.c_double, _P, _P]
                           + [ctypes.c_int64] * 4,
    "optiscope_rows_sq": [_P, _P, ctypes.c_int64, _P, _P, ctypes.c_int64, ctypes.c_int64],
    "optiscope_rows_sample_sums": [_P] * 4 + [ctypes.c_int64, _P, _P] + [ctypes.c_int64] * 3,
    "optiscope_rows_topk": [_P] * 5 + [ctypes.c_int64, _P, _P, ctypes.c_int64, _P, _P]
                           + [ctypes.c_int64] * 3,
    "optiscope_rows_grad_topk": [_P, _P, ctypes.c_int64, ctypes.c_int, ctypes.c_double]
                                + [_P] * 4 + [ctypes.c_int64] + [_P] * 3 + [_P, ctypes.c_int64,
                                                                            _P],
    "optiscope_rows_sq_take": [_P, _P, ctypes.c_int64] + [_P] * 8 + [ctypes.c_int64, _P],
    "optiscope_steps_add_one": [_P, ctypes.c_int64, _P],
    "optiscope_adam_f32_many": ([_P] * 6 + [ctypes.c_int64] + [ctypes.c_float] * 7 + [_P] * 2
                                + [ctypes.c_int] * 3 + [_P] * 3 + [ctypes.c_int64, _P,
                                                                   ctypes.c_int]),
}
_lib = None


def available() -> bool:
    """The C library is compiled and loaded (`optiscope.kernels.cpu.kernel`)."""
    global _lib
    if _lib is None:
        lib = cpu.kernel()
        if lib is None:
            return False
        for name, argtypes in _SIGNATURES.items():
            f = getattr(lib, name)
            f.restype, f.argtypes = None, argtypes
        _lib = lib
    return True


_PLAIN = (torch.Tensor, torch.nn.Parameter)
_PLAIN_SET = frozenset(_PLAIN)
_F32_SET = frozenset([torch.float32])
_DTYPE, _IS_CPU = attrgetter("dtype"), attrgetter("is_cpu")
_IS_CONTIGUOUS, _NUMEL, _DATA_PTR = (torch.Tensor.is_contiguous, torch.Tensor.numel,
                                     torch.Tensor.data_ptr)


def f32_addresses(tensors: list, numels: list[int]) -> np.ndarray | None:
    """The tensors' addresses as a uint64 array when every one is exactly a `torch.Tensor` or
    `Parameter`, float32, on the CPU, contiguous, of ``numels[i]`` entries (`cpu.is_plain` and
    the length the C code reads); else None."""
    if len(tensors) != len(numels):
        return None
    # each check a C-level map over the tensors (this runs for a model's gradients at every
    # sampled step; a Python loop over them cost twice as much), the type first
    if not (set(map(type, tensors)) <= _PLAIN_SET and set(map(_DTYPE, tensors)) <= _F32_SET
            and all(map(_IS_CPU, tensors)) and all(map(_IS_CONTIGUOUS, tensors))
            and list(map(_NUMEL, tensors)) == numels):
        return None
    return np.array(list(map(_DATA_PTR, tensors)), dtype=np.uint64)


def steps_add_one(steps: list) -> list[int] | None:
    """Adds 1 to each step counter (float32 CPU scalars) in one C call and returns the new
    counts; None, with nothing done, when the library is not built or a counter is not a plain
    float32 CPU scalar (`f32_addresses`)."""
    if not steps or not available():
        return None
    counters = f32_addresses(steps, [1] * len(steps))
    return _add_one(counters) if counters is not None else None


def _add_one(counters: np.ndarray) -> list[int]:
    """Adds 1 to the float32 counters at ``counters`` (checked addresses) and returns them."""
    counts = np.empty(len(counters), dtype=np.float64)
    _lib.optiscope_steps_add_one(_ptr(counters), len(counters), _ptr(counts))
    return [int(s) for s in counts.tolist()]


class AddressCache:
    """`f32_addresses` for tensors that keep their storage from step to step (parameters, an
    optimizer's moments): the checks run again only when an address changes (a new tensor, or
    ``p.data`` replaced)."""

    def __init__(self, numels: list[int]):
        self.numels = numels
        self._pointers: list[int] | None = None
        self._addresses: np.ndarray | None = None

    def __call__(self, tensors: list) -> np.ndarray | None:
        try:
            pointers = list(map(_DATA_PTR, tensors))
        except (AttributeError, RuntimeError, TypeError):  # not a tensor, or without storage
            return None
        if pointers != self._pointers:
            self._addresses = f32_addresses(tensors, self.numels)
            if self._addresses is not None:
                kept(self._addresses)
            self._pointers = pointers if self._addresses is not None else None
        return self._addresses


# Arrays that live across steps (a plan's lengths, indices, scales; the cached addresses), with
# their address: ``a.ctypes.data`` costs about 2.5 us a call, and a sampled step made ~40.
_KEPT: dict[int, tuple[weakref.ref, int]] = {}


def kept(a: np.ndarray) -> np.ndarray:
    """Registers ``a`` (kept and not reallocated by its owner) so that its address is looked up,
    not computed, by the calls here; returns it."""
    key = id(a)
    _KEPT[key] = (weakref.ref(a, lambda _, k=key: _KEPT.pop(k, None)), a.ctypes.data)
    return a


def _ptr(a: np.ndarray) -> int:
    entry = _KEPT.get(id(a))
    if entry is not None and entry[0]() is a:
        return entry[1]
    return a.ctypes.data


def grad_sums(addresses: np.ndarray, numels: np.ndarray) -> np.ndarray:
    """``[n, 3]`` float64: Σg², max |g| over the finite entries, the non-finite count of each
    tensor (``numels``: int64 lengths)."""
    out = np.empty((len(numels), 3), dtype=np.float64)
    _lib.optiscope_many_grad_sums(_ptr(addresses), _ptr(numels), len(numels), _ptr(out))
    return out


def sq_sums(addresses: np.ndarray, numels: np.ndarray) -> np.ndarray:
    """Σx² of each tensor, float64."""
    out = np.empty(len(numels), dtype=np.float64)
    _lib.optiscope_many_sq_sums(_ptr(addresses), _ptr(numels), len(numels), _ptr(out))
    return out


def take(addresses: np.ndarray, index: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The sampled entries of each tensor end to end, float32 (``index``: int32 local indices
    end to end, each below its tensor's length; ``counts``: int64 per tensor)."""
    out = np.empty(len(index), dtype=np.float32)
    _lib.optiscope_many_take(_ptr(addresses), _ptr(index), _ptr(counts), len(counts), _ptr(out))
    return out


def topk(addresses: np.ndarray, of: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
         ks: np.ndarray, scratch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(kept, total) of each row: the sum of its ``ks[r]`` largest squares and of all of them,
    float64 (NaN for a row with a NaN); row r is ``lengths[r]`` entries of tensor ``of[r]`` from
    ``starts[r]`` (all int64, within the tensor); ``scratch``: float64, the longest row."""
    rows = len(of)
    kept = np.empty(rows, dtype=np.float64)
    total = np.empty(rows, dtype=np.float64)
    _lib.optiscope_many_topk(_ptr(addresses), _ptr(of), _ptr(starts), _ptr(lengths), _ptr(ks),
                             rows, _ptr(kept), _ptr(total), _ptr(scratch))
    return kept, total



class Rows:
    """Where the ``rows_*`` functions write: a C-contiguous float64 ``[n, stride]`` array (the
    monitor's rows) and the int64 row of each tensor of a set in it; column -1: not written."""

    def __init__(self, rows: np.ndarray, where: np.ndarray):
        if rows.dtype != np.float64 or rows.ndim != 2 or not rows.flags.c_contiguous:
            raise TypeError(f"optiscope.kernels.cpu_many.Rows: rows must be a C-contiguous "
                            f"float64 matrix, got {rows.dtype} {rows.shape}")
        if where.dtype != np.int64 or (len(where) and not 0 <= where.min() <= where.max()
                                       < rows.shape[0]):
            raise ValueError(f"optiscope.kernels.cpu_many.Rows: the tensors' rows must be int64 "
                             f"in [0, {rows.shape[0]}), got {where}")
        self.rows, self.where = rows, where
        self.address, self.stride = rows.ctypes.data, rows.shape[1]
        self._where = where.ctypes.data


def _one_each(name: str, addresses: np.ndarray, numels: np.ndarray, out: Rows,
              *more: np.ndarray) -> None:
    """One address, one length and one row (and one of each of ``more``) per tensor: the C walks
    index them all by the tensor's number."""
    n = len(numels)
    if len(addresses) != n or len(out.where) != n or any(len(m) != n for m in more):
        raise ValueError(f"optiscope.kernels.cpu_many.{name}: {n} tensors, but "
                         f"{len(addresses)} addresses, {len(out.where)} rows and "
                         f"{[len(m) for m in more]} per-tensor values")


def _cols(rows: Rows, *cols: int) -> list[int]:
    for c in cols:
        if not -1 <= c < rows.stride:
            raise ValueError(f"optiscope.kernels.cpu_many: column {c} outside the rows' "
                             f"{rows.stride}")
    return list(cols)


def rows_grad(addresses: np.ndarray, numels: np.ndarray, inv_scale: float | None, out: Rows,
              col_sq: int, col_max: int, col_bad: int) -> None:
    """`grad_sums` into ``out``: Σg², max |g| (inf after a non-finite entry), the non-finite
    count, the first two divided by the loss scale (``inv_scale``: 1 / scale, or None)."""
    _one_each("rows_grad", addresses, numels, out)
    _lib.optiscope_rows_grad(_ptr(addresses), _ptr(numels), len(numels), inv_scale is not None,
                             1.0 if inv_scale is None else inv_scale, out._where, out.address,
                             out.stride, *_cols(out, col_sq, col_max, col_bad))


def rows_sq(addresses: np.ndarray, numels: np.ndarray, out: Rows, col: int) -> None:
    """`sq_sums` into column ``col`` of ``out``."""
    _one_each("rows_sq", addresses, numels, out)
    _lib.optiscope_rows_sq(_ptr(addresses), _ptr(numels), len(numels), out._where, out.address,
                           out.stride, *_cols(out, col))


def rows_sample_sums(a: np.ndarray, b: np.ndarray | None, counts: np.ndarray,
                     scales: np.ndarray, out: Rows, col_diff: int, col_ref: int = -1) -> None:
    """Per tensor over its ``counts[k]`` sample entries (``a``, ``b``: float32, end to end), in
    double: ``col_diff`` gets scales[k]·Σ(a − b)² (Σa² when ``b`` is None), ``col_ref``
    scales[k]·Σb²."""
    _samples_of("rows_sample_sums", int(counts.sum()) if len(counts) else 0, a, b)
    if len(scales) != len(counts) or len(out.where) != len(counts):
        raise ValueError(f"optiscope.kernels.cpu_many.rows_sample_sums: {len(counts)} tensors, "
                         f"but {len(scales)} scales and {len(out.where)} rows")
    _lib.optiscope_rows_sample_sums(_ptr(a), _ptr(b) if b is not None else None, _ptr(counts),
                                    _ptr(scales), len(counts), out._where, out.address,
                                    out.stride, *_cols(out, col_diff, col_ref))


def _samples_of(name: str, total: int, *xs: np.ndarray | None) -> None:
    for x in xs:
        if x is not None and (x.dtype != np.float32 or x.shape != (total,)
                              or not x.flags.c_contiguous):
            raise TypeError(f"optiscope.kernels.cpu_many.{name}: samples must be {total} "
                            f"contiguous float32, got {x.dtype} {x.shape}")


class SampleSet:
    """A set of tensors' lengths and sampled entries for `sq_take`, checked once and kept with
    their addresses (a sampled step calls it for θ before and after and for v: each call's
    Python meets cold caches after the optimizer's step, where a lookup costs microseconds).

    Args:
        numels: int64, the tensors' lengths.
        index: int32, each tensor's sampled local indices, end to end.
        counts: int64, each tensor's number of them.
        scales: float64, each tensor's sample scale.
    """

    def __init__(self, numels: np.ndarray, index: np.ndarray, counts: np.ndarray,
                 scales: np.ndarray):
        n = len(numels)
        if (numels.dtype != np.int64 or index.dtype != np.int32 or counts.dtype != np.int64
                or scales.dtype != np.float64 or len(counts) != n or len(scales) != n):
            raise TypeError(f"optiscope.kernels.cpu_many.SampleSet: int64 lengths, int32 "
                            f"indices, int64 counts and float64 scales of {n} tensors, got "
                            f"{numels.dtype}, {index.dtype}, {counts.dtype} {counts.shape}, "
                            f"{scales.dtype} {scales.shape}")
        total = int(counts.sum()) if n else 0
        if total != len(index) or (counts < 0).any():
            raise ValueError(f"optiscope.kernels.cpu_many.SampleSet: {len(index)} sampled "
                             f"entries, but counts {counts}")
        if len(index) and ((index < 0).any() or (index >= np.repeat(numels, counts)).any()):
            raise ValueError("optiscope.kernels.cpu_many.SampleSet: a sampled index outside "
                             "its tensor")
        self.n, self.total = n, total
        self.numels, self.index, self.counts, self.scales = (
            np.ascontiguousarray(a) for a in (numels, index, counts, scales))
        self._args = tuple(a.ctypes.data for a in (self.numels, self.index, self.counts,
                                                    self.scales))
        self._cols: dict[tuple, np.ndarray] = {}

    def sq_take(self, addresses: np.ndarray, out: Rows, col_sq: int,
                ref1: np.ndarray | None = None, cols1: tuple[int, int] = (-1, -1),
                ref2: np.ndarray | None = None, cols2: tuple[int, int] = (-1, -1),
                sample: np.ndarray | None = None) -> np.ndarray:
        """`rows_sq` into ``col_sq`` (-1: none), `take` and `rows_sample_sums` of that sample
        against ``ref1`` into ``cols1`` (diff, ref) and ``ref2`` into ``cols2``, in one walk:
        the sample, float32 (written into ``sample`` when given; a reference may be ``sample``
        itself: a difference of 0 and the sample's own sum of squares). The same values as the
        separate calls, to the bit."""
        if sample is None:
            sample = np.empty(self.total, dtype=np.float32)
        _samples_of("SampleSet.sq_take", self.total, sample, ref1, ref2)
        if len(addresses) != self.n or addresses.dtype != np.uint64 or len(out.where) != self.n:
            raise ValueError(f"optiscope.kernels.cpu_many.SampleSet.sq_take: {self.n} tensors, "
                             f"got {len(addresses)} addresses and {len(out.where)} rows")
        key = (out.stride, col_sq, *cols1, *cols2)
        cols = self._cols.get(key)
        if cols is None:
            cols = self._cols[key] = np.array(_cols(out, *key[1:]), dtype=np.int64)
        numels, index, counts, scales = self._args
        _lib.optiscope_rows_sq_take(_ptr(addresses), numels, self.n, index, counts, scales,
                                    sample.ctypes.data, None if ref1 is None else _ptr(ref1),
                                    None if ref2 is None else _ptr(ref2), out._where,
                                    out.address, out.stride, cols.ctypes.data)
        return sample


def rows_sq_take(addresses: np.ndarray, numels: np.ndarray, out: Rows, col_sq: int,
                 index: np.ndarray, counts: np.ndarray, scales: np.ndarray,
                 *refs) -> np.ndarray:
    """`SampleSet.sq_take` of a set made for this call (``refs``: its optional arguments)."""
    return SampleSet(numels, index, counts, scales).sq_take(addresses, out, col_sq, *refs)


def rows_topk(addresses: np.ndarray, of: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
              ks: np.ndarray, scratch: np.ndarray, scales: np.ndarray, out: Rows,
              col_kept: int, col_total: int) -> None:
    """`topk` into ``out``: each tensor's rows (``of`` ascending) added in order, times
    ``scales[k]``."""
    _one_each("rows_topk", addresses, scales, out)
    _lib.optiscope_rows_topk(_ptr(addresses), _ptr(of), _ptr(starts), _ptr(lengths), _ptr(ks),
                             len(of), _ptr(scratch), _ptr(scales), len(scales), out._where,
                             out.address, out.stride, *_cols(out, col_kept, col_total))


def rows_grad_topk(addresses: np.ndarray, numels: np.ndarray, inv_scale: float | None,
                   of: np.ndarray, starts: np.ndarray, lengths: np.ndarray, ks: np.ndarray,
                   scratch: np.ndarray, scales: np.ndarray, out: Rows, cols: np.ndarray) -> None:
    """`rows_grad` and `rows_topk` of the same tensors in one walk (each tensor read once
    while in cache); ``cols``: int64, the columns of Σg², max |g|, the non-finite count, the
    kept and the total mass."""
    _one_each("rows_grad_topk", addresses, numels, out, scales)
    _cols(out, *cols.tolist())
    _lib.optiscope_rows_grad_topk(_ptr(addresses), _ptr(numels), len(numels),
                                  inv_scale is not None, 1.0 if inv_scale is None else inv_scale,
                                  _ptr(of), _ptr(starts), _ptr(lengths), _ptr(ks), len(of),
                                  _ptr(scratch), _ptr(scales), out._where, out.address,
                                  out.stride, _ptr(cols))


def adam_f32_many(params: list, grads: list, exp_avgs: list, exp_avg_sqs: list,
                  max_exp_avg_sqs: list | None, state_steps: list, *, lr: float, beta1: float,
                  beta2: float, eps: float, weight_decay: float, decoupled: bool, maximize: bool,
                  stats: "cpu.BlockSums | None" = None, ranges: np.ndarray | None = None) -> bool:
    """`cpu.adam_f32` on every tensor, in one C call: the same arithmetic, bit for bit.

    Returns False, having done nothing, unless every tensor of every role is a plain
    contiguous float32 CPU tensor of its parameter's length and every step counter a plain
    float32 CPU scalar (`f32_addresses`); the caller then steps them one by one.
    ``state_steps``: each tensor's step counter, incremented here (as torch.optim does before
    the update); ``stats``, ``ranges``: as `cpu.adam_f32`'s (``ranges``: a `cpu.range_buffer` of
    the tensors, row i for tensor i).
    """
    if not available() or not params:
        return False
    numels = [p.numel() for p in params]
    roles = [params, grads, exp_avgs, exp_avg_sqs]
    if max_exp_avg_sqs is not None:
        roles.append(max_exp_avg_sqs)
    addresses = []
    for role in roles:
        a = f32_addresses(role, numels)
        if a is None:
            return False
        addresses.append(a)
    counters = f32_addresses(state_steps, [1] * len(params))
    if counters is None:
        return False
    if max_exp_avg_sqs is None:
        addresses.append(addresses[3])  # not read without amsgrad
    if ranges is not None and (ranges.dtype != np.uint64 or ranges.shape != (len(params),
                                                                              *cpu.RANGE_SHAPE)
                               or not ranges.flags.c_contiguous):
        raise TypeError(f"optiscope.kernels.cpu_many.adam_f32_many: ranges must be a "
                        f"C-contiguous uint64 array of shape {(len(params), *cpu.RANGE_SHAPE)} "
                        f"(cpu.range_buffer), got {ranges.dtype} {ranges.shape}")
    steps = _add_one(counters)
    # The step's constants as `cpu.adam_f32` computes them, in double (Python's pow), then
    # rounded to float by numpy as ctypes rounds them there; once per distinct step.
    constants = {}
    for s in steps:
        if s not in constants:
            constants[s] = (-lr / (1.0 - beta1 ** s), (1.0 - beta2 ** s) ** 0.5)
    neg_step_size = np.array([constants[s][0] for s in steps], dtype=np.float32)
    bc2_sqrt = np.array([constants[s][1] for s in steps], dtype=np.float32)
    one_minus_b1 = 1.0 - beta1
    lerp_rest = 1.0 - ctypes.c_float(one_minus_b1).value
    n = np.array(numels, dtype=np.int64)
    rows = stats.row_offsets() if stats is not None else None
    _lib.optiscope_adam_f32_many(
        *(_ptr(a) for a in addresses), _ptr(n), len(params), 1.0 - lr * weight_decay,
        one_minus_b1, lerp_rest, beta2, 1.0 - beta2, eps, weight_decay, _ptr(neg_step_size),
        _ptr(bc2_sqrt), int(decoupled), int(max_exp_avg_sqs is not None), int(maximize),
        stats.array.ctypes.data if stats is not None else None,
        _ptr(rows) if rows is not None else None,
        _ptr(ranges) if ranges is not None and stats is not None else None,
        int(np.prod(cpu.RANGE_SHAPE)), cpu.range_cuts_pointer(), torch.get_num_threads())
    return True
