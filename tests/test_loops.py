"""The monitor inside plain training loops: closures, gradient clipping, resume, on_nonfinite.

Every figure is judged against the test's own float64 gradient norm, taken in the closure or
right after backward, before any clipping."""

from __future__ import annotations

import gc
import math

import numpy as np
import pytest
import torch

from optiscope import OptimizerMonitor, load_run
from optiscope.monitor import clipping
from optiscope.monitor.nonfinite import NonFiniteGradientError
from optiscope.optimizers import AdamW

OPTIMIZERS = {
    "torch-adamw": lambda p: torch.optim.AdamW(p, lr=1e-2),
    "bundled-adamw": lambda p: AdamW(p, lr=1e-2),
    "lbfgs": lambda p: torch.optim.LBFGS(p, lr=0.1, max_iter=3),
}


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def _norm64(model) -> float:
    return math.sqrt(sum(p.grad.double().square().sum().item() for p in model.parameters()))


def _batch(t):
    g = torch.Generator().manual_seed(t)
    return torch.randn(32, 8, generator=g), torch.randn(32, 1, generator=g)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("clip", [None, 0.05])
def test_closure_loop_records_the_gradient_the_closure_made(name, clip):
    model = _model()
    opt = OPTIMIZERS[name](model.parameters())
    mon = OptimizerMonitor(opt, model=model, console=False, strict=True)
    oracle, coef = {}, {}
    for t in range(1, 7):
        x, y = _batch(t)
        first = True

        def closure():
            nonlocal first
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            if first:  # LBFGS calls it again after moving θ; the step consumed the first
                first = False
                oracle[t] = _norm64(model)
                if clip is not None:
                    total = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                    coef[t] = min(1.0, clip / (float(total) + 1e-6))
            return loss

        opt.step(closure)
    mon.close()
    steps, values = mon.history.series("grad_norm")
    assert steps.tolist() == list(range(1, 7))
    for s, v in zip(steps, values):
        assert v == pytest.approx(oracle[s], rel=1e-5)
    steps, values = mon.history.series("clip_coef")
    assert steps.tolist() == list(range(1, 7))
    for s, v in zip(steps, values):
        assert v == pytest.approx(coef.get(s, 1.0), rel=1e-5)


@pytest.mark.parametrize("name", ["torch-adamw", "bundled-adamw"])
def test_clipped_loop_every_3_records_the_gradient_before_clipping(name):
    model = _model()
    opt = OPTIMIZERS[name](model.parameters())
    mon = OptimizerMonitor(opt, model=model, every=3, console=False, strict=True)
    oracle = {}
    for t in range(1, 9):
        x, y = _batch(t)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        oracle[t] = _norm64(model)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        opt.step()
    mon.close()
    steps, values = mon.history.series("grad_norm")
    assert steps.tolist() == [1, 4, 7]
    for s, v in zip(steps, values):
        assert v == pytest.approx(oracle[s], rel=1e-5)
    gc.collect()  # monitors other tests left open and dropped are gone from the weak set
    assert not clipping.active()  # the last monitor closed: torch's functions are back


def test_clip_calls_on_unsampled_steps_do_no_work(monkeypatch):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = OptimizerMonitor(opt, model=model, every=4, console=False, strict=True)
    taken = []
    original = clipping.Capture.take
    monkeypatch.setattr(clipping.Capture, "take",
                        lambda self, *a: taken.append(self.step) or original(self, *a))
    for t in range(1, 9):
        x, y = _batch(t)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        opt.step()
    mon.close()
    assert taken == [1, 5]


@pytest.mark.parametrize("name", ["torch-adamw", "bundled-adamw"])
@pytest.mark.parametrize("clip", [None, "norm", "value"])
def test_nan_in_one_tensor_is_named_alone_under_clipping(name, clip):
    model = _model()
    opt = OPTIMIZERS[name](model.parameters())
    mon = OptimizerMonitor(opt, model=model, console=False)
    for t in range(1, 5):
        x, y = _batch(t)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        if t == 3:
            model[2].bias.grad[0] = float("nan")
        if clip == "norm":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        elif clip == "value":
            torch.nn.utils.clip_grad_value_(model.parameters(), 0.01)
        opt.step()
    mon.close()
    alerts = [a for a in mon.history.alerts if a.kind == "nonfinite_grads"]
    assert [(a.step, a.tensors) for a in alerts][:1] == [(3, ["2.bias"])]


