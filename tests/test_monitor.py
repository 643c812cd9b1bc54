"""OptimizerMonitor: every metric against a brute-force computation in the test, for bundled and
foreign optimizers; the sampling schedule; no effect on the trajectory; GradScaler, schedulers,
torch.compile; what it says about optimizers it cannot read. Its alerts in training, its state
bytes and its life (construction, close, a failing hook) have files of their own:
test_monitor_alerts.py, test_monitor_state.py, test_monitor_lifecycle.py."""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from helpers import assert_equal, topk_mass
from models import TinyTransformer, batches, hooked_run, loss_fn
from optiscope import OptimizerMonitor
from optiscope.optimizers import Adafactor, Adam, AdamW


@dataclass
class Trace:
    """What the test itself sees of each step, through hooks of its own."""

    grads: dict = field(default_factory=dict)
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    v: dict = field(default_factory=dict)     # step -> {name: full second moment}
    m: dict = field(default_factory=dict)

    def attach(self, opt, model, first: str | None = None, second=None):
        names = {id(p): n for n, p in model.named_parameters()}

        def pre(o, args, kwargs):
            step = len(self.before) + 1
            self.grads[step] = {names[id(p)]: p.grad.detach().clone() for g in o.param_groups
                                for p in g["params"] if p.grad is not None}
            self.before[step] = {names[id(p)]: p.detach().clone() for g in o.param_groups
                                 for p in g["params"]}

        def post(o, args, kwargs):
            step = len(self.before)
            self.after[step] = {names[id(p)]: p.detach().clone() for g in o.param_groups
                                for p in g["params"]}
            if first:
                self.m[step] = {names[id(p)]: o.state[p][first].detach().clone()
                                for p in o.state if first in o.state[p]}
            if second:
                self.v[step] = {names[id(p)]: second(o.state[p]) for p in o.state}

        opt.register_step_pre_hook(pre)
        opt.register_step_post_hook(post)


def _norm(x):
    return float(x.double().norm())


def _adafactor_v(state):
    if "variance" in state:
        return state["variance"].double().clone()
    row, col = state["row_var"].double(), state["col_var"].double()
    return row @ col / row.mean(dim=-2, keepdim=True)


def _ours_adafactor_v(state):
    if "exp_avg_sq" in state:
        return state["exp_avg_sq"].double().clone()
    row, col = state["exp_avg_sq_row"].double(), state["exp_avg_sq_col"].double()
    return (row / row.mean(-1, keepdim=True)).unsqueeze(-1) * col.unsqueeze(-2)


OPTIMIZERS = {
    # name: (factory, first-moment key, second-moment reader)
    "optiscope-adamw-torch": (lambda ps: AdamW(ps, lr=3e-3, backend="torch"), "exp_avg",
                              lambda s: s["exp_avg_sq"].double().clone()),
    "optiscope-adamw-triton": (lambda ps: AdamW(ps, lr=3e-3, backend="triton"), "exp_avg",
                               lambda s: s["exp_avg_sq"].double().clone()),
    "optiscope-adafactor-torch": (lambda ps: Adafactor(ps, beta1=0.9, backend="torch"), "exp_avg",
                                  _ours_adafactor_v),
    "optiscope-adafactor-triton": (lambda ps: Adafactor(ps, beta1=0.9, backend="triton"), "exp_avg",
                                   _ours_adafactor_v),
    "torch-adamw": (lambda ps: torch.optim.AdamW(ps, lr=3e-3), "exp_avg",
                    lambda s: s["exp_avg_sq"].double().clone()),
    "torch-sgd-momentum": (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
                           "momentum_buffer", None),
    "torch-rmsprop": (lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.5), "momentum_buffer",
                      lambda s: s["square_avg"].double().clone()),
    "torch-adafactor": (lambda ps: torch.optim.Adafactor(ps, lr=1e-2), None, _adafactor_v),
    "torch-adamax": (lambda ps: torch.optim.Adamax(ps, lr=1e-3), "exp_avg",
                     lambda s: s["exp_inf"].double().clone()),
}

RTOL = 2e-5  # float32 sums against float64 brute force


