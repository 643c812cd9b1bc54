"""Test setup: Triton kernels run under the Triton interpreter on CPU unless told otherwise.

``TRITON_INTERPRET`` must be set before Triton is first imported, so it is set here, before
anything imports torch. On a GPU machine run ``OPTISCOPE_TEST_DEVICE=cuda pytest -m gpu`` to
compile the kernels for real.
"""

import os

if os.environ.get("OPTISCOPE_TEST_DEVICE", "cpu") != "cuda":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from optiscope.kernels.backend import triton_available  # noqa: E402

requires_triton = pytest.mark.skipif(not triton_available(), reason="triton is not importable")


def _interpret_float_arguments_as_float32() -> None:
    """Makes the interpreter pass a Python float argument to a kernel as the compiler does: a
    float32 scalar. Left to itself it keeps the Python float, so scalar arithmetic in a kernel
    (``1.0 - beta2``) runs in float64 on CPU and in float32 on a GPU, and a kernel can pass every
    interpreted test and differ from torch.optim on the GPU: the first GPU run found Adam's
    second moment off by 1.3e-5 of itself that way (fp32 1 - fp32 0.999)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    convert = interpreter._implicit_cvt

    def as_compiled(arg):
        if isinstance(arg, float):
            handle = interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32)
            return tl.tensor(handle, tl.float32)
        return convert(arg)

    interpreter._implicit_cvt = as_compiled


if os.environ.get("TRITON_INTERPRET") == "1" and triton_available():
    _interpret_float_arguments_as_float32()


def run_inspect(out, *args: str, first_on_path: str | None = None) -> tuple:
    """`optiscope.kernels.inspect` as a user runs it (a subprocess, without the interpreter this
    file turns on) with ``--json out`` and ``args``; ``first_on_path`` goes before everything on
    its path (another Triton). Returns the process and its results."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([p for p in (first_on_path, str(root)) if p]
                                        + [env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "optiscope.kernels.inspect", *args, "--json",
                           str(out)], cwd=root, env=env, capture_output=True, text=True,
                          timeout=1800)
    assert out.exists(), f"the tool wrote no results:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc, json.loads(out.read_text())


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["c-kernel", "torch-fused"])
def cpu_path(request, monkeypatch):
    """Runs a test through both CPU paths of the torch backend: optiscope's one-pass C kernel
    and, as on a machine without a C compiler, torch's fused kernel plus torch reductions."""
    from optiscope.kernels import cpu

    if request.param == "torch-fused":
        monkeypatch.setattr(cpu, "kernel", lambda: None)
        monkeypatch.setattr("optiscope.optimizers.adam.kernel", lambda: None)
    elif cpu.kernel() is None:
        pytest.skip("no C compiler: the one-pass CPU kernel is not available here")
    return request.param