@pytest.mark.parametrize("name", ["torch-adamw", "bundled-adamw"])
def test_on_nonfinite_raise_stops_at_that_step_naming_the_tensor(name):
    model = _model()
    opt = OPTIMIZERS[name](model.parameters())
    mon = OptimizerMonitor(opt, model=model, console=False, on_nonfinite="raise")
    with pytest.raises(NonFiniteGradientError, match=r"step 3: .*2\.weight") as err:
        for t in range(1, 6):
            x, y = _batch(t)
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            if t == 3:
                model[2].weight.grad[0, 1] = float("inf")
            before = model[0].weight.detach().clone()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    mon.close()
    assert (err.value.step, err.value.tensors) == (3, ["2.weight"])
    # the clip call gave the statistics before the update: it was not applied
    assert torch.equal(model[0].weight, before)
    assert [a.step for a in mon.history.alerts if a.kind == "nonfinite_grads"] == [3]


def test_resume_from_a_checkpoint_supersedes_the_abandoned_steps(tmp_path):
    def train(mon, model, opt, steps, oracle, crash_at=None):
        for t in steps:
            x, y = _batch(t)
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            oracle[t] = _norm64(model)
            opt.step()
            mon.log_scalar("loss_seen", float(t), step=t)
            if t == 4:
                yield {"model": {k: v.clone() for k, v in model.state_dict().items()},
                       "opt": opt.state_dict(), "monitor": mon.state_dict()}
            if t == crash_at:
                return

    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mon = OptimizerMonitor(opt, model=model, every=2, log_dir=tmp_path, console=False,
                           tensorboard=False, report=False)
    first = {}
    ckpt = next(iter([c for c in train(mon, model, opt, range(1, 8), first, crash_at=7)]))
    mon.writer.close()  # the crash: no close(), the log stops at step 7

    model = _model(seed=1)  # a different start: only the checkpoint makes them equal
    model.load_state_dict(ckpt["model"])
    model[0].weight.data.mul_(1.5)  # and the resumed run's values differ from the abandoned
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt.load_state_dict(ckpt["opt"])
    mon = OptimizerMonitor(opt, model=model, every=2, log_dir=tmp_path, console=False,
                           tensorboard=False, report=False, resume=True)
    mon.load_state_dict(ckpt["monitor"])
    second = {}
    list(train(mon, model, opt, range(5, 10), second))
    mon.close()

    run = load_run(tmp_path)
    steps, values = run.series("grad_norm")
    assert steps.tolist() == [1, 3, 5, 7, 9]
    truth = {**{s: first[s] for s in (1, 3)}, **{s: second[s] for s in (5, 7, 9)}}
    for s, v in zip(steps, values):
        assert v == pytest.approx(truth[s], rel=1e-5)
    steps, _ = run.series("loss_seen")
    assert steps.tolist() == list(range(1, 10))
    assert run.last_step() == 9
    assert mon.history.series("grad_norm")[0].tolist() == [1, 3, 5, 7, 9]  # in memory too


def test_a_rewind_in_process_drops_the_abandoned_histograms_as_the_run_log_does(tmp_path):
    # load_state_dict on the live monitor (a trainer restoring a checkpoint in process): the
    # histograms of the abandoned steps 4-6 must leave the history in memory as they leave
    # the file's reader (the oracle: `load_run`, which voids them by the resume record)
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mon = OptimizerMonitor(opt, model=model, log_dir=tmp_path, console=False, tensorboard=False,
                           report=False, range_probes=True)

    def train(steps):
        for t in steps:
            x, y = _batch(t)
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
            mon.log_scalar("seen", float(t))
            if t == 3:
                yield mon.state_dict()

    saved = list(train(range(1, 7)))[0]
    model[0].weight.data.mul_(1.5)  # the resumed steps' values differ from the abandoned ones
    mon.load_state_dict(saved)
    list(train(range(4, 6)))
    mon.close()

    run = load_run(tmp_path)
    assert run.histogram_quantities() == mon.history.histogram_quantities() != []
    for quantity in run.histogram_quantities():
        for scope in run.histogram_scopes(quantity):
            steps, counts = mon.history.histograms(quantity, scope)
            file_steps, file_counts = run.histograms(quantity, scope)
            assert steps.tolist() == file_steps.tolist() == [1, 2, 3, 4, 5]
            np.testing.assert_array_equal(counts, file_counts)
    assert mon.history.series("seen")[0].tolist() == [1, 2, 3, 4, 5]


