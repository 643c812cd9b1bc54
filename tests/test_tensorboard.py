"""The TensorBoard sink, read back with TensorBoard's own reader.

A real run (TinyTransformer, optiscope's AdamW, a NaN gradient injected mid-run) writes its events
live through the monitor; `EventAccumulator` reads them back (it checks every record's CRC) and
the scalars must be the monitor's history at float32 precision, NaN and inf included; the text,
Custom Scalars layout and HParams summaries must be there and say what the history says.
`export_tensorboard` replays the run log into the same events. The event file format's CRC is
checked against tensorboard's own byte-by-byte implementation.
"""

from __future__ import annotations

import math
import re
import shutil
import tempfile
import time

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as tb_masked_crc32c
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
from tensorboard.util import tensor_util

from models import TinyTransformer, batches, loss_fn, train_steps
from optiscope import OptimizerMonitor
from optiscope.dashboards.eventfile import crc32c, masked_crc32c
from optiscope.dashboards.tensorboard import TensorBoardSink, export_tensorboard
from optiscope.monitor.history import Alert
from optiscope.monitor.runlog import META, RUNLOG
from optiscope.optimizers import AdamW

STEPS, EVERY, NAN_AT = 14, 2, 9  # sampled 1, 3, ..., 13; q.weight's gradient gets a NaN at 9
# An export reads the run log, which keeps 7 significant digits (a relative 5e-7 at most); the live
# sink has the monitor's float64. Both are then rounded to float32 (a relative 2**-24 each).
EXPORT_RTOL = 5e-7 + 2 * 2.0 ** -24


def read_events(path) -> EventAccumulator:
    """Everything in a directory's event files: no sampling of scalars or tensors."""
    ea = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0,
                                                    "histograms": 0})
    ea.Reload()
    return ea


def text(ea: EventAccumulator, tag: str) -> list[tuple[int, str]]:
    return [(e.step, tensor_util.make_ndarray(e.tensor_proto).item().decode())
            for e in ea.Tensors(tag)]


def plugin_content(ea: EventAccumulator, tag: str) -> bytes:
    return ea.SummaryMetadata(tag).plugin_data.content


def last_layout(ea: EventAccumulator) -> layout_pb2.Layout:
    events = ea.Tensors("custom_scalars__config__")
    return layout_pb2.Layout.FromString(tensor_util.make_ndarray(events[-1].tensor_proto).item())


def assert_same_values(got, want, *, what: str, rtol: float = 0.0) -> None:
    """Equal within ``rtol``, NaN and ±inf exactly where expected; reports how many differ."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: {len(got)} values read back, {len(want)} expected"
    same_special = (np.isnan(got) & np.isnan(want)) | (np.isinf(want) & (got == want))
    with np.errstate(invalid="ignore"):
        close = np.isfinite(want) & (np.abs(got - want) <= rtol * np.abs(want))
    bad = ~(same_special | close)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {len(want)} values differ; first at "
                             f"{i}: read back {got[i]!r}, expected {want[i]!r}")


# ------------------------------------------------------------------------------------ the run
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real run whose monitor writes TensorBoard events live into its run directory."""
    log_dir = tmp_path_factory.mktemp("tb") / "run"
    torch.manual_seed(0)
    model = TinyTransformer()
    opt = AdamW(model.parameters(), lr=1e-2, backend="torch")
    mon = OptimizerMonitor(opt, model=model, every=EVERY, log_dir=log_dir, freeze_probe=5,
                           console=False, report=False, strict=True)
    mon.log_scalar("loss", 3.2)  # step 0, before the first step
    train_steps(mon, model, opt, STEPS, nan_at=NAN_AT)
    mon.close()
    return log_dir, mon.history, read_events(log_dir)


def test_one_event_file_in_the_run_directory(run):
    log_dir, _, _ = run
    files = [f.name for f in log_dir.iterdir() if "tfevents" in f.name]
    assert len(files) == 1, f"expected one event file in the run directory, found {files}"


