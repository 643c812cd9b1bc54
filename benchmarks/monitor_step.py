"""``python -m benchmarks.monitor_step``: what one sampled step of the monitor costs the training
thread, in dispatched aten ops and added milliseconds, at 148 and 1,000 tiny tensors, for the
bundled AdamW and torch.optim.AdamW (the method: `optiscope.bench.sampled_step`).

Op counts are deterministic; the milliseconds are medians of interleaved steps and need a quiet
machine (the load average at the start and the end is recorded). Writes
``results/monitor-step-<device>.json``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

import torch

from optiscope.bench.machine import describe_device
from optiscope.bench.results import write_script_results
from optiscope.bench.sampled_step import OPTIMIZERS, SINKS, measure

SCHEMA = "optiscope-bench-monitor-step/1"
RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.monitor_step",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, nargs="+", default=[148, 1000])
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    parser.add_argument("--sinks", nargs="+", default=list(SINKS), choices=SINKS)
    parser.add_argument("--rounds", type=int, default=200, help="timed steps of each (200)")
    parser.add_argument("--probes", nargs="+", default=["off", "on"], choices=["off", "on"],
                        help="the readiness probes (quant_probes, range_probes): off, on or both")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: "
                        "torch's)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--name", default=None, help="results file name (default "
                        "monitor-step-<device>.json)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = describe_device(torch.device("cpu"))
    load_start = os.getloadavg()[0]
    rows = []
    for n in args.tensors:
        for kind in args.optimizers:
            for sinks, probes in itertools.product(args.sinks, args.probes):
                row = measure(kind, n, sinks, args.rounds, probes == "on")
                rows.append(row)
                print(f"{n:5d} tensors  {kind:16s} {sinks:7s} probes {probes:3s} "
                      f"{row['ops']:5d} ops "
                      f"{row['c_calls']:4d} C calls  +{row['added_ms']:7.2f} ms (mean +{row['added_mean_ms']:.2f}) "
                      f"(hooks {row['hooks_ms']:.2f} ms, step {row['plain_ms']:.2f} ms)",
                      flush=True)
    name = args.name or f"monitor-step-{device.get('slug', 'cpu')}.json"
    write_script_results(
        args.output, name, schema=SCHEMA,
        command="python -m benchmarks.monitor_step " + " ".join(argv or sys.argv[1:]),
        device=device, torch_threads=torch.get_num_threads(),
        load_average=[load_start, os.getloadavg()[0]],
        optimizers={k: v[0] for k, v in OPTIMIZERS.items()}, sinks=SINKS,
        settings="every=1, sample_size auto, topk_density 0.01 (block 4096), drift on, "
                 "readiness probes as the row says; "
                 "GPT-2's shapes at d_model 16, vocab 256, n_ctx 32",
        rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
