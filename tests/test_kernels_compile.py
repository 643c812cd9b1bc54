"""Every Triton kernel variant the optimizers launch compiles for sm_80 and sm_90, without spills,
with the load widths and registers the kernels were tuned for: `optiscope.kernels.inspect`,
run as a user would (a subprocess without the interpreter that conftest.py turns on)."""

from __future__ import annotations

import os

import pytest

from conftest import requires_triton, run_inspect


def test_occupancy_from_registers_shared_memory_and_warps():
    from optiscope.kernels.inspect import occupancy

    # 168 registers x 128 threads: 21,504 of 65,536 per block -> 3 blocks, 12 warps
    assert occupancy(168, 1040, 4, 90) == {"blocks_per_sm": 3, "warps_per_sm": 12,
                                           "limited_by": "registers"}
    # 255 registers at 8 warps fill the register file with one block
    assert occupancy(255, 17408, 8, 80)["blocks_per_sm"] == 1
    # 32 registers: the 64-warp limit binds, not registers
    assert occupancy(32, 0, 4, 90) == {"blocks_per_sm": 16, "warps_per_sm": 64,
                                       "limited_by": "warps"}
    # 100 KiB of shared memory per block: 2 blocks on sm_90 (228 KiB), 1 on sm_80 (164 KiB)
    assert occupancy(32, 100 * 1024, 4, 90)["blocks_per_sm"] == 2
    assert occupancy(32, 100 * 1024, 4, 80)["limited_by"] == "shared memory"


def test_sass_load_and_store_widths():
    from optiscope.kernels.inspect import sass_widths

    sass = """
        /*0100*/  LDG.E.128 R4, desc[UR6][R2.64] ;
        /*0110*/  LDG.E.128.CONSTANT R8, desc[UR6][R2.64+0x10] ;
        /*0120*/  LDG.E.64 R10, desc[UR6][R6.64] ;
        /*0130*/  @P0 LDG.E R12, desc[UR6][R6.64] ;
        /*0140*/  LDG.E.U16 R13, desc[UR6][R6.64] ;
        /*0150*/  STG.E.128 desc[UR6][R2.64], R4 ;
        /*0160*/  STG.E.U8 desc[UR6][R2.64], R4 ;
    """
    assert sass_widths(sass) == {"LDG": {128: 2, 64: 1, 32: 1, 16: 1}, "STG": {128: 1, 8: 1}}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    cuobjdump = None
    try:
        from optiscope.kernels.inspect import _tool

        cuobjdump = _tool("cuobjdump")
    except ImportError:
        pass
    if cuobjdump is None or not os.path.exists(cuobjdump):
        pytest.skip("this Triton ships no cuobjdump")
    return run_inspect(tmp_path_factory.mktemp("inspect") / "kernels.json", "--arch", "80,90")


@requires_triton
@pytest.mark.slow
def test_every_launched_variant_compiles_without_spills(compiled):
    proc, results = compiled
    kernels = results["kernels"]
    assert {r["arch"] for r in kernels} == {80, 90}
    names = {r["kernel"] for r in kernels}
    assert {"_adam_kernel", "_microadam_kernel", "_update_rms_kernel", "_apply_kernel",
            "_row_col_sums_kernel", "_col_finalize_kernel", "_pack_signs_kernel"} <= names
    errors = [f"{r['case']} sm_{r['arch']}: {r['error'][:300]}" for r in kernels if "error" in r]
    assert not errors, "\n".join(errors)
    spills = [f"{r['kernel']} {r['case']} sm_{r['arch']}: {r['stack_bytes']} B stack"
              for r in kernels if r["spills"]]
    assert not spills, "\n".join(spills)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _adam(kernels, *, dtype, stats=None, misaligned=False):
    rows = [r for r in kernels if r["kernel"] == "_adam_kernel" and f"-{dtype}" in r["case"]
            and ("misaligned" in r["case"]) == misaligned
            and (stats is None or ("+stats" in r["case"]) == stats)]
    assert rows
    return rows


@requires_triton
@pytest.mark.slow
def test_adam_moves_data_in_wide_loads_on_the_aligned_path(compiled):
    kernels = compiled[1]["kernels"]
    for r in _adam(kernels, dtype="fp32"):
        assert r["global"]["LDG"].get("128", 0) >= 4, (r["case"], r["arch"], r["global"])
        assert r["global"]["STG"].get("128", 0) >= 3, (r["case"], r["arch"], r["global"])
    for r in _adam(kernels, dtype="bf16"):
        assert max(int(w) for w in r["global"]["LDG"]) >= 64, (r["case"], r["arch"])
    for r in _adam(kernels, dtype="fp32", misaligned=True):  # the scalar path stays scalar
        assert "128" not in r["global"]["LDG"], (r["case"], r["arch"])


@requires_triton
@pytest.mark.slow
def test_adam_statistics_variants_fit_in_128_registers(compiled):
    kernels = compiled[1]["kernels"]
    for dtype in ("fp32", "bf16", "fp16"):
        for r in _adam(kernels, dtype=dtype, stats=True) + _adam(kernels, dtype=dtype, stats=True,
                                                                  misaligned=dtype != "fp16"):
            assert r["registers"] <= 128, (r["case"], r["arch"], r["registers"])


@requires_triton
@pytest.mark.slow
def test_microadam_launches_as_many_programs_as_are_resident(compiled):
    from optiscope.kernels.microadam import RESIDENT_PER_SM

    kernels = compiled[1]["kernels"]
    for arch in (80, 90):
        resident = {r["blocks_per_sm"] for r in kernels
                    if r["kernel"] == "_microadam_kernel" and r["arch"] == arch}
        assert min(resident) == RESIDENT_PER_SM, (arch, resident)