def test_scalar_tags_are_the_history_metric_slash_scope(run):
    _, history, ea = run
    want = {f"{m}/{s}" for m in history.metrics() for s in history.scopes(m)}
    got = set(ea.Tags()["scalars"])
    assert got == want, (f"only in the events: {sorted(got - want)[:5]}; "
                         f"only in the history: {sorted(want - got)[:5]}")
    assert {"grad_norm/q.weight", "state_bytes/key/exp_avg_sq", "lr/group0",
            "loss/global"} <= got


def test_scalar_values_are_the_history_at_float32_precision(run):
    _, history, ea = run
    nonfinite = 0
    for metric in history.metrics():
        for scope in history.scopes(metric):
            steps, values = history.series(metric, scope)
            events = ea.Scalars(f"{metric}/{scope}")
            assert [e.step for e in events] == steps.tolist(), f"steps of {metric}/{scope}"
            # simple_value is a float32: the history's float64 rounded to it, exactly
            assert_same_values([e.value for e in events], values.astype(np.float32),
                               what=f"{metric}/{scope}")
            nonfinite += int((~np.isfinite(values)).sum())
    assert nonfinite > 0, "the injected NaN gradient left no non-finite value to round-trip"


def test_nan_and_inf_round_trip(run):
    _, history, ea = run
    steps, norms = history.series("grad_norm", "q.weight")
    read = {e.step: e.value for e in ea.Scalars("grad_norm/q.weight")}
    nan_steps = steps[np.isnan(norms)].tolist()
    assert nan_steps and all(math.isnan(read[s]) for s in nan_steps)
    steps, maxima = history.series("grad_max", "global")
    inf_steps = steps[np.isinf(maxima)].tolist()
    read = {e.step: e.value for e in ea.Scalars("grad_max/global")}
    assert inf_steps and all(read[s] == math.inf for s in inf_steps)


def test_metadata_and_alerts_as_text(run):
    _, history, ea = run
    [(step, meta)] = text(ea, "run/meta")
    assert step == 0
    assert "`AdamW`" in meta and "### Hyperparameters" in meta and "`q.weight`" in meta
    assert "| `lr` | `0.01` |" in meta
    skipped = dict(text(ea, "run/skipped_metrics"))[0]
    for metric in history.meta["skipped_metrics"]:
        assert f"`{metric}`" in skipped
    assert "steps_taken" in text(ea, "run/meta_updates")[-1][1]

    assert history.alerts, "the NaN gradient raised no alert"
    alerts = text(ea, "alerts")
    by_step = dict(alerts)
    assert len(by_step) == len(alerts), "one text per step: a second one at a step replaces it"
    assert sorted(by_step) == sorted({a.step for a in history.alerts})
    for alert in history.alerts:
        assert alert.message in by_step[alert.step], f"alert at step {alert.step} missing"


def test_custom_scalars_layout_charts_every_metric_over_its_tensors(run):
    _, history, ea = run
    tags = ea.Tags()["scalars"]
    layout = last_layout(ea)
    categories = {c.title: c for c in layout.category}
    assert list(categories)[0] == "optiscope: global"

    def matched(chart):
        regexes = [re.compile(r) for r in chart.multiline.tag]
        return {t for t in tags if any(r.match(t) for r in regexes)}

    overview = {c.title.split(":")[0]: matched(c) for c in categories["optiscope: global"].chart}
    for metric in history.metrics():
        scopes = history.scopes(metric)
        run_wide = ["global"] if "global" in scopes else scopes  # lr: one line per group
        assert overview[metric] == {f"{metric}/{s}" for s in run_wide}, f"overview of {metric}"

    charts = {c.title.split(":")[0]: matched(c) for cat in layout.category[1:] for c in cat.chart}
    for metric in ("grad_norm", "update_ratio", "moment2_drift", "moment2_drift_since_freeze",
                   "topk_coverage", "lr"):
        assert charts[metric] == {f"{metric}/{s}" for s in history.scopes(metric)}, metric
    split = {c.title: matched(c) for c in categories["optiscope: memory"].chart}
    by_key = {f"state_bytes/{s}" for s in history.scopes("state_bytes")
              if s == "global" or s.startswith("key/")}
    per_tensor = {f"state_bytes/{s}" for s in history.scopes("state_bytes")} - by_key
    assert split[next(t for t in split if t.endswith("per state key"))] == by_key
    assert split[next(t for t in split if t.endswith("per tensor"))] == per_tensor | {
        "state_bytes/global"}
    assert "loss" not in charts, "a user scalar has no per-tensor chart"


