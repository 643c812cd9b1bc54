"""Step times of two revisions side by side: did a change make the benchmark table slower?

    python -m benchmarks.compare BASE [--head REV] [--rounds N] [--json FILE] -- [bench options]

Each revision is checked out in a temporary `git worktree` (``--head .``, the default, is this
checkout as it is, uncommitted changes included). Then, round after round, each revision runs the
step table of ``optiscope bench`` (``python -m benchmarks --no-overhead`` and the options after
``--``) in a fresh process of its own, with the same interpreter, environment and options; the
order alternates between rounds, so that a machine growing busier or quieter weighs on both
alike. The table gives, per workload and case, the median over rounds of each run's median step
time and their ratio (head over base; above 1 is slower); a ``torch.optim`` row runs the same
code in both, so its ratio is what noise alone does. The results of each run stay in the
temporary directory (``--keep`` prints it and keeps it).

Example (the step table of README.md, at shorter budgets):

    python -m benchmarks.compare 91ab6d0 --rounds 5 -- --sizes 1e6 1e7 --models gpt2-small \\
        --budget 20
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


def checkout(rev: str, where: Path) -> Path:
    """``rev`` in a detached worktree at ``where`` (``"."``: this checkout itself)."""
    if rev == ".":
        return ROOT
    _git("worktree", "add", "--detach", str(where), rev)
    return where


def run_bench(tree: Path, output: Path, bench_args: list[str]) -> dict:
    """One run of the step table in ``tree``'s code; its results document."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(tree)
    output.mkdir(parents=True)
    cmd = [sys.executable, "-m", "benchmarks", "--no-overhead", "--output", str(output),
           *bench_args]
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    files = sorted(output.glob("*.json"))
    if proc.returncode not in (0, 1) or not files:  # 1: a case failed, the others are timed
        raise SystemExit(f"{' '.join(cmd)} in {tree} failed ({proc.returncode}):\n"
                         f"{proc.stderr[-3000:]}")
    return json.loads(files[0].read_text())


def medians(doc: dict) -> dict[tuple[str, str], float]:
    return {(r["workload"], r["case"]): r["ms_median"] for r in doc["rows"]
            if r.get("ms_median") is not None}


def table(base: list[dict], head: list[dict], labels: tuple[str, str]) -> str:
    """Markdown: per (workload, case) the median over rounds of each side's median, and the
    ratio head / base."""
    runs = {label: [medians(d) for d in docs] for label, docs in zip(labels, (base, head))}
    keys = list(dict.fromkeys(k for per in runs.values() for m in per for k in m))
    lines = [f"| workload | case | {labels[0]} ms | {labels[1]} ms | ratio |",
             "|---|---|---:|---:|---:|"]
    ratios = []
    for key in keys:
        side = [statistics.median(m[key] for m in runs[label] if key in m)
                if any(key in m for m in runs[label]) else None for label in labels]
        ratio = side[1] / side[0] if None not in side else None
        if ratio is not None:
            ratios.append(ratio)
        cells = ["—" if v is None else f"{v:.3g}" for v in side]
        lines.append(f"| {key[0]} | {key[1]} | {cells[0]} | {cells[1]} | "
                     f"{'—' if ratio is None else f'{ratio:.3f}'} |")
    if ratios:
        lines.append(f"\nmedian ratio over {len(ratios)} rows: {statistics.median(ratios):.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    bench_args: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, bench_args = argv[:at], argv[at + 1:]
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help="the revision to compare against (a commit, tag, branch)")
    parser.add_argument("--head", default=".",
                        help="the revision compared (default '.': this checkout as it is)")
    parser.add_argument("--rounds", type=int, default=5, help="runs per revision (default 5)")
    parser.add_argument("--json", type=Path, help="also write every run's medians here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    labels = (_git("rev-parse", "--short", args.base),
              "working tree" if args.head == "." else _git("rev-parse", "--short", args.head))
    tmp = Path(tempfile.mkdtemp(prefix="optiscope-compare-"))
    trees: list[Path] = []
    docs: dict[str, list[dict]] = {label: [] for label in labels}
    try:
        trees = [checkout(args.base, tmp / "base"), checkout(args.head, tmp / "head")]
        for r in range(args.rounds):
            order = [0, 1] if r % 2 == 0 else [1, 0]
            for i in order:
                doc = run_bench(trees[i], tmp / f"round{r}-{i}", bench_args)
                docs[labels[i]].append(doc)
                print(f"round {r + 1}/{args.rounds} {labels[i]}: {len(doc['rows'])} rows, load "
                      f"{doc.get('load_average')}", file=sys.stderr, flush=True)
    finally:
        for tree in trees:
            if tree != ROOT:
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT,
                               capture_output=True)
        if args.keep:
            print(f"results kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(table(docs[labels[0]], docs[labels[1]], labels))
    if args.json:
        # the schema lets `optiscope bench --render` (which reads every results file) pass it by
        args.json.write_text(json.dumps({
            "schema": "optiscope-bench-compare/1",
            "runs": {label: [medians_json(d) for d in runs] for label, runs in docs.items()},
        }, indent=1) + "\n")
    return 0


def medians_json(doc: dict) -> dict:
    return {"git": doc.get("git"), "load_average": doc.get("load_average"),
            "ms_median": {f"{w} | {c}": v for (w, c), v in medians(doc).items()}}


if __name__ == "__main__":
    sys.exit(main())