def _close(actual, expected, what):
    assert math.isclose(actual, expected, rel_tol=RTOL, abs_tol=1e-12), (
        f"{what}: monitor {actual!r}, brute force {expected!r}")


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_metric_matches_brute_force(name):
    factory, first, second = OPTIMIZERS[name]
    torch.manual_seed(0)
    model = TinyTransformer()
    opt = factory(model.parameters())
    trace = Trace()
    trace.attach(opt, model, first, second)
    density, block = 0.25, 8
    mon = OptimizerMonitor(opt, model=model, every=2, sample_size=10**9, topk_density=density,
                           topk_block=block, freeze_probe=2, strict=True)
    for x, y in batches(5):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    mon.close()
    h = mon.history
    assert [int(s) for s in h.series("grad_norm")[0]] == [1, 2, 3, 5], "steps 1, 3, 5 and T=2"
    names = [n for n, _ in model.named_parameters()]
    for step in (1, 2, 3, 5):
        g, p0, p1 = trace.grads[step], trace.before[step], trace.after[step]
        totals = dict(g=0.0, p0=0.0, d=0.0, kept=0.0, mass=0.0)
        for n in names:
            def at(metric, scope=n):
                steps, values = h.series(metric, scope)
                return float(values[list(steps).index(step)])
            d = p1[n].double() - p0[n].double()
            _close(at("grad_norm"), _norm(g[n]), f"{name} step {step} {n} grad_norm")
            _close(at("grad_max"), float(g[n].abs().max()), f"{n} grad_max")
            assert at("nonfinite_grads") == 0
            _close(at("weight_norm"), _norm(p1[n]), f"{n} weight_norm")
            _close(at("update_norm"), _norm(d), f"{n} update_norm")
            if _norm(p0[n]) > 0:
                _close(at("update_ratio"), _norm(d) / _norm(p0[n]), f"{n} update_ratio")
            kept, mass = topk_mass(g[n], density, block)
            _close(at("topk_coverage"), kept / mass, f"{n} topk_coverage")
            if first:
                _close(at("moment1_norm"), _norm(trace.m[step][n]), f"{n} moment1_norm")
            if second:
                v = trace.v[step][n]
                _close(at("moment2_norm"), _norm(v), f"{n} moment2_norm")
                prev = max(s for s in (1, 2, 3, 5) if s < step) if step > 1 else None
                if prev is not None:
                    vp = trace.v[prev][n]
                    if _norm(vp) > 0:
                        _close(at("moment2_drift"), _norm(v - vp) / _norm(vp), f"{n} drift")
                if step >= 2 and _norm(trace.v[2][n]) > 0:
                    vt = trace.v[2][n]
                    _close(at("moment2_drift_since_freeze"), _norm(v - vt) / _norm(vt),
                           f"{n} drift since freeze")
            totals["g"] += _norm(g[n]) ** 2
            totals["p0"] += _norm(p0[n]) ** 2
            totals["d"] += _norm(d) ** 2
            totals["kept"] += kept
            totals["mass"] += mass

        def glob(metric):
            steps, values = h.series(metric, "global")
            return float(values[list(steps).index(step)])
        _close(glob("grad_norm"), math.sqrt(totals["g"]), f"{name} global grad_norm")
        _close(glob("update_ratio"), math.sqrt(totals["d"] / totals["p0"]), "global update_ratio")
        _close(glob("topk_coverage"), totals["kept"] / totals["mass"], "global topk_coverage")
        _close(glob("grad_max"), max(float(t.abs().max()) for t in g.values()), "global grad_max")
    if not second:
        assert "moment2_norm" not in h.metrics()
        assert "moment2_norm" in h.meta["skipped_metrics"]


