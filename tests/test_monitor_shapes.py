"""The monitor on models of odd shape — a 0-d parameter, a parameter without a gradient, a sample
of one coordinate, an empty tensor next to a small one — and on float64 parameters with the
bundled optimizers: every sample recorded, every figure against float64 computed here from the
tensors the test itself feeds and reads."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import topk_mass
from optiscope import OptimizerMonitor
from optiscope.optimizers import AdaDiag, Adam, AdamW


class Trace:
    """g, θ before, θ after and v of every step, read by hooks of the test's own (float64)."""

    def __init__(self, opt, names: dict[int, str]):
        self.steps: list[dict] = []

        def pre(o, args, kwargs):
            self.steps.append({
                "g": {names[id(p)]: p.grad.detach().double().clone()
                      for g in o.param_groups for p in g["params"] if p.grad is not None},
                "p0": {names[id(p)]: p.detach().double().clone()
                       for g in o.param_groups for p in g["params"]}})

        def post(o, args, kwargs):
            self.steps[-1]["p1"] = {names[id(p)]: p.detach().double().clone()
                                    for g in o.param_groups for p in g["params"]}
            self.steps[-1]["v"] = {names[id(p)]: o.state[p]["exp_avg_sq"].detach().double().clone()
                                   for p in o.state if "exp_avg_sq" in o.state[p]}

        opt.register_step_pre_hook(pre)
        opt.register_step_post_hook(post)


def _norm(x) -> float:
    return float(x.double().norm())


def _at(history, metric, scope, step):
    steps, values = history.series(metric, scope)
    assert step in list(steps), f"{metric}/{scope}: step {step} not recorded (steps {list(steps)})"
    return float(values[list(steps).index(step)])


def _check(history, trace: Trace, *, rtol: float, density=0.01, block=4096):
    """Every per-tensor and global figure of every step against the trace."""
    def close(actual, expected, what):
        assert math.isclose(actual, expected, rel_tol=rtol, abs_tol=1e-30), (
            f"{what}: monitor {actual!r}, float64 {expected!r}")

    for step, t in enumerate(trace.steps, start=1):
        g_tot = d_tot = p0_tot = kept_tot = mass_tot = 0.0
        for n, g in t["g"].items():
            d = t["p1"][n] - t["p0"][n]
            if g.numel():
                close(_at(history, "grad_norm", n, step), _norm(g), f"step {step} {n} grad_norm")
                close(_at(history, "weight_norm", n, step), _norm(t["p1"][n]), f"{n} weight_norm")
                close(_at(history, "update_norm", n, step), _norm(d), f"{n} update_norm")
                kept, mass = topk_mass(g, density, block)
                if mass > 0:
                    close(_at(history, "topk_coverage", n, step), kept / mass, f"{n} coverage")
                if n in t["v"]:
                    close(_at(history, "moment2_norm", n, step), _norm(t["v"][n]), f"{n} v")
                    if step > 1 and n in trace.steps[step - 2]["v"]:
                        vp = trace.steps[step - 2]["v"][n]
                        close(_at(history, "moment2_drift", n, step),
                              _norm(t["v"][n] - vp) / _norm(vp), f"step {step} {n} drift")
                kept_tot, mass_tot = kept_tot + kept, mass_tot + mass
            g_tot += _norm(g) ** 2
            d_tot += _norm(d) ** 2
            p0_tot += _norm(t["p0"][n]) ** 2
        close(_at(history, "grad_norm", "global", step), math.sqrt(g_tot), f"step {step} global g")
        close(_at(history, "update_ratio", "global", step), math.sqrt(d_tot / p0_tot),
              f"step {step} global update_ratio")
        close(_at(history, "topk_coverage", "global", step), kept_tot / mass_tot,
              f"step {step} global coverage")


OPTIMIZERS = {
    "torch.optim.Adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "optiscope Adam": lambda ps: Adam(ps, lr=1e-2),
}


def _run(factory, params: dict[str, torch.nn.Parameter], grads, steps=3, **kwargs):
    opt = factory(list(params.values()))
    trace = Trace(opt, {id(p): n for n, p in params.items()})
    mon = OptimizerMonitor(opt, every=1, strict=True, console=False, **kwargs)
    for step in range(steps):
        for name, g in grads(step).items():
            params[name].grad = g
        opt.step()
        for p in params.values():
            p.grad = None
    mon.close()
    return mon.history, trace


