"""The suite's Triton interpreter computes a kernel's scalar arithmetic as compiled code does.

Compiled, a Python float argument is a float32 scalar; the interpreter, left alone, keeps it a
Python float and computes in float64 (tests/conftest.py: `_interpret_float_arguments_as_float32`).
Oracle: numpy's float32 arithmetic on the same values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import requires_triton

pytestmark = requires_triton


def _one_minus_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def one_minus(out_ptr, beta):
        tl.store(out_ptr, 1.0 - beta)

    return one_minus


@pytest.mark.parametrize("beta", [0.999, 0.9, 0.95, 1 - 1e-6])
def test_a_float_argument_is_float32_in_the_kernel(beta):
    out = torch.zeros(1, dtype=torch.float32)
    _one_minus_kernel()[(1,)](out, beta)
    expected = np.float32(1.0) - np.float32(beta)  # fl32(1 - fl32(beta)), not fl32(1 - beta)
    assert out.item() == float(expected)
    if beta == 0.999:  # the case that made Adam's v differ on the GPU
        assert out.item() != float(np.float32(1 - beta))