def _microadam_moments(opt, p):
    """MicroAdam's bias-corrected window estimates (m̂, v̂) of ``p``'s latest step, in float64,
    entry by entry from its state: row r has age (t − 1 − r) mod m, and a column's block
    follows from the blocks' k_b = ⌈k_init·|b|⌉."""
    group = opt.param_groups[0]
    (beta1, beta2), block = group["betas"], group["topk_block_size"]
    st = opt.state[p]
    t, d = int(st["step"]), p.numel()
    starts = []
    for start in range(0, d, block):
        starts += [start] * math.ceil(group["k_init"] * min(block, d - start))
    s1 = torch.zeros(d, dtype=torch.float64)
    s2 = torch.zeros(d, dtype=torch.float64)
    m = st["I"].shape[0]
    for r in range(m):
        age = (t - 1 - r) % m
        for c, start in enumerate(starts):
            v = float(st["V"][r, c])
            s1[start + int(st["I"][r, c])] += beta1 ** age * v
            s2[start + int(st["I"][r, c])] += beta2 ** age * v * v
    return (1 - beta1) / (1 - beta1 ** t) * s1, (1 - beta2) / (1 - beta2 ** t) * s2


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.slow)])
def test_microadam_metrics_match_brute_force_from_its_state(backend):
    # MicroAdam's compression metrics are of its own accumulator a = g + Q⁻¹(e_t): the share of
    # a's mass its top-k keeps, and the relative error of the residual's 4-bit quantization.
    from optiscope.optimizers import MicroAdam
    from test_microadam import literal_dequantize

    torch.manual_seed(0)
    model = TinyTransformer()
    # 64-entry blocks: each program of the interpreted kernel costs the same at 16 or 64
    block, bucket, density = 64, 8, 0.05
    opt = MicroAdam(model.parameters(), lr=3e-3, m=3, k_init=density, quant_block_size=bucket,
                    topk_block_size=block, backend=backend)
    names = {id(p): n for n, p in model.named_parameters()}
    seen: dict = {}

    def state_copy(o):
        return {names[id(p)]: {k: v.clone() for k, v in o.state[p].items()} for p in o.state}

    def pre(o, args, kwargs):
        step = o.global_step + 1
        seen[step] = dict(grads={names[id(p)]: p.grad.clone() for p in model.parameters()},
                          before=state_copy(o))

    def post(o, args, kwargs):
        seen[o.global_step]["after"] = state_copy(o)
        seen[o.global_step]["moments"] = {names[id(p)]: _microadam_moments(o, p)
                                          for p in model.parameters()}

    h = hooked_run(opt, model, 5, pre, post)
    sampled = (1, 3, 5)
    assert [int(s) for s in h.series("quant_error")[0]] == list(sampled)
    for step in sampled:
        totals = dict(err=0.0, res=0.0, kept=0.0, mass=0.0)
        for n, p in model.named_parameters():
            def at(metric, scope=n):
                steps, values = h.series(metric, scope)
                return float(values[list(steps).index(step)])
            d = p.numel()
            old = seen[step]["before"].get(n)
            new = seen[step]["after"][n]
            g = seen[step]["grads"][n].reshape(-1).double()
            feedback = (torch.zeros(d, dtype=torch.float64) if old is None else literal_dequantize(
                old["error"].tolist(), list(old["min_vals"].float()),
                list(old["max_vals"].float()), d, bucket).double())
            a = g + feedback
            row = (step - 1) % 3
            starts = []
            for start in range(0, d, block):
                starts += [start] * math.ceil(density * min(block, d - start))
            kept_at = torch.tensor(starts) + new["I"][row].long()
            residual = a.clone()
            residual[kept_at] = 0
            decoded = literal_dequantize(new["error"].tolist(), list(new["min_vals"].float()),
                                         list(new["max_vals"].float()), d, bucket).double()
            err, res = _norm(residual - decoded) ** 2, _norm(residual) ** 2
            kept, mass = a[kept_at].square().sum().item(), a.square().sum().item()
            if res > 0:
                _close(at("quant_error"), math.sqrt(err / res), f"{backend} step {step} {n} q")
            _close(at("topk_coverage"), kept / mass, f"{n} topk_coverage")
            m_hat, v_hat = seen[step]["moments"][n]
            _close(at("moment1_norm"), _norm(m_hat), f"{n} moment1_norm")
            _close(at("moment2_norm"), _norm(v_hat), f"{n} moment2_norm")
            if step > 1:
                v_prev = seen[step - 2]["moments"][n][1]
                _close(at("moment2_drift"), _norm(v_hat - v_prev) / _norm(v_prev), f"{n} drift")
            totals["err"] += err
            totals["res"] += res
            totals["kept"] += kept
            totals["mass"] += mass

        def glob(metric):
            steps, values = h.series(metric, "global")
            return float(values[list(steps).index(step)])
        _close(glob("quant_error"), math.sqrt(totals["err"] / totals["res"]), "global quant")
        _close(glob("topk_coverage"), totals["kept"] / totals["mass"], "global topk_coverage")
    assert "quant_error" not in h.meta["skipped_metrics"]


