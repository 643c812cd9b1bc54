"""Assertion helpers that say how many entries differ and where, not only "not close"; float64
oracles that several test files share."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def assert_close(actual: Tensor, expected: Tensor, *, rtol: float, atol: float, what: str = "") -> None:
    """Fails with the count of mismatching entries, the worst one and its index."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    same = (a.isnan() & e.isnan()) | (a == e)  # equal infinities, and NaN against NaN
    diff = (a - e).abs()
    bad = ~same & ~(diff <= atol + rtol * e.abs())
    if bad.any():
        n = int(bad.sum())
        excess = torch.where(bad, diff - rtol * e.abs(), torch.zeros_like(diff))
        worst = int(excess.flatten().argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape)) if a.dim() else ()
        raise AssertionError(
            f"{what}: {n} of {a.numel()} entries differ beyond rtol={rtol}, atol={atol}; worst at "
            f"{idx}: actual {a.flatten()[worst].item()!r}, expected {e.flatten()[worst].item()!r}")


def assert_equal(actual: Tensor, expected: Tensor, what: str = "") -> None:
    """Bit-for-bit equality, with the same report as `assert_close`."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert_close(actual, expected, rtol=0.0, atol=0.0, what=what)


# Per-dtype tolerances for one step's result, and for trajectories compared step by step.
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-7),
    torch.float64: dict(rtol=1e-12, atol=1e-14),
    # One rounding of a float32 result to the storage dtype can land one ulp apart.
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=1e-6),
}


def topk_mass(g: Tensor, density: float, block: int) -> tuple[float, float]:
    """(kept, total) squared mass of the monitor's blockwise top-k of the whole tensor ``g``, in
    float64: per block of ``block`` entries the ⌈density·size⌉ largest g² are kept."""
    flat = g.double().reshape(-1).square()
    kept = total = 0.0
    for start in range(0, flat.numel(), block):
        chunk = flat[start:start + block]
        kept += float(chunk.sort(descending=True).values[:math.ceil(density * chunk.numel())].sum())
        total += float(chunk.sum())
    return kept, total
