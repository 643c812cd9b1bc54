"""The monitor's per-tensor sums on the Triton sums kernel (`kernels.sums`), the path a foreign
optimizer's tensors take on a GPU: run here on CPU tensors under the interpreter, every tensor
sent to the per-tensor path, the C sums turned off. Oracle: the float64 brute force of
test_monitor.test_every_metric_matches_brute_force (the trainer's own tensors, traced)."""

from __future__ import annotations

import logging

import pytest
import torch

import test_monitor
from conftest import requires_triton
from optiscope.kernels import cpu, sums
from optiscope.monitor import collect, pertensor

pytestmark = requires_triton


def _per_tensor_path(monkeypatch, kernels: bool = True) -> None:
    """Every tensor on the per-tensor path, the C sums off; ``kernels``: its sums and gathers as
    Triton launches (interpreted), else the torch ops."""
    monkeypatch.setattr(collect, "flat_eligible", lambda t: False)
    monkeypatch.setattr(cpu, "sums_apply", lambda tensors: False)
    monkeypatch.setattr(pertensor, "KERNEL_DEVICES", ("cuda", "cpu") if kernels else ("cuda",))
    monkeypatch.setattr(pertensor, "_failed", set())


@pytest.fixture
def kernel_path(monkeypatch):
    _per_tensor_path(monkeypatch)
    calls = []
    real = sums.tensor_sums
    monkeypatch.setattr(sums, "tensor_sums", lambda ts: calls.append(len(ts)) or real(ts))
    return calls


@pytest.mark.parametrize("name", ["torch-adamw", "torch-rmsprop", "torch-adafactor"])
def test_a_foreign_optimizers_metrics_on_the_sums_kernel_match_brute_force(name, kernel_path):
    test_monitor.test_every_metric_matches_brute_force(name)
    assert kernel_path and max(kernel_path) > 1, "the sums kernel took the tensors, many a call"


def test_non_finite_gradients_are_counted_by_the_kernel(kernel_path):
    from optiscope import OptimizerMonitor

    params = [torch.nn.Parameter(torch.randn(n)) for n in (70_000, 300, 40)]
    opt = torch.optim.SGD(params, lr=0.1)
    mon = OptimizerMonitor(opt, every=1, console=False, tensorboard=False, report=False)
    for p in params:
        p.grad = torch.randn(p.shape)
    params[0].grad[[5, 69_999]] = torch.tensor([float("nan"), float("inf")])
    opt.step()
    mon.close()
    h = mon.history
    counts = {scope: float(h.series("nonfinite_grads", scope)[1][-1])
              for scope in h.scopes("nonfinite_grads") if scope != "global"}
    assert sorted(counts.values()) == [0.0, 0.0, 2.0], counts  # three per-tensor scopes
    assert kernel_path


def test_a_failing_kernel_is_logged_once_and_the_torch_ops_take_over(monkeypatch, caplog):
    monkeypatch.setattr(pertensor, "KERNEL_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(pertensor, "_failed", set())
    monkeypatch.setattr(cpu, "sums_apply", lambda tensors: False)

    def broken(tensors):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(sums, "tensor_sums", broken)
    xs = [torch.randn(5000), torch.randn(70), torch.randn(3)]
    with caplog.at_level(logging.WARNING, logger="optiscope.monitor"):
        first = pertensor.sq_norms(xs)
        second = pertensor.sq_norms(xs)
    expected = torch.stack([x.double().square().sum() for x in xs])
    assert torch.allclose(first, expected, rtol=1e-6) and torch.equal(first, second)
    assert sum("sums kernel failed" in r.getMessage() for r in caplog.records) == 1


def _sampled_run(kernels: bool, monkeypatch) -> dict:
    """Every metric of a 5-step run of torch.optim.AdamW under the monitor's default coordinate
    sample (1/512 of each tensor, at least 16 entries) and sampled top-k blocks, every tensor on
    the per-tensor path; ``kernels``: the sums and gathers as Triton launches (interpreted)."""
    from optiscope import OptimizerMonitor
    from models import TinyTransformer, train_steps

    _per_tensor_path(monkeypatch, kernels)
    torch.manual_seed(0)
    model = TinyTransformer()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    mon = OptimizerMonitor(opt, model=model, every=1, topk_density=0.25, topk_block=4,
                           freeze_probe=2, console=False, tensorboard=False, report=False,
                           strict=True)
    train_steps(mon, model, opt, 5)
    mon.close()
    h = mon.history
    return {(m, s): h.series(m, s)[1] for m in h.metrics() for s in h.scopes(m)}


def test_sampled_metrics_on_the_gather_kernel_equal_the_torch_ops(monkeypatch):
    """The fast path against the slow reference: the same run with index_select per tensor
    (the torch ops) and with one gather launch per dtype; the gathered entries are copies, so
    every sampled estimate agrees to float64 rounding of the sums' order."""
    from optiscope.kernels import gather

    launches = []
    real = gather.gather
    monkeypatch.setattr(gather, "gather", lambda *a, **k: launches.append(1) or real(*a, **k))
    slow = _sampled_run(False, monkeypatch)
    assert not launches
    fast = _sampled_run(True, monkeypatch)
    assert launches, "the gather kernel took the samples"
    assert slow.keys() == fast.keys()
    for key in ("update_norm", "moment2_drift", "topk_coverage", "moment2_drift_since_freeze"):
        assert any(m == key for m, _ in slow), f"{key} not recorded"
    for key, values in slow.items():
        assert torch.allclose(torch.as_tensor(fast[key], dtype=torch.float64),
                              torch.as_tensor(values, dtype=torch.float64), rtol=1e-9, atol=0.0,
                              equal_nan=True), key