def test_lr_per_group_follows_the_scheduler():
    model = TinyTransformer()
    opt = torch.optim.AdamW([dict(params=model.head.parameters(), lr=1e-2),
                             dict(params=model.embed.parameters(), lr=1e-3)])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    mon = OptimizerMonitor(opt, model=model, strict=True)
    for x, y in batches(3):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
        sched.step()
    mon.close()
    assert mon.history.scopes("lr") == ["group0", "group1"]
    np.testing.assert_allclose(mon.history.series("lr", "group0")[1], [1e-2, 5e-3, 2.5e-3])
    np.testing.assert_allclose(mon.history.series("lr", "group1")[1], [1e-3, 5e-4, 2.5e-4])


@pytest.mark.parametrize("factory", [
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False),
    lambda ps: AdamW(ps, lr=1e-2, backend="torch"),
    lambda ps: AdamW(ps, lr=1e-2, backend="triton"),
], ids=["torch-adamw", "optiscope-torch", "optiscope-triton"])
def test_monitor_does_not_change_the_trajectory(factory):
    torch.manual_seed(0)
    watched = TinyTransformer()
    plain = copy.deepcopy(watched)
    opt_w, opt_p = factory(watched.parameters()), factory(plain.parameters())
    sched_w = torch.optim.lr_scheduler.LambdaLR(opt_w, lambda s: 1 / (1 + s))
    sched_p = torch.optim.lr_scheduler.LambdaLR(opt_p, lambda s: 1 / (1 + s))
    mon = OptimizerMonitor(opt_w, model=watched, every=1, strict=True)
    for x, y in batches(6):
        for model, opt, sched in ((watched, opt_w, sched_w), (plain, opt_p, sched_p)):
            opt.zero_grad()
            loss = loss_fn(model, x, y)
            loss.backward()
            opt.step()
            sched.step()
        mon.log_scalar("loss", loss)
    mon.close()
    for (n, a), b in zip(watched.named_parameters(), plain.parameters()):
        assert_equal(a.detach(), b.detach(), what=f"{n} with and without the monitor")
    assert len(mon.history.series("grad_norm")[0]) == 6


class CountingTensor(torch.Tensor):
    """Counts the torch operations that touch it, except metadata reads (numel, shape): a sync,
    a copy or any arithmetic would show up here."""

    calls = 0
    METADATA = {"numel", "dim", "shape", "dtype", "device", "__get__"}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") not in cls.METADATA:
            CountingTensor.calls += 1
        return super().__torch_function__(func, types, args, kwargs or {})


def test_unsampled_steps_do_no_work():
    model = TinyTransformer()
    opt = torch.optim.AdamW(model.parameters())
    mon = OptimizerMonitor(opt, model=model, every=4, strict=True)
    begins, ends = [], []
    original_begin, original_end = mon.collector.begin, mon.collector.end
    mon.collector.begin = lambda kw: (begins.append(mon.step), original_begin(kw))[1]
    mon.collector.end = lambda step: (ends.append(step), original_end(step))[1]
    touched = []
    for x, y in batches(9):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
        loss = torch.tensor(1.0).as_subclass(CountingTensor)
        CountingTensor.calls = 0
        mon.log_scalar("loss", loss)
        touched.append(CountingTensor.calls)
    mon.close()
    assert begins == ends == [1, 5, 9]
    assert [t for i, t in enumerate(touched, 1) if i not in (1, 5, 9)] == [0] * 6, (
        "log_scalar touched a tensor on an unsampled step")
    assert list(mon.history.series("loss")[0]) == [1, 5, 9]


def test_gradient_accumulation_counts_only_optimizer_steps():
    model = TinyTransformer()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = OptimizerMonitor(opt, model=model, strict=True)
    for i, (x, y) in enumerate(batches(8)):
        loss_fn(model, x, y).backward()
        if i % 4 == 3:
            opt.step()
            opt.zero_grad()
    mon.close()
    assert mon.step == 2 and list(mon.history.series("grad_norm")[0]) == [1, 2]


