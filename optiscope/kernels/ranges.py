"""The dynamic-range counts a sampled step takes of g, θ⁺ − θ⁻ and v: their layout, shared by
the kernels that fill them in their pass (the C kernels of Adam and MicroAdam, cpu_kernels.c's
`range_count`; the Triton kernels of Adam, MicroAdam and Adafactor: `range_cuts`,
`range_levels`, `store_levels`), the steps made of torch ops that count by an extra pass
(kernels/whole_ranges.py, `counts_of`), the monitor (monitor/ranges.py), and the torch
reference computation.

Per quantity, one block of `RANGE_BLOCK` counts: the entries counted; for each (format, what) of
`RANGE_SHARES` the entries a cast to that format flushes to zero (nonzero → 0) or overflows; a
histogram of log2|x| in `HIST_BINS` fixed bins: 0, then 0 < |x| < 2^EXP_MIN, one bin
[2^e, 2^(e+1)) per exponent e in EXP_MIN..EXP_MAX-1, then finite |x| >= 2^EXP_MAX, then
non-finite. The bins are the same for every run, so runs compare and shards add.

The bin comes from the float's exponent (``frexp``), exactly, not from a rounded log. The shares
are exact comparisons with the thresholds round-to-nearest-even implies: a nonzero |x| at most
half the format's smallest subnormal becomes 0 (the tie goes to the even 0); a finite |x| at or
above the midpoint between the largest finite value and the next power step becomes inf (fp16
65520, e5m2 61440). e4m3fn has no inf and torch's cast saturates (1e30 and even inf become 448):
there an overflow is an |x| above 464, which the cast returns as ±448 with more than half an ulp
of error. bf16 overflows only above 3.396e38, within 0.2 % of float32's largest value, where
the run has already failed: that pair is left out.
"""

from __future__ import annotations

import struct

import torch
from torch import Tensor

__all__ = ["RANGE_QUANTITIES", "RANGE_SHARES", "EXP_MIN", "EXP_MAX", "HIST_BINS", "RANGE_BLOCK",
           "FORMAT_LIMITS", "range_counts", "range_cuts", "range_levels", "store_levels",
           "counts_of", "kernel_counters"]

RANGE_QUANTITIES = ("grad", "update", "moment2")  # g, θ⁺ − θ⁻, v
RANGE_SHARES = tuple((f, k) for f in ("bf16", "fp16", "fp8e4m3", "fp8e5m2")
                     for k in ("underflow", "overflow") if (f, k) != ("bf16", "overflow"))
# 2^-112 is below v of a 1e-17 gradient, 2^32 above any sane gradient
EXP_MIN, EXP_MAX = -112, 32
HIST_BINS = EXP_MAX - EXP_MIN + 4
RANGE_BLOCK = 1 + len(RANGE_SHARES) + HIST_BINS

# (largest |x| that becomes 0, smallest |x| that overflows) of a cast from float32
FORMAT_LIMITS: dict[str, tuple[float, float]] = {
    "bf16": (2.0 ** -134, 255.5 * 2.0 ** 120),
    "fp16": (2.0 ** -25, 65520.0),
    "fp8e4m3": (2.0 ** -10, float.fromhex("0x1.d00002p+8")),  # the next float32 above 464
    "fp8e5m2": (2.0 ** -17, 61440.0),
}


def _bits(x: float) -> int:
    """The float32 bit pattern of x (nonnegative), as an int: for |x| its order is x's."""
    return struct.unpack("<i", struct.pack("<f", x))[0]


# Every share is a count of |x| in a range of bit patterns, and the ranges nest: the patterns are
# cut at each format's thresholds into levels (one `bucketize`), and each share is a sum of
# levels (`_SHARE_OF_LEVEL`). Level 0: zero; the last: non-finite.
_CUTS = sorted({0, _bits(3.4028234663852886e38)}
               | {_bits(FORMAT_LIMITS[f][0]) for f, what in RANGE_SHARES if what == "underflow"}
               | {_bits(FORMAT_LIMITS[f][1]) - 1 for f, what in RANGE_SHARES if what == "overflow"})
