"""Every C function the package calls is declared to ctypes with the C prototype's arguments."""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import pytest

import torch

from optiscope.kernels import cpu, cpu_many, whole_ranges

SOURCES = sorted(Path(cpu.__file__).parent.glob("*.c"))
_PROTOTYPE = re.compile(r"^(?:void|int|int64_t|double)\s+(optiscope_\w+)\(([^)]*)\)\s*\{",
                        re.MULTILINE)


def _kind(param: str):
    if "*" in param:
        return ctypes.c_void_p
    for word, kind in (("int64_t", ctypes.c_int64), ("uint64_t", ctypes.c_uint64),
                       ("double", ctypes.c_double), ("float", ctypes.c_float),
                       ("int", ctypes.c_int)):
        if re.search(rf"\b{word}\b", param):
            return kind
    raise AssertionError(f"unknown C parameter type: {param!r}")


def prototypes() -> dict[str, list]:
    return {name: [_kind(p) for p in params.split(",") if p.strip() not in ("", "void")]
            for source in SOURCES for name, params in _PROTOTYPE.findall(source.read_text())}


@pytest.mark.skipif(not cpu_many.available(), reason="no C compiler here")
def test_every_declared_c_function_has_its_prototypes_arguments():
    """ctypes passes what argtypes says: one argument too few there and a 64-bit address goes
    through as a C int (it worked while the heap lay below 2 GiB, and crashed the monitor's
    sampled step once it did not)."""
    whole_ranges.whole_counts([torch.ones(3)])  # declares its function on first use
    # the handles that declare functions: cpu.py's (the loaded library) and cpu_many's (the one it
    # loaded first: another test may have made cpu.py load the library again)
    libs = [cpu.kernel(), cpu_many._lib]
    found = prototypes()
    assert len(found) >= 25, "the prototype pattern no longer matches the C sources"
    declared = set()
    for name, kinds in found.items():
        for lib in libs:
            argtypes = getattr(lib, name).argtypes
            if argtypes is None:
                continue
            declared.add(name)
            normal = [ctypes.c_void_p if a in (ctypes.c_void_p, ctypes.c_char_p) else a
                      for a in argtypes]
            assert normal == kinds, f"{name}: ctypes {argtypes}, C {kinds}"
    assert set(cpu_many._SIGNATURES) <= declared
    assert "optiscope_adam_f32" in declared and "optiscope_range_count_f32" in declared
