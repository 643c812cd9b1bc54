"""``python -m benchmarks.report``: the HTML report of a long run, against its floors.

Builds the `RunHistory` of a 10,000-step run of a 100-tensor model with every metric
(`benchmarks.synthetic.synthetic_run`: noisy trends, gradient spikes, a NaN, alerts),
writes its report, and opens it in headless Chromium several times. Floors: the file under 10 MB,
and the report open — every figure drawn — in under 5 s. Prints a table and writes
``results/report-<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from optiscope.bench.machine import describe_device, git_commit, load_average, utc_now, versions
from benchmarks.browser import find_chromium, open_in_chromium
from optiscope.dashboards.report import write_report
from benchmarks.synthetic import synthetic_run

SCHEMA = "optiscope-bench-report/1"
MAX_BYTES = 10_000_000
MAX_OPEN_S = 5.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report",
        description="Size, write time and Chromium open time of the HTML report of a long run.")
    parser.add_argument("--steps", type=int, default=10_000, help="steps in the run (10000)")
    parser.add_argument("--layers", type=int, default=100, help="parameter tensors (100)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="report writes and Chromium opens, each (5); medians are reported")
    parser.add_argument("--chromium", help="the browser (default: chromium on PATH)")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="directory of the results file (benchmarks/results)")
    parser.add_argument("--keep", type=Path, metavar="FILE", help="also keep the report here")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.steps < 1 or args.layers < 2 or args.repeats < 1:
        parser.error(f"--steps >= 1, --layers >= 2 and --repeats >= 1, got {args.steps}, "
                     f"{args.layers}, {args.repeats}")
    chromium = args.chromium or find_chromium()
    if chromium is None:
        parser.error("no Chromium: install it (apt-get install chromium) or pass --chromium PATH")
    load_before = load_average()

    started = time.perf_counter()
    history = synthetic_run(steps=args.steps, layers=args.layers)
    build_s = time.perf_counter() - started

    with tempfile.TemporaryDirectory(prefix="optiscope-report-bench-") as tmp:
        out = Path(tmp) / "report.html"
        write_s = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            write_report(history, out)
            write_s.append(time.perf_counter() - started)
        size = out.stat().st_size
        opens = [open_in_chromium(out, chromium=chromium) for _ in range(args.repeats)]
        if args.keep:
            args.keep.write_bytes(out.read_bytes())

    broken = [s for s in opens if not s.ok]
    open_s = statistics.median(s.open_s for s in opens)
    results = {
        "schema": SCHEMA,
        "device": describe_device(torch.device("cpu")),
        "versions": versions(), "git": git_commit(), "date_utc": utc_now(),
        "command": " ".join(["python -m benchmarks.report", *(argv if argv is not None
                                                               else sys.argv[1:])]),
        "load_average": {"start": load_before, "end": load_average()},
        "chromium": chromium,
        "run": {"steps": args.steps, "layers": args.layers,
                "samples": len(history.series("grad_norm")[0]),
                "metrics": len(history.metrics()), "build_s": round(build_s, 3)},
        "report": {
            "bytes": size, "figures": opens[0].expected,
            "write_s": [round(s, 3) for s in write_s],
            "write_s_median": round(statistics.median(write_s), 3),
        },
        "chromium_opens": [
            {"open_s": round(s.open_s, 3), "page_ms": s.ms, "first_figure_ms": s.first_ms,
             "process_s": round(s.process_s, 3), "rendered": s.rendered, "figures": s.figures,
             "errors": s.errors, "resources": s.resources} for s in opens],
        "open_s_median": round(open_s, 3),
        "page_ms_median": statistics.median(s.ms for s in opens),
        "first_figure_ms_median": statistics.median(s.first_ms for s in opens),
        "process_s_median": round(statistics.median(s.process_s for s in opens), 3),
        "floors": {
            "size": {"limit_bytes": MAX_BYTES, "pass": size < MAX_BYTES},
            "open": {"limit_s": MAX_OPEN_S, "pass": open_s < MAX_OPEN_S and not broken},
        },
    }
    args.output.mkdir(parents=True, exist_ok=True)
    path = args.output / f"report-{results['device']['slug']}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(_table(results, broken))
    print(f"\nwritten {path}")
    return 0 if all(f["pass"] for f in results["floors"].values()) else 1


def _table(r: dict, broken: list) -> str:
    """The results as a Markdown table, with the floors."""
    floors = r["floors"]

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    rows = [
        ("run", f"{r['run']['steps']:,} steps × {r['run']['layers']} tensors, "
                f"{r['run']['metrics']} metrics (built in {r['run']['build_s']:.1f} s)", ""),
        ("report size", f"{r['report']['bytes'] / 1e6:.2f} MB ({r['report']['figures']} figures)",
         f"< {MAX_BYTES / 1e6:.0f} MB: {verdict(floors['size']['pass'])}"),
        ("write_report", f"{r['report']['write_s_median']:.2f} s", ""),
        ("open: launch → last figure drawn", f"{r['open_s_median']:.2f} s",
         f"< {MAX_OPEN_S:.0f} s: {verdict(floors['open']['pass'])}"),
        ("page: navigation → first figure", f"{r['first_figure_ms_median'] / 1000:.2f} s", ""),
        ("page: navigation → last figure", f"{r['page_ms_median'] / 1000:.2f} s", ""),
        ("Chromium process (+ DOM dump, exit)", f"{r['process_s_median']:.2f} s", ""),
        ("load average (start, end)", f"{r['load_average']['start']}, {r['load_average']['end']}",
         ""),
    ]
    lines = ["| | median of " + f"{len(r['chromium_opens'])} | floor |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    if broken:
        lines.append(f"\n{len(broken)} opens did not draw every figure: {broken[0].detail}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