def test_hparams_in_the_run_directory(run):
    _, history, ea = run
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        plugin_content(ea, "_hparams_/experiment")).experiment
    infos = {h.name: h.type for h in experiment.hparam_infos}
    for name in ("optimizer", "lr", "betas", "eps", "weight_decay", "every", "n_params"):
        assert name in infos, f"hyperparameter {name} missing from the experiment"
    assert infos["betas"] == api_pb2.DATA_TYPE_STRING
    assert infos["amsgrad"] == api_pb2.DATA_TYPE_BOOL
    metrics = {m.name.tag for m in experiment.metric_infos}
    assert {"loss/global", "grad_norm/global", "update_ratio/global"} <= metrics
    assert metrics <= set(ea.Tags()["scalars"]), "an HParams metric that is not a scalar tag"

    start = plugin_data_pb2.HParamsPluginData.FromString(
        plugin_content(ea, "_hparams_/session_start_info")).session_start_info
    assert start.hparams["optimizer"].string_value == "AdamW"
    assert start.hparams["lr"].number_value == 0.01
    assert start.hparams["betas"].string_value == "(0.9, 0.999)"
    assert start.hparams["every"].number_value == EVERY
    assert start.hparams["n_params"].number_value == history.meta["n_params"]

    end = plugin_data_pb2.HParamsPluginData.FromString(
        plugin_content(ea, "_hparams_/session_end_info")).session_end_info
    assert end.status == api_pb2.STATUS_SUCCESS


def test_export_equals_the_live_events(run, tmp_path):
    log_dir, history, live = run
    path = export_tensorboard(log_dir, tmp_path / "export")
    assert path.parent == tmp_path / "export" and "tfevents" in path.name
    exported = read_events(tmp_path / "export")
    assert exported.Tags()["scalars"] == live.Tags()["scalars"]
    assert exported.Tags()["tensors"] == live.Tags()["tensors"]
    for tag in live.Tags()["scalars"]:
        a, b = live.Scalars(tag), exported.Scalars(tag)
        assert [e.step for e in a] == [e.step for e in b], tag
        assert_same_values([e.value for e in b], [e.value for e in a], what=tag,
                           rtol=EXPORT_RTOL)
        assert np.allclose([e.wall_time for e in a], [e.wall_time for e in b], rtol=0, atol=1e-3)
    for tag in live.Tags()["tensors"]:
        a, b = live.Tensors(tag), exported.Tensors(tag)
        assert [e.step for e in a] == [e.step for e in b], tag
        if not tag.startswith("_hparams_"):  # its payload is in the metadata: compared below
            assert [e.tensor_proto for e in a] == [e.tensor_proto for e in b], tag
    for tag in ("_hparams_/experiment", "_hparams_/session_start_info"):
        assert plugin_content(live, tag) == plugin_content(exported, tag), tag


def test_export_into_the_run_directory_of_a_run_recorded_without_tensorboard(run, tmp_path):
    log_dir, history, _ = run
    for name in (RUNLOG, META):
        shutil.copy(log_dir / name, tmp_path / name)
    path = export_tensorboard(tmp_path)
    assert path.parent == tmp_path
    assert len(read_events(tmp_path).Scalars("grad_norm/global")) == len(
        history.series("grad_norm")[0])
    with pytest.raises(FileExistsError, match="already holds TensorBoard events.*out_dir"):
        export_tensorboard(tmp_path)


