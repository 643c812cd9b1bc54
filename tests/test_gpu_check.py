"""benchmarks/gpu_check.sh, the one command a GPU machine runs, in its CPU dry run: every stage
runs (the CUDA tests collected and skipped, one kernel variant compiled, the benchmark at tiny
sizes) and leaves its files in $OUT, so that the script's first GPU run is not its first run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils' timeout")
def test_gpu_check_dry_run_writes_every_stage_output(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    summary = (tmp_path / "summary.txt").read_text()
    assert proc.returncode == 0, f"{summary}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    for stage in ("gpu-tests", "kernels", "bench"):
        assert f"{stage}: exit 0" in summary, summary
        assert (tmp_path / f"{stage}.log").stat().st_size > 0
    assert "mode dry" in (tmp_path / "env.txt").read_text()
    assert "skipped" in (tmp_path / "gpu-tests.log").read_text()
    kernels = json.loads((tmp_path / "kernels-sm90.json").read_text())
    assert [r["kernel"] for r in kernels["kernels"]] == ["_pack_signs_kernel"]
    assert not kernels["kernels"][0].get("error") and kernels["traffic"]
    results = list(tmp_path.glob("cpu-*.json"))
    assert len(results) == 1, sorted(p.name for p in tmp_path.iterdir())
    assert json.loads(results[0].read_text())["settings"]["quick"] is True


def test_gpu_check_rejects_an_unknown_option(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--fast"],
                          env=dict(os.environ, OUT=str(tmp_path)), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr
