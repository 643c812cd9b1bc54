"""The ``optiscope`` command: ``demo``, ``compare``, ``watch``, ``report``, ``tensorboard``,
``export`` and ``bench``.

Every subcommand has ``--help`` with examples, and bad input (a missing run directory, an unknown
optimizer, an empty run log) ends it with exit status 1 (2 for a malformed command line) and one
line saying what was wrong and what to do. Any other error is a bug: it keeps its traceback.
``--debug`` shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shlex
import sys
from pathlib import Path

from optiscope.cmdline import OneLineParser, positive_float, positive_int

__all__ = ["OneLineParser", "main"]

_COMPARE_DIR = Path("runs/compare")


class _Failure(Exception):
    """Bad input found while running a command: one line for the user, exit status 1."""


@contextlib.contextmanager
def _user_errors(*types: type[BaseException]):
    """Turns the ``types`` raised inside into `_Failure`: errors a library call raises about the
    input the user gave it (a path, a run log), as opposed to a bug."""
    try:
        yield
    except types as exc:
        raise _Failure(str(exc)) from exc


_EPILOG = """\
examples:
  optiscope demo                           train a small GPT on Python's own source for about 2
                                           minutes, with the live dashboard; writes runs/demo-adamw
  optiscope compare --optimizers adamw,adafactor
                                           the same model with each optimizer, one report
  optiscope watch runs/exp1                the live dashboard of a run another process is writing
  optiscope report runs/exp1 runs/exp2 -o both.html
                                           one HTML report, the runs overlaid
  optiscope tensorboard runs/exp1          TensorBoard events from a run log
  optiscope export runs/exp1 -o exp1.csv   every value as a row: step, metric, scope, value
  optiscope bench --quick                  time our optimizers against torch.optim
  optiscope COMMAND --help                 every option of a command
  optiscope --debug COMMAND ...            a traceback for every error, not only for bugs
"""

_DEMO_EPILOG = """\
examples:
  optiscope demo                           AdamW, {steps} steps, runs/demo-adamw (about 2 minutes
                                           on a 2-core CPU)
  optiscope demo --optimizer adafactor --steps 2000 --out runs/adafactor
  optiscope demo --steps 50 > demo.log     off a terminal: one line per sample instead of the
                                           live view

optimizers:
{optimizers}
"""

_COMPARE_EPILOG = """\
examples:
  optiscope compare                        adamw and adafactor; runs/compare/report.html
  optiscope compare --optimizers adamw,adam,adafactor,sgd --steps 300 --out runs/cmp
"""

_WATCH_EPILOG = """\
examples:
  optiscope watch runs/exp1                follow the run until Ctrl-C; waits for the directory
                                           if the job has not created it yet
  optiscope watch runs/exp1 --top 30 --sort-by update_ratio
  optiscope watch runs/exp1 --once         print the dashboard as it is now and exit
"""

_REPORT_EPILOG = """\
examples:
  optiscope report runs/exp1               runs/exp1/report.html and runs/exp1/trends.png
  optiscope report runs/a runs/b -o ab.html
                                           both runs overlaid; ab.png beside it
  optiscope report runs/exp1 -o r.html --no-png --title "lr sweep 3e-3"
"""

_TENSORBOARD_EPILOG = """\
examples:
  optiscope tensorboard runs/exp1          events into runs/exp1 (for a run recorded with
                                           tensorboard=False); then: tensorboard --logdir runs
  optiscope tensorboard runs/exp1 --out tb/exp1
"""

_EXPORT_EPILOG = """\
examples:
  optiscope export runs/exp1 -o exp1.csv   one row per value: step,metric,scope,value
  optiscope export runs/exp1 -o exp1.parquet
                                           Parquet (needs pyarrow: pip install 'optiscope[parquet]')
