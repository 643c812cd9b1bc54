"""The HTML report: the freeze verdict on drift series with known answers, the report of real
training runs (one, and several overlaid), escaping, no network references, the size of a
10,000-step × 100-tensor report, and real headless Chromium opening each report with every
figure drawn and no script error (its downsampling: test_report_downsample.py)."""

from __future__ import annotations

import base64
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from plotly.offline import get_plotlyjs

from models import TinyTransformer, batches, loss_fn
from optiscope import OptimizerMonitor, RunHistory
from benchmarks.browser import PageStatus, find_chromium, open_in_chromium
from optiscope.dashboards.html import PLOTLYJS_END, PLOTLYJS_START, Page, esc, table
from optiscope.dashboards.report import FreezeVerdict, freeze_verdict, write_report
from benchmarks.synthetic import synthetic_run
from optiscope.monitor.history import Alert
from optiscope.monitor.readiness import INT8_MAX_ERROR, readiness
from optiscope.optimizers import Adafactor, AdamW

HOSTILE = '<img src=x onerror="window.pwned=1">'


# ------------------------------------------------------------------------------ helpers
def _train(log_dir: Path, make_opt, steps: int = 30, freeze_probe: int | None = 10) -> RunHistory:
    torch.manual_seed(0)
    model = TinyTransformer()
    opt = make_opt(model.parameters())
    with OptimizerMonitor(opt, model=model, log_dir=log_dir, freeze_probe=freeze_probe,
                          report=False) as mon:
        for tokens, targets in batches(steps):
            loss = loss_fn(model, tokens, targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.log_scalar("loss", loss)
    return mon.history


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Run directories of three real tiny trainings: AdamW, Adafactor and SGD with momentum."""
    root = tmp_path_factory.mktemp("runs")
    makers = {"adamw": lambda p: AdamW(p, lr=3e-3, weight_decay=0.1),
              "adafactor": lambda p: Adafactor(p),
              "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)}
    for name, make in makers.items():
        _train(root / name, make, freeze_probe=None if name == "sgd" else 10)
    return {name: root / name for name in makers}


@pytest.fixture(scope="module")
def big_run() -> RunHistory:
    return synthetic_run(steps=10_000, layers=100)


def _figures(text: str) -> list[dict]:
    """The plotly figures of a report, in page order."""
    blobs = re.findall(r'<script type="application/json" id="fig-\d+-data">(.*?)</script>', text,
                       flags=re.S)
    return [json.loads(b) for b in blobs]


def _section(text: str, anchor: str) -> str:
    start = text.index(f'<section id="{anchor}">')
    return text[start:text.index("</section>", start)]


def _without_plotlyjs(text: str) -> str:
    start, end = text.index(PLOTLYJS_START), text.index(PLOTLYJS_END)
    return text[:start] + text[end:]


def chromium_status(path: Path) -> PageStatus:
    """Opens a report in headless Chromium: skipped without one, unless
    OPTISCOPE_REQUIRE_BROWSER=1 (CI), where a missing browser fails."""
    if find_chromium() is None:
        if os.environ.get("OPTISCOPE_REQUIRE_BROWSER") == "1":
            pytest.fail("OPTISCOPE_REQUIRE_BROWSER=1 but no chromium on PATH or in /usr/bin: "
                        "install Debian's chromium package (apt-get install chromium)")
        pytest.skip("no chromium: install it (apt-get install chromium) to open the report in a "
                    "real browser")
    return open_in_chromium(path)


def assert_rendered(status: PageStatus) -> None:
    assert status.state == "done", status
    assert status.figures == status.expected > 0, status
    assert status.rendered == status.figures, (f"{status.rendered} of {status.figures} figures "
                                               f"drawn: {status.detail}")
    assert status.errors == 0, f"script errors: {status.detail}"
    assert status.resources == 0, "a self-contained page fetches nothing"
    assert status.ok and 0 < status.first_ms <= status.ms


def _hostile_run() -> RunHistory:
    """A run whose every user-chosen string is markup: optimizer, tensor, scalar, state key,
    hyperparameter, command, alert."""
    history = RunHistory(meta=dict(
        optimizer_name=HOSTILE, command="train.py </script><script>window.pwned=2</script>",
        hyperparameters=[{HOSTILE: HOSTILE}], n_params=15,
        params=[dict(name=HOSTILE, numel=10), dict(name="b", numel=5)]))
    for step in range(1, 31):
        for metric in ("grad_norm", "moment2_norm", "moment2_drift", "topk_coverage"):
            history.add(step, metric, ["global", HOSTILE, "b"], [1.0 / step, 0.5, 0.25])
        history.add(step, "state_bytes", ["global", HOSTILE, "b", f"key/{HOSTILE}"],
                    [120, 80, 40, 120])
        history.add(step, "lr", ["group0"], [1e-3])
        history.add(step, HOSTILE, ["global"], [float(step)])
    history.alerts.append(Alert(5, "grad_spike", "grad_norm", [HOSTILE], HOSTILE, 1.0))
    return history


def _decode(array: dict) -> np.ndarray:
    """A plotly base64 typed array as numpy."""
    dtype = {"f4": np.float32, "i4": np.int32}[array["dtype"]]
    values = np.frombuffer(base64.b64decode(array["bdata"]), dtype=dtype)
    shape = array.get("shape")
    return values.reshape([int(n) for n in shape.split(",")]) if shape else values


# ------------------------------------------------------------------------------ freeze verdict
def _drift_run(drift: dict[int, float], norms: dict[int, float] | None = None,
               probe: dict[int, float] | None = None, probe_step: int | None = None) -> RunHistory:
    history = RunHistory(meta={"freeze_probe": probe_step})
    for step in sorted(set(drift) | set(norms or {}) | set(probe or {})):
        if norms is not None and step in norms:
            history.add(step, "moment2_norm", ["global"], [norms[step]])
        if step in drift:
            history.add(step, "moment2_drift", ["global"], [drift[step]])
        if probe is not None and step in probe:
            history.add(step, "moment2_drift_since_freeze", ["global"], [probe[step]])
    return history


def _reference_bounds(drift: dict[int, float], norms: dict[int, float]) -> dict[int, float]:
    """Σ over drift samples after T of d·‖v_prev‖/‖v_T‖, by a literal loop."""
    sampled = sorted(norms)
    prev = {s: max(p for p in sampled if p < s) for s in drift if any(p < s for p in sampled)}
    candidates = sorted(set(prev.values()) | set(drift))
    return {t: sum(drift[s] * norms[prev[s]] for s in prev if prev[s] >= t) / norms[t]
            for t in candidates}


def test_freeze_verdict_finds_the_known_freeze_step():
    # Drift 0.05 per sample until step 30, then 0.001: from step 30 on the sum is 0.07 <= 0.1;
    # from step 29 it is 0.12.
    drift = {s: (0.05 if s <= 30 else 0.001) for s in range(2, 101)}
    verdict = freeze_verdict(_drift_run(drift, {s: 1.0 for s in range(1, 101)}), tol=0.1)
    assert verdict.available and verdict.stable
    assert verdict.freeze_step == 30 and verdict.evidence == "summed drift"
    assert verdict.bound == pytest.approx(0.07)
    assert "from step 30" in verdict.message
    assert isinstance(verdict, FreezeVerdict) and verdict.probe_step is None


def test_freeze_verdict_bound_weights_each_drift_by_the_norm_of_v():
    rng = np.random.default_rng(0)
    norms = {s: float(np.exp(rng.normal())) for s in range(1, 61, 3)}
    drift = {s: float(rng.uniform(0.0, 0.05)) for s in list(norms)[1:]}
    verdict = freeze_verdict(_drift_run(drift, norms), tol=0.2)
    reference = _reference_bounds(drift, norms)
    assert verdict.steps.tolist() == sorted(reference)
    np.testing.assert_allclose(verdict.remaining, [reference[t] for t in sorted(reference)],
                               rtol=1e-12)
    expected = next((t for t in sorted(reference) if reference[t] <= 0.2
                     and 58 - t >= 0.2 * (58 - 1)), None)
    assert verdict.freeze_step == expected


def test_freeze_verdict_without_norms_takes_v_as_constant():
    drift = {s: 0.01 for s in range(2, 50)}
    verdict = freeze_verdict(_drift_run(drift), tol=0.1)
    assert verdict.freeze_step == 39  # 10 drifts of 0.01 after step 39
    assert "the run has no moment2_norm" in verdict.message


def test_freeze_verdict_wants_a_tail_and_finite_drift():
    # Only the last 10% of the run is quiet: too short a tail to call it stable.
    drift = {s: (0.3 if s <= 90 else 0.0) for s in range(2, 101)}
    late = freeze_verdict(_drift_run(drift), tol=0.1)
    assert late.available and not late.stable and late.freeze_step is None
    assert "not stable over the first 80% of the run" in late.message
    # The drift recorded at step 90 is the change from 89 to 90: from step 90 on, none.
    assert freeze_verdict(_drift_run(drift), tol=0.1, min_tail=0.05).freeze_step == 90
    # A NaN drift: no bound from any step before it.
    drift = {s: 0.001 for s in range(2, 101)}
    drift[60] = math.nan
    verdict = freeze_verdict(_drift_run(drift), tol=0.1)
    assert np.isinf(verdict.remaining[verdict.steps < 60]).all()
    assert verdict.freeze_step == 60, "the NaN was the change into step 60; later ones are finite"


def test_freeze_verdict_from_the_freeze_probe():
    noisy = {s: 0.05 for s in range(2, 101)}  # the summed drift never certifies anything
    calm = {s: 0.002 * (s - 20) for s in range(20, 101)}  # at most 0.16 ... or, scaled, 0.08
    for scale, stable in ((0.5, True), (1.0, False)):
        probe = {s: v * scale for s, v in calm.items()}
        verdict = freeze_verdict(_drift_run(noisy, probe=probe, probe_step=20), tol=0.1)
        assert verdict.probe_step == 20
        assert verdict.probe_max == pytest.approx(max(probe.values()))
        assert verdict.probe_last == pytest.approx(probe[100]) and verdict.probe_last_step == 100
        assert verdict.stable is stable
        assert verdict.freeze_step == (20 if stable else None)
        assert verdict.evidence == ("freeze probe" if stable else None)
        assert "Freeze probe: with v frozen at step 20" in verdict.message


def test_freeze_verdict_says_why_there_is_none(runs):
    from optiscope import load_run

    sgd = freeze_verdict(load_run(runs["sgd"]))
    assert not sgd.available and not sgd.stable
    assert sgd.message == ("No verdict on freezing the second moment: SGD keeps no second "
                           "moment.")
    assert not freeze_verdict(RunHistory()).available
    with pytest.raises(ValueError, match="tol must be a number > 0, got 0"):
        freeze_verdict(RunHistory(), tol=0)
    with pytest.raises(ValueError, match=r"min_tail must be in \[0, 1\), got 1"):
        freeze_verdict(RunHistory(), min_tail=1)


def test_freeze_verdict_of_a_real_run_with_a_freeze_probe(runs):
    from optiscope import load_run

    history = load_run(runs["adamw"])
    verdict = freeze_verdict(history)
    steps, values = history.series("moment2_drift_since_freeze")
    assert verdict.available and verdict.probe_step == 10
    assert verdict.probe_last == values[-1] and verdict.probe_last_step == steps[-1]
    assert verdict.probe_max == values.max()
    assert len(verdict.steps) == len(history.series("moment2_drift")[0]) + 1


# ------------------------------------------------------------------------------ report
def test_report_of_a_real_run(runs, tmp_path):
    from optiscope import load_run

    out = write_report(runs["adamw"], tmp_path / "sub" / "report.html")
    assert out == tmp_path / "sub" / "report.html"
    text = out.read_text(encoding="utf-8")
    history = load_run(runs["adamw"])

    assert text.count(PLOTLYJS_START) == 1 and text.count(get_plotlyjs()) == 1, "inlined once"
    figures = _figures(text)
    assert len(figures) == text.count('class="optiscope-figure"')
    assert f'data-expected="{len(figures)}"' in text
    for anchor in ("summary", "readiness", "trends", "layers", "drift", "quantization",
                   "coverage", "memory", "alerts"):
        assert f'<section id="r1-{anchor}">' in text, anchor
    section = _section(text, "r1-readiness")
    for verdict in readiness(history):  # the run's own verdicts, each in the table
        assert f"<td>{esc(verdict.question)}</td><td><span" in section
        assert f">{verdict.answer}</span>" in section

    summary = _section(text, "r1-summary")
    state = history.series("state_bytes")[1][-1]
    n_params = history.meta["n_params"]
    assert f"{state / n_params:.3g} B" in summary
    assert esc(freeze_verdict(history).message) in summary
    assert "optiscope.optimizers.adam.AdamW" in summary and "weight_decay" in summary

    layer_metrics = [m for m in ("grad_norm", "grad_max", "weight_norm", "update_norm",
                                 "update_ratio", "moment1_norm", "moment2_norm")
                     if m in history.metrics()]
    heatmaps = [f for f in _figures(_section(text, "r1-layers"))
                if f["data"][0]["type"] == "heatmap"]
    assert len(heatmaps) == len(layer_metrics) == 7
    tensors = [p["name"] for p in history.meta["params"]]
    assert heatmaps[0]["data"][0]["y"] == tensors, "one row per tensor, in model order"
    for fig in figures:  # numbers travel as base64 typed arrays, not decimal text
        for trace in fig["data"]:
            for key in ("x", "y", "z"):
                if isinstance(trace.get(key), dict):
                    assert trace[key]["dtype"] in ("f4", "i4") and "bdata" in trace[key]
    assert all(isinstance(f["data"][0]["z"], dict) for f in heatmaps)

    drift = _section(text, "r1-drift")
    assert len(_figures(drift)) == 3, "the drift plot and two heatmaps"
    assert "No quant_error: AdamW does not compress its state." in _section(text, "r1-quantization")
    assert len(_figures(_section(text, "r1-coverage"))) == 2
    memory = _section(text, "r1-memory")
    for key in ("exp_avg", "exp_avg_sq", "step", "fp32 AdamW"):
        assert key in memory


def test_report_of_several_runs_overlays_them(runs, tmp_path):
    out = write_report([runs["adamw"], runs["adafactor"], runs["sgd"]], tmp_path / "all.html",
                       names=["AdamW lr 3e-3", "Adafactor", "SGD"])
    text = out.read_text(encoding="utf-8")
    assert text.count(PLOTLYJS_START) == 1
    for anchor in ("compare", "compare-loss", "compare-memory", "compare-metrics", "r1-run",
                   "r2-run", "r3-run", "r3-drift"):
        assert f'id="{anchor}"' in text, anchor
    names = ["AdamW lr 3e-3", "Adafactor", "SGD"]
    (loss,) = _figures(_section(text, "compare-loss"))
    assert [t["name"] for t in loss["data"] if t["type"] == "scatter"] == names

    (memory,) = _figures(_section(text, "compare-memory"))
    labelled = [t["text"][0] for t in memory["data"] if t["type"] == "scatter" and t["text"][0]]
    assert labelled == names, "one labelled point per run"
    bars = [t for t in memory["data"] if t["type"] == "bar"]
    from optiscope import load_run
    expected = [load_run(runs[n]).series("state_bytes")[1][-1] / load_run(runs[n]).meta["n_params"]
                for n in ("adamw", "adafactor", "sgd")]
    assert [b["x"][0] for b in bars] == names
    np.testing.assert_allclose([b["y"][0] for b in bars], expected)
    table_html = _section(text, "compare")
    assert all(esc(n) in table_html for n in names)
    assert "SGD keeps no second moment" in _section(text, "r3-drift")

    (overlay,) = _figures(_section(text, "compare-metrics"))
    in_legend = [t["name"] for t in overlay["data"] if t.get("showlegend")]
    assert in_legend == names, "each run once in the legend, for every panel"


def test_report_names_and_arguments(tmp_path):
    history = RunHistory(meta={"optimizer_name": "AdamW"})
    out = write_report([history, history], tmp_path / "two.html")
    text = out.read_text()
    assert "AdamW (2)" in text and "optiscope report: 2 runs" in text
    with pytest.raises(ValueError, match=r"names must list one name per run \(2\), got \['a'\]"):
        write_report([history, history], tmp_path / "x.html", names=["a"])
    with pytest.raises(ValueError, match="no runs given"):
        write_report([], tmp_path / "x.html")
    with pytest.raises(ValueError, match="max_points must be an integer >= 4, got 2"):
        write_report(history, tmp_path / "x.html", max_points=2)
    with pytest.raises(ValueError, match="freeze_tol must be a number > 0, got -1"):
        write_report(history, tmp_path / "x.html", freeze_tol=-1)
    with pytest.raises(TypeError, match=r"runs\[0\] must be a RunHistory or a run directory path, "
                                        "got int"):
        write_report([3], tmp_path / "x.html")
    with pytest.raises(IsADirectoryError, match="pass a file path such as"):
        write_report(history, tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a run directory: no runlog.jsonl there"):
        write_report(tmp_path, tmp_path / "x.html")
    assert not list(tmp_path.glob(".report-*")), "no temporary file left behind"


def test_report_of_a_run_without_samples(tmp_path):
    text = write_report(RunHistory(meta={"optimizer_name": "SGD"}), tmp_path / "r.html").read_text()
    assert "No sampled steps: the run recorded no metrics." in text
    assert "No state_bytes recorded" in text and "No alerts." in text


def test_report_escapes_every_user_string(tmp_path):
    out = write_report(_hostile_run(), tmp_path / "hostile.html", names=[HOSTILE], title=HOSTILE)
    text = out.read_text(encoding="utf-8")
    page = _without_plotlyjs(text)
    assert "<img" not in page, "a user string became markup"
    assert "</script><script>" not in page
    # Ours only: the error recorder, plotly.js, one per figure, the config, template and renderer.
    assert page.count("<script") == page.count("</script>") == len(_figures(text)) + 5
    summary = _section(text, "r1-summary")
    assert summary.count(esc(HOSTILE)) >= 3, "optimizer, hyperparameter name and value"
    assert esc(HOSTILE) in _section(text, "r1-alerts")
    heatmap = next(f for f in _figures(text) if f["data"][0]["type"] == "heatmap")
    assert heatmap["data"][0]["y"] == [esc(HOSTILE), "b"], "plotly shows entities as text"


def test_report_has_no_network_references(runs, tmp_path):
    text = write_report([runs["adamw"], runs["sgd"]], tmp_path / "r.html").read_text()
    page = _without_plotlyjs(text)
    assert "http://" not in page and "https://" not in page
    for pattern in (r"\bsrc\s*=", r"<link\b", r"@import", r"url\(", r"<iframe", r"mathjax"):
        assert not re.search(pattern, page, flags=re.I), pattern
    config = json.loads(re.search(r'id="optiscope-config">(.*?)</script>', text).group(1))
    assert config["displaylogo"] is False and config["showLink"] is False


def test_page_keeps_script_json_inside_its_script_element():
    import plotly.graph_objects as go

    page = Page("</title><b>t")
    page.figure(go.Figure(go.Scatter(x=np.arange(3, dtype=np.int32), y=np.ones(3, np.float32),
                                     name="</script><script>alert(1)</script><!--")),
                caption="cap")
    page.html(table(["a", "b"], [[esc("<x>"), "1"]], numeric={1}, caption="note"))
    text = page.render(nav=[("id", "<nav>")])
    assert page.figures == 1 and "<title>&lt;/title&gt;&lt;b&gt;t</title>" in text
    assert "</script><script>alert(1)" not in text and "&lt;nav&gt;" in text
    (fig,) = _figures(text)
    assert fig["data"][0]["name"] == "</script><script>alert(1)</script><!--"
    assert '<td class=num>1</td>' in text and "&lt;x&gt;" in text


def test_many_tensors_keep_the_heatmap_readable(tmp_path):
    history = synthetic_run(steps=60, layers=200, freeze_probe=None)
    text = write_report(history, tmp_path / "wide.html").read_text()
    grad = next(f for f in _figures(_section(text, "r1-layers"))
                if f["data"][0]["type"] == "heatmap")
    rows = grad["data"][0]["y"]
    assert len(rows) == 160
    nan_tensor = history.meta["synthetic_nan"][1]
    spiked = {name for _, name in history.meta["synthetic_spikes"]}
    assert nan_tensor in rows and spiked <= set(rows), "the eventful tensors are shown"
    order = [p["name"] for p in history.meta["params"]]
    assert rows == [t for t in order if t in set(rows)], "in model order"
    assert "Showing the 160 of 200 tensors" in text


def test_synthetic_run_holds_every_metric_and_its_events():
    history = synthetic_run(steps=200, layers=12, every=10, freeze_probe=55)
    for metric in ("grad_norm", "grad_max", "nonfinite_grads", "weight_norm", "update_norm",
                   "update_ratio", "moment1_norm", "moment2_norm", "moment2_drift",
                   "moment2_drift_since_freeze", "quant_error", "topk_coverage", "state_bytes",
                   "lr", "skipped_steps", "loss"):
        assert metric in history.metrics(), metric
    steps, _ = history.series("grad_norm")
    assert steps.tolist() == sorted(set(range(1, 201, 10)) | {55})
    for step, name in history.meta["synthetic_spikes"]:
        s, v = history.series("grad_norm", name)
        assert v[s.tolist().index(step)] > 5 * np.median(v)
    step, name = history.meta["synthetic_nan"]
    s, v = history.series("grad_norm", name)
    assert math.isnan(v[s.tolist().index(step)])
    assert math.isnan(history.series("grad_norm")[1][s.tolist().index(step)])
    assert {a.kind for a in history.alerts} == {"grad_spike", "nonfinite_grads"}
    with pytest.raises(ValueError, match="layers >= 2"):
        synthetic_run(layers=1)


@pytest.mark.slow
def test_report_of_a_long_run_stays_small(big_run, tmp_path):
    out = write_report(big_run, tmp_path / "big.html")
    size = out.stat().st_size
    assert size < 10_000_000, f"{size / 1e6:.2f} MB"
    text = out.read_text()
    assert "Each column holds 33–34 consecutive samples" in text
    # The global gradient norm keeps its largest value through downsampling to 2,000 points ...
    trends = _figures(_section(text, "r1-trends"))
    grid = next(f for f in trends if len(f["data"]) > 5)
    shown = _decode(grid["data"][0]["y"])
    assert len(shown) <= 2000 + 2 + 1  # two a bucket, the first and last samples, one NaN
    full = big_run.series("grad_norm")[1]
    assert np.nanmax(shown) == np.float32(np.nanmax(full))
    # ... and each spiked tensor's heatmap row, its spike.
    heatmap = next(f for f in _figures(_section(text, "r1-layers"))
                   if f["data"][0]["type"] == "heatmap")["data"][0]
    z = _decode(heatmap["z"])
    assert z.shape == (100, 300)
    for step, name in big_run.meta["synthetic_spikes"]:
        s, v = big_run.series("grad_norm", name)
        row = z[heatmap["y"].index(name)]
        assert 10 ** float(np.nanmax(row)) == pytest.approx(v[s.tolist().index(step)], rel=1e-5)


# ------------------------------------------------------------------------------ browser
@pytest.mark.slow
def test_chromium_draws_every_figure_of_one_run(runs, tmp_path):
    out = write_report(runs["adamw"], tmp_path / "one.html")
    assert_rendered(chromium_status(out))


@pytest.mark.slow
def test_chromium_draws_every_figure_of_several_runs(runs, tmp_path):
    out = write_report(list(runs.values()), tmp_path / "several.html", names=list(runs))
    assert_rendered(chromium_status(out))


@pytest.mark.slow
def test_chromium_runs_no_injected_markup(tmp_path):
    out = write_report(_hostile_run(), tmp_path / "hostile.html", names=[HOSTILE], title=HOSTILE)
    status = chromium_status(out)
    assert_rendered(status)  # an injected <img src=x> would count as an error and a resource
    assert not re.search(r"<img[^>]*onerror", status.dom), "markup was injected"


@pytest.mark.slow
def test_chromium_draws_the_long_run(big_run, tmp_path):
    out = write_report(big_run, tmp_path / "big.html")
    assert_rendered(chromium_status(out))


@pytest.mark.slow
def test_chromium_status_reports_a_broken_page(runs, tmp_path):
    out = write_report(runs["sgd"], tmp_path / "broken.html")
    text = out.read_text(encoding="utf-8")
    out.write_text(text.replace("Plotly.newPlot(div,", "Plotly.noSuchFunction(div,"))
    status = chromium_status(out)
    assert status.state == "done" and not status.ok
    assert status.rendered == 0 and status.errors == status.figures > 0
    assert "noSuchFunction is not a function" in status.detail
    assert re.search(r'<div id="optiscope-banner">This report did not render completely: 0 of '
                     rf"{status.figures} figures drawn", status.dom)
    plain = tmp_path / "plain.html"
    plain.write_text("<!DOCTYPE html><p>not a report</p>")
    with pytest.raises(RuntimeError, match="no status element"):
        open_in_chromium(plain)
    with pytest.raises(FileNotFoundError, match="no report at"):
        open_in_chromium(tmp_path / "missing.html")



def test_an_optimizer_that_froze_v_is_judged_by_the_probe_not_by_its_own_drift():
    """OneBitAdam's own v stops moving at its freeze step, so its summed drift is 0 by
    construction and must not read as "stable"; the drift since freeze is the evidence."""
    run = RunHistory(meta={"second_moment_frozen_at": 10, "freeze_probe": 10})
    for step in range(1, 101):
        run.add(step, "moment2_norm", ["global"], [1.0])
        if step > 1:
            run.add(step, "moment2_drift", ["global"], [0.0 if step > 10 else 0.5])
        if step > 10:  # the unfrozen v keeps moving away from v_T
            run.add(step, "moment2_drift_since_freeze", ["global"], [0.01 * (step - 10)])
    verdict = freeze_verdict(run, tol=0.1)
    assert not verdict.stable
    assert "froze v itself at step 10" in verdict.message


def test_report_shows_each_readiness_verdict_with_its_evidence(tmp_path):
    # 8-bit probes well under the limit, no 4-bit probes, a top-k coverage of 0.8 on every
    # block (tensors smaller than a block: exact), fp16 without overflow and 0 flushed.
    history = RunHistory(meta={"optimizer_name": "AdamW", "topk_density": 0.01,
                               "topk_block": 4096,
                               "params": [{"name": HOSTILE, "numel": 1000, "sampled": 1000}],
                               "skipped_metrics": {"probe_int4_m": "off: probe disabled"}})
    for step in range(1, 11):
        history.add(step, "probe_int8_m", ["global", HOSTILE], [INT8_MAX_ERROR / 5] * 2)
        history.add(step, "probe_int8_v", ["global", HOSTILE], [INT8_MAX_ERROR / 10] * 2)
        history.add(step, "topk_coverage", ["global"], [0.8])
        history.add(step, "grad_fp16_underflow", ["global"], [0.0])
        history.add(step, "grad_fp16_overflow", ["global"], [0.0])
    text = write_report(history, tmp_path / "r.html").read_text(encoding="utf-8")
    section = _section(text, "r1-readiness")
    answers = re.findall(r"<tr><td>([^<]*)</td><td><span class=\"(\w+)\">([^<]*)</span>", section)
    assert answers == [
        ("Is 8-bit optimizer state safe for this run?", "ok", "yes"),
        ("Is 4-bit optimizer state safe for this run?", "muted", "no data"),
        ("Would MicroAdam at k = 1 % keep most of the gradient?", "ok", "yes"),
        ("From which step could 1-bit Adam freeze v?", "muted", "no data"),
        ("Would bf16 hold this run&#x27;s gradients?", "muted", "no data"),
        ("Would fp16 hold this run&#x27;s gradients?", "ok", "yes"),
        ("Would fp8 e4m3 hold this run&#x27;s gradients?", "muted", "no data"),
        ("Would fp8 e5m2 hold this run&#x27;s gradients?", "muted", "no data")]
    for evidence in ("<code>probe_int8_m</code>", "<code>probe_int8_v</code>",
                     "<code>topk_coverage</code>", "<code>grad_fp16_overflow</code>",
                     f"({esc(HOSTILE)})", "probe_int4_m: off: probe disabled"):
        assert evidence in section, evidence
    assert HOSTILE not in text