def test_start_step_continues_at_the_checkpoint(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with OptimizerMonitor(opt, model=model, log_dir=tmp_path, console=False, tensorboard=False,
                          report=False) as mon:
        for t in range(1, 7):
            x, y = _batch(t)
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
    with OptimizerMonitor(opt, model=model, log_dir=tmp_path, console=False, tensorboard=False,
                          report=False, resume=True, start_step=3) as mon:
        assert mon.step == 3
        for t in range(4, 6):
            opt.zero_grad()
            ((model(_batch(t)[0]) - _batch(t)[1]) ** 2).mean().backward()
            opt.step()
    run = load_run(tmp_path)
    assert run.series("grad_norm")[0].tolist() == [1, 2, 3, 4, 5]
    assert run.last_step() == 5


@pytest.mark.parametrize("name", ["torch-adamw", "bundled-adamw"])
def test_accelerate_prepared_optimizer_and_model_are_unwrapped(name):
    accelerate = pytest.importorskip("accelerate")
    model = _model()
    opt = OPTIMIZERS[name](model.parameters())
    accelerator = accelerate.Accelerator(cpu=True)
    pmodel, popt = accelerator.prepare(model, opt)
    mon = OptimizerMonitor(popt, model=pmodel, console=False, strict=True)
    oracle = {}
    for t in range(1, 5):
        x, y = _batch(t)
        popt.zero_grad()
        accelerator.backward(((pmodel(x) - y) ** 2).mean())
        oracle[t] = _norm64(model)
        accelerator.clip_grad_norm_(pmodel.parameters(), 0.05)
        popt.step()
    mon.close()
    steps, values = mon.history.series("grad_norm")
    assert steps.tolist() == [1, 2, 3, 4]
    for s, v in zip(steps, values):
        assert v == pytest.approx(oracle[s], rel=1e-5)
    assert mon.history.scopes("grad_norm")[1:] == [n for n, _ in model.named_parameters()]
    assert all(c < 1 for c in mon.history.series("clip_coef")[1])


def test_gradscaler_skipped_step_does_not_leave_a_stale_capture():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    mon = OptimizerMonitor(opt, model=model, scaler=scaler, console=False, strict=True)
    oracle, taken = [], 0
    for t in range(1, 7):
        x, y = _batch(t)
        opt.zero_grad()
        scaler.scale(((model(x) - y) ** 2).mean()).backward()
        if t == 3:
            model[0].weight.grad[0, 0] = float("inf")  # the scaler skips this step
        scaler.unscale_(opt)
        if t != 3:
            oracle.append(_norm64(model))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        scaler.step(opt)
        scaler.update()
    mon.close()
    steps, values = mon.history.series("grad_norm")
    assert steps.tolist() == [1, 2, 3, 4, 5]  # five steps taken
    assert values.tolist() == pytest.approx(oracle, rel=1e-5)
    assert mon.history.series("skipped_steps")[1][-1] == 1


def test_runlog_reader_supersedes_after_each_resume_point(tmp_path):
    from optiscope.monitor.runlog import RunLogWriter
    w = RunLogWriter(tmp_path)
    w.write_meta({"optimizer": "x"})
    for s in range(1, 7):
        w.write_sample(s, 0.0, {"v": (["global"], [s])})        # attempt 1: 1..6
    w.write_resume(4)
    for s in range(5, 9):
        w.write_sample(s, 0.0, {"v": (["global"], [10 + s])})   # attempt 2: 5..8
    w.write_resume(2)
    for s in range(3, 6):
        w.write_sample(s, 0.0, {"v": (["global"], [100 + s])})  # attempt 3: 3..5
    w.close()
    steps, values = load_run(tmp_path).series("v")
    assert steps.tolist() == [1, 2, 3, 4, 5]
    assert values.tolist() == [1, 2, 103, 104, 105]


def test_log_scalar_at_a_step_and_bad_arguments():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = OptimizerMonitor(opt, model=model, every=4, console=False)
    for t in range(1, 4):
        x, y = _batch(t)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        mon.log_scalar("seen", float(t), step=t)  # steps 2 and 3 are not sampled
    with pytest.raises(ValueError, match="step must be an integer in \\[0, 3\\]"):
        mon.log_scalar("seen", 1.0, step=4)
    mon.close()
    assert mon.history.series("seen")[0].tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="on_nonfinite"):
        OptimizerMonitor(opt, on_nonfinite="stop")
    with pytest.raises(ValueError, match="start_step"):
        OptimizerMonitor(opt, start_step=-1)


def test_import_optiscope_imports_no_trainer_library():
    import subprocess
    import sys
    code = ("import sys, optiscope, optiscope.integrations; "
            "print(sorted(m for m in ('transformers', 'lightning', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
