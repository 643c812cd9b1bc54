"""What the sdist and the wheel carry: the sdist's own tests collect (conftest.py and the helper
modules ship), the README's image and the licence ship, the wheel carries the licence and the C
sources; the licence is declared as an SPDX expression; triton is an extra, not a dependency."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What a build reads; copied so that building leaves nothing (egg-info, build/) in the checkout.
SOURCES = ["pyproject.toml", "MANIFEST.in", "LICENSE", "README.md", "optiscope", "tests", "docs",
           "benchmarks", ".ci"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} predates SPDX license strings (77)")
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        elif path.exists():
            shutil.copy2(path, src / name)
    # (setuptools rewrites sys.argv while it builds: the output directory is read first)
    code = ("import sys; from setuptools import build_meta as b; "
            "out = sys.argv[1]; s = b.build_sdist(out); w = b.build_wheel(out); print('BUILT', s, w)")
    done = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    sdist, wheel = next(line for line in done.stdout.splitlines()
                        if line.startswith("BUILT ")).split()[1:]
    return out / sdist, out / wheel


@pytest.mark.slow
def test_the_sdist_carries_its_tests_helpers_docs_and_licence(built):
    sdist, _ = built
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    tests = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").glob("*.py")}
    assert tests <= names, f"missing from the sdist: {sorted(tests - names)}"
    for needed in ("LICENSE", "README.md", "docs/dashboard.svg", "tests/conftest.py",
                   "optiscope/kernels/cpu_kernels.c", "optiscope/kernels/cpu_microadam.c"):
        assert needed in names, needed
    assert not any("__pycache__" in n for n in names)


@pytest.mark.slow
def test_the_wheel_carries_the_licence_and_declares_it(built):
    _, wheel = built
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
        metadata = next(whl.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "optiscope/kernels/cpu_kernels.c" in names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist: triton")]
    assert requires and all('extra == "triton"' in r or 'extra == "test"' in r for r in requires), \
        "triton is optional: the `triton` extra (and the test extra)"


def test_the_licence_is_the_apache_2_0_text():
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n                           Version 2.0, January 2004")
    assert "END OF TERMS AND CONDITIONS" in text
