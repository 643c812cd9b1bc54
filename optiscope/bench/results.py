"""Results files, one per device (``<output>/<device slug>.json``), and the README section that is
generated from them."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from optiscope.bench.base import BenchError

__all__ = ["SCHEMA", "README_START", "README_END", "write_results", "write_script_results",
           "load_results", "update_readme", "readme_text", "replace_section",
           "script_command", "script_section"]

SCHEMA = "optiscope-bench/1"
README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"


def _existing(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) and doc.get("schema") == SCHEMA else None


def _merged(results: dict, old: dict | None) -> dict:
    """A run that measured only one part keeps the other part of the device's file: an
    ``--overhead-only`` run its step table, a ``--no-overhead`` run its overhead section (which
    carries its own date and command)."""
    if old is None:
        return results
    if not results["settings"].get("steps", True):
        return {**old, "overhead": results["overhead"]}
    if "overhead" not in results and "overhead" in old:
        return {**results, "overhead": old["overhead"]}
    return results


def write_results(results: dict, output: Path) -> Path:
    """Writes ``results`` to ``output/<device slug>.json``, replacing that device's file, except
    for the part a run did not measure (`_merged`)."""
    output.mkdir(parents=True, exist_ok=True)
    path = output / f"{results['device']['slug']}.json"
    text = json.dumps(_merged(results, _existing(path)), indent=2)
    # One line per list of timings instead of one line per number.
    text = re.sub(r"\[\s*(-?[\d.eE+-]+(?:,\s*-?[\d.eE+-]+)*)\s*\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
    path.write_text(text + "\n")
    return path


def write_script_results(output: Path, name: str, *, schema: str, command: str,
                         **fields) -> Path:
    """Writes one of the single-purpose benchmark scripts' results (``benchmarks/*.py``) to
    ``output/name``: its schema, when, the versions, the commit and the command that made it,
    then ``fields``."""
    from optiscope.bench.machine import git_commit, utc_now, versions

    doc = dict(schema=schema, created=utc_now(), versions=versions(), git=git_commit(),
               command=command, **fields)
    output.mkdir(parents=True, exist_ok=True)
    path = output / name
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path}")
    return path


def script_command(module: str, argv: list[str] | None) -> str:
    """The command line of a benchmark script run as ``python -m module`` with ``argv`` (None:
    this process's own arguments), for its results file."""
    return " ".join(["python -m " + module, *(sys.argv[1:] if argv is None else argv)])


def script_section(readme: Path | None, start: str, end: str, body: str) -> int:
    """A benchmark script's ``--readme``: replaces the section between ``start`` and ``end`` of
    ``readme`` with ``body`` (nothing without a readme). Returns the script's exit status: 0, or 1
    after printing why the file could not be written."""
    if readme is None:
        return 0
    try:
        replace_section(readme, start, end, body)
    except BenchError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


def load_results(output: Path) -> list[tuple[Path, dict]]:
    """Every step-timing results file in ``output``, sorted by name; raises BenchError naming a
    bad one. The other benchmarks' files there (``optiscope-bench-<kind>/N`` schemas: the report,
    memory, convergence and AdaDiag scripts) are left to their own scripts."""
    found = []
    for path in sorted(output.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BenchError(f"{path}: not a readable JSON file ({exc})") from None
        if isinstance(doc, dict) and str(doc.get("schema", "")).startswith("optiscope-bench-"):
            continue
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
            raise BenchError(f"{path}: not an optiscope benchmark result (schema "
                             f"{doc.get('schema') if isinstance(doc, dict) else None!r}, "
                             f"expected {SCHEMA!r})")
        found.append((path, doc))
    return found


def update_readme(readme: Path, markdown: str) -> None:
    """Replaces what lies between the bench markers of ``readme`` with ``markdown``."""
    replace_section(readme, README_START, README_END, markdown)


def readme_text(readme: Path) -> str:
    """The text of ``readme``; raises BenchError when it cannot be read or lacks the markers."""
    return _marked_text(readme, README_START, README_END)


def replace_section(path: Path, start: str, end: str, body: str) -> None:
    """Replaces what lies between the markers ``start`` and ``end`` of ``path`` (a README) with
    a newline and ``body``: the generated tables of ``optiscope bench`` and of the benchmark
    scripts. Raises BenchError when the file cannot be read or lacks the markers."""
    text = _marked_text(path, start, end)
    first = text.index(start) + len(start)
    path.write_text(text[:first] + "\n" + body + text[text.index(end, first):])


def _marked_text(path: Path, start: str, end: str) -> str:
    try:
        text = path.read_text()
    except OSError as exc:
        raise BenchError(f"--readme {path}: cannot read it ({exc.strerror})") from None
    first, last = text.find(start), text.find(end)
    if first < 0 or last < 0 or last < first:
        raise BenchError(f"--readme {path}: needs the markers {start} and {end} "
                         "(in that order) around the section to generate")
    return text
