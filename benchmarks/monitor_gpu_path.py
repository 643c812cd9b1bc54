"""``python -m benchmarks.monitor_gpu_path``: the monitor's sampled step on the code path a GPU
takes, counted on a CPU: dispatched aten ops and Triton launches per sampled step.

On a CPU the monitor sums and gathers float32 tensors in C (`benchmarks.monitor_step` measures
that path), so neither its ops nor its time say what a GPU pays. Here the C kernels are turned
off and the Triton kernels that the GPU path launches (`optiscope.kernels.sums`, `.gather`) run
on the CPU tensors under the Triton interpreter (``--kernels off``: the torch ops that take over
without Triton). Ops are counted as `optiscope.bench.sampled_step` counts them (non-view aten
ops inside the monitor's hooks), minus those the interpreter itself dispatches while it runs a
kernel; each kernel launch is counted apart. Times are not measured: interpreted kernels are
not fast, and a CPU's launch costs are not a GPU's.

The model is GPT-2's structure, ``--layers`` blocks (default 12) at ``--d-model`` (default 192:
37 of its 148 tensors are above the flat path's 65,536 entries, as 50 of GPT-2 small's are),
vocabulary 1,024, context 64.
Writes ``results/monitor-gpu-path.json``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is first imported

import argparse  # noqa: E402
import sys  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

SCHEMA = "optiscope-bench-monitor-gpu-path/1"
RESULTS = Path(__file__).resolve().parent / "results"


def _gpu_path(kernels: bool) -> None:
    """Turns the C kernels off and routes the monitor's sums and gathers to the Triton kernels
    (``kernels``) or to torch ops."""
    import optiscope.optimizers.adam as adam
    from optiscope.kernels import cpu
    from optiscope.monitor import pertensor

    cpu.kernel = lambda: None
    adam.kernel = lambda: None
    cpu.sums_apply = lambda tensors: False
    pertensor.KERNEL_DEVICES = ("cuda", "cpu") if kernels else ("cuda",)


def _count_launches() -> Counter:
    """The counter every launch of the monitor's kernels adds to, from now on."""
    from torch.utils._python_dispatch import _disable_current_modes

    from optiscope.kernels import gather, sums

    launches: Counter = Counter()
    for name, kernel in (("sums", sums._sums_kernel), ("gather", gather._gather_kernel)):
        run = kernel.run

        def counted(*args, _run=run, _name=name, **kwargs):
            launches[_name] += 1
            with _disable_current_modes():  # the interpreter's own ops are not the monitor's
                return _run(*args, **kwargs)
        kernel.run = counted
    return launches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.monitor_gpu_path",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=192)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--optimizers", nargs="+", default=["bundled", "foreign"])
    parser.add_argument("--kernels", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--name", default="monitor-gpu-path.json")
    args = parser.parse_args(argv)

    import optiscope.bench.sampled_step as sampled
    from optiscope.bench.cases import gpt2_shapes
    from optiscope.bench.results import write_script_results
    from optiscope.monitor.flat import FLAT_MAX

    shapes = gpt2_shapes(n_layer=args.layers, d_model=args.d_model, vocab=1024, n_ctx=64)
    sampled.shapes_for = lambda n: shapes
    large = sum(1 for s in shapes if torch.Size(s).numel() > FLAT_MAX)
    rows = []
    launches = _count_launches()
    for kernels in args.kernels:
        _gpu_path(kernels == "on")
        for kind in args.optimizers:
            launches.clear()
            steps = 3
            row = sampled.count_ops(kind, len(shapes), "runlog", steps=steps, probes=False)
            # count_ops counts the last step's ops; launches run in every step, the same each
            per_step = {k: v // steps for k, v in launches.items()}
            rows.append(dict(optimizer=kind, kernels=kernels, ops=row["ops"],
                             launches=per_step, op_counts=row["op_counts"]))
            print(f"{kind:8s} kernels {kernels:3s} {row['ops']:5d} ops  launches {per_step}",
                  flush=True)
    write_script_results(
        args.output, args.name, schema=SCHEMA,
        command="python -m benchmarks.monitor_gpu_path " + " ".join(argv or sys.argv[1:]),
        tensors=len(shapes), large_tensors=large, parameters=sum(
            torch.Size(s).numel() for s in shapes),
        settings=f"GPT-2's shapes, {args.layers} blocks at d_model {args.d_model}, vocab 1024, "
                 "n_ctx 64; every=1, "
                 "sample_size auto, topk_density 0.01 (block 4096), drift on, readiness probes "
                 "off; C kernels off",
        rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
