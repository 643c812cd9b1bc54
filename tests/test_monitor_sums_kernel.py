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


@pytest.fixture
def kernel_path(monkeypatch):
    monkeypatch.setattr(collect, "flat_eligible", lambda t: False)  # every tensor per-tensor
    monkeypatch.setattr(cpu, "sums_apply", lambda tensors: False)
    monkeypatch.setattr(pertensor, "SUMS_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(pertensor, "_sums_failed", False)
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

    params = [torch.nn.Parameter(torch.randn(70_000)), torch.nn.Parameter(torch.randn(300))]
    opt = torch.optim.SGD(params, lr=0.1)
    mon = OptimizerMonitor(opt, every=1, console=False, tensorboard=False, report=False)
    params[0].grad = torch.randn(70_000)
    params[0].grad[[5, 69_999]] = torch.tensor([float("nan"), float("inf")])
    params[1].grad = torch.randn(300)
    opt.step()
    mon.close()
    h = mon.history
    counts = {scope: float(h.series("nonfinite_grads", scope)[1][-1])
              for scope in h.scopes("nonfinite_grads") if scope != "global"}
    assert sorted(counts.values()) == [0.0, 2.0], counts  # two per-tensor scopes
    assert kernel_path


def test_a_failing_kernel_is_logged_once_and_the_torch_ops_take_over(monkeypatch, caplog):
    monkeypatch.setattr(pertensor, "SUMS_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(pertensor, "_sums_failed", False)
    monkeypatch.setattr(cpu, "sums_apply", lambda tensors: False)

    def broken(tensors):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(sums, "tensor_sums", broken)
    xs = [torch.randn(5000), torch.randn(70)]
    with caplog.at_level(logging.WARNING, logger="optiscope.monitor"):
        first = pertensor.sq_norms(xs)
        second = pertensor.sq_norms(xs)
    expected = torch.stack([x.double().square().sum() for x in xs])
    assert torch.allclose(first, expected, rtol=1e-6) and torch.equal(first, second)
    assert sum("sums kernel failed" in r.getMessage() for r in caplog.records) == 1
