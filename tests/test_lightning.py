"""The monitor inside Lightning's automatic optimization (closures, gradient_clip_val).

Oracle: the float64 gradient norm in the module's own ``on_before_optimizer_step`` (after the
closure's backward, before Lightning clips), and the metrics a test logger receives."""

from __future__ import annotations

import math

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from optiscope import load_run  # noqa: E402
from optiscope.integrations.lightning import OptimizerMonitorCallback  # noqa: E402
from optiscope.optimizers import AdamW  # noqa: E402

pytestmark = pytest.mark.slow


class _Module(pl.LightningModule):
    def __init__(self, bundled=False, poison_at=None):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
        self.bundled, self.poison_at, self.norm = bundled, poison_at, {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = ((self.net(x) - y) ** 2).mean() * 50
        self.log("train_loss", loss)
        return loss

    def on_before_optimizer_step(self, optimizer):
        step = self.trainer.global_step + 1
        if step == self.poison_at:
            self.net[0].bias.grad[3] = float("nan")
        if step == getattr(self, "scale_at", None):
            for p in self.parameters():
                p.grad.mul_(20)
        self.norm[step] = math.sqrt(sum(p.grad.double().square().sum().item()
                                        for p in self.parameters()))

    def configure_optimizers(self):
        if self.bundled:
            return AdamW(self.parameters(), lr=1e-2)
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class _Logged(pl.loggers.Logger):
    def __init__(self):
        super().__init__()
        self.seen = []

    name, version = "test", 0

    def log_metrics(self, metrics, step=None):
        self.seen.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def _data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=g), torch.randn(64, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def _fit(tmp_path, module, callback, max_steps=8, logger=None):
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, gradient_clip_val=0.5,
                         log_every_n_steps=3, logger=logger or False, callbacks=[callback],
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, _data())
    return trainer


@pytest.mark.parametrize("bundled", [False, True])
def test_lightning_automatic_optimization(tmp_path, bundled):
    module = _Module(bundled=bundled)
    logger = _Logged()
    _fit(tmp_path, module, OptimizerMonitorCallback(every=2), logger=logger)
    run = load_run(tmp_path / "optiscope")
    steps, values = run.series("grad_norm")
    assert steps.tolist() == [1, 3, 5, 7]
    for s, v in zip(steps, values):
        assert v == pytest.approx(module.norm[s], rel=1e-5)
    _, coefs = run.series("clip_coef")
    for s, c in zip(steps, coefs):
        assert c == pytest.approx(min(1.0, 0.5 / (module.norm[s] + 1e-6)), rel=1e-5)
    assert max(coefs) < 1  # clipping acted
    logged = [(s, m["train_loss"]) for s, m in logger.seen if "train_loss" in m]
    steps, values = run.series("trainer/train_loss")
    # Lightning's logger step counts the batches stepped before this one (0-based); the monitor
    # records at the optimizer step the loss belongs to (1-based)
    assert steps.tolist() == [s + 1 for s, _ in logged] and len(logged) >= 2
    assert values.tolist() == pytest.approx([v for _, v in logged], rel=1e-6)


@pytest.mark.parametrize("bundled", [False, True])
def test_lightning_nan_raise_stops_at_that_step(tmp_path, bundled):
    module = _Module(bundled=bundled, poison_at=3)
    callback = OptimizerMonitorCallback(on_nonfinite="raise")
    trainer = _fit(tmp_path, module, callback)
    assert trainer.global_step == 3
    assert callback.monitor.stopped.tensors == ["net.0.bias"]
    run = load_run(tmp_path / "optiscope")
    alerts = [a for a in run.alerts if a.kind == "nonfinite_grads"]
    assert [(a.step, a.tensors) for a in alerts] == [(3, ["net.0.bias"])]
    assert all(torch.isfinite(p).all() for p in module.parameters())  # update not applied


class _Crash(pl.Callback):
    def __init__(self, at):
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at:
            raise RuntimeError("simulated crash")


