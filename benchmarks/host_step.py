"""``python -m benchmarks.host_step [--against REV]``: the host's part of a bundled optimizer's
Triton step, the Python that runs before its launch, in microseconds per step.

On a GPU the host's time and the kernel's add up whenever nothing else hides the host (the
benchmark harness times a step from an idle device, and a small model's training loop waits on
it too): on the H200, GPT-2 small's bundled AdamW step took 2.74 ms against torch's fused 1.67,
where its kernel alone projects to about 1.3 ms (`results/cuda-nvidia-h200.json`). A CPU
measures that host part honestly once the launch itself is taken out: every Triton kernel of
the optimizer is replaced by a no-op, the tensors are CPU tensors, and what is timed is
`optimizer.step()` (gathering the state, advancing the step counts, launch groups, address
tables, the statistics' buffers). Not counted: Triton's own launcher and the copy of the address
table to a GPU (a cache hit skips that copy since the table cache).

``--against REV`` measures a git revision too, in a worktree, side by side: the two run in
alternating child processes, and each figure is the median over the rounds.
Writes ``results/host-step.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCHEMA = "optiscope-bench-host-step/1"
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OPTIMIZERS = ("AdamW", "Adafactor")


def _shapes(n: int) -> list[tuple[int, ...]]:
    """GPT-2's 148 tensors at d_model 16 (the structure, small), or ``n`` tensors of 64×64."""
    from optiscope.bench.cases import gpt2_shapes

    return gpt2_shapes(d_model=16, vocab=256, n_ctx=32) if n == 148 else [(64, 64)] * n


def _child(tensors: list[int], steps: int) -> dict:
    """This tree's figures: µs per step of each optimizer, tensor count and stats setting."""
    os.environ["TRITON_INTERPRET"] = "1"  # the Triton backend on CPU tensors
    import torch
    import triton

    from optiscope.kernels import adafactor as adafactor_kernels
    from optiscope.kernels import adam as adam_kernels
    from optiscope import optimizers

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    for module in (adam_kernels, adafactor_kernels):
        for name, value in list(vars(module).items()):
            if isinstance(value, triton.runtime.jit.KernelInterface):  # jitted or interpreted
                setattr(module, name, NoLaunch())
    torch.set_num_threads(1)
    out = {}
    for n in tensors:
        for name in OPTIMIZERS:
            params = [torch.nn.Parameter(torch.randn(s)) for s in _shapes(n)]
            for p in params:
                p.grad = torch.randn_like(p)
            opt = getattr(optimizers, name)(params, backend="triton")
            for stats in (False, True):
                for _ in range(10):
                    if stats:
                        opt.request_stats()
                    opt.step()
                start = time.perf_counter()
                for _ in range(steps):
                    if stats:
                        opt.request_stats()
                    opt.step()
                out[f"{name}/{n}/{'stats' if stats else 'plain'}"] = (
                    (time.perf_counter() - start) / steps * 1e6)
    return out


def _run_child(tree: Path, tensors: list[int], steps: int) -> dict:
    """This script run as a child on ``tree``'s optiscope (first on its path)."""
    proc = subprocess.run(
        [sys.executable, __file__, "--child", "--steps", str(steps), "--tensors",
         *map(str, tensors)], env=dict(os.environ, PYTHONPATH=str(tree)), cwd=tree,
        capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the child on {tree} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    where = Path(out.pop("optiscope")).resolve()
    if tree.resolve() not in where.parents:
        raise RuntimeError(f"the child on {tree} imported optiscope from {where}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host_step",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", default=None, help="a git revision to measure beside")
    parser.add_argument("--tensors", type=int, nargs="+", default=[148, 1000])
    parser.add_argument("--steps", type=int, default=200, help="timed steps per round (200)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (5)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--name", default="host-step.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        import optiscope

        print(json.dumps(dict(_child(args.tensors, args.steps), optiscope=optiscope.__file__)))
        return 0

    from optiscope.bench.machine import describe_device, git_commit
    from optiscope.bench.results import script_command, write_script_results

    import torch

    trees = {"this": ROOT}
    worktree = None
    if args.against:
        worktree = Path(tempfile.mkdtemp(prefix="optiscope-host-step-"))
        subprocess.run(["git", "worktree", "add", "--detach", str(worktree), args.against],
                       cwd=ROOT, check=True, capture_output=True)
        trees[args.against] = worktree
    try:
        samples: dict = {label: {} for label in trees}
        load_start = os.getloadavg()[0]
        for r in range(args.rounds):
            for label, tree in trees.items():
                for key, us in _run_child(tree, args.tensors, args.steps).items():
                    samples[label].setdefault(key, []).append(us)
            print(f"round {r + 1}/{args.rounds}", flush=True)
    finally:
        if worktree is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT,
                           capture_output=True)
    rows = []
    for key in samples["this"]:
        name, n, stats = key.split("/")
        row = dict(optimizer=name, tensors=int(n), statistics=stats == "stats",
                   us_per_step=round(statistics.median(samples["this"][key]), 1))
        if args.against:
            before = statistics.median(samples[args.against][key])
            row.update(against=args.against, against_us_per_step=round(before, 1),
                       speedup=round(before / statistics.median(samples["this"][key]), 2))
        rows.append(row)
        print(f"{name:10s} {n:>5s} tensors {stats:5s} {row['us_per_step']:8.1f} us"
              + (f"  (at {args.against}: {row['against_us_per_step']:.1f} us, "
                 f"{row['speedup']:.2f}x)" if args.against else ""))
    write_script_results(
        args.output, args.name, schema=SCHEMA, command=script_command("benchmarks.host_step", argv),
        device=describe_device(torch.device("cpu")), commit=git_commit(),
        load_average=[load_start, os.getloadavg()[0]], steps=args.steps, rounds=args.rounds,
        torch_threads=1, rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