def test_a_rewind_in_process_leaves_tensorboard_the_resumed_steps_only(tmp_path):
    # load_state_dict on the live monitor: TensorBoard's reader (EventAccumulator, the oracle)
    # must show steps 1-5 once each, with the resumed run's values (the history's, which
    # tests/test_loops.py judges against load_run), live and exported from the run log
    log_dir = tmp_path / "run"
    torch.manual_seed(0)
    model = TinyTransformer()
    opt = AdamW(model.parameters(), lr=1e-2, backend="torch")
    mon = OptimizerMonitor(opt, model=model, log_dir=log_dir, console=False, report=False,
                           strict=True, range_probes=True)
    saved = {}
    for step, (x, y) in enumerate(batches(6), start=1):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
        mon.log_scalar("loss", float(step))
        saved[step] = mon.state_dict()
    with torch.no_grad():
        next(model.parameters()).mul_(1.5)  # the resumed steps' values differ
    mon.load_state_dict(saved[3])
    train_steps(mon, model, opt, 2)
    mon.close()
    history = mon.history
    assert history.series("grad_norm")[0].tolist() == [1, 2, 3, 4, 5]
    for events in (read_events(log_dir), None):
        if events is None:
            export_tensorboard(log_dir, tmp_path / "export")
            events = read_events(tmp_path / "export")
        for metric in history.metrics():
            for scope in history.scopes(metric):
                steps, values = history.series(metric, scope)
                got = events.Scalars(f"{metric}/{scope}")
                assert [e.step for e in got] == steps.tolist(), f"steps of {metric}/{scope}"
        grad = events.Histograms("grad_log2_abs/global")
        assert [e.step for e in grad] == [1, 2, 3, 4, 5]
    live = read_events(log_dir)
    assert_same_values([e.value for e in live.Scalars("grad_norm/global")],
                       history.series("grad_norm")[1].astype(np.float32), what="grad_norm")


