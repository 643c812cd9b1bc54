"""OptimizerMonitor's alerts in training: non-finite gradients named, gradient-norm spikes and
update ratios out of band raised once per excursion, a decaying learning rate not taken for one,
messages that name a few tensors and count the rest (the rules themselves, against a plain
reference: tests/test_alerts.py)."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from models import TinyTransformer, batches, loss_fn
from optiscope import OptimizerMonitor
from optiscope.optimizers import Adam


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("factory", [lambda ps: torch.optim.SGD(ps, lr=0.1),
                                     lambda ps: Adam(ps, backend="torch"),
                                     lambda ps: Adam(ps, backend="triton")],
                         ids=["foreign", "bundled-torch", "bundled-triton"])
def test_non_finite_gradients_alert_names_every_tensor(factory, caplog):
    model = TinyTransformer()
    opt = factory(model.parameters())
    mon = OptimizerMonitor(opt, model=model, strict=True)
    x, y = next(batches(1))
    loss_fn(model, x, y).backward()
    model.head.bias.grad[3] = float("nan")
    model.q.weight.grad[0, :2] = float("inf")
    with caplog.at_level(logging.WARNING, logger="optiscope.monitor"):
        opt.step()
        mon.close()
    (alert,) = mon.history.alerts
    assert alert.kind == "nonfinite_grads" and alert.step == 1
    assert sorted(alert.tensors) == ["head.bias", "q.weight"]
    assert "head.bias (1)" in alert.message and "q.weight (2)" in alert.message
    assert "head.bias" in caplog.text
    assert mon.history.series("nonfinite_grads", "global")[1][0] == 3
    assert mon.history.series("grad_max", "head.bias")[1][0] == float("inf")


def test_gradient_spike_and_update_ratio_band_alerts():
    p = torch.nn.Parameter(torch.ones(100))
    opt = torch.optim.SGD([p], lr=1e-3)
    mon = OptimizerMonitor(opt, strict=True)
    for step in range(1, 11):
        p.grad = torch.full((100,), 1000.0 if step in (7, 10) else 1.0)
        opt.step()
        if step == 7:
            p.data.fill_(1.0)  # undo the jump, so later ratios are comparable again
    mon.close()
    kinds = sorted({(a.kind, a.step) for a in mon.history.alerts})
    # the spike at 7 does not enter the averages, so 10 is a spike again
    assert kinds == [("grad_spike", 7), ("grad_spike", 10), ("update_ratio_band", 7),
                     ("update_ratio_band", 10)]
    spike = next(a for a in mon.history.alerts if a.kind == "grad_spike")
    assert spike.tensors == ["global", "group0.param0"] and "1000.0x its average" in spike.message


def test_a_decaying_learning_rate_is_not_an_update_ratio_alert():
    """Adam's update scales with its lr: a schedule annealing lr 1000x must not read as 30
    stalled layers. A jump at constant lr still does."""
    torch.manual_seed(0)
    model = TinyTransformer()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.7)  # 1e-2 -> ~1e-5 in 20 steps
    mon = OptimizerMonitor(opt, model=model, strict=True)
    for x, y in batches(20):
        loss = loss_fn(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    mon.close()
    assert [a for a in mon.history.alerts if a.kind == "update_ratio_band"] == []
    _, ratio = mon.history.series("update_ratio")
    assert ratio[-1] < ratio[0] / 100, "the ratio itself did fall with the lr"


def test_alert_messages_name_a_few_tensors_and_count_the_rest():
    params = [torch.nn.Parameter(torch.ones(10)) for _ in range(9)]
    opt = torch.optim.SGD(params, lr=0.1)
    mon = OptimizerMonitor(opt, strict=True)
    for p in params:
        p.grad = torch.full((10,), math.nan)
    opt.step()
    mon.close()
    (alert,) = mon.history.alerts
    assert len(alert.tensors) == 9
    assert alert.message.endswith("and 5 more")
    assert "group0.param3 (10)" in alert.message and "group0.param4" not in alert.message


def test_a_lasting_change_of_level_is_one_alert_then_the_new_baseline():
    """A grad norm that jumps 100x and stays there is reported when it jumps, not at every
    sample after: after a few samples out of band, the new level is the baseline."""
    p = torch.nn.Parameter(torch.ones(100))
    opt = torch.optim.SGD([p], lr=1e-3)
    mon = OptimizerMonitor(opt, strict=True)
    for step in range(1, 31):
        p.grad = torch.full((100,), 100.0 if step > 10 else 1.0)
        if step == 25:
            p.grad *= 100  # a real spike over the new level
        opt.step()
        p.data.fill_(1.0)
    mon.close()
    spikes = [a.step for a in mon.history.alerts if a.kind == "grad_spike"]
    assert spikes == [11, 25]