def test_lightning_crash_and_resume_from_checkpoint(tmp_path):
    module = _Module()
    module.scale_at = 5  # the abandoned attempt's step 5 differs from the resumed run's

    def fit(module, callbacks, ckpt_path=None):
        checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4,
                                                  save_top_k=-1)
        trainer = pl.Trainer(max_steps=8, accelerator="cpu", devices=1, logger=False,
                             callbacks=[checkpoint, *callbacks], enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=str(tmp_path))
        trainer.fit(module, _data(), ckpt_path=ckpt_path)

    crashed = OptimizerMonitorCallback(every=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(module, [crashed, _Crash(6)])
    crashed.monitor.writer.close()  # the crashed process's file is closed when it dies
    first = module.norm
    resumed = _Module()
    ckpt = next((tmp_path / "ckpt").glob("*step=4*.ckpt"))
    fit(resumed, [OptimizerMonitorCallback(every=1)], ckpt_path=str(ckpt))
    run = load_run(tmp_path / "optiscope")
    steps, values = run.series("grad_norm")
    assert steps.tolist() == list(range(1, 9))  # each step once
    assert sorted(resumed.norm) == list(range(5, 9))
    assert abs(first[5] / resumed.norm[5] - 1) > 0.1
    truth = {**{s: first[s] for s in range(1, 5)}, **resumed.norm}
    for s, v in zip(steps, values):
        assert v == pytest.approx(truth[s], rel=1e-5)


class _Broken(pl.loggers.Logger):
    """A logger whose backend rejects the monitor's values (and only those)."""

    name, version = "broken", 0

    def __init__(self):
        super().__init__()
        self.calls = 0

    def log_metrics(self, metrics, step=None):
        if any(k.startswith("optiscope/") for k in metrics):
            self.calls += 1
            raise ConnectionError("tracker unreachable")

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_lightning_log_to_trainer_csv(tmp_path, caplog):
    """Every chosen value reaches Lightning's CSVLogger at its optimizer step, equal to the run
    log's; a failing logger is reported once and training goes on."""
    import csv
    import logging

    module = _Module()
    names = {n for n, _ in module.named_parameters()}
    csv_logger = pl.loggers.CSVLogger(tmp_path / "csv", name="run", version=0)
    broken = _Broken()
    with caplog.at_level(logging.ERROR, logger="optiscope"):
        trainer = _fit(tmp_path, module, OptimizerMonitorCallback(every=2, log_to_trainer=True),
                       logger=[csv_logger, broken])
    assert trainer.global_step == 8
    assert broken.calls == 1
    assert len([r for r in caplog.records if "_Broken failed" in r.getMessage()]) == 1

    with open(tmp_path / "csv" / "run" / "version_0" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    got: dict[tuple[str, str], dict[int, float]] = {}
    for row in rows:
        for key, cell in row.items():
            if key.startswith("optiscope/") and cell != "":
                metric, scope = key[len("optiscope/"):].split("/", 1)
                assert int(row["step"]) not in got.setdefault((metric, scope), {})
                got[(metric, scope)][int(row["step"])] = float(cell)
    assert "train_loss" in rows[0] or any(r.get("train_loss") for r in rows)  # Lightning's own

    run = load_run(tmp_path / "optiscope")
    # The default budget: every run-wide value, and grad_norm and update_ratio per tensor (this
    # model has 4 tensors, fewer than top=20); the trainer's logged values are not sent back.
    want = {(m, s) for m in run.metrics() for s in run.scopes(m)
            if not m.startswith("trainer/") and (s not in names or m in ("grad_norm", "update_ratio"))}
    assert set(got) == want
    assert ("grad_norm", "net.0.weight") in want and ("lr", "group0") in want
    for metric, scope in want:
        steps, values = run.series(metric, scope)
        assert sorted(got[(metric, scope)]) == steps.tolist(), (metric, scope)
        for s, v in zip(steps.tolist(), values.tolist()):
            assert got[(metric, scope)][s] == pytest.approx(v, rel=1e-5, nan_ok=True), (metric, s)
    assert run.series("grad_norm")[0].tolist() == [1, 3, 5, 7]
