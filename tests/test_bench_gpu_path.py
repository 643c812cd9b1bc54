"""benchmarks/monitor_gpu_path.py: the monitor's ops and launches per sampled step on the GPU's
code path, counted on a CPU. One block of GPT-2 at width 160 (four tensors above the flat
limit); oracle: the count of such tensors, each of which costs torch norms of its own without
the kernels."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import requires_triton

ROOT = Path(__file__).resolve().parent.parent


@requires_triton
@pytest.mark.slow
def test_the_kernels_take_the_per_tensor_ops(tmp_path):
    # its own process: the script turns the C kernels off for good
    proc = subprocess.run([sys.executable, "-m", "benchmarks.monitor_gpu_path", "--d-model",
                           "160", "--layers", "1", "--optimizers", "foreign", "--output",
                           str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "monitor-gpu-path.json").read_text())
    off, on = ({r["kernels"]: r for r in doc["rows"]}[k] for k in ("off", "on"))
    from optiscope.bench.cases import gpt2_shapes

    large = [s for s in gpt2_shapes(n_layer=1, d_model=160, vocab=1024, n_ctx=64)
             if s[0] * (s[1] if len(s) > 1 else 1) > 65_536]
    assert doc["large_tensors"] == len(large) == 4  # the embedding, c_attn, c_fc, mlp c_proj
    assert on["launches"]["sums"] >= 1 and on["launches"]["gather"] >= 1
    assert not off["launches"]
    # without the kernels each large tensor costs its own norms (g, theta before/after, m, v)
    assert off["op_counts"].get("linalg_vector_norm", 0) >= 5 * doc["large_tensors"]
    assert on["op_counts"].get("linalg_vector_norm", 0) == 0
    assert on["ops"] < off["ops"]


@requires_triton
def test_host_step_times_the_python_before_the_launch_not_the_kernels(tmp_path):
    """benchmarks/host_step.py: every Triton kernel of Adam and Adafactor is stubbed, so a step
    is the host's Python only (the interpreter would take minutes for these steps), and the
    child measured this checkout's optiscope (it raises otherwise)."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.host_step", "--tensors", "148",
                           "--steps", "3", "--rounds", "1", "--output", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "host-step.json").read_text())
    rows = {(r["optimizer"], r["statistics"]): r["us_per_step"] for r in doc["rows"]}
    assert set(rows) == {(o, s) for o in ("AdamW", "Adafactor") for s in (False, True)}
    # a stubbed step is host work: well under 50 ms even on a loaded 2-core machine (an
    # interpreted launch of GPT-2's 148 tensors takes seconds)
    assert all(0 < us < 50_000 for us in rows.values()), rows