def test_export_of_a_directory_without_a_run_log(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run directory: no runlog.jsonl"):
        export_tensorboard(tmp_path)


# ------------------------------------------------------------------------------- the sink alone
META_RECORD = {"optimizer_name": "AdamW", "hyperparameters": [{"lr": 1e-3, "betas": [0.9, 0.99]}],
               "n_params": 10, "every": 1, "start_time": 1.7e9}


def test_constructing_and_closing_an_unused_sink_writes_nothing(tmp_path):
    sink = TensorBoardSink(tmp_path / "run")
    assert not (tmp_path / "run").exists() and sink.path is None
    sink.close()
    sink.close()
    assert not (tmp_path / "run").exists()


def test_close_is_idempotent_and_a_closed_sink_refuses_records(tmp_path):
    sink = TensorBoardSink(tmp_path)
    sink.on_meta(META_RECORD)
    sink.close()
    size = sink.path.stat().st_size
    sink.close()
    assert sink.path.stat().st_size == size
    with pytest.raises(RuntimeError, match="closed; create a new one"):
        sink.on_sample(1, 1.7e9, {"loss": (["global"], [1.0])})


def test_events_wait_at_most_flush_secs_or_until_flush(tmp_path):
    waiting = TensorBoardSink(tmp_path / "a", flush_secs=3600)
    waiting.on_meta(META_RECORD)
    waiting.on_sample(1, 1.7e9, {"grad_norm": (["global"], [2.0])})
    assert "grad_norm/global" not in read_events(tmp_path / "a").Tags()["scalars"]
    waiting.flush()
    assert read_events(tmp_path / "a").Scalars("grad_norm/global")[0].value == 2.0
    waiting.close()

    eager = TensorBoardSink(tmp_path / "b", flush_secs=0)
    eager.on_meta(META_RECORD)
    eager.on_sample(1, 1.7e9, {"grad_norm": (["global"], [2.0])})
    assert read_events(tmp_path / "b").Scalars("grad_norm/global")[0].value == 2.0
    eager.close()


@pytest.mark.parametrize("bad", [-1, "10", None, math.nan])
def test_flush_secs_is_checked(tmp_path, bad):
    with pytest.raises(ValueError, match=f"flush_secs must be a number of seconds >= 0, got "
                                         f"{re.escape(repr(bad))}"):
        TensorBoardSink(tmp_path, flush_secs=bad)


def test_tags_keep_dots_slashes_spaces_and_unicode(tmp_path):
    sink = TensorBoardSink(tmp_path)
    sink.on_meta(META_RECORD)
    scopes = ["global", "blocks.0.attn.weight", "key/exp_avg", "layer 3 (ü)", "bad\udc80name"]
    sink.on_sample(1, 1.7e9, {"grad_norm": (scopes, [1.0, 2.0, 3.0, 4.0, 5.0]),
                              "loss (train)": (["global"], [0.5])})
    sink.close()
    ea = read_events(tmp_path)
    assert set(ea.Tags()["scalars"]) == {
        "grad_norm/global", "grad_norm/blocks.0.attn.weight", "grad_norm/key/exp_avg",
        "grad_norm/layer 3 (ü)", "grad_norm/bad?name", "loss (train)/global"}
    [overview] = [c for c in last_layout(ea).category if c.title == "optiscope: global"]
    loss_chart = next(c for c in overview.chart if c.title == "loss (train)")
    assert re.match(loss_chart.multiline.tag[0], "loss (train)/global")


def test_alerts_of_one_step_share_one_text(tmp_path):
    sink = TensorBoardSink(tmp_path)
    sink.on_meta(META_RECORD)
    sink.on_sample(4, 1.7e9, {"grad_norm": (["global"], [1e9])})
    for message in ("a spike in fc.weight", "a spike in fc.bias"):
        sink.on_alert(Alert(4, "grad_spike", "grad_norm", ["fc.weight"], message, 1e9))
    sink.on_alert(Alert(6, "skipped_steps", "skipped_steps", ["global"], "skipped 1", None))
    sink.close()
    alerts = text(read_events(tmp_path), "alerts")
    assert [s for s, _ in alerts] == [4, 6]
    assert "a spike in fc.weight" in alerts[0][1] and "a spike in fc.bias" in alerts[0][1]
    assert "**grad_spike** (grad_norm) [value 1e+09]" in alerts[0][1]


def test_layout_is_rewritten_when_a_series_appears(tmp_path):
    sink = TensorBoardSink(tmp_path)
    sink.on_meta(META_RECORD)
    sink.on_sample(1, 1.7e9, {"grad_norm": (["global", "fc.weight"], [1.0, 1.0])})
    sink.on_sample(2, 1.7e9, {"grad_norm": (["global", "fc.weight"], [1.0, 1.0])})
    sink.on_sample(3, 1.7e9, {"grad_norm": (["global", "fc.weight"], [1.0, 1.0]),
                              "val_loss": (["global"], [2.0])})
    sink.close()
    ea = read_events(tmp_path)
    assert [e.step for e in ea.Tensors("custom_scalars__config__")] == [1, 3]
    titles = [c.title for c in last_layout(ea).category[0].chart]
    assert titles[0] == "val_loss" and titles[1].startswith("grad_norm")


def test_session_status_is_unknown_when_the_run_did_not_close(tmp_path):
    sink = TensorBoardSink(tmp_path)
    sink.on_meta(META_RECORD)  # no steps_taken: the monitor never closed (a crash)
    sink.on_sample(1, 1.7e9, {"grad_norm": (["global"], [1.0])})
    sink.close()
    end = plugin_data_pb2.HParamsPluginData.FromString(
        plugin_content(read_events(tmp_path), "_hparams_/session_end_info")).session_end_info
    assert end.status == api_pb2.STATUS_UNKNOWN


# ------------------------------------------------------------------------------- file format
@pytest.mark.parametrize("data, expected", [
    (b"", 0x00000000),
    (b"123456789", 0xE3069283),                 # the CRC-32C check value
    (bytes(32), 0x8A9136AA),                    # RFC 3720 B.4: 32 bytes of zeros
    (b"\xff" * 32, 0x62A8AB43),                 # ... of ones
    (bytes(range(32)), 0x46DD794E),             # ... incrementing
    (bytes(range(31, -1, -1)), 0x113FDB5C),     # ... decrementing
])
def test_crc_matches_known_crc32c_values(data, expected):
    assert crc32c(data) == expected


@pytest.mark.parametrize("size", [0, 1, 7, 63, 64, 1023, 1024, 1025, 4097, 100_003])
def test_crc_is_tensorboards(size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    assert masked_crc32c(data) == tb_masked_crc32c(data)
    assert masked_crc32c(b"\0" * size) == tb_masked_crc32c(b"\0" * size)


def test_without_google_crc32c_the_events_are_checksummed_in_python(tmp_path, monkeypatch,
                                                                     caplog):
    """A checkout run without google-crc32c installed (the first GPU machine had none) still
    writes events TensorBoard reads; oracle: the CRC-32C check values and EventAccumulator,
    which checks every record's CRC."""
    import logging

    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary

    from optiscope.dashboards import eventfile

    monkeypatch.setattr(eventfile, "google_crc32c", None)
    monkeypatch.setattr(eventfile, "_said_slow", False)
    with caplog.at_level(logging.WARNING, logger="optiscope.dashboards"):
        assert crc32c(b"123456789") == 0xE3069283
        assert crc32c(bytes(range(32))) == 0x46DD794E
        f = eventfile.EventFile(tmp_path)
        for step in range(3):
            f.write(Event(wall_time=1.0, step=step, summary=Summary(
                value=[Summary.Value(tag="loss", simple_value=0.5 * step)])))
        f.close()
    assert sum("google-crc32c is not installed" in r.getMessage() for r in caplog.records) == 1
    assert [(e.step, e.value) for e in read_events(tmp_path).Scalars("loss")] == [
        (0, 0.0), (1, 0.5), (2, 1.0)]


def test_a_sample_costs_less_than_half_of_torchs_writer():
    """One event of 101 scopes × 14 metrics, against the same event through torch's writer
    (whose CRC is pure Python); best of three rounds each, side by side."""
    from torch.utils.tensorboard.writer import FileWriter

    rng = np.random.default_rng(0)
    scopes = ["global"] + [f"blocks.{i // 4}.attn.{'qkvo'[i % 4]}.weight" for i in range(100)]
    samples = [{f"metric{m}": (scopes, rng.random(len(scopes))) for m in range(14)}
               for _ in range(12)]

    def ours(d):
        sink = TensorBoardSink(d)
        sink.on_meta(META_RECORD)
        sink.on_sample(0, 1.7e9, samples[0])  # the layout and hparams: once per run
        start = time.perf_counter()
        for step, values in enumerate(samples[1:], start=1):
            sink.on_sample(step, 1.7e9, values)
        sink.close()
        return time.perf_counter() - start

    def torchs(d):
        writer = FileWriter(d)
        start = time.perf_counter()
        for step, values in enumerate(samples[1:], start=1):
            summary = Summary()
            for metric, (names, numbers) in values.items():
                for scope, x in zip(names, numbers.tolist()):
                    summary.value.add(tag=f"{metric}/{scope}", simple_value=x)
            writer.add_summary(summary, step, 1.7e9)
        writer.close()
        return time.perf_counter() - start

    best = {}
    for fn in (ours, torchs):
        times = []
        for _ in range(3):
            with tempfile.TemporaryDirectory() as d:
                times.append(fn(d))
        best[fn.__name__] = min(times)
    per_scalar = {k: v / (len(samples) - 1) / (14 * len(scopes)) * 1e6 for k, v in best.items()}
    assert best["ours"] < best["torchs"] / 2, f"µs per scalar: {per_scalar}"
