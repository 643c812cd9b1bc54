"""The dynamic-range counts a sampled step takes of g, θ⁺ − θ⁻ and v: their layout, shared by
the kernels that fill them in their pass (cpu_adam.c) and the monitor (monitor/ranges.py), and
the torch reference computation.

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

import torch
from torch import Tensor

__all__ = ["RANGE_QUANTITIES", "RANGE_SHARES", "EXP_MIN", "EXP_MAX", "HIST_BINS", "RANGE_BLOCK",
           "FORMAT_LIMITS", "range_counts"]

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


def range_counts(x: Tensor, lengths: Tensor, scale: Tensor) -> Tensor:
    """The counts of one quantity for each tensor of a concatenated sample.

    Args:
        x: the sampled entries of every tensor, concatenated (float32).
        lengths: int64 ``[n]``, entries of each tensor in ``x``.
        scale: ``[n]``, each tensor's numel / sampled entries.

    Returns:
        float64 ``[n, 1 + len(RANGE_SHARES) + HIST_BINS]``: entries, share counts, histogram,
        in the order of `range_cols`' block.
    """
    n = lengths.numel()
    device = x.device
    x = x.to(torch.float32)
    seg = torch.repeat_interleave(torch.arange(n, device=device), lengths, output_size=x.numel())
    a = x.abs()
    finite = a <= torch.finfo(torch.float32).max
    exponent = torch.frexp(a).exponent - 1  # |x| in [2^e, 2^(e+1)): exact, unlike log2
    index = torch.clamp(exponent - (EXP_MIN - 2), 1, HIST_BINS - 2)
    index = torch.where(a == 0, 0, torch.where(finite, index, HIST_BINS - 1))
    # index_add_, not bincount: bincount reads the largest index back to the host
    hist = torch.zeros(n * HIST_BINS, dtype=torch.float64, device=device)
    hist.index_add_(0, seg * HIST_BINS + index, torch.ones_like(a, dtype=torch.float64))
    masks = []
    for fmt, what in RANGE_SHARES:
        under, over = FORMAT_LIMITS[fmt]
        masks.append((a > 0) & (a <= under) if what == "underflow" else finite & (a >= over))
    shares = torch.zeros(n, len(RANGE_SHARES), dtype=torch.float64, device=device)
    shares.index_add_(0, seg, torch.stack(masks, dim=1).to(torch.float64))
    counts = torch.cat([lengths.to(torch.float64)[:, None], shares, hist.view(n, HIST_BINS)], 1)
    return counts * scale.to(device, torch.float64)[:, None]
