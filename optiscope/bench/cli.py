"""The command line of the harness: ``optiscope bench`` and ``python -m benchmarks`` (same
options). Parses them into `Settings`, runs, writes the results file and the README section."""

from __future__ import annotations

import argparse
import fnmatch
import shlex
import sys
from pathlib import Path

import torch

from optiscope.bench.base import BenchError, OverheadSettings, Settings, log
from optiscope.bench.cases import CASES, MODELS
from optiscope.bench.machine import cpu_llc_bytes, describe_device
from optiscope.bench.markdown import render_markdown
from optiscope.bench.results import load_results, readme_text, update_readme, write_results
from optiscope.bench.runner import run
from optiscope.cmdline import (OneLineParser, nonnegative_int, positive_float, positive_int,
                               size)

__all__ = ["add_arguments", "configure_parser", "build_parser", "settings_from_args",
           "run_command", "execute", "main"]


EXAMPLES = """\
examples:
  # full run on the default device (CUDA if any); writes {output}/<device>.json
  {prog}
  # tiny sizes and three steps: checks that every case runs, in seconds
  {prog} --quick
  # two single-tensor sizes and no model; only the torch.optim rows and one optiscope row
  {prog} --sizes 1e6 1e7 --models --cases 'torch-adamw-*' optiscope-adamw-torch
  # also regenerate README.md's benchmark section from every file in the output directory
  {prog} --readme README.md
  # measure nothing, only regenerate that section
  {prog} --render --readme README.md
  # only the monitor's overhead (the device's step table in {output} is kept)
  {prog} --overhead-only
  # only the step table (the device's overhead section is kept)
  {prog} --no-overhead

cases (implementations):
{cases}
models: {models}
"""


def add_arguments(parser: argparse.ArgumentParser, default_output: Path) -> None:
    """The options of ``optiscope bench`` / ``python -m benchmarks``."""
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes (1000 and 4097 parameters, GPT-2 tiny), 1 warm-up step, "
                             "3 timed steps, 2 overhead rounds, a small cache flush: for tests, "
                             "not for numbers")
    parser.add_argument("--sizes", nargs="*", type=size, metavar="N",
                        help="single-tensor workloads, in parameters (1e6 is accepted; default "
                             "1e6 1e7 1e8 on CPU, also 1e9 on CUDA; none when given no value)")
    parser.add_argument("--models", nargs="*", choices=sorted(MODELS), metavar="MODEL",
                        help="many-tensor workloads (default gpt2-small; none when given no "
                             "value)")
    parser.add_argument("--cases", nargs="+", metavar="CASE",
                        help="implementations to time, by name or shell pattern (default: all)")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N "
                             "(default auto)")
    parser.add_argument("--output", type=Path, metavar="DIR",
                        help=f"directory of the results files (default {default_output}; a "
                             "--quick run writes none unless given one)")
    parser.set_defaults(default_output=default_output)
    parser.add_argument("--readme", type=Path, metavar="PATH",
                        help="regenerate the section between the bench markers of this file from "
                             "every results file in --output")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: print (or, with --readme, write) the tables of the "
                             "results already in --output")
    parser.add_argument("--warmup", type=nonnegative_int, metavar="N",
                        help="untimed steps per case (default 3)")
    parser.add_argument("--repeats", type=positive_int, metavar="N",
                        help="timed steps per case (default: as many as fit --budget, 5 to 100)")
    parser.add_argument("--budget", type=positive_float, metavar="SECONDS",
                        help="seconds of timed steps per workload when --repeats is not given "
                             "(default 90 on CPU, 30 on CUDA)")
    part = parser.add_mutually_exclusive_group()
    part.add_argument("--overhead-only", action="store_true",
                      help="time only the monitor's overhead on the models (the step table of "
                           "the device's results file is kept)")
    part.add_argument("--no-overhead", action="store_true",
                      help="do not time the monitor's overhead (the overhead section of the "
                           "device's results file is kept)")
    parser.add_argument("--overhead-budget", type=positive_float, metavar="SECONDS",
                        help="seconds of timed overhead rounds per model (default 150 on CPU, 60 "
                             "on CUDA), rounded to whole sampling periods")
    parser.add_argument("--overhead-rounds", type=positive_int, metavar="N",
                        help="timed overhead rounds per model instead of a budget (rounded up to "
                             "whole sampling periods; default 2 with --quick)")


