"""OptimizerMonitor's life: bad arguments refused at construction with the value named, `close`
detaching the hooks (twice is fine, and as a context manager), and a failing hook logged while
training goes on with the optimizer's own update."""

from __future__ import annotations

import logging

import pytest
import torch

from optiscope import OptimizerMonitor


def test_close_detaches_and_context_manager():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    with OptimizerMonitor(opt, strict=True) as mon:
        p.grad = torch.ones(3)
        opt.step()
    opt.step()
    assert mon.step == 1
    mon.close()  # twice is fine


@pytest.mark.parametrize("kwargs, match", [
    (dict(every=0), r"every must be an integer >= 1, got 0"),
    (dict(every=2.5), r"every must be an integer >= 1, got 2.5"),
    (dict(sample_size=0), r"sample_size must be a positive integer or None"),
    (dict(topk_density=1.5), r"topk_density must be in \(0, 1\] or None, got 1.5"),
    (dict(topk_block=0), r"topk_block must be an integer >= 1"),
    (dict(freeze_probe=0), r"freeze_probe must be a step >= 1 or None, got 0"),
    (dict(spike_factor=0.5), r"spike_factor must be a number > 1"),
])
def test_bad_arguments_fail_at_construction(kwargs, match):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    with pytest.raises((TypeError, ValueError), match=match):  # a wrong type is a TypeError
        OptimizerMonitor(opt, **kwargs)


def test_not_an_optimizer_fails_at_construction():
    with pytest.raises(TypeError, match=r"optimizer must be a torch.optim.Optimizer, got list"):
        OptimizerMonitor([torch.ones(2)])


def test_a_failing_hook_does_not_stop_training(caplog):
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    mon = OptimizerMonitor(opt)
    mon.collector.begin = lambda kwargs: 1 / 0
    with caplog.at_level(logging.ERROR, logger="optiscope.monitor"):
        for _ in range(2):
            p.grad = torch.ones(3)
            opt.step()
    mon.close()
    assert torch.allclose(p.detach(), torch.full((3,), 0.8))
    assert "the monitor failed at step 1" in caplog.text and "ZeroDivisionError" in caplog.text
