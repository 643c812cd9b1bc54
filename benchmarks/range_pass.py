"""``python -m benchmarks.range_pass``: what counting the dynamic range of every entry in Adam's
and MicroAdam's C kernels costs (``OptimizerMonitor(range_probes="exact")``).

One float32 tensor per size, stepped by `optiscope.kernels.cpu.adam_f32` (and by
`optiscope.kernels.cpu.microadam_f32`, rows marked ``"microadam"``) three ways in interleaved
rounds: the plain update, the update with its statistics (a sampled step), and the
update with its statistics and the range counts of g, θ⁺ − θ⁻ and v (log2 histogram and the
low-precision thresholds of every entry). Prints the median ms of each and the ratios; writes
``results/range-pass-<device>.json``. Needs a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from optiscope.bench.machine import describe_device
from optiscope.bench.results import script_command, write_script_results
from optiscope.kernels import cpu
from optiscope.kernels.blocks import blocks

RESULTS = Path(__file__).resolve().parent / "results"


def measure(n: int, rounds: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    p, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen) * 1e-3
    m, v = torch.zeros(n), torch.zeros(n)
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=3,
              decoupled=True, maximize=False)
    ways = {
        "plain": lambda: cpu.adam_f32(p, g, m, v, None, **kw),
        "stats": lambda: cpu.adam_f32(p, g, m, v, None, stats=cpu.BlockSums([n], 8), **kw),
        "stats_ranges": lambda: cpu.adam_f32(p, g, m, v, None, stats=cpu.BlockSums([n], 8),
                                             ranges=cpu.range_buffer(1)[0], **kw),
    }
    return dict(optimizer="adam", **_time(n, ways, rounds))


def measure_microadam(n: int, rounds: int) -> dict:
    """MicroAdam's C step at its defaults (m = 10, k = 1 %, 4096-entry blocks and buckets)."""
    gen = torch.Generator().manual_seed(0)
    p, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen) * 1e-3
    layout, window = blocks(n, 4096, 0.01), 10
    state = dict(error=torch.zeros((n + 1) // 2, dtype=torch.uint8),
                 min_vals=torch.zeros(-(-n // 4096), dtype=torch.bfloat16),
                 max_vals=torch.zeros(-(-n // 4096), dtype=torch.bfloat16),
                 indices=torch.zeros(window, layout.k, dtype=torch.int16),
                 values=torch.zeros(window, layout.k, dtype=torch.bfloat16))
    kw = dict(block=layout.size, n_full=layout.n_full, k_full=layout.k_full, tail=layout.tail,
              k_tail=layout.k_tail, slot=0, quant_block_size=4096, w1=torch.ones(window),
              w2=torch.ones(window), c1=0.1, c2=0.001, lr=1e-3, weight_decay=0.01, eps=1e-8)
    ways = {
        "plain": lambda: cpu.microadam_f32(p, g, **state, stats=False, **kw),
        "stats": lambda: cpu.microadam_f32(p, g, **state, stats=True, **kw),
        "stats_ranges": lambda: cpu.microadam_f32(p, g, **state, stats=True,
                                                  ranges=cpu.range_buffer(1)[0], **kw),
    }
    return dict(optimizer="microadam", **_time(n, ways, rounds))


def _time(n: int, ways: dict, rounds: int) -> dict:
    """Median ms of each way over interleaved rounds, after one warm-up call each."""
    times: dict[str, list[float]] = {k: [] for k in ways}
    for f in ways.values():  # warm-up
        f()
    for _ in range(rounds):
        for name, f in ways.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    ms = {k: statistics.median(x) * 1e3 for k, x in times.items()}
    return dict(numel=n, rounds=rounds, ms=ms, stats_over_plain=ms["stats"] / ms["plain"],
                ranges_over_stats=ms["stats_ranges"] / ms["stats"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.range_pass",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if cpu.kernel() is None:
        print("the C kernel is not available here:", cpu.unavailable_reason())
        return 1
    device = describe_device(torch.device("cpu"))
    load = [os.getloadavg()[0]]
    rows = []
    for n, measure_one in ((n, f) for n in args.sizes for f in (measure, measure_microadam)):
        row = measure_one(int(n), args.rounds)
        rows.append(row)
        print(f"{row['optimizer']:>9s} {int(n):>10,d} entries  plain {row['ms']['plain']:7.2f} "
              f"ms  stats {row['ms']['stats']:7.2f} ms  stats+ranges {row['ms']['stats_ranges']:7.2f} ms  "
              f"(ranges x{row['ranges_over_stats']:.2f} the sampled step)", flush=True)
    load.append(os.getloadavg()[0])
    write_script_results(args.output, f"range-pass-{device.get('slug', 'cpu')}.json",
                         schema="optiscope-bench-range-pass/1",
                         command=script_command("benchmarks.range_pass", argv), device=device,
                         torch_threads=torch.get_num_threads(), load_average=load, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
