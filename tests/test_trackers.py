"""The experiment-tracker sinks, read back by the trackers' own code, offline.

One real run (TinyTransformer, optiscope's AdamW, a NaN gradient near the end) feeds a live
`MLflowSink` (local SQLite store, read back with ``MlflowClient``) and a `WandbSink` with a
tighter key budget (offline mode, read back from the run's own ``.wandb`` file: W&B's record log,
each chunk's CRC checked, the records parsed with W&B's protocol buffers). The oracle for the
values is `load_run` of the same run directory; for which keys a sample sends, the rule of the
key budget applied here to the monitor's history. Nothing touches the network: W&B is offline,
MLflow writes a file, HOME and every W&B directory are inside the test's temporary directory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
import torch

from models import TinyTransformer, train_steps
from optiscope import OptimizerMonitor
from optiscope.dashboards.trackers import TrackerSink, is_tensor_scope
from optiscope.monitor.runlog import load_run
from optiscope.optimizers import AdamW

STEPS, NAN_AT = 8, 7
RTOL = 1e-5
INF_SQL = 1.7976931348623157e308  # MLflow's SQL stores keep ±inf as ±(largest float64)
WANDB_BUDGET = dict(top=3, metrics=["grad_norm", "update_*"], scopes=["ln1.*"])


# ------------------------------------------------------------------------------------ oracle
def expected_keys(history, *, top=20, metrics=("grad_norm", "update_ratio"), scopes=()):
    """{step: set of keys} the key budget sends, from the monitor's own (float64) history."""
    from fnmatch import fnmatchcase

    by_step: dict[int, dict[str, dict[str, float]]] = {}
    for m in history.metrics():
        for s in history.scopes(m):
            for step, x in zip(*history.series(m, s)):
                by_step.setdefault(int(step), {}).setdefault(m, {})[s] = float(x)
    want = {}
    for step, values in by_step.items():
        grads = [(s, x) for s, x in values.get("grad_norm", {}).items() if s != "global"]
        if len(grads) > top:  # non-finite first, then largest; ties keep the monitor's order
            grads = sorted(grads, key=lambda sx: (math.isfinite(sx[1]),
                                                  -sx[1] if math.isfinite(sx[1]) else 0))[:top]
        chosen = {s for s, _ in grads}
        keys = set()
        for m, per in values.items():
            per_tensor = any(fnmatchcase(m, p) for p in metrics)
            for s in per:
                if not is_tensor_scope(m, s) or (per_tensor and (
                        s in chosen or any(fnmatchcase(s, p) for p in scopes))):
                    keys.add(f"{m}/{s}")
        want[step] = keys
    return want


def logged(run_dir) -> dict[tuple[int, str], float]:
    """{(step, "<metric>/<scope>"): value} from `load_run`."""
    h = load_run(run_dir)
    return {(int(t), f"{m}/{s}"): float(x)
            for m in h.metrics() for s in h.scopes(m) for t, x in zip(*h.series(m, s))}


def same(got: float, want: float, *, inf_as=None) -> bool:
    if math.isnan(want):
        return math.isnan(got)
    if math.isinf(want):
        return got == want or (inf_as is not None and got == math.copysign(inf_as, want))
    return abs(got - want) <= RTOL * abs(want)


# ------------------------------------------------------------------------------------ setup
@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """Trackers confined to a temporary directory, offline."""
    root = tmp_path_factory.mktemp("trackers")
    mp = pytest.MonkeyPatch()
    # optiscope's compiled CPU kernel stays where it is cached, not rebuilt under the new HOME
    mp.setenv("OPTISCOPE_CACHE_DIR", os.environ.get("OPTISCOPE_CACHE_DIR")
              or str(Path.home() / ".cache" / "optiscope"))
    dirs = {k: root / k.lower() for k in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR",
                                          "WANDB_DATA_DIR", "HOME")}
    for key, path in dirs.items():
        path.mkdir()
        mp.setenv(key, str(path))
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    mp.setenv("WANDB_CONSOLE", "off")
    mp.setenv("WANDB_DISABLE_GIT", "true")
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    mp.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    mp.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    mp.chdir(root)  # MLflow's default artifact root is ./mlruns
    yield root
    try:
        import wandb
        wandb.teardown()
    finally:
        mp.undo()