def test_grad_scaler_unscaled_gradients_and_skipped_steps(caplog):
    torch.manual_seed(0)
    model = TinyTransformer()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    trace = Trace()
    trace.attach(opt, model)
    mon = OptimizerMonitor(opt, model=model, scaler=scaler, strict=True)
    with caplog.at_level(logging.WARNING, logger="optiscope.monitor"):
        for i, (x, y) in enumerate(batches(5)):
            opt.zero_grad()
            scaler.scale(loss_fn(model, x, y)).backward()
            if i == 2:
                model.head.weight.grad[0, 0] = float("inf")  # this step is skipped
            scaler.step(opt)
            scaler.update()
    mon.close()
    h = mon.history
    assert mon.step == 4, "the skipped iteration is not an optimizer step"
    assert list(h.series("skipped_steps")[1]) == [0, 0, 1, 1]
    assert [a.kind for a in h.alerts] == ["skipped_steps"]
    assert "skipped 1 step" in caplog.text
    for step in (1, 2):
        expected = math.sqrt(sum(_norm(g) ** 2 for g in trace.grads[step].values()))
        _close(float(h.series("grad_norm")[1][step - 1]), expected, "unscaled grad norm")


def test_grad_scaler_with_a_fused_optimizer_sees_unscaled_gradients():
    torch.manual_seed(0)
    model = TinyTransformer()
    reference = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    mon = OptimizerMonitor(opt, model=model, scaler=scaler, strict=True)
    x, y = next(batches(1))
    scaler.scale(loss_fn(model, x, y)).backward()
    loss_fn(reference, x, y).backward()
    scaler.step(opt)
    scaler.update()
    mon.close()
    expected = math.sqrt(sum(_norm(p.grad) ** 2 for p in reference.parameters()))
    _close(float(mon.history.series("grad_norm")[1][0]), expected, "fused: unscaled grad norm")


def test_torch_compiled_model_keeps_working_and_names_are_clean():
    torch.manual_seed(0)
    model = TinyTransformer()
    compiled = torch.compile(model, backend="aot_eager")
    opt = AdamW(compiled.parameters(), backend="torch")
    mon = OptimizerMonitor(opt, model=compiled, strict=True)
    for x, y in batches(2):
        opt.zero_grad()
        loss_fn(compiled, x, y).backward()
        opt.step()
    mon.close()
    assert "head.weight" in mon.history.scopes("grad_norm")
    assert not any(s.startswith("_orig_mod") for s in mon.history.scopes("grad_norm"))


def test_names_without_a_model_and_from_named_parameters():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    mon = OptimizerMonitor(torch.optim.SGD([dict(params=[a]), dict(params=[b])], lr=0.1))
    assert [s.scope for s in mon.slots] == ["group0.param0", "group1.param0"]
    mon.close()
    named = Adam([("encoder.w", a), ("encoder.b", b)], backend="torch")
    mon = OptimizerMonitor(named)
    assert [s.scope for s in mon.slots] == ["encoder.w", "encoder.b"]
    mon.close()


def test_an_unreadable_optimizer_still_gets_norms_and_says_once_what_it_skips(caplog):
    class SignSGD(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, dict(lr=0.01))

        @torch.no_grad()
        def step(self, closure=None):
            for g in self.param_groups:
                for p in g["params"]:
                    self.state[p]["memo"] = p.grad.sign()
                    p.sub_(self.state[p]["memo"], alpha=g["lr"])

    model = TinyTransformer()
    opt = SignSGD(model.parameters())
    with caplog.at_level(logging.INFO, logger="optiscope.monitor"):
        mon = OptimizerMonitor(opt, model=model, strict=True)
        for x, y in batches(3):
            opt.zero_grad()
            loss_fn(model, x, y).backward()
            opt.step()
        mon.close()
    h = mon.history
    for metric in ("grad_norm", "weight_norm", "update_norm", "nonfinite_grads", "lr", "state_bytes"):
        assert len(h.series(metric, h.scopes(metric)[0])[0]) == 3, metric
    for metric in ("moment1_norm", "moment2_norm", "moment2_drift"):
        assert metric not in h.metrics()
        assert "['memo']" in h.meta["skipped_metrics"][metric]
    assert caplog.text.count("not recorded for SignSGD") == 1


