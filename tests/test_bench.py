"""optiscope bench: the harness at tiny sizes, the results file, the derived columns, the monitor
overhead section, and the command line (console script and ``python -m benchmarks``); the
tables it renders: test_bench_tables.py."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import optiscope.optimizers
from optiscope import bench
from bench_rows import overhead_row, overhead_rows
from optiscope.bench import CASES, MODELS, SCHEMA, OverheadSettings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One ``--quick`` run on CPU, written to a fresh directory: (exit status, path, document)."""
    out = tmp_path_factory.mktemp("results")
    status = bench.main(["--quick", "--device", "cpu", "--output", str(out)])
    files = sorted(out.glob("*.json"))
    assert len(files) == 1, f"expected one results file, found {files}"
    return status, files[0], json.loads(files[0].read_text())


def _by_key(rows, *keys):
    return {tuple(r[k] for k in keys): r for r in rows}


# ----------------------------------------------------------------------------- the results file
def test_quick_run_writes_a_file_named_after_the_device_with_its_provenance(quick):
    status, path, doc = quick
    assert status == 0
    assert doc["schema"] == SCHEMA
    device = doc["device"]
    assert device["type"] == "cpu" and isinstance(device["cores"], int) and device["cores"] >= 1
    assert path.name == f"{device['slug']}.json"
    assert re.fullmatch(r"cpu-[a-z0-9-]+", device["slug"])
    assert device["copy_bandwidth_Bps"] > 0
    assert device["peak_bandwidth_Bps"] is None  # the roofline column is for GPUs
    assert doc["versions"]["torch"] == torch.__version__
    assert doc["versions"]["optiscope"] == optiscope.__version__
    assert set(doc["versions"]) == {"python", "torch", "triton", "optiscope"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", doc["date_utc"])
    commit = doc["git"]["commit"]
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}", commit)
    assert doc["command"] == f"optiscope bench --quick --device cpu --output {path.parent}"
    assert doc["settings"]["quick"] is True and doc["settings"]["repeats"] == 3
    assert [w["name"] for w in doc["workloads"]] == [
        "1 tensor of 1e3", "1 tensor of 4,097", MODELS["gpt2-tiny"].name]
    assert doc["errors"] == []
    assert set(doc["load_average"]) == {"start", "end"}


def test_every_case_is_timed_or_skipped_with_a_reason_on_every_workload(quick):
    _, _, doc = quick
    assert [c["case"] for c in doc["cases"]] == list(CASES)
    timed = _by_key(doc["rows"], "workload", "case")
    for workload in (w["name"] for w in doc["workloads"]):
        for case in CASES:
            reasons = [s["reason"] for s in doc["skipped"]
                       if s["case"] == case and s["workload"] in (None, workload)]
            assert ((workload, case) in timed) != bool(reasons), (workload, case, reasons)
            assert all(reasons), (workload, case)
            if case.startswith("torch-adamw-") or case.startswith("optiscope-adamw-torch"):
                assert (workload, case) in timed, f"{case} must run on CPU ({reasons})"
            if case.startswith("optiscope-adamw-triton"):
                assert "CUDA" in reasons[0]
            if case.startswith("optiscope-adafactor") and (workload, case) not in timed:
                assert "Adafactor" in reasons[0] or "CUDA" in reasons[0]