def _params(**shapes) -> dict[str, torch.nn.Parameter]:
    """Parameters named as the monitor names them without a model: group0.param{j}."""
    return {f"group0.param{j}": torch.nn.Parameter(torch.randn(shape))
            for j, shape in enumerate(shapes.values())}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_0d_parameter_alone_is_monitored(name):
    params = _params(scalar=())
    history, trace = _run(OPTIMIZERS[name], params,
                          lambda s: {"group0.param0": torch.tensor(0.3 + s)})
    assert list(history.series("grad_norm")[0]) == [1, 2, 3]
    _check(history, trace, rtol=2e-6)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_0d_parameter_among_others(name):
    params = _params(w=(3, 5), scalar=(), b=(1,))
    history, trace = _run(OPTIMIZERS[name], params,
                          lambda s: {n: torch.randn_like(p) for n, p in params.items()})
    _check(history, trace, rtol=2e-6)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_only_one_of_two_parameters_gets_a_gradient(name):
    params = _params(frozen=(3,), trained=(5,))
    history, trace = _run(OPTIMIZERS[name], params,
                          lambda s: {"group0.param1": torch.randn(5)})
    assert list(history.series("grad_norm")[0]) == [1, 2, 3]
    assert "group0.param0" not in history.scopes("grad_norm")
    _check(history, trace, rtol=2e-6)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_sample_of_one_coordinate(name):
    # Gradients constant over each tensor make m, v and Adam's update (no weight decay) the same
    # at every coordinate, so one sampled coordinate scaled to the tensor is the exact figure.
    params = _params(a=(32,), b=(7, 4))  # whole blocks of 4: the sampled blocks are exact too
    history, trace = _run(OPTIMIZERS[name], params,
                          lambda s: {"group0.param0": torch.full((32,), 0.5 + s),
                                     "group0.param1": torch.full((7, 4), -1.0 - s * s)},
                          sample_size=1)
    assert list(history.series("moment2_drift", "group0.param0")[0]) == [2, 3]
    # θ⁺ is rounded to float32 at each coordinate on its own: the updates agree to an ulp of θ,
    # 1e-5 of an update of 1e-2.
    _check(history, trace, rtol=1e-4)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_an_empty_tensor_followed_by_a_small_one(name):
    params = _params(empty=(0,), small=(5,))
    history, trace = _run(OPTIMIZERS[name], params,
                          lambda s: {n: torch.randn_like(p) for n, p in params.items()})
    assert list(history.series("grad_norm", "group0.param1")[0]) == [1, 2, 3]
    _check(history, trace, rtol=2e-6)


def test_the_constant_cache_keys_on_dtype_and_device():
    from optiscope.monitor.collect import Collector

    p = torch.nn.Parameter(torch.ones(2))
    c = Collector(torch.optim.SGD([p], lr=0.1), [], sample_size=None,
                  topk_density=None, topk_block=8, freeze_step=None, seed=0)
    lengths = c._on([1, 2], "cpu")
    scales = c._on([1.0, 2.0], "cpu")
    assert lengths.dtype == torch.int64 and scales.dtype == torch.float32
    assert c._on([1, 2], "cpu") is lengths and c._on([1.0, 2.0], "cpu") is scales
    assert c._on([-0.0], "cpu").item() == 0.0 and str(c._on([-0.0], "cpu").item()) == "-0.0"
    assert str(c._on([0.0], "cpu").item()) == "0.0"


# ----------------------------------------------------------------------------- float64 params
def _linear64():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()


@pytest.mark.parametrize("cls", [Adam, AdamW])
def test_float64_bundled_adam_under_the_monitor_matches_torch_optim(cls, cpu_path):
    ours_model, ref_model = _linear64(), _linear64()
    ours = cls(ours_model.parameters(), lr=1e-2)
    ref = getattr(torch.optim, cls.__name__)(ref_model.parameters(), lr=1e-2)
    names = {id(p): n for n, p in ours_model.named_parameters()}
    trace = Trace(ours, names)
    mon = OptimizerMonitor(ours, model=ours_model, every=1, topk_density=0.25, topk_block=4,
                           sample_size=10**9, strict=True, console=False)
    for _ in range(4):
        x = torch.randn(5, 8, dtype=torch.float64)
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    mon.close()
    for (n, p), q in zip(ours_model.named_parameters(), ref_model.parameters()):
        assert p.dtype == torch.float64 and ours.state[p]["exp_avg_sq"].dtype == torch.float64
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=f"{n} against torch.optim")
    # The statistics are summed in float64 and recorded as float32: one float32 rounding.
    _check(mon.history, trace, rtol=1e-6, density=0.25, block=4)


def test_float64_adadiag_under_the_monitor():
    model = _linear64()
    opt = AdaDiag(model.parameters(), lr=1e-2, update_proj_gap=2)
    trace = Trace(opt, {id(p): n for n, p in model.named_parameters()})
    mon = OptimizerMonitor(opt, model=model, every=1, topk_density=0.25, topk_block=4,
                           sample_size=10**9, strict=True, console=False)
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(5, 8, dtype=torch.float64)).square().mean().backward()
        opt.step()
    mon.close()
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert list(mon.history.series("grad_norm")[0]) == [1, 2, 3, 4]
    for t in trace.steps:  # AdaDiag's v lives in the rotated basis: compare g, θ, Δθ only
        t["v"] = {}
    _check(mon.history, trace, rtol=1e-6, density=0.25, block=4)
