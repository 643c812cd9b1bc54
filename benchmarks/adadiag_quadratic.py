"""``python -m benchmarks.adadiag_quadratic``: AdaDiag's premise on a problem made for it.

A quadratic ½ tr(EᵀAE), E = W − W*, whose Hessian I ⊗ A is diagonal in a random rotation's basis
and far from diagonal in the original one (A = U diag(1 … 1/cond) Uᵀ, an 8 × 64 weight, cond
10³). For each learning rate of a grid: the steps AdamW and one-sided AdaDiag
(``update_proj_gap=50``) take to bring the loss below 10⁻⁴ of its initial value (None: not
within 400 steps); and, for AdaDiag at lr 0.3, ``grad_diagonality`` in its basis and in the
original one at step 45 (44 steps after a refresh, so the rotated share is not 1 by
construction). ``tests/test_adadiag.py`` asserts the same figures' direction on the same
problem. Writes ``results/adadiag-quadratic.json`` (CPU, deterministic).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from optiscope.bench.results import script_command, write_script_results
from optiscope.kernels.stats import Stat
from optiscope.optimizers import AdaDiag, AdamW

SCHEMA = "optiscope-bench-adadiag-quadratic/1"
RESULTS = Path(__file__).resolve().parent / "results"
GRID = (3e-2, 1e-1, 3e-1, 1.0, 3.0)
MAKERS = {
    "adamw": lambda ps, lr: AdamW(ps, lr=lr, weight_decay=0.0, backend="torch"),
    "adadiag": lambda ps, lr: AdaDiag(ps, lr=lr, update_proj_gap=50, backend="torch"),
}


def rotated_quadratic(m: int = 8, n: int = 64, cond: float = 1e3, seed: int = 0):
    """(A, W*): A = U diag(1 … 1/cond) Uᵀ with a random rotation U, and a random target."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=gen))
    a = u @ torch.diag(torch.logspace(0, -math.log10(cond), m)) @ u.T
    return a, torch.randn(m, n, generator=gen)


def steps_to(make, lr: float, *, threshold: float = 1e-4, max_steps: int = 400,
             stats_at: int | None = None):
    """Steps until the loss is below ``threshold`` × the initial loss (None if never), and the
    optimizer's statistics of step ``stats_at`` (run to that step) when asked."""
    a, target = rotated_quadratic()
    w = torch.nn.Parameter(torch.zeros_like(target))
    opt = make([w], lr)
    first = None
    for step in range(1, (stats_at or max_steps) + 1):
        e = w.detach() - target
        loss = 0.5 * float((e * (a @ e)).sum())
        first = first or loss
        if stats_at is None and loss <= threshold * first:
            return step, None
        w.grad = a @ e
        if step == stats_at:
            opt.request_stats()
        opt.step()
    return None, opt.last_stats if stats_at else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.adadiag_quadratic",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    steps = {name: {str(lr): steps_to(make, lr)[0] for lr in GRID}
             for name, make in MAKERS.items()}
    best = {name: min((s for s in per.values() if s is not None), default=None)
            for name, per in steps.items()}
    _, stats = steps_to(MAKERS["adadiag"], 0.3, stats_at=45)
    diagonality = {"step": 45, "lr": 0.3,
                   "rotated": float(stats.column(Stat.GRAD_DIAG)[0]),
                   "original": float(stats.column(Stat.GRAD_DIAG_ORIGINAL)[0])}
    print(json.dumps({"best": best, "grad_diagonality": diagonality}))
    write_script_results(
        args.output, "adadiag-quadratic.json", schema=SCHEMA,
        command=script_command("benchmarks.adadiag_quadratic", argv),
        problem="8 x 64 weight, Hessian I ⊗ U diag(logspace(0, -3, 8)) Uᵀ, seed 0; "
                "threshold 1e-4 of the initial loss, at most 400 steps",
        grid=list(GRID), steps=steps, best=best, grad_diagonality=diagonality)
    return 0


if __name__ == "__main__":
    sys.exit(main())