def test_each_row_is_computed_from_its_own_timings(quick):
    _, _, doc = quick
    rows = doc["rows"]
    for row in rows:
        t = row["times_ms"]
        assert row["reps"] == len(t) == 3 and row["warmup"] == 1
        assert all(x > 0 for x in t)
        assert row["ms_median"] == statistics.median(t)
        assert row["ms_min"] == min(t)
        seconds = row["ms_median"] / 1e3
        assert row["params_per_s"] == pytest.approx(row["params"] / seconds, rel=1e-12)
        assert row["effective_GBps"] == pytest.approx(row["bytes_per_step"] / seconds / 1e9,
                                                      rel=1e-12)
        assert row["roofline_pct"] is None
        if row["algorithm"] == "AdamW":  # fp32: read θ, g, m, v; write θ, m, v
            assert row["bytes_per_step"] == 28 * row["params"]

    for row in rows:
        baselines = [r for r in rows if r["baseline"] and r["workload"] == row["workload"]
                     and r["algorithm"] == row["algorithm"]]
        if not baselines:
            assert row["ratio_to_fastest_torch"] is None and row["reference_case"] is None
            continue
        fastest = min(baselines, key=lambda r: r["ms_median"])
        assert row["reference_case"] == fastest["case"]
        assert row["ratio_to_fastest_torch"] == pytest.approx(
            row["ms_median"] / fastest["ms_median"], rel=1e-12)
    assert any(r["ratio_to_fastest_torch"] == 1.0 and r["baseline"] for r in rows)


def test_ratios_roofline_and_reference_on_known_timings():
    def row(case, algorithm, ms, baseline, workload="w"):
        return dict(workload=workload, case=case, algorithm=algorithm, baseline=baseline,
                    params=10 ** 6, bytes_per_step=28 * 10 ** 6, ms_median=ms)

    rows = [row("loop", "AdamW", 10.0, True), row("fused", "AdamW", 5.0, True),
            row("ours", "AdamW", 6.0, False), row("ada", "Adafactor", 2.0, False),
            row("fused", "AdamW", 1.0, True, workload="other")]
    bench.add_ratios(rows, peak_Bps=14e9)
    loop, fused, ours, ada, other = rows
    assert [r["ratio_to_fastest_torch"] for r in (loop, fused, ours)] == [2.0, 1.0, 1.2]
    assert {r["reference_case"] for r in (loop, fused, ours)} == {"fused"}
    assert ada["ratio_to_fastest_torch"] is None and ada["reference_case"] is None
    assert other["ratio_to_fastest_torch"] == 1.0  # another workload has its own reference
    assert ours["params_per_s"] == pytest.approx(10 ** 6 / 6e-3)
    assert ours["effective_GBps"] == pytest.approx(28e6 / 6e-3 / 1e9)
    assert fused["roofline_pct"] == pytest.approx(100 * 28e6 / 5e-3 / 14e9)  # 40 %
    bench.add_ratios(rows, peak_Bps=None)
    assert fused["roofline_pct"] is None


def test_peak_bandwidth_table_knows_the_gpus_it_names():
    assert bench.peak_bandwidth("NVIDIA H100 80GB HBM3")[0] == 3.35e12
    assert bench.peak_bandwidth("NVIDIA H100 PCIe")[0] == 2.0e12
    assert bench.peak_bandwidth("NVIDIA H200")[0] == 4.8e12
    assert bench.peak_bandwidth("NVIDIA A100-SXM4-80GB")[0] == 2.039e12
    assert bench.peak_bandwidth("Some Future GPU") is None  # then: the measured copy bandwidth


def test_gpt2_small_has_the_real_models_shapes():
    shapes = MODELS["gpt2-small"].shapes
    assert len(shapes) == 148
    assert MODELS["gpt2-small"].params == 124_439_808
    assert shapes[:4] == ((50257, 768), (1024, 768), (768,), (768,))
    assert shapes[4:8] == ((768, 2304), (2304,), (768, 768), (768,))
    assert len(MODELS["gpt2-tiny"].shapes) == 148


def test_a_statistics_case_steps_the_optimizer_of_its_plain_case():
    for name, case in CASES.items():
        if case.stats:
            assert case.shares == name.removesuffix("-stats") and CASES[case.shares].shares is None