_LEVELS = len(_CUTS) + 1
_SHARE_OF_LEVEL = torch.zeros(_LEVELS, len(RANGE_SHARES), dtype=torch.float64)
for _j, (_fmt, _what) in enumerate(RANGE_SHARES):
    _under, _over = FORMAT_LIMITS[_fmt]
    for _level in range(1, _LEVELS - 1):  # level k: _CUTS[k-1] < bits <= _CUTS[k]
        if (_what == "underflow" and _CUTS[_level] <= _bits(_under)) or (
                _what == "overflow" and _CUTS[_level - 1] >= _bits(_over) - 1):
            _SHARE_OF_LEVEL[_level, _j] = 1.0


def range_cuts() -> list[int]:
    """The thresholds of the share counts, as ascending bit patterns of |x| (float32): a
    kernel that counts, for each, the entries whose |x| bits exceed it has every share
    (`range_levels`)."""
    return list(_CUTS)


def range_levels(fields: Tensor, above: Tensor, scale: Tensor | None = None) -> Tensor:
    """`range_counts`' layout from a kernel's whole-tensor counts (the C and Triton kernels):
    per tensor ``fields`` ``[n, 256]``, the histogram of |x|'s biased float32 exponent, and ``above``
    ``[n, len(range_cuts())]``, how many |x| exceed each threshold; float64 ``[n, RANGE_BLOCK]``
    (times ``scale`` per tensor, if given)."""
    fields, above = fields.to(torch.float64), above.to(torch.float64)
    entries = fields.sum(dim=1)
    # level k: cuts[k-1] < bits <= cuts[k]; the first level (bits <= 0) is zero
    level = torch.cat([(entries - above[:, 0])[:, None], above[:, :-1] - above[:, 1:],
                       above[:, -1:]], dim=1)
    shares = level @ _SHARE_OF_LEVEL.to(level.device)
    zeros = level[:, 0]
    # the bin of each exponent field, as range_counts bins |x|: field 0 (zeros and subnormals)
    # into bin 1, the zeros moved to bin 0 below; field 255 (inf, NaN) the last bin
    bins = torch.clamp(torch.arange(256, device=fields.device) - (127 + EXP_MIN - 2), 1,
                       HIST_BINS - 2)
    bins[255] = HIST_BINS - 1
    hist = torch.zeros(fields.shape[0], HIST_BINS, dtype=torch.float64, device=fields.device)
    hist.index_add_(1, bins, fields)
    hist[:, 1] -= zeros
    hist[:, 0] = zeros
    out = torch.cat([entries[:, None], shares, hist], dim=1)
    return out if scale is None else out * scale.to(torch.float64)[:, None]


def range_counts(x: Tensor, lengths: Tensor, scale: Tensor) -> Tensor:
    """The counts of one quantity for each tensor of a concatenated sample.

    One integer code per entry (tensor, exponent bin, threshold level) and one count of the
    codes: about 15 elementwise operations whatever the number of tensors.

    Args:
        x: the sampled entries of every tensor, concatenated (float32).
        lengths: int64 ``[n]``, entries of each tensor in ``x``.
        scale: ``[n]``, each tensor's numel / sampled entries.

    Returns:
        float64 ``[n, RANGE_BLOCK]``: entries, share counts, histogram (the block's order).
    """
    n = lengths.numel()
    device = x.device
    bits = x.to(torch.float32).contiguous().view(torch.int32) & 0x7FFFFFFF  # |x|, as bits
    field = bits >> 23  # the biased exponent: |x| in [2^e, 2^(e+1)) for e = field - 127
    index = torch.clamp(field - (127 + EXP_MIN - 2), 1, HIST_BINS - 2)  # subnormals: below
    index = torch.where(bits == 0, 0, torch.where(field == 255, HIST_BINS - 1, index))
    cuts = torch.tensor(_CUTS, dtype=torch.int32, device=device)
    level = torch.bucketize(bits, cuts)
    seg = torch.repeat_interleave(torch.arange(n, device=device), lengths, output_size=x.numel())
    code = (seg * HIST_BINS + index) * _LEVELS + level
    size = n * HIST_BINS * _LEVELS
    if device.type == "cpu":  # bincount reads the largest code back to the host: CPU only
        counts = torch.bincount(code, minlength=size)
    else:
        counts = torch.zeros(size, dtype=torch.int64, device=device).index_add_(
            0, code, torch.ones_like(code))
    table = counts.view(n, HIST_BINS, _LEVELS).to(torch.float64)
    shares = table.sum(dim=1) @ _SHARE_OF_LEVEL.to(device)
    out = torch.cat([lengths.to(torch.float64)[:, None], shares, table.sum(dim=2)], 1)
    return out * scale.to(device, torch.float64)[:, None]