def configure_parser(parser: argparse.ArgumentParser, default_output: Path) -> None:
    """Gives ``parser`` the description, examples and options of the bench command."""
    parser.description = _DESCRIPTION
    parser.epilog = _epilog(parser.prog, default_output)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_arguments(parser, default_output)


def build_parser(prog: str = "optiscope bench",
                 default_output: Path = Path("benchmarks/results")) -> argparse.ArgumentParser:
    """The standalone parser of the bench options (``python -m benchmarks``)."""
    parser = OneLineParser(prog=prog)
    configure_parser(parser, default_output)
    return parser


_DESCRIPTION = ("Time one optimizer step of every implementation (torch.optim.AdamW for-loop, "
                "foreach and fused; optiscope's optimizers on each backend, with and without "
                "statistics) side by side in one process, and the step time with an "
                "OptimizerMonitor attached (every=1, 10, 100) against the same optimizer "
                "without one; write the results as JSON and render the README tables.")


def _epilog(prog: str, default_output: Path) -> str:
    width = max(len(n) for n in CASES)
    cases = "\n".join(f"  {name:<{width}}  {case.label}" for name, case in CASES.items())
    return EXAMPLES.format(prog=prog, output=default_output, cases=cases,
                           models=", ".join(sorted(MODELS)))