def train(log_dir: Path, sinks, steps=STEPS, nan_at=NAN_AT):
    torch.manual_seed(0)
    model = TinyTransformer()
    opt = AdamW(model.parameters(), lr=1e-2, backend="torch")
    with OptimizerMonitor(opt, model=model, log_dir=log_dir, console=False, tensorboard=False,
                          report=False, strict=True, sinks=sinks) as mon:
        train_steps(mon, model, opt, steps, nan_at=nan_at)
    return mon


@pytest.fixture(scope="module")
def tracked(offline):
    """One run sent live to MLflow (default budget) and W&B (`WANDB_BUDGET`)."""
    from optiscope.dashboards import MLflowSink, WandbSink

    mlflow_sink, wandb_sink = MLflowSink(), WandbSink(project="optiscope-test", **WANDB_BUDGET)
    log_dir = offline / "run"
    mon = train(log_dir, [mlflow_sink, wandb_sink])
    assert mlflow_sink.failed is None and wandb_sink.failed is None
    return log_dir, mon.history, mlflow_sink, wandb_sink


# ------------------------------------------------------------------------------------ W&B file
def wandb_records(path: Path):
    """The records of a ``.wandb`` file: W&B's LevelDB-style log (7-byte file header; 32 KiB
    blocks of chunks with a CRC-32 seeded by the chunk type, a length and a type: full, first,
    middle, last), each record a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, _magic, version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and version == 0, f"{path}: not a W&B run file"
    pos, pieces, records = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # block padding
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad CRC at {pos}"
        pos += 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pieces = chunk
        elif kind == 3:
            pieces += chunk
        elif kind == 4:
            records.append(pieces + chunk)
    out = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        out.append(record)
    return out


def wandb_run_file(root: Path, run_id: str) -> Path:
    """The run's ``.wandb`` file, once W&B's service has written its last (``exit``) record:
    ``run.finish()`` can return before the service has flushed the file."""
    files = list((root / "wandb_dir").glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 1, f"expected one .wandb file for run {run_id}, found {files}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            records = wandb_records(files[0])
        except AssertionError:  # a chunk being written: its CRC does not match yet
            records = []
        if records and records[-1].WhichOneof("record_type") == "exit":
            break
        time.sleep(0.2)
    return files[0]


def wandb_history(records) -> list[dict]:
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({"/".join(i.nested_key) if i.nested_key else i.key: json.loads(i.value_json)
                         for i in r.history.item})
    return rows


# ------------------------------------------------------------------------------------ MLflow
@pytest.mark.slow
def test_mlflow_holds_every_chosen_value_at_its_step(tracked):
    from mlflow import MlflowClient

    log_dir, history, sink, _ = tracked
    client = MlflowClient()
    run = client.get_run(sink.run_id)
    assert sink.owns_run and run.info.status == "FINISHED"
    assert run.info.run_name == log_dir.name  # named after the run directory
    want_keys = expected_keys(history)
    values = logged(log_dir)
    all_keys = set().union(*want_keys.values())
    assert set(run.data.metrics) == all_keys
    assert {"grad_norm/global", "grad_norm/q.weight", "update_ratio/mlp.0.bias", "lr/group0",
            "state_bytes/key/exp_avg", "loss/global", "weight_norm/global"} <= all_keys
    assert "weight_norm/q.weight" not in all_keys  # not in the default per-tensor metrics
    # The README's figure: AdamW sends 18 run-wide values (clip_coef among them) and 2 x 20
    # per tensor per sample (the readiness probes are off by default).
    assert max(len(k) for k in want_keys.values()) == 18 + 2 * 20
    # ... where every value is 18 + 11 per tensor (the README's "11 values per tensor").
    n_tensors = len(history.meta["params"])
    assert sum(len(history.scopes(m)) for m in history.metrics()) == 18 + 11 * n_tensors
    assert_mlflow_run_holds(sink.run_id, want_keys, values)


def assert_mlflow_run_holds(run_id: str, want_keys: dict, values: dict) -> None:
    """The run's metrics are exactly ``want_keys`` per step, each equal to the run log's."""
    from mlflow import MlflowClient

    client = MlflowClient()
    all_keys = set().union(*want_keys.values())
    assert set(client.get_run(run_id).data.metrics) == all_keys
    n = 0
    for key in sorted(all_keys):
        got = [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
        want = sorted((t, values[(t, key)]) for t, keys in want_keys.items() if key in keys)
        assert [t for t, _ in sorted(got)] == [t for t, _ in want], key
        for (t, g), (_, w) in zip(sorted(got), want):
            assert same(g, w, inf_as=INF_SQL), f"{key} at step {t}: MLflow {g!r}, run log {w!r}"
            n += 1
    assert n == sum(len(k) for k in want_keys.values())


@pytest.mark.slow
def test_mlflow_replay_of_the_run_log_holds_the_same(tracked):
    from mlflow import MlflowClient

    from optiscope.dashboards import MLflowSink, RecordDecoder
    from optiscope.monitor.runlog import read_records

    log_dir, history, _, _ = tracked
    sink = MLflowSink(block=True, max_queue=1, run_name="replayed")
    RecordDecoder(sink).feed(read_records(log_dir / "runlog.jsonl"))
    sink.close()
    assert sink.failed is None and sink.dropped == 0
    assert MlflowClient().get_run(sink.run_id).info.run_name == "replayed"
    assert_mlflow_run_holds(sink.run_id, expected_keys(load_run(log_dir)), logged(log_dir))


@pytest.mark.slow
def test_mlflow_params_tags_and_alerts(tracked, tmp_path):
    from mlflow import MlflowClient

    log_dir, history, sink, _ = tracked
    client = MlflowClient()
    data = client.get_run(sink.run_id).data
    assert data.params["optiscope.lr"] == "0.01"
    assert data.params["optiscope.optimizer_name"] == "AdamW"
    assert data.params["optiscope.n_tensors"] == str(len(history.meta["params"]))
    assert data.tags["optiscope.steps_taken"] == str(STEPS)
    alerts = load_run(log_dir).alerts
    assert alerts and data.tags["optiscope.alerts"] == str(len(alerts))
    text = Path(client.download_artifacts(sink.run_id, "optiscope/alerts.txt", str(tmp_path)))
    lines = text.read_text().splitlines()
    assert len(lines) == len(alerts)
    for line, alert in zip(lines, alerts):
        assert line.startswith(f"step {alert.step}: {alert.kind}") and alert.message in line


@pytest.mark.slow
def test_mlflow_logs_into_the_active_run_and_leaves_it_open(offline):
    import mlflow
    from mlflow import MlflowClient

    from optiscope.dashboards import MLflowSink

    with mlflow.start_run(run_name="users-run") as active:
        sink = MLflowSink()
        train(offline / "active-mlflow", [sink], steps=2, nan_at=None)
        assert sink.run_id == active.info.run_id and not sink.owns_run
        assert MlflowClient().get_run(sink.run_id).info.status == "RUNNING"
        mlflow.log_metric("after", 1.0)  # the user's run goes on
        # A second monitor in the same run: its parameters differ (start time), MLflow's
        # cannot change, so they become tags and the sink goes on.
        again = MLflowSink()
        train(offline / "active-mlflow-2", [again], steps=2, nan_at=None)
        assert again.failed is None and not again.owns_run
    history = MlflowClient().get_metric_history(active.info.run_id, "grad_norm/global")
    assert sorted(m.step for m in history) == [1, 1, 2, 2]


@pytest.mark.slow
def test_mlflow_failing_is_reported_once_and_training_goes_on(offline, caplog):
    from optiscope.dashboards import MLflowSink

    sink = MLflowSink(run_id="0" * 32)  # no such run
    with caplog.at_level(logging.ERROR, logger="optiscope"):
        train(offline / "bad-mlflow", [sink], steps=3, nan_at=None)
    errors = [r.getMessage() for r in caplog.records if "MLflowSink failed" in r.getMessage()]
    assert len(errors) == 1 and "0" * 32 in errors[0], errors
    assert sink.failed and not sink.owns_run
    assert load_run(offline / "bad-mlflow").series("grad_norm")[0].tolist() == [1, 2, 3]


# ------------------------------------------------------------------------------------ W&B
@pytest.mark.slow
def test_wandb_file_holds_every_chosen_value_at_its_step(tracked, offline):
    log_dir, history, _, sink = tracked
    assert sink.owns_run
    records = wandb_records(wandb_run_file(offline, sink.run.id))
    want_keys = expected_keys(history, **WANDB_BUDGET)
    values = logged(log_dir)
    rows = [r for r in wandb_history(records) if not any(k.startswith("optiscope/alerts")
                                                         for k in r)]
    got = {}
    for row in rows:
        step = row.pop("optiscope/step")
        assert step not in got, f"two rows for step {step}"
        got[step] = {k: v for k, v in row.items() if not k.startswith("_")}
    assert sorted(got) == sorted(want_keys)
    n = 0
    for step, keys in want_keys.items():
        assert set(got[step]) == keys, (step, sorted(set(got[step]) ^ keys)[:5])
        for key in keys:
            g = float(got[step][key])
            w = values[(step, key)]
            assert same(g, w), f"{key} at {step}: W&B {g!r}, run log {w!r}"
            n += 1
    assert n > 3 * STEPS  # the budget sends the globals plus some tensors each step
    assert any("ln1.weight" in k for k in want_keys[1])  # scopes= pattern
    assert not any(k.startswith("weight_norm/") and not k.endswith("/global")
                   for keys in want_keys.values() for k in keys)
    metrics = [r.metric for r in records if r.WhichOneof("record_type") == "metric"]
    assert any(m.name == "grad_norm/global" and m.step_metric == "optiscope/step" for m in metrics)


@pytest.mark.slow
def test_wandb_config_name_and_alert_table(tracked, offline):
    log_dir, history, _, sink = tracked
    records = wandb_records(wandb_run_file(offline, sink.run.id))
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.display_name == log_dir.name and run.project == "optiscope-test"
    config = {}
    for r in records:
        if r.WhichOneof("record_type") == "config":
            config.update({i.key: json.loads(i.value_json) for i in r.config.update})
    assert config["optiscope"]["lr"] == 0.01 and config["optiscope"]["steps_taken"] == STEPS
    table_rows = [r for r in wandb_history(records) if "optiscope/alerts/path" in r]
    assert len(table_rows) == 1
    files = Path(sink.run.dir)
    table = json.loads((files / table_rows[0]["optiscope/alerts/path"]).read_text())
    alerts = load_run(log_dir).alerts
    assert table["columns"] == ["step", "kind", "metric", "value", "tensors", "message"]
    assert [(row[0], row[1], row[5]) for row in table["data"]] == \
        [(a.step, a.kind, a.message) for a in alerts]


@pytest.mark.slow
def test_wandb_logs_into_the_active_run_and_leaves_it_open(offline):
    import wandb

    from optiscope.dashboards import WandbSink

    run = wandb.init(project="optiscope-test", name="users-run")
    try:
        sink = WandbSink()
        train(offline / "active-wandb", [sink], steps=2, nan_at=None)
        assert sink.run is run and not sink.owns_run
        run.log({"after": 1.0})  # still open: the user's run goes on
    finally:
        run.finish()
    rows = wandb_history(wandb_records(wandb_run_file(offline, run.id)))
    assert [r["optiscope/step"] for r in rows if "grad_norm/global" in r] == [1, 2]
    assert any("after" in r for r in rows)


# ------------------------------------------------------------------------------------ plumbing
class Recording(TrackerSink):
    """A tracker in memory; ``fail_at`` makes sending a sample raise, ``gate`` holds `_open`."""

    tracker = "Recording"

    def __init__(self, fail_at=None, gate=None, **kwargs):
        super().__init__(**kwargs)
        self.fail_at, self.gate = fail_at, gate
        self.entered = threading.Event()
        self.samples, self.metas, self.finished = [], [], None

    def _find_active(self):
        return None

    def _open(self, active, meta):
        self.owns_run = True
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        self.metas.append(meta)

    def _log_samples(self, samples):
        for step, _, values in samples:
            if step == self.fail_at:
                raise ConnectionError("tracker unreachable")
            self.samples.append((step, values))

    def _log_meta(self, changes):
        self.metas.append(changes)

    def _finish(self, alerts, failed):
        self.finished = (len(alerts), failed)


def test_a_failing_tracker_is_reported_once_and_the_run_goes_on(tmp_path, caplog):
    sink = Recording(fail_at=3)
    with caplog.at_level(logging.ERROR, logger="optiscope"):
        mon = train(tmp_path / "run", [sink], steps=6, nan_at=None)
    errors = [r for r in caplog.records if "Recording failed" in r.getMessage()]
    assert len(errors) == 1 and "tracker unreachable" in errors[0].getMessage()
    assert [s for s, _ in sink.samples] == [1, 2]
    assert sink.finished == (0, True)  # a run it started is still ended
    assert load_run(tmp_path / "run").series("grad_norm")[0].tolist() == list(range(1, 7))
    assert mon.history.last_step() == 6


def test_a_slow_tracker_drops_the_oldest_samples(caplog):
    gate = threading.Event()
    sink = Recording(gate=gate, max_queue=2)
    sink.on_meta({"optimizer_name": "X"})
    values = {"grad_norm": (["global"], [1.0])}
    sink.on_sample(1, 0.0, values)
    assert sink.entered.wait(10)
    with caplog.at_level(logging.WARNING, logger="optiscope"):
        for step in range(2, 8):
            sink.on_sample(step, 0.0, values)
        gate.set()
        sink.close()
    steps = [s for s, _ in sink.samples]
    assert steps[-2:] == [6, 7] and steps == sorted(steps)
    assert sink.dropped == 7 - len(steps) >= 4
    drops = [r for r in caplog.records if "dropping the oldest" in r.getMessage()]
    assert len(drops) == 1


def test_a_replay_with_block_waits_instead_of_dropping():
    from optiscope.dashboards import RecordDecoder

    class Slow(Recording):
        def _log_samples(self, samples):
            time.sleep(0.01)
            super()._log_samples(samples)

    sink = Slow(max_queue=1, block=True)
    records = [{"type": "meta", "optimizer_name": "X"},
               {"type": "scopes", "id": 0, "names": ["global"]}]
    records += [{"type": "sample", "step": t, "time": 0.0, "values": {"grad_norm": [0, [t]]}}
                for t in range(1, 41)]
    RecordDecoder(sink).feed(records)
    sink.close()
    assert [s for s, _ in sink.samples] == list(range(1, 41)) and sink.dropped == 0
    assert [v["grad_norm/global"] for _, v in sink.samples] == list(range(1, 41))


def test_the_key_budget():
    from optiscope.dashboards.trackers import KeyBudget

    values = {
        "grad_norm": (["global", "a", "b", "c", "ln.w"], [5.0, 1.0, math.nan, 3.0, 0.5]),
        "update_ratio": (["global", "a", "b", "c", "ln.w"], [1e-3] * 5),
        "weight_norm": (["global", "a", "b", "c", "ln.w"], [2.0] * 5),
        "state_bytes": (["global", "a", "b", "c", "ln.w", "key/exp_avg"], [9.0] * 6),
        "lr": (["group0", "group1"], [0.1, 0.2]),
        "loss": (["global"], [2.5]),
    }
    keys = set(KeyBudget(top=2, scopes=["ln.*"]).select(values))
    assert keys == {"grad_norm/global", "grad_norm/b", "grad_norm/c", "grad_norm/ln.w",
                    "update_ratio/global", "update_ratio/b", "update_ratio/c", "update_ratio/ln.w",
                    "weight_norm/global", "state_bytes/global", "state_bytes/key/exp_avg",
                    "lr/group0", "lr/group1", "loss/global"}
    everything = KeyBudget(metrics="*", top=0, scopes="*").select(values)
    assert len(everything) == sum(len(s) for s, _ in values.values())
    assert len(KeyBudget(top=0).select(values)) == 8  # the run-wide scopes only
    with pytest.raises(ValueError, match="top must be an int >= 0"):
        KeyBudget(top=-1)
    with pytest.raises(TypeError, match="metrics must be a glob pattern"):
        KeyBudget(metrics=3)


def test_missing_libraries_name_the_extra(monkeypatch):
    from optiscope.dashboards import MLflowSink, WandbSink

    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match=r"pip install 'optiscope\[mlflow\]'"):
        MLflowSink()
    with pytest.raises(ImportError, match=r"pip install 'optiscope\[wandb\]'"):
        WandbSink()


@pytest.mark.slow  # a fresh interpreter imports torch
def test_importing_optiscope_imports_no_tracker():
    code = ("import sys, optiscope, optiscope.dashboards as d; d.MLflowSink; d.WandbSink; "
            "d.export_run; import optiscope.cli; "
            "bad = [m for m in ('mlflow', 'wandb', 'pandas', 'pyarrow') if m in sys.modules]; "
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