def kernel_counters(n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """For a kernel that counts in its pass: the thresholds (`range_cuts`, int32) it compares
    |x|'s bits with, and zeroed int64 counters ``[n, len(RANGE_QUANTITIES), 256 +
    len(range_cuts())]`` it adds each tensor's counts to (`store_levels` reads them)."""
    return (torch.tensor(_CUTS, dtype=torch.int32, device=device),
            torch.zeros((n, len(RANGE_QUANTITIES), 256 + len(_CUTS)), dtype=torch.int64,
                        device=device))


def store_levels(ranges: Tensor, rows: Tensor, counts: Tensor) -> None:
    """Writes a kernel's whole-tensor counts into ``ranges`` (`StatsRows.ranges`) at ``rows``:
    ``counts`` ``[n, len(RANGE_QUANTITIES), 256 + len(range_cuts())]`` integers, per quantity
    the exponent fields, then the entries above each threshold (the C and Triton kernels'
    layout), turned into `range_counts`' by `range_levels`."""
    rows = rows.to(ranges.device, torch.long)
    for q in range(counts.shape[1]):
        ranges[rows, q] = range_levels(counts[:, q, :256], counts[:, q, 256:]).to(ranges.device)


# Entries counted per call in `counts_of`: its scratch (the bits, the levels) stays at 12 MiB
# whatever the tensor.
_CHUNK = 1 << 20


def counts_of(x: Tensor) -> Tensor:
    """Every entry of ``x`` (any float dtype, 1-D) counted as the kernels count: int64 ``[256 +
    len(range_cuts())]`` on its device, the exponent fields' histogram, then the entries above
    each threshold (`range_levels` turns them into `range_counts`' layout). Torch ops over
    chunks of `_CHUNK` entries; a few times faster than `range_counts`' per-entry codes, which
    only a concatenated sample of many tensors needs."""
    device = x.device
    cuts = torch.tensor(_CUTS, dtype=torch.int32, device=device)
    fields = torch.zeros(256, dtype=torch.int64, device=device)
    levels = torch.zeros(_LEVELS, dtype=torch.int64, device=device)
    for start in range(0, x.numel(), _CHUNK):
        bits = x[start:start + _CHUNK].float().contiguous().view(torch.int32) & 0x7FFFFFFF
        level = torch.bucketize(bits, cuts)  # cuts[k-1] < bits <= cuts[k]
        if device.type == "cpu":  # bincount reads the largest value back: CPU only
            fields += torch.bincount(bits >> 23, minlength=256)
            levels += torch.bincount(level, minlength=_LEVELS)
        else:
            one = torch.ones_like(level, dtype=torch.int64)
            fields.index_add_(0, (bits >> 23).long(), one)
            levels.index_add_(0, level.long(), one)
    above = levels.flip(0).cumsum(0).flip(0)[1:]  # above cut j: level > j
    return torch.cat([fields, above])
