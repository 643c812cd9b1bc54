"""``python -m benchmarks.microadam_buckets``: what MicroAdam's quantization bucket size buys.

MicroAdam stores its error feedback in 4 bits with a min and a max per bucket of
``quant_block_size`` entries. Smaller buckets cost more bytes per parameter; this measures what
they buy in ``quant_error`` (the error feedback's relative 4-bit error, as the monitor reports
it): the demo's byte-level transformer trained for ``--steps`` steps on the same batches with
each bucket size, the monitor's global ``quant_error`` at the last step and the state's bytes
per parameter. Writes ``results/microadam-buckets.json`` (CPU, seeded: the figures repeat).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from optiscope import OptimizerMonitor
from optiscope.bench.machine import describe_device
from optiscope.bench.results import script_command, write_script_results
from optiscope.demo import CharGPT, _Batches, _loss, stdlib_text
from optiscope.optimizers import MicroAdam

SCHEMA = "optiscope-bench-microadam-buckets/1"
RESULTS = Path(__file__).resolve().parent / "results"
BUCKETS = (64, 256, 1024, 4096)


def run(bucket: int, steps: int, text: bytes) -> dict:
    """One training run with buckets of ``bucket`` entries: the last step's ``quant_error`` and
    the state's bytes per parameter."""
    torch.manual_seed(0)
    model = CharGPT()
    batches = _Batches(text, context=model.context, batch=16, seed=0)
    opt = MicroAdam(model.parameters(), lr=1e-3, weight_decay=0.1, m=10, k_init=0.01,
                    quant_block_size=bucket, backend="torch")
    with OptimizerMonitor(opt, model=model, every=steps, console=False, tensorboard=False,
                          report=False, strict=True) as mon:
        for step in range(1, steps + 1):
            if step == steps:
                mon.sample_next()  # every=steps samples step 1 only; the last step is the figure
            tokens, targets = batches.next()
            opt.zero_grad()
            _loss(model, tokens, targets).backward()
            opt.step()
    last, values = mon.history.series("quant_error", "global")
    n_params = sum(p.numel() for p in model.parameters())
    state = sum(t.untyped_storage().nbytes() for s in opt.state.values() for t in s.values()
                if isinstance(t, torch.Tensor) and t.dim() > 0)
    return dict(quant_block_size=bucket, step=int(last[-1]), quant_error=float(values[-1]),
                params=n_params, state_bytes=state, bytes_per_param=state / n_params)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.microadam_buckets",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps (default 20)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    text = stdlib_text()
    rows = []
    for bucket in BUCKETS:
        rows.append(run(bucket, args.steps, text))
        print(json.dumps(rows[-1]))
    write_script_results(
        args.output, "microadam-buckets.json", schema=SCHEMA,
        command=script_command("benchmarks.microadam_buckets", argv),
        device=describe_device(torch.device("cpu")),
        model="the demo's CharGPT (dim 128, 3 blocks, context 64), batch 16, seed 0",
        optimizer="MicroAdam(lr=1e-3, weight_decay=0.1, m=10, k_init=0.01)", rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