def _resolve_device(text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise BenchError(f"--device {text!r} is not a device; use auto, cpu, cuda or "
                         "cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise BenchError(f"--device {text!r}: the harness times cpu and cuda devices")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BenchError(f"--device {text}: CUDA is not available here; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= torch.cuda.device_count():
            raise BenchError(f"--device {text}: only {torch.cuda.device_count()} CUDA devices")
        torch.cuda.set_device(device)
    return device


def _select_cases(patterns: list[str] | None) -> list[str]:
    if not patterns:
        return list(CASES)
    chosen: list[str] = []
    for item in (p for text in patterns for p in text.split(",") if p):
        matched = [name for name in CASES if fnmatch.fnmatchcase(name, item)]
        if not matched:
            raise BenchError(f"unknown case {item!r}; known: {', '.join(CASES)}")
        chosen += [m for m in matched if m not in chosen]
    return [name for name in CASES if name in chosen]  # registry order: baselines first


def _check_parts(args: argparse.Namespace) -> None:
    """Options that the chosen parts would ignore are refused, not ignored."""
    if args.overhead_only:
        given = [f"--{name}" for name in ("sizes", "cases", "warmup", "repeats", "budget")
                 if getattr(args, name) is not None]
        if given:
            raise BenchError(f"--overhead-only times no step table: {', '.join(given)} would "
                             "change nothing; drop them")
    if args.no_overhead:
        given = [opt for opt, value in (("--overhead-budget", args.overhead_budget),
                                        ("--overhead-rounds", args.overhead_rounds))
                 if value is not None]
        if given:
            raise BenchError(f"--no-overhead times no overhead: drop {', '.join(given)}")


def settings_from_args(args: argparse.Namespace, command: str) -> Settings:
    """Turns parsed options into `Settings` (raising BenchError for inconsistent ones)."""
    _check_parts(args)
    device = _resolve_device(args.device)
    gpu = device.type == "cuda"
    overhead = OverheadSettings(budget_s=60.0 if gpu else 150.0,
                                min_block_steps=100 if gpu else 1)
    if args.quick:
        sizes, models = [1000, 4097], ["gpt2-tiny"]
        base = dict(warmup=1, repeats=3, flush_bytes=1 << 20, copy_bytes=8 << 20, quick=True)
        overhead.rounds = 2
    else:
        sizes = [10 ** 6, 10 ** 7, 10 ** 8] + ([10 ** 9] if gpu else [])
        models = ["gpt2-small"]
        llc = (describe_device(device).get("l2_cache_bytes") if gpu else cpu_llc_bytes()) or 0
        base = dict(budget_s=30.0 if gpu else 90.0,
                    flush_bytes=max(256 << 20 if gpu else 64 << 20, 2 * llc),
                    copy_bytes=1 << 30 if gpu else 256 << 20)
    if args.sizes is not None:
        sizes = args.sizes
    if args.models is not None:
        models = args.models
    if args.overhead_only:
        sizes = []
        if not models:
            raise BenchError("nothing to measure: --overhead-only times the models, and "
                             "--models is empty")
    if not sizes and not models:
        raise BenchError("nothing to measure: --sizes and --models are both empty")
    settings = Settings(device=device, sizes=sizes, models=models,
                        cases=_select_cases(args.cases), command=command, **base)
    if args.warmup is not None:
        settings.warmup = args.warmup
    if args.repeats is not None:
        settings.repeats = args.repeats
    if args.budget is not None:
        settings.budget_s = args.budget
        settings.repeats = args.repeats  # a budget asks for fitted repetitions, even with --quick
    if args.overhead_budget is not None:
        overhead.budget_s = args.overhead_budget
        overhead.rounds = args.overhead_rounds  # fitted rounds, even with --quick
    if args.overhead_rounds is not None:
        overhead.rounds = args.overhead_rounds
    settings.steps = not args.overhead_only
    settings.overhead = None if args.no_overhead or not models else overhead
    return settings


def run_command(args: argparse.Namespace, command: str) -> int:
    """Executes parsed bench options; returns the exit status (1 when a case failed)."""
    output = args.output
    if output is None and not (args.quick and not args.render):
        output = args.default_output  # a quick run must not replace a device's real results
    if args.readme is not None:
        readme_text(args.readme)  # fail before measuring, not after
        if output is None:
            raise BenchError("--quick --readme needs --output: the table is generated from the "
                             "results files there")
    if args.render:
        markdown = render_markdown(load_results(output),
                                   args.readme.parent if args.readme else None)
        if args.readme is not None:
            update_readme(args.readme, markdown)
            log(f"updated {args.readme}")
        else:
            print(markdown, end="")
        return 0
    settings = settings_from_args(args, command)
    results = run(settings)
    if output is None:
        path = None
        log("quick run: no results file written (pass --output DIR to keep one)")
    else:
        path = write_results(results, output)
        log(f"wrote {path}")
    print(render_markdown([(path, results)]), end="")
    if args.readme is not None:
        update_readme(args.readme, render_markdown(load_results(output), args.readme.parent))
        log(f"updated {args.readme}")
    failed = results["errors"] or results.get("overhead", {}).get("errors")
    return 1 if failed else 0


def execute(parser: argparse.ArgumentParser, args: argparse.Namespace, command: str, *,
            debug: bool = False) -> int:
    """Runs parsed bench options, reporting a BenchError (bad options) as one line, exit status
    2; with ``debug`` it keeps its traceback. Any other exception is a bug and keeps its own."""
    try:
        return run_command(args, command)
    except BenchError as exc:
        if debug:
            raise
        parser.exit(2, f"{parser.prog}: error: {exc}\n")


def main(argv: list[str] | None = None, *, prog: str = "optiscope bench",
         default_output: Path = Path("benchmarks/results")) -> int:
    """The bench command on its own (``python -m benchmarks``): parses ``argv`` and runs."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog, default_output)
    return execute(parser, parser.parse_args(argv), shlex.join(prog.split() + argv))
