"""``python -m benchmarks.microadam_cpu``: MicroAdam's C step against its torch ops, on the CPU.

The torch backend steps a contiguous float32 CPU tensor with optiscope's C kernel
(``optiscope/kernels/cpu_microadam.c``) and any other tensor with torch ops; both give the same
bits (``tests/test_microadam.py``). This times the two side by side in one process, interleaved
round by round, on the same workloads as ``optiscope bench``: one 10^6 and one 10^7 tensor and
GPT-2 small's 148 tensors, with and without statistics. Writes ``results/microadam-cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from optiscope.bench.cases import gpt2_shapes
from optiscope.bench.machine import describe_device
from optiscope.bench.results import script_command, write_script_results
from optiscope.kernels import cpu
from optiscope.optimizers import MicroAdam
from optiscope.optimizers import microadam as module

SCHEMA = "optiscope-bench-microadam-cpu/1"
RESULTS = Path(__file__).resolve().parent / "results"
WORKLOADS = {"1 tensor of 1e6": ((10 ** 6,),), "1 tensor of 1e7": ((10 ** 7,),),
             "GPT-2 small: 148 tensors, 124.4M": gpt2_shapes()}


def _optimizer(shapes) -> MicroAdam:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    return MicroAdam(params, lr=1e-3, backend="torch")


def measure(shapes, rounds: int) -> dict:
    """Median ms per step of each path (``c``, ``ops``) and statistics setting, interleaved."""
    real = module._c_kernel_applies
    paths = {"c": real, "ops": lambda *args: False}
    runs = {(path, stats): _optimizer(shapes) for path in paths for stats in (False, True)}
    times = {key: [] for key in runs}
    try:
        for r in range(rounds + 1):  # round 0 warms up (state allocation, the kernel's load)
            for (path, stats), opt in runs.items():
                module._c_kernel_applies = paths[path]
                if stats:
                    opt.request_stats()
                start = time.perf_counter()
                opt.step()
                if r:
                    times[(path, stats)].append(time.perf_counter() - start)
    finally:
        module._c_kernel_applies = real
    rows = {f"{path}{' + stats' if stats else ''}": statistics.median(ts) * 1e3
            for (path, stats), ts in times.items()}
    rows["ops / c"] = rows["ops"] / rows["c"]
    rows["ops / c, with stats"] = rows["ops + stats"] / rows["c + stats"]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.microadam_cpu",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (default 7)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if cpu.kernel() is None:
        print("no C compiler here: MicroAdam has only its torch ops on this machine",
              file=sys.stderr)
        return 1
    results = {}
    for name, shapes in WORKLOADS.items():
        results[name] = measure(shapes, args.rounds)
        print(name, json.dumps({k: round(v, 2) for k, v in results[name].items()}))
    write_script_results(
        args.output, "microadam-cpu.json", schema=SCHEMA,
        command=script_command("benchmarks.microadam_cpu", argv),
        device=describe_device(torch.device("cpu")),
        optimizer="MicroAdam(lr=1e-3) defaults: m=10, k_init=0.01, blocks of 4096",
        unit="ms per step, median of the rounds", workloads=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
