"""optiscope bench's tables: the markdown rendered from results files, with each file's own
figures, and the README section it replaces between its markers (nothing else)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench_rows import overhead_rows
from optiscope import bench
from optiscope.bench import README_END, README_START, SCHEMA

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- README table
def _doc(device: dict, rows: list[dict], skipped=()) -> dict:
    bench.add_ratios(rows, device["peak_bandwidth_Bps"])
    return {"schema": SCHEMA, "device": device,
            "versions": {"python": "3.11.7", "torch": "2.13.0", "triton": "3.9.0",
                         "optiscope": "0.1.0"},
            "git": {"commit": "0123456789abcdef" * 2 + "01234567", "dirty": False},
            "date_utc": "2026-01-02T03:04:05Z", "command": "optiscope bench",
            "load_average": {"start": 0.25, "end": 2.0},
            "settings": {"quick": False}, "rows": rows, "skipped": list(skipped), "errors": []}


def _row(case, label, ms, baseline, algorithm="AdamW", params=10 ** 7):
    return dict(workload="1 tensor of 1e7", case=case, label=label, algorithm=algorithm,
                baseline=baseline, stats=False, params=params, bytes_per_step=28 * params,
                ms_median=ms, ms_min=ms * 0.9, times_ms=[ms])


CPU = {"type": "cpu", "name": "Test CPU", "cores": 2, "usable_cores": 2, "slug": "cpu-test-cpu",
       "copy_bandwidth_Bps": 20e9, "peak_bandwidth_Bps": None, "peak_bandwidth_source": None}
GPU = {"type": "cuda", "name": "NVIDIA H100 80GB HBM3", "memory_bytes": 80 * 2**30,
       "slug": "cuda-nvidia-h100-80gb-hbm3", "copy_bandwidth_Bps": 3.0e12,
       "peak_bandwidth_Bps": 3.35e12, "peak_bandwidth_source": "data sheet: H100 SXM"}


@pytest.fixture
def results_dir(tmp_path):
    out = tmp_path / "benchmarks" / "results"
    bench.write_results(_doc(CPU, [
        _row("torch-adamw-foreach", "torch.optim.AdamW (foreach)", 20.0, True),
        _row("torch-adamw-fused", "torch.optim.AdamW (fused)", 4.0, True),
        _row("optiscope-adamw-torch", "optiscope AdamW (backend=torch)", 4.1, False),
        _row("optiscope-adafactor-torch", "optiscope Adafactor (backend=torch)", 8.0, False,
             algorithm="Adafactor"),
    ], skipped=[{"workload": None, "case": "optiscope-adamw-triton", "reason": "needs CUDA"}]), out)
    bench.write_results(_doc(GPU, [
        _row("torch-adamw-fused", "torch.optim.AdamW (fused)", 0.125, True),
        _row("optiscope-adamw-triton", "optiscope AdamW (backend=triton)", 0.1, False),
    ]), out)
    return out


def test_markdown_has_one_table_per_results_file_with_the_files_figures(results_dir, tmp_path):
    md = bench.render_markdown(bench.load_results(results_dir), relative_to=tmp_path)
    assert md.count("\n#### ") == 2
    cpu_part, gpu_part = md.split("#### CPU: Test CPU (2 cores)")[1].split("#### CUDA: ")
    link = "benchmarks/results/cpu-test-cpu.json"
    assert f"[`{link}`]({link})" in cpu_part
    assert "commit 0123456789" in cpu_part and "`optiscope bench`" in cpu_part
    assert "load average 0.2 at the start, 2.0 at the end" in cpu_part
    lines = [ln for ln in cpu_part.splitlines() if ln.startswith("|")]
    assert lines[0] == ("| Workload | Implementation | ms/step (median) | ms/step (min) | params/s "
                        "| GB/s | × fastest torch.optim |")
    # 10^7 params in 4.1 ms: 2.44e9 params/s, 28e7 B / 4.1 ms = 68.3 GB/s, 4.1 / 4.0 = 1.02
    assert "|  | optiscope AdamW (backend=torch) | 4.1 | 3.69 | 2.44 G | 68.3 | 1.02 |" in lines
    assert ("| 1 tensor of 1e7 | torch.optim.AdamW (foreach) | 20 | 18 | 500 M | 14.0 | 5.00 |"
            in lines)
    assert "|  | optiscope Adafactor (backend=torch) | 8 | 7.2 | 1.25 G | 35.0 | — |" in lines
    assert "- Not measured: `optiscope-adamw-triton`: needs CUDA." in cpu_part

    assert "NVIDIA H100 80GB HBM3 (80 GiB)" in gpu_part and "roofline peak 3350 GB/s" in gpu_part
    lines = [ln for ln in gpu_part.splitlines() if ln.startswith("|")]
    assert "% of roofline" in lines[0]
    # 28e7 B in 0.1 ms = 2800 GB/s = 84 % of 3.35 TB/s; 0.1 / 0.125 = 0.80
    assert ("|  | optiscope AdamW (backend=triton) | 0.1 | 0.09 | 100 G | 2800.0 | 84% | 0.80 |"
            in lines)


def test_readme_section_is_replaced_between_the_markers_only(results_dir, tmp_path):
    readme = tmp_path / "README.md"
    before, after = "# project\n\nintro\n\n", "\n\n## Layout\n\ntext\n"
    readme.write_text(f"{before}{README_START}\nstale table\n{README_END}{after}")
    assert bench.main(["--render", "--output", str(results_dir), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith(before + README_START) and text.endswith(README_END + after)
    assert "stale table" not in text and text.count("\n#### ") == 2
    bench.main(["--render", "--output", str(results_dir), "--readme", str(readme)])
    assert readme.read_text() == text  # regenerating is idempotent


def test_readme_without_markers_is_refused_before_anything_runs(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--output", str(tmp_path), "--readme", str(readme)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and README_START in err
    assert readme.read_text() == "# no markers\n" and not list(tmp_path.glob("*.json"))


def test_a_foreign_json_file_in_the_results_directory_is_named(tmp_path):
    (tmp_path / "notes.json").write_text('{"hello": 1}')
    with pytest.raises(bench.BenchError, match="notes.json: not an optiscope benchmark result"):
        bench.load_results(tmp_path)


def test_cases_skipped_on_one_workload_for_one_reason_make_one_line(tmp_path):
    big = "the workload needs about 139.8 GiB, 138.1 GiB are free on cuda"
    bench.write_results(_doc(GPU, [
        _row("torch-adamw-fused", "torch.optim.AdamW (fused)", 0.125, True),
    ], skipped=[{"workload": "1 tensor of 1e9", "case": c, "reason": big}
                for c in ("torch-adamw-fused", "optiscope-adamw-triton")]
      + [{"workload": "1 tensor of 1e9", "case": "optiscope-adamw-torch", "reason": "other"}]),
        tmp_path)
    text = bench.render_markdown(bench.load_results(tmp_path))
    assert (f"- Not measured on 1 tensor of 1e9: `torch-adamw-fused`, `optiscope-adamw-triton`: "
            f"{big}.") in text.splitlines()
    assert "- Not measured on 1 tensor of 1e9: `optiscope-adamw-torch`: other." in text


def test_the_readme_tables_are_what_the_committed_results_render_to(tmp_path):
    """Every figure of the README's benchmark section comes from a committed results file: the
    section is regenerated from benchmarks/results/ into a copy and must come out the same."""
    readme, results = tmp_path / "README.md", tmp_path / "benchmarks" / "results"
    readme.write_text((ROOT / "README.md").read_text())
    results.mkdir(parents=True)  # beside the copy, so that the links come out relative alike
    for path in (ROOT / "benchmarks" / "results").glob("*.json"):
        (results / path.name).write_bytes(path.read_bytes())
    assert bench.main(["--render", "--output", str(results), "--readme", str(readme)]) == 0
    assert readme.read_text() == (ROOT / "README.md").read_text()


def _overhead_section(rows, device_type="cpu", skipped=(), errors=()):
    bench.add_overhead_ratios(rows, device_type)
    return {"date_utc": "2026-01-02T04:00:00Z", "command": "optiscope bench --overhead-only",
            "git": {"commit": "fedcba9876543210" * 2 + "76543210", "dirty": True},
            "load_average": {"start": 0.5, "end": 1.25}, "settings": {"quick": False},
            "rows": rows, "skipped": list(skipped), "errors": list(errors)}


def test_overhead_table_shows_each_monitored_row_with_its_target_and_memory():
    doc = _doc(CPU, [_row("torch-adamw-fused", "torch.optim.AdamW (fused)", 4.0, True)])
    doc["overhead"] = _overhead_section(overhead_rows(), skipped=[{
        "workload": None, "implementation": "optiscope-adamw-triton", "reason": "needs CUDA"}])
    md = bench.render_markdown([(None, doc)])
    steps_part, part = md.split("**Monitor overhead**")
    assert "| torch.optim.AdamW (fused) | 4 |" in steps_part  # the step table comes first
    assert "Monitor overhead: step time with `OptimizerMonitor(opt, every=N)`" in md
    assert part.startswith(". Measured 2026-01-02T04:00:00Z, commit fedcba9876 (dirty); "
                           "`optiscope bench --overhead-only`; load average 0.5 at the start, "
                           "1.2 at the end.")
    lines = [ln for ln in part.splitlines() if ln.startswith("|")]
    assert lines[0] == ("| Workload | Optimizer | every | steps timed (blocks × steps) | "
                        "ms/step unmonitored | ms/step monitored | × unmonitored | target | "
                        "monitor memory | of param bytes |")
    assert len(lines) == 2 + 6  # header, rule, the A/A control, one line per monitored row
    assert lines[2] == ("| GPT-2 small | optiscope-adamw-torch | — (A/A control) | 100 = 10 × 10 | "
                        "100 | 101 | 1.010 (1.010–1.010) | — | — | — |")
    assert lines[3] == ("|  | optiscope-adamw-torch | 1 | 3 = 3 × 1 | 100 | 140 | "
                        "1.400 (1.400–7.700) | ≤ 1.5×: PASS | 1.9 MB | 0.38 % (< 1 %: PASS) |")
    assert lines[4] == ("|  | optiscope-adamw-torch | 1, run log | 3 = 3 × 1 | 100 | 160 | "
                        "1.600 (1.600–1.600) | ≤ 1.5×: **FAIL** | 1.9 MB | 0.38 % (< 1 %: PASS) |")
    assert lines[5] == ("|  | optiscope-adamw-torch | 10 | 100 = 10 × 10 | 100 | 107 | "
                        "1.060 (1.040–1.080) | ≤ 5 %: **FAIL** | 1.9 MB | 0.38 % (< 1 %: PASS) |")
    assert lines[6] == ("|  | optiscope-adamw-torch | 100 | 100 = 10 × 10 | 109 | 110 | "
                        "1.009 (1.009–1.009) | — | 1.9 MB | 0.38 % (< 1 %: PASS) |")
    assert lines[7] == ("|  | torch-adamw-fused | 1 | 1 = 1 × 1 | 50 | 400 | "
                        "8.000 (8.000–8.000) | — | 6 MB | 1.2 % (< 1 %: **FAIL**) |")
    assert ("- every=100 on GPT-2 small, optiscope-adamw-torch: a period of 100 steps is timed as "
            "10 consecutive blocks of 10 steps, interleaved with the other rows; the 10 blocks "
            "make 1 whole period.") in part
    assert "- Not measured: `optiscope-adamw-triton`: needs CUDA." in part
    assert "Targets (the monitor's acceptance figures)" in part


def test_a_run_of_one_part_keeps_the_other_part_of_the_devices_file(tmp_path):
    steps_doc = _doc(CPU, [_row("torch-adamw-fused", "torch.optim.AdamW (fused)", 4.0, True)])
    steps_doc["settings"]["steps"] = True
    path = bench.write_results(steps_doc, tmp_path)

    only = _doc(CPU, [])  # what --overhead-only writes: no step rows, an overhead section
    only["settings"] = {"quick": False, "steps": False}
    only["overhead"] = _overhead_section(overhead_rows())
    assert bench.write_results(only, tmp_path) == path
    merged = json.loads(path.read_text())
    assert [r["case"] for r in merged["rows"]] == ["torch-adamw-fused"]
    assert merged["overhead"] == json.loads(json.dumps(only["overhead"]))

    again = _doc(CPU, [_row("torch-adamw-foreach", "torch.optim.AdamW (foreach)", 9.0, True)])
    bench.write_results(again, tmp_path)  # --no-overhead: new step rows, the overhead is kept
    merged = json.loads(path.read_text())
    assert [r["case"] for r in merged["rows"]] == ["torch-adamw-foreach"]
    assert merged["overhead"]["date_utc"] == "2026-01-02T04:00:00Z"

    full = _doc(CPU, [_row("torch-adamw-fused", "torch.optim.AdamW (fused)", 3.0, True)])
    full["overhead"] = _overhead_section(overhead_rows()[:3])
    bench.write_results(full, tmp_path)  # a run of both parts replaces both
    merged = json.loads(path.read_text())
    assert len(merged["overhead"]["rows"]) == 3 and merged["rows"][0]["ms_median"] == 3.0