"""

_BENCH_EPILOG = """\
examples:
  optiscope bench --quick                  check that every implementation runs (seconds)
  optiscope bench                          time them all, and the monitor's overhead; writes
                                           benchmarks/results/<device>.json
  optiscope bench --readme README.md       ... and regenerate README.md's benchmark tables
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``optiscope`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # anywhere: before or after the command
    argv = [a for a in argv if a != "--debug"]
    if argv[:1] == ["bench"]:  # its options come from the harness, which imports torch
        from optiscope import bench

        parser = OneLineParser(prog="optiscope bench", epilog=_BENCH_EPILOG,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        bench.configure_parser(parser, Path("benchmarks/results"))
        return bench.execute(parser, parser.parse_args(argv[1:]), shlex.join(["optiscope", *argv]),
                             debug=debug)

    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"optiscope {args.command}: interrupted", file=sys.stderr)
        return 130
    except _Failure as exc:
        if debug:
            raise
        message = str(exc).removeprefix("optiscope: ").replace("\n", " ")
        print(f"optiscope {args.command}: error: {message}", file=sys.stderr)
        return 1


def _parser() -> OneLineParser:
    from optiscope.demo import OPTIMIZERS, DemoConfig

    raw = argparse.RawDescriptionHelpFormatter
    parser = OneLineParser(prog="optiscope", epilog=_EPILOG, formatter_class=raw,
                           description="See what your PyTorch optimizer does.")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of every error (also after the command)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=OneLineParser)
    defaults = DemoConfig()
    names = "\n".join(f"  {name:<12} {desc}" for name, (desc, _) in OPTIMIZERS.items())

    demo = sub.add_parser(
        "demo", help="train a small GPT on Python's own source, with the live dashboard",
        description="Train a small character-level GPT on the Python standard library's source "
                    "with the live dashboard, and leave a run directory: run log, TensorBoard "
                    "events, report.html, trends.png.",
        epilog=_DEMO_EPILOG.format(steps=defaults.steps, optimizers=names), formatter_class=raw)
    demo.add_argument("--optimizer", default="adamw", metavar="NAME",
                      help="one of: %s (default adamw)" % ", ".join(OPTIMIZERS))
    _training_options(demo, defaults)
    demo.add_argument("--out", type=Path, metavar="DIR",
                      help="run directory (default runs/demo-OPTIMIZER, or -2, -3, ... if taken)")
    demo.set_defaults(run=_demo)

    compare = sub.add_parser(
        "compare", help="train the demo model with several optimizers; one report overlays them",
        description="Train the demo model on the same batches with each optimizer, then write "
                    "one report: loss against step and against optimizer-state memory.",
        epilog=_COMPARE_EPILOG + "\noptimizers:\n" + names + "\n", formatter_class=raw)
    compare.add_argument("--optimizers", default="adamw,adafactor", metavar="A,B,...",
                         help="comma-separated (default adamw,adafactor)")
    _training_options(compare, defaults)
    compare.add_argument("--out", type=Path, default=_COMPARE_DIR, metavar="DIR",
                         help="holds one run directory per optimizer and report.html "
                              "(default runs/compare, or -2, -3, ... if taken)")
    compare.set_defaults(run=_compare)

    watch = sub.add_parser(
        "watch", help="the live dashboard of a run that another process is writing",
        description="Follow RUN_DIR's run log and show the live dashboard until Ctrl-C.",
        epilog=_WATCH_EPILOG, formatter_class=raw)
    watch.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    watch.add_argument("--top", type=positive_int, default=12, metavar="N",
                       help="layers in the table (default 12)")
    watch.add_argument("--sort-by", default="grad_norm", metavar="METRIC",
                       help="metric that picks the top layers (default grad_norm)")
    watch.add_argument("--interval", type=positive_float, default=0.5, metavar="S",
                       help="seconds between looks at the run log (default 0.5)")
    watch.add_argument("--once", action="store_true",
                       help="print the dashboard of what is there now and exit")
    watch.set_defaults(run=_watch)

    report = sub.add_parser(
        "report", help="the HTML report (and PNG) of one run, or several overlaid",
        description="Write a self-contained HTML report (opens offline) of one run, or of "
                    "several overlaid, and the trends as a PNG beside it.",
        epilog=_REPORT_EPILOG, formatter_class=raw)
    report.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    report.add_argument("-o", "--output", type=Path, metavar="FILE",
                        help="the HTML file (default: RUN_DIR/report.html for one run, "
                             "report.html for several)")
    report.add_argument("--title", help="the report's title")
    report.add_argument("--names", metavar="A,B,...",
                        help="names for the runs in the legends (default: directory names)")
    report.add_argument("--no-png", action="store_true", help="skip the PNG")
    report.set_defaults(run=_report)

    tensorboard = sub.add_parser(
        "tensorboard", help="TensorBoard events from a run log",
        description="Replay RUN_DIR's run log into TensorBoard event files.",
        epilog=_TENSORBOARD_EPILOG, formatter_class=raw)
    tensorboard.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    tensorboard.add_argument("--out", type=Path, metavar="DIR",
                             help="where the events go (default RUN_DIR)")
    tensorboard.set_defaults(run=_tensorboard)

    export = sub.add_parser(
        "export", help="a run's values as a long table (CSV or Parquet)",
        description="Write every value of RUN_DIR's run log as one row: step, metric, scope, "
                    "value.", epilog=_EXPORT_EPILOG, formatter_class=raw)
    export.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    export.add_argument("--format", choices=("csv", "parquet"),
                        help="default: from FILE's suffix (.parquet), else csv")
    export.add_argument("-o", "--output", type=Path, required=True, metavar="FILE")
    export.set_defaults(run=_export)

    sub.add_parser("bench", help="time optimizer steps and the monitor's overhead side by side; "
                                 "write results and the README tables", add_help=False)
    return parser


def _training_options(parser: argparse.ArgumentParser, defaults) -> None:
    parser.add_argument("--steps", type=positive_int, default=defaults.steps, metavar="N",
                        help=f"optimizer steps (default {defaults.steps})")
    parser.add_argument("--every", type=positive_int, default=defaults.every, metavar="N",
                        help=f"sample every N steps (default {defaults.every})")
    parser.add_argument("--lr", type=positive_float, metavar="LR",
                        help="learning rate (default: the optimizer's demo default)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="(default 0)")
    parser.add_argument("--plain", action="store_true",
                        help="one line per sample even on a terminal")


# ------------------------------------------------------------------------------- commands
def _config(args):
    from optiscope.demo import DemoConfig
    return DemoConfig(steps=args.steps, every=args.every, lr=args.lr, seed=args.seed)


def _check_optimizers(names: list[str]) -> None:
    from optiscope.demo import OPTIMIZERS
    for name in names:
        if name not in OPTIMIZERS:
            raise _Failure(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


def _console(args):
    from rich.console import Console
    return Console(force_terminal=False) if args.plain else Console()


@contextlib.contextmanager
def _logging_to(console):
    """optiscope's log messages through ``console`` (above the live view, not through it), and
    only errors: the dashboard shows the alerts already."""
    from rich.logging import RichHandler

    handler = RichHandler(logging.ERROR, console=console, show_time=False, show_path=False)
    logger = logging.getLogger("optiscope")
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _demo(args) -> int:
    from optiscope.demo import fresh_dir, stdlib_text, train
    from optiscope.monitor.runlog import RunLogError

    _check_optimizers([args.optimizer])
    out = args.out if args.out is not None else fresh_dir(Path("runs") / f"demo-{args.optimizer}")
    _refuse_taken(out)
    console = _console(args)
    config = _config(args)
    text = stdlib_text(config.text_bytes)
    console.print(f"optiscope demo: a {config.layers}-layer character GPT on {len(text) / 1e6:.1f} "
                  f"MB of the standard library's source, {args.optimizer}, {config.steps} steps "
                  f"→ {out}", highlight=False)
    with _logging_to(console), _user_errors(RunLogError):  # an unusable --out
        result = train(args.optimizer, out, config, console=console, text=text)
    _print_result(console, result)
    console.print(f"\n  report       {out / 'report.html'}\n  trends       {out / 'trends.png'}\n"
                  f"  tensorboard  tensorboard --logdir {out}\n  again        optiscope report "
                  f"{out}", highlight=False)
    return 0


def _print_result(console, result) -> None:
    sample = result.sample.decode("utf-8", "replace")
    console.print(f"\n{result.optimizer}: {result.steps} steps in {result.seconds:.1f} s, "
                  f"loss {result.final_loss:.3f}, held-out loss {result.val_loss:.3f}, optimizer "
                  f"state {result.state_bytes / max(1, result.n_params):.2f} bytes/parameter",
                  highlight=False)
    console.print("the model writes:", highlight=False)
    console.print("  def " + sample.replace("\n", "\n  "), markup=False, highlight=False)


def _compare(args) -> int:
    from rich.table import Table

    from optiscope.dashboards.png import write_png
    from optiscope.dashboards.report import write_report
    from optiscope.demo import stdlib_text, train
    from optiscope.monitor.runlog import RunLogError

    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    if not names:
        raise _Failure("--optimizers names no optimizer; pass e.g. --optimizers adamw,adafactor")
    if len(set(names)) != len(names):
        raise _Failure(f"--optimizers names an optimizer twice: {args.optimizers}")
    _check_optimizers(names)
    out = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if out != _COMPARE_DIR:
            raise _Failure(f"{out} is not an empty directory; pass --out with a new directory")
        out = _fresh_compare_dir(out)
    console = _console(args)
    config = _config(args)
    text = stdlib_text(config.text_bytes)
    results = []
    for i, name in enumerate(names, 1):
        console.rule(f"[{i}/{len(names)}] {name}")
        with _logging_to(console), _user_errors(RunLogError):  # an unusable --out
            results.append(train(name, out / name, config, console=console, text=text,
                                 title=f"compare {i}/{len(names)}: {name}"))
    runs = [r.run_dir for r in results]
    report = write_report(runs, out / "report.html", names=names,
                          title=f"optiscope compare: {', '.join(names)}")
    write_png(runs, out / "trends.png", names=names)
    table = Table(title=f"{config.steps} steps, same model, same batches")
    for col in ("optimizer", "loss", "held-out loss", "state bytes/param", "state MB", "time s"):
        table.add_column(col, justify="left" if col == "optimizer" else "right")
    for r in results:
        table.add_row(r.optimizer, f"{r.final_loss:.3f}", f"{r.val_loss:.3f}",
                      f"{r.state_bytes / max(1, r.n_params):.2f}", f"{r.state_bytes / 1e6:.2f}",
                      f"{r.seconds:.1f}")
    console.print(table)
    console.print(f"report  {report}\ntrends  {out / 'trends.png'}", highlight=False)
    return 0


def _fresh_compare_dir(base: Path) -> Path:
    """``base-2``, ``base-3``, ...: the first that is absent or empty."""
    candidate, n = base, 1
    while candidate.exists() and any(candidate.iterdir()):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def _refuse_taken(run_dir: Path) -> None:
    if (run_dir / "runlog.jsonl").exists():
        raise _Failure(f"{run_dir} already holds a run; pass --out with a new directory")


def _load(run_dir: Path):
    """A run directory's history, refusing a missing directory or a run log without samples."""
    from optiscope import load_run

    if not run_dir.exists():
        raise _Failure(f"{run_dir} does not exist; pass the log_dir a monitor wrote")
    if not run_dir.is_dir():
        raise _Failure(f"{run_dir} is a file; pass the run directory that holds runlog.jsonl")
    with _user_errors(OSError, ValueError):  # not a run directory, an unreadable run log
        history = load_run(run_dir)
    if not history.metrics():
        raise _Failure(f"{run_dir / 'runlog.jsonl'} holds no samples yet (the run has not reached "
                       "its first sampled step, or crashed before it); wait, or check the path")
    return history


def _watch(args) -> int:
    from optiscope.dashboards.follow import watch

    if args.run_dir.exists() and not args.run_dir.is_dir():
        raise _Failure(f"{args.run_dir} is a file; pass the run directory that holds runlog.jsonl")
    if args.once:
        _load(args.run_dir)
    from optiscope.monitor.metrics import TENSOR_METRICS
    metrics = [m.name for m in TENSOR_METRICS]
    if args.sort_by not in metrics:
        raise _Failure(f"unknown metric {args.sort_by!r} for --sort-by; choose from "
                       f"{', '.join(metrics)}")
    return watch(args.run_dir, poll_interval=args.interval, once=args.once, top=args.top,
                 sort_by=args.sort_by)


def _report(args) -> int:
    from optiscope.dashboards.png import write_png
    from optiscope.dashboards.report import write_report

    histories = [_load(d) for d in args.run_dirs]
    names = [n.strip() for n in args.names.split(",")] if args.names else \
        [d.resolve().name for d in args.run_dirs]
    if len(names) != len(histories):
        raise _Failure(f"--names gives {len(names)} names for {len(histories)} runs")
    out = args.output or (args.run_dirs[0] / "report.html" if len(histories) == 1
                          else Path("report.html"))
    if out.exists() and out.is_dir():
        raise _Failure(f"{out} is a directory; pass -o with a file name such as {out / 'report.html'}")
    with _user_errors(OSError):  # an unwritable -o
        written = write_report(histories, out, names=names, title=args.title)
        print(f"report  {written}")
        if not args.no_png:
            png = write_png(histories, out.with_suffix(".png") if len(histories) > 1 or args.output
                            else out.with_name("trends.png"), names=names)
            print(f"trends  {png}")
    return 0


def _tensorboard(args) -> int:
    from optiscope.dashboards.tensorboard import export_tensorboard

    _load(args.run_dir)
    with _user_errors(OSError):  # an unwritable --out
        events = export_tensorboard(args.run_dir, args.out)
    print(f"events in {events}; view with: tensorboard --logdir {events.parent}")
    return 0


def _export(args) -> int:
    from optiscope.dashboards.export import export_run

    _load(args.run_dir)
    try:
        n = export_run(args.run_dir, args.output, args.format)
    except (ImportError, OSError) as exc:  # a missing extra; an output path that cannot be written
        raise _Failure(str(exc)) from exc
    print(f"{n} rows in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
