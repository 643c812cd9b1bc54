"""``python -m benchmarks.demo_readiness``: what the compression-readiness verdicts say on the demo.

Trains the demo (`optiscope.demo.train`: the model, data, schedule and sampling of
``optiscope demo``, without the live dashboard) with ``--optimizer`` (default AdamW), reads the
run back with `load_run` and writes its verdicts (`optiscope.monitor.readiness`: answer, deciding
figure, threshold, evidence, confidence, steps) to ``results/demo-readiness-OPTIMIZER.json``, and
prints them as the Markdown table the README shows. CPU, seeded: the verdicts repeat; the
training time does not.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

from optiscope.bench.machine import describe_device
from optiscope.bench.results import write_script_results
from optiscope.cmdline import OneLineParser, positive_int
from optiscope.demo import OPTIMIZERS, DemoConfig, train
from optiscope.monitor.readiness import readiness
from optiscope.monitor.runlog import load_run

SCHEMA = "optiscope-bench-demo-readiness/1"
RESULTS = Path(__file__).resolve().parent / "results"


def markdown(verdicts: list[dict]) -> str:
    """The README's table: question, answer, the deciding figure."""
    lines = ["| question | answer | figure (last half of the run) |", "|---|---|---|"]
    for v in verdicts:
        figure = v["figure"] or v["detail"]
        lines.append(f"| {v['question']} | {v['answer']} | {figure.replace('|', '∣')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m benchmarks.demo_readiness",
                           description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizer", default="adamw", choices=sorted(OPTIMIZERS))
    parser.add_argument("--steps", type=positive_int, default=DemoConfig.steps, metavar="N",
                        help=f"optimizer steps (default {DemoConfig.steps}, as the demo)")
    parser.add_argument("--run-dir", type=Path, metavar="DIR",
                        help="keep the run directory here (default: a temporary one)")
    parser.add_argument("--output", type=Path, default=RESULTS, metavar="DIR",
                        help="where the JSON file goes (default benchmarks/results)")
    parser.add_argument("--judge-only", action="store_true",
                        help="judge the run already in --run-dir again; do not train")
    args = parser.parse_args(argv)
    if args.judge_only and args.run_dir is None:
        parser.error("--judge-only needs --run-dir: the run to judge again")
    seconds = None
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run_dir or Path(tmp) / f"demo-{args.optimizer}"
        if not args.judge_only:
            seconds = round(train(args.optimizer, run_dir, DemoConfig(steps=args.steps),
                                  dashboard=False).seconds, 1)
        history = load_run(run_dir)
    verdicts = [dataclasses.asdict(v) for v in readiness(history)]
    last = {name: float(history.series(name)[1][-1]) for name in ("loss", "val_loss")}
    print(markdown(verdicts))
    command = "python -m benchmarks.demo_readiness " + " ".join(argv or sys.argv[1:])
    write_script_results(
        args.output, f"demo-readiness-{args.optimizer}.json", schema=SCHEMA,
        command=command.strip(), device=describe_device(torch.device("cpu")),
        run=dict(optimizer=OPTIMIZERS[args.optimizer][0], steps=history.last_step(),
                 every=history.meta.get("every"), seconds=seconds, final_loss=last["loss"],
                 val_loss=last["val_loss"], n_params=history.meta["n_params"],
                 sampled=sum(p["sampled"] for p in history.meta["params"]),
                 topk_density=history.meta.get("topk_density"),
                 topk_block=history.meta.get("topk_block"),
                 freeze_probe=history.meta.get("freeze_probe"),
                 recorded=sorted(history.metrics())),
        verdicts=verdicts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