def test_default_sampling_is_close_and_its_memory_is_stated():
    torch.manual_seed(0)
    layer = torch.nn.Linear(2048, 1024)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    exact = OptimizerMonitor(opt, sample_size=10**9, strict=True)
    sampled = OptimizerMonitor(opt, strict=True)
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(16, 2048)).square().mean().backward()
        opt.step()
    exact.close()
    sampled.close()
    assert sampled.memory_bytes() < 0.01 * layer.weight.numel() * 4
    # what it keeps: per tensor, the sample's int32 indices (none when the sample is the whole
    # tensor) and v at the sample (float32), and the top-k probe's sampled block indices
    expected = 0
    for slot in sampled.slots:
        count, whole = slot.sample.count, slot.sample.index is None
        expected += (0 if whole else 4 * count) + 4 * count
        expected += 0 if slot.blocks is None else 8 * slot.blocks.numel()
    assert sampled.memory_bytes() == expected
    for metric in ("update_norm", "moment2_drift", "topk_coverage"):
        e = exact.history.series(metric, "group0.param0")[1][-1]
        s = sampled.history.series(metric, "group0.param0")[1][-1]
        assert abs(s - e) < 0.1 * e, f"{metric}: sampled {s}, exact {e}"
    for metric in ("grad_norm", "weight_norm", "moment2_norm"):  # never sampled
        assert exact.history.series(metric)[1][-1] == sampled.history.series(metric)[1][-1]


def test_log_scalar_records_numbers_and_tensors_on_sampled_steps():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    mon = OptimizerMonitor(opt, every=2, strict=True)
    mon.log_scalar("loss", 9.0)  # step 0, before training
    for step in range(1, 5):
        p.grad = torch.ones(3)
        opt.step()
        mon.log_scalar("loss", torch.tensor(float(step)))
        mon.log_scalar("tokens_per_s", 100.0 * step)
    with pytest.raises(ValueError, match=r"log_scalar\('bad'\) takes one number.*shape \(3,\)"):
        mon.log_scalar("bad", torch.ones(3))
    mon.close()
    assert list(mon.history.series("loss")[0]) == [0, 1, 3]
    assert list(mon.history.series("loss")[1]) == [9.0, 1.0, 3.0]
    assert list(mon.history.series("tokens_per_s")[1]) == [100.0, 300.0]


def test_sums_of_large_tensors_are_accurate():
    # torch's float32 CPU norm of 10^7 entries is off by ~7e-4; the monitor's sums must not be
    from optiscope.kernels.stats import torch_sq_norms

    x = torch.randn(3_000_001) * 0.01 + 0.003  # not a multiple of the row length
    exact = float((x.double() ** 2).sum())
    assert abs(float(torch_sq_norms([x, x[:5]])[0]) / exact - 1) < 1e-6


def test_adafactor_without_beta1_has_its_second_moment_read():
    """Adafactor's default keeps no first moment: vectors hold ``exp_avg_sq`` alone, matrices
    its factors. Both are read (the layout is recognised by v alone), so v and its drift are
    recorded for every tensor."""
    torch.manual_seed(0)
    model = TinyTransformer()
    opt = Adafactor(model.parameters(), backend="torch")
    mon = OptimizerMonitor(opt, model=model, strict=True, console=False, quant_probes=True,
                           range_probes=True)
    for x, y in batches(3):
        loss = loss_fn(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    mon.close()
    run = mon.history
    # no Adam-style m and v (exp_avg, exp_avg_sq): no requantization error, nothing to probe
    assert set(run.meta["skipped_metrics"]) == {"moment1_norm", "moment2_drift_since_freeze",
                                                "quant_error", "grad_diagonality",
                                                "grad_diagonality_original", "moment1_quant_error",
                                                "moment2_quant_error", "probe_int8_m", "probe_int8_v",
                                                "probe_int4_m", "probe_int4_v", "probe_int4_v_rank1"}
    names = {n for n, _ in model.named_parameters()}
    assert names <= set(run.scopes("moment2_norm")), "vectors and factored matrices alike"
    assert names <= set(run.scopes("moment2_drift"))
    state = opt.state[model.ln1.weight]
    _, v = run.series("moment2_norm", "ln1.weight")
    assert v[-1] == pytest.approx(float(state["exp_avg_sq"].norm()), rel=1e-5)


def test_a_float64_model_is_monitored():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 8192).double()  # one tensor above a summing row (4096)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    mon = OptimizerMonitor(opt, model=layer, strict=True)
    for _ in range(2):
        opt.zero_grad()
        layer(torch.randn(4, 64, dtype=torch.float64)).square().mean().backward()
        grad = layer.weight.grad.clone()
        opt.step()
    mon.close()
    steps, values = mon.history.series("grad_norm", "weight")
    assert list(steps) == [1, 2]
    assert values[-1] == pytest.approx(float(grad.norm()), rel=1e-6)
    assert mon.history.series("moment2_norm", "weight")[1][-1] > 0