def test_a_case_that_cannot_be_built_is_skipped_and_the_others_still_run(monkeypatch):
    def unsupported(params):
        raise RuntimeError("fused=True is not supported on this device")
    monkeypatch.setitem(CASES, "torch-adamw-fused",
                        dataclasses.replace(CASES["torch-adamw-fused"], build=unsupported))
    settings = bench.Settings(device=torch.device("cpu"), sizes=[10], models=[],
                              cases=["torch-adamw-forloop", "torch-adamw-fused"], warmup=1,
                              repeats=2, flush_bytes=0, copy_bytes=1 << 16)
    doc = bench.run(settings)
    assert [r["case"] for r in doc["rows"]] == ["torch-adamw-forloop"]
    assert doc["skipped"] == [{
        "workload": "1 tensor of 10", "case": "torch-adamw-fused",
        "reason": "RuntimeError: fused=True is not supported on this device"}]


def test_a_case_whose_step_fails_is_reported_as_an_error_not_a_row(monkeypatch):
    class Broken(torch.optim.SGD):
        def request_stats(self):
            pass

        def step(self, closure=None):
            raise ValueError("kernel exploded")
    monkeypatch.setitem(CASES, "optiscope-adamw-torch", dataclasses.replace(
        CASES["optiscope-adamw-torch"], build=lambda params: Broken(params, lr=0.1)))
    settings = bench.Settings(device=torch.device("cpu"), sizes=[10], models=[],
                              cases=["torch-adamw-fused", "optiscope-adamw-torch",
                                     "optiscope-adamw-torch-stats"],
                              warmup=1, repeats=2, flush_bytes=0, copy_bytes=1 << 16)
    doc = bench.run(settings)
    assert [r["case"] for r in doc["rows"]] == ["torch-adamw-fused"]
    assert [(e["case"], e["reason"]) for e in doc["errors"]] == [
        ("optiscope-adamw-torch", "step raised ValueError: kernel exploded"),
        ("optiscope-adamw-torch-stats", "step raised ValueError: kernel exploded")]
    md = bench.render_markdown([(None, doc)])
    assert "- **Failed** on 1 tensor of 10: `optiscope-adamw-torch`: step raised" in md


def test_adafactor_rows_are_skipped_with_a_reason_when_it_does_not_import(monkeypatch):
    monkeypatch.delattr(optiscope.optimizers, "Adafactor", raising=False)
    reason = CASES["optiscope-adafactor-torch"].requires(torch.device("cpu"))
    assert "from optiscope.optimizers import Adafactor" in reason


# ----------------------------------------------------------------------------- monitor overhead
MONITORED = [(1, False), (1, True), (10, False), (100, False)]  # (every, with a run log)


