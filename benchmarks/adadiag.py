"""``python -m benchmarks.adadiag``: what a basis refresh costs AdaDiag, per matrix and per model.

A step of AdaDiag is an Adam step plus two GEMMs per matrix (four two-sided); every
``update_proj_gap`` steps it also takes the SVD of each matrix's gradient. This times, side by
side in one process, for each matrix shape of one GPT-2-small block (and its position embedding):
AdamW's step, AdaDiag's step without a refresh, AdaDiag's step with one (``update_proj_gap=1``),
one-sided and two-sided, and the SVD alone. The per-refresh cost of the whole model is the sum
over its matrices (12 blocks), and amortised over T steps it is (refresh − step) / T per step.
Writes ``results/adadiag-<device>.json``.

GPT-2's token embedding (50257 × 768) is left out by default: its one-sided SVD dominates a
refresh on a CPU (``--embedding`` includes it), and its two-sided basis alone is 50257² floats
(9.4 GiB), so AdaDiag++ belongs in a one-sided group for it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from optiscope.bench.machine import describe_device, load_average
from optiscope.bench.results import script_command, write_script_results
from optiscope.bench.timing import Clock
from optiscope.optimizers import AdaDiag, AdamW

SCHEMA = "optiscope-bench-adadiag/1"
RESULTS = Path(__file__).resolve().parent / "results"
D = 768
# One GPT-2-small block's matrices, Conv1D (in, out) as GPT-2 stores them, with how many of each
# the model has; and the position embedding.
BLOCK = {"attn.c_attn (768, 2304)": ((D, 3 * D), 12), "attn.c_proj (768, 768)": ((D, D), 12),
         "mlp.c_fc (768, 3072)": ((D, 4 * D), 12), "mlp.c_proj (3072, 768)": ((4 * D, D), 12),
         "wpe (1024, 768)": ((1024, D), 1)}
EMBEDDING = {"wte (50257, 768)": ((50257, D), 1)}


def _best_ms(clock: Clock, fn, repeats: int) -> float:
    """The fastest of ``repeats`` calls after a warm-up: on a shared machine the least
    disturbed one (medians of 3 on a loaded 2-core CPU gave AdamW 7.9 ms for 1.8M entries
    and 0.47 ms for 2.4M)."""
    fn()  # warm-up: state allocation, first-call overheads
    return min(clock.measure_ms(fn, flush=False) for _ in range(repeats))


def time_shape(shape: tuple[int, int], device: torch.device, repeats: int) -> dict:
    """Milliseconds of each variant's step on one matrix of ``shape``, and of its SVD."""
    clock = Clock(device, 0)
    p = torch.nn.Parameter(torch.randn(shape, device=device) * 0.02)
    p.grad = torch.randn(shape, device=device)
    out = {"adamw_step_ms": _best_ms(clock, AdamW([p], lr=1e-9).step, repeats)}
    for label, two_sided in (("one_sided", False), ("two_sided", True)):
        steady = AdaDiag([p], lr=1e-9, update_proj_gap=10**9, two_sided=two_sided)
        refreshing = AdaDiag([p], lr=1e-9, update_proj_gap=1, two_sided=two_sided)
        out[f"{label}_step_ms"] = _best_ms(clock, steady.step, repeats)
        out[f"{label}_refresh_step_ms"] = _best_ms(clock, refreshing.step, repeats)
        g = p.grad.float()
        out[f"{label}_svd_ms"] = _best_ms(
            clock, lambda: torch.linalg.svd(g, full_matrices=two_sided), repeats)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.adadiag", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed calls per figure, the fastest kept (default 5)")
    parser.add_argument("--embedding", action="store_true",
                        help="also time GPT-2's token embedding (slow on a CPU)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shapes = {**BLOCK, **(EMBEDDING if args.embedding else {})}
    rows = []
    for name, (shape, count) in shapes.items():
        figures = time_shape(shape, device, args.repeats)
        rows.append(dict(matrix=name, shape=list(shape), count=count, **figures))
        print(f"{name:26s} " + "  ".join(f"{k} {v:8.2f}" for k, v in figures.items()), flush=True)
    totals = {}
    for label in ("one_sided", "two_sided"):
        refresh = sum(r["count"] * (r[f"{label}_refresh_step_ms"] - r[f"{label}_step_ms"])
                      for r in rows)
        totals[label] = dict(
            refresh_extra_ms=refresh,
            step_ms=sum(r["count"] * r[f"{label}_step_ms"] for r in rows),
            amortised_ms_per_step_at_T200=refresh / 200)
    totals["adamw_step_ms"] = sum(r["count"] * r["adamw_step_ms"] for r in rows)
    print(json.dumps(totals, indent=1))
    device_info = describe_device(device)
    write_script_results(
        args.output, f"adadiag-{device_info['slug']}.json", schema=SCHEMA,
        command=script_command("benchmarks.adadiag", argv), device=device_info,
        repeats=args.repeats, statistic="min", load_average=load_average(),
        model="GPT-2 small matrices" + (" with wte" if args.embedding else
                                        " (12 blocks and wpe; wte left out)"),
        rows=rows, totals=totals)
    return 0


if __name__ == "__main__":
    sys.exit(main())
