"""Every kernel variant compiles without a spill, and Adam's kernels keep their wide loads and
their registers, on an older Triton than the one installed: ``OPTISCOPE_OLDER_TRITON`` names a
directory holding one (``pip install --target DIR triton==3.6.0``, the Triton of torch 2.11's
CUDA builds; `.ci/run` makes it), put first on the path of `optiscope.kernels.inspect` run as a
subprocess. Triton 3.3-3.6 drop a pointer hint that 3.9 keeps (`chunked.role_ptr`) and allocate
registers differently (MicroAdam with the range counts spilled there and not on 3.9), which the
tests of the installed Triton cannot see."""

from __future__ import annotations

import os

import pytest

from conftest import requires_triton, run_inspect

OLDER = os.environ.get("OPTISCOPE_OLDER_TRITON")


@requires_triton
@pytest.mark.slow
@pytest.mark.skipif(not OLDER, reason="OPTISCOPE_OLDER_TRITON names no directory with an older "
                    "Triton (pip install --target DIR triton==3.6.0)")
def test_every_variant_compiles_without_spills_and_adam_loads_16_bytes_on_an_older_triton(
        tmp_path):
    import triton

    _, results = run_inspect(tmp_path / "kernels.json", "--arch", "80,90", first_on_path=OLDER)
    assert results["triton"] != triton.__version__, "the older Triton was not the one imported"
    every = results["kernels"]
    assert {r["arch"] for r in every} == {80, 90}
    assert {"_adam_kernel", "_microadam_kernel", "_update_rms_kernel", "_apply_kernel",
            "_pack_signs_kernel", "_sums_kernel", "_gather_kernel"} <= {r["kernel"] for r in every}
    errors = [f"{r['case']} sm_{r['arch']}: {r['error'][:300]}" for r in every if "error" in r]
    assert not errors, "\n".join(errors)
    spills = [f"{r['kernel']} {r['case']} sm_{r['arch']}: {r['stack_bytes']} B stack"
              for r in every if r["spills"]]
    assert not spills, "\n".join(spills)  # MicroAdam +ranges, 32-56 B, before its int32 offsets
    kernels = [r for r in every if r["kernel"] == "_adam_kernel"]
    aligned = [r for r in kernels if "misaligned" not in r["case"]]
    fp32 = [r for r in aligned if "-fp32" in r["case"]]
    assert len(fp32) >= 20
    for r in fp32:  # with Triton 3.6.0 before the hint moved into role_ptr: none
        assert r["global"]["LDG"].get("128", 0) >= 4, (r["case"], r["arch"], r["global"])
    for r in aligned:
        if "-bf16" in r["case"]:
            assert max(int(w) for w in r["global"]["LDG"]) >= 64, (r["case"], r["arch"])
        if "+stats" in r["case"]:
            assert r["registers"] <= 128, (r["case"], r["arch"], r["registers"])