def test_quick_run_times_every_monitor_variant_over_whole_periods(quick):
    _, _, doc = quick
    ov = doc["overhead"]
    assert ov["command"] == doc["command"] and set(ov["load_average"]) == {"start", "end"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", ov["date_utc"])
    assert ov["settings"]["quick"] is True and ov["settings"]["everies"] == [1, 10, 100]
    assert ov["settings"]["monitor_defaults"]["topk_density"] == 0.01
    assert ov["errors"] == []
    names = [i["implementation"] for i in ov["implementations"]]
    assert names == ["optiscope-adamw-torch", "optiscope-adamw-triton", "torch-adamw-fused"]
    assert [(s["implementation"], s["workload"]) for s in ov["skipped"]] == [
        ("optiscope-adamw-triton", None)]
    assert "CUDA" in ov["skipped"][0]["reason"]
    assert [w["name"] for w in ov["workloads"]] == [MODELS["gpt2-tiny"].name]

    for impl in ("optiscope-adamw-torch", "torch-adamw-fused"):
        rows = [r for r in ov["rows"] if r["implementation"] == impl]
        watched = [r for r in rows if r["every"] is not None]
        assert [(r["every"], r["log_dir"]) for r in watched] == MONITORED
        # One unmonitored row per block length the monitored rows use, and no other.
        assert ({r["block_steps"] for r in rows if r["every"] is None}
                == {r["block_steps"] for r in watched})
        for row in rows:
            assert row["bundled"] == impl.startswith("optiscope")
            assert row["params"] == MODELS["gpt2-tiny"].params and row["tensors"] == 148
            assert row["param_bytes"] == 4 * row["params"]  # fp32
            assert row["blocks"] == len(row["times_ms"]) >= 2 and all(t > 0 for t in row["times_ms"])
            assert row["steps"] == row["blocks"] * row["block_steps"]
        for row in watched:  # whole sampling periods: one sampled step in each
            assert row["steps"] % row["every"] == 0
            assert row["sampled_steps"] == row["periods"] == row["steps"] // row["every"]
            assert row["memory_bytes"] > 0


def _median_of_periods(times, block_steps, blocks_per_period):
    """The slow way: cut the blocks into whole periods, mean step time of each, their median."""
    periods = []
    for start in range(0, len(times), blocks_per_period):
        chunk = times[start:start + blocks_per_period]
        if len(chunk) == blocks_per_period:
            periods.append(sum(chunk) / (blocks_per_period * block_steps))
    return statistics.median(periods)


def test_overhead_ratios_and_memory_are_computed_from_the_rows_own_figures(quick):
    _, _, doc = quick
    rows = doc["overhead"]["rows"]
    reference = {(r["implementation"], r["block_steps"]): r for r in rows
                 if r["every"] is None and not r["control"]}
    controls = [r for r in rows if r["control"]]
    assert {r["implementation"] for r in controls} == {r["implementation"] for r in rows}
    for row in rows:
        assert row["ms_per_step_mean"] == pytest.approx(sum(row["times_ms"]) / row["steps"],
                                                        rel=1e-12)
        per_period = row.get("blocks_per_period", 1)
        assert row["ms_per_step"] == pytest.approx(
            _median_of_periods(row["times_ms"], row["block_steps"], per_period), rel=1e-12)
        if row["every"] is None and not row["control"]:
            assert "ratio" not in row
            continue
        if not row["control"]:
            assert per_period == max(1, row["every"] // row["block_steps"])
        ref = reference[(row["implementation"], row["block_steps"])]
        base = _median_of_periods(ref["times_ms"], ref["block_steps"], per_period)
        assert row["unmonitored_ms_per_step"] == pytest.approx(base, rel=1e-12)
        times, ref_times = row["times_ms"], ref["times_ms"]
        assert len(times) == len(ref_times)  # one block per round each
        paired = [sum(times[i:i + per_period]) / sum(ref_times[i:i + per_period])
                  for i in range(0, len(times), per_period)]
        assert row["ratio"] == pytest.approx(statistics.median(paired), rel=1e-12)
        assert row["overhead_pct"] == pytest.approx(100 * (row["ratio"] - 1), rel=1e-9)
        if row["control"]:
            continue
        assert row["memory_pct"] == pytest.approx(100 * row["memory_bytes"] / row["param_bytes"])
        assert row["memory_target"] is None  # 44k parameters: the target is for > 10^7
        expected = {(1, True): 1.5, (10, True): 1.05}.get((row["every"], row["bundled"]))
        if expected is None:
            assert row["target"] is None
        else:  # the CPU targets are for the bundled optimizer's torch backend
            assert row["target"]["max_ratio"] == expected
            assert row["target"]["pass"] == (row["ratio"] <= expected)


def test_overhead_ratios_targets_and_memory_on_known_timings():
    rows = overhead_rows()
    bench.add_overhead_ratios(rows, "cpu")
    e1, e1_log, e10, e100, foreign = [r for r in rows if r["every"] is not None]
    assert [r["ms_per_step"] for r in rows[:2]] == [100.0, 100.0]  # medians of the blocks
    assert rows[1]["ms_per_step_mean"] == pytest.approx(109.0)
    assert "ratio" not in rows[0] and "ratio" not in rows[1]
    control = rows[2]
    assert control["ratio"] == pytest.approx(1.01) and "target" not in control
    assert e1["ms_per_step"] == 140.0 and e1["ms_per_step_mean"] == pytest.approx(560.0)
    assert e1["ratio"] == pytest.approx(1.4) and e1["target"]["pass"] is True
    assert e1["ratio_quartiles"] == pytest.approx([1.4, (1.4 + 14) / 2])
    assert e1_log["ratio"] == pytest.approx(1.6) and e1_log["target"]["pass"] is False
    assert e10["ms_per_step"] == pytest.approx(107.0)  # median of the 10 blocks' means
    assert e10["ratio"] == pytest.approx(1.06) and e10["target"] == {
        "text": "≤ 5 %", "max_ratio": 1.05, "pass": False}
    # every=100 in blocks of 10: one period is 10 blocks, and so is the reference's group
    assert e100["ms_per_step"] == pytest.approx(110.0)
    assert e100["unmonitored_ms_per_step"] == pytest.approx(109.0)
    assert e100["ratio"] == pytest.approx(110 / 109) and e100["target"] is None
    assert foreign["ratio"] == pytest.approx(8.0) and foreign["target"] is None
    assert e1["memory_pct"] == pytest.approx(100 * 1.9e6 / (4 * 124_439_808))  # 0.38 %
    assert e1["memory_target"] == {"max_pct": 1.0, "pass": True}
    assert foreign["memory_target"] == {"max_pct": 1.0, "pass": False}  # 1.2 %

    gpu = overhead_rows("triton")
    bench.add_overhead_ratios(gpu, "cuda")
    assert gpu[3]["target"] == {"text": "≤ 3 %", "max_ratio": 1.03, "pass": False}
    assert gpu[5]["target"] is None  # no GPU target at every=10
    on_cuda = overhead_rows("torch")  # the torch backend on a GPU: reported, no target
    bench.add_overhead_ratios(on_cuda, "cuda")
    assert all(r.get("target") is None for r in on_cuda)


def test_overhead_ratios_refuse_rows_not_timed_in_the_same_rounds():
    rows = [overhead_row("optiscope-adamw-torch", None, 1, [100.0, 100.0]),
            overhead_row("optiscope-adamw-torch", 1, 1, [140.0, 140.0, 140.0])]
    with pytest.raises(ValueError, match="3 blocks against 2"):
        bench.add_overhead_ratios(rows, "cpu")


@pytest.mark.parametrize("every, step_ms, settings, expected", [
    (1, 60.0, OverheadSettings(), 1),
    (10, 60.0, OverheadSettings(), 10),
    (100, 60.0, OverheadSettings(), 10),     # 6 s: 10 blocks of 10 (0.6 s)
    (100, 9.0, OverheadSettings(), 100),     # 0.9 s: one block
    (100, 30.0, OverheadSettings(), 25),     # 0.75 s per block of 25
    (100, 700.0, OverheadSettings(), 10),    # never more than 10 blocks per period
    (7, 500.0, OverheadSettings(), 1),       # a prime period, 3.5 s: 7 blocks of 1
    (1, 1.5, OverheadSettings(min_block_steps=100), 100),  # CUDA: streams of 100 steps
    (10, 1.5, OverheadSettings(min_block_steps=100), 100),
    (1, 50.0, OverheadSettings(min_block_steps=100), 20),  # ... as far as 1 s allows
])
def test_block_lengths_cover_whole_periods_or_divide_them(every, step_ms, settings, expected):
    steps = bench.block_steps(every, step_ms, settings)
    assert steps == expected
    assert steps % every == 0 or every % steps == 0


def test_rounds_are_whole_periods():
    from optiscope.bench.overhead import whole_period_rounds
    assert [whole_period_rounds(r, 10) for r in (1, 7, 14.9, 15.8, 26)] == [10, 10, 10, 20, 30]
    assert [whole_period_rounds(r, 1) for r in (1, 2.4, 7)] == [1, 2, 7]


def test_a_monitor_that_fails_is_an_error_and_the_other_optimizers_still_run(monkeypatch):
    from optiscope import OptimizerMonitor

    def exploding(self):
        if not self.collector.produced:  # only the foreign optimizer's monitor
            raise ValueError("probe exploded")
    monkeypatch.setattr(OptimizerMonitor, "_after_step", exploding)
    settings = bench.Settings(
        device=torch.device("cpu"), sizes=[], models=["gpt2-tiny"], cases=[], steps=False,
        flush_bytes=0, copy_bytes=1 << 16,
        overhead=OverheadSettings(everies=(1, 10), log_every=None, rounds=2))
    doc = bench.run(settings)
    assert doc["rows"] == [] and doc["settings"]["steps"] is False
    ov = doc["overhead"]
    assert {r["implementation"] for r in ov["rows"]} == {"optiscope-adamw-torch"}
    assert [(r["every"], r["blocks"]) for r in ov["rows"] if r["every"]] == [(1, 2), (10, 2)]
    [error] = ov["errors"]
    assert error["implementation"] == "torch-adamw-fused"
    assert error["reason"].endswith("step raised ValueError: probe exploded")
    md = bench.render_markdown([(None, doc)])
    assert "- **Failed** on GPT-2 tiny: 148 tensors, 44k: `torch-adamw-fused`: " in md
    assert "_No step timings: the run that wrote this measured only the monitor's" in md


# ----------------------------------------------------------------------------- command line
@pytest.mark.parametrize("args, says", [
    (["--cases", "nope"], "unknown case 'nope'"),
    (["--sizes", "-5"], "positive integer, got -5"),
    (["--sizes", "0"], "positive integer, got 0"),
    (["--sizes", "many"], "got 'many'"),
    (["--repeats", "0"], "positive integer, got 0"),
    (["--models", "gpt5"], "invalid choice: 'gpt5'"),
    (["--device", "tpu"], "--device 'tpu'"),
    (["--sizes", "--models"], "nothing to measure"),
    (["--overhead-only", "--sizes", "1e6"], "--overhead-only times no step table: --sizes"),
    (["--overhead-only", "--models"], "--overhead-only times the models, and --models is empty"),
    (["--no-overhead", "--overhead-rounds", "3"], "--no-overhead times no overhead: drop"),
    (["--overhead-only", "--no-overhead"], "not allowed with argument"),
    (["--overhead-budget", "0"], "positive number, got 0"),
])
def test_bad_input_exits_nonzero_with_a_one_line_reason(args, says, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(args + ["--output", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err, err
    assert not list(tmp_path.iterdir())


def test_quick_run_without_output_writes_no_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert bench.main(["--quick", "--device", "cpu", "--sizes", "7", "--models",
                       "--cases", "torch-adamw-fore*", "*-fused"]) == 0
    assert not list(tmp_path.rglob("*"))
    out = capsys.readouterr().out
    assert "From this run (no results file written)" in out
    assert "torch.optim.AdamW (foreach)" in out and "torch.optim.AdamW (fused)" in out
    assert "for-loop" not in out


def test_console_script_and_module_entry_points():
    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("optiscope") == "optiscope.cli:main"
    shown = subprocess.run([sys.executable, "-m", "optiscope.cli", "bench", "--help"],
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "examples:" in shown.stdout and "optiscope bench --quick" in shown.stdout
    assert all(name in shown.stdout for name in CASES)
    bad = subprocess.run([sys.executable, "-m", "benchmarks", "--cases", "nope"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.startswith("python -m benchmarks: error: unknown case 'nope'")
    assert bad.stderr.count("\n") == 1


def test_the_other_benchmarks_files_beside_the_step_timings_are_left_alone(tmp_path):
    """The report, memory, convergence and AdaDiag scripts write their own schemas into the same
    directory; rendering the step tables must skip them, not fail on them (it did)."""
    (tmp_path / "report-cpu.json").write_text('{"schema": "optiscope-bench-report/1"}')
    (tmp_path / "memory.json").write_text('{"schema": "optiscope-bench-memory/1"}')
    assert bench.load_results(tmp_path) == []
