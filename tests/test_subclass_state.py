"""Tensor subclasses in an optimizer's state (torchao's low-bit AdamW keeps its moments as
OptimState8bit / OptimState4bit): they never reach a raw pointer, and the monitor reads them
through their own ``dequantize()`` or says once why it does not.

A subclass's ``data_ptr`` is not the address of float32 values (torchao's is 0): handed to the C
sums it was a segmentation fault that took the training process down. What could crash runs in
a subprocess, so a regression fails one test instead of killing pytest.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from optiscope import OptimizerMonitor

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, *, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    environment = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", **(env or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env=environment, cwd=ROOT)


# ------------------------------------------------------------------------------------ hand-made
class Packed(torch.Tensor):
    """A float32 face over int8 codes and a per-tensor scale, as torchao's states are: no
    storage of its own (``data_ptr`` 0), every aten op unimplemented but detach."""

    @staticmethod
    def __new__(cls, codes, scale):
        return torch.Tensor._make_wrapper_subclass(cls, codes.shape, dtype=torch.float32,
                                                   device=codes.device)

    def __init__(self, codes, scale):
        self.codes, self.scale = codes, scale

    @classmethod
    def pack(cls, x):
        scale = x.abs().max().clamp_min(1e-30) / 127
        return cls(torch.round(x / scale).to(torch.int8), scale)

    def __tensor_flatten__(self):
        return ["codes", "scale"], None

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.detach.default:
            return args[0]
        raise NotImplementedError(f"{cls.__name__} does not implement {func}")

    def dequantize(self):
        return self.codes.float() * self.scale


class Opaque(Packed):
    """The same without a ``dequantize`` of its own."""

    dequantize = torch.Tensor.dequantize


class PackedAdam(torch.optim.Optimizer):
    """Adam whose moments are stored as ``state_type`` (Packed or Opaque), torch.optim's keys."""

    def __init__(self, params, lr=1e-2, state_type=Packed):
        super().__init__(params, dict(lr=lr))
        self.state_type = state_type

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = self.state_type.pack(torch.zeros_like(p))
                    state["exp_avg_sq"] = self.state_type.pack(torch.zeros_like(p))
                state["step"] += 1
                m = 0.9 * state["exp_avg"].codes.float() * state["exp_avg"].scale + 0.1 * p.grad
                v = (0.999 * state["exp_avg_sq"].codes.float() * state["exp_avg_sq"].scale
                     + 0.001 * p.grad.square())
                state["exp_avg"], state["exp_avg_sq"] = (self.state_type.pack(m),
                                                         self.state_type.pack(v))
                p.sub_(group["lr"] * m / (v.sqrt() + 1e-8))


def test_every_raw_pointer_wrapper_refuses_a_subclass_with_a_type_error():
    result = _run("""
        import torch
        from optiscope.kernels import cpu
        from test_subclass_state import Packed
        assert cpu.kernel() is not None, "no C compiler: nothing to guard"
        x = Packed.pack(torch.randn(4096))
        assert x.data_ptr() == 0  # what the C code would have read
        f32, i16 = torch.zeros(4096), torch.zeros((2, 8), dtype=torch.int16)
        bf16 = torch.zeros(8, dtype=torch.bfloat16)
        calls = {
            "sq_sums_f32": lambda: cpu.sq_sums_f32([f32, x]),
            "grad_sums_f32": lambda: cpu.grad_sums_f32([x]),
            "sq_sums_small_f32": lambda: cpu.sq_sums_small_f32([x]),
            "adam_f32": lambda: cpu.adam_f32(f32, f32.clone(), x, f32.clone(), None, lr=1e-3,
                beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1, decoupled=True,
                maximize=False),
            "microadam_f32": lambda: cpu.microadam_f32(x, f32, torch.zeros(8, dtype=torch.uint8),
                bf16, bf16, i16, bf16, block=8, n_full=1, k_full=1, tail=0, k_tail=0, slot=0,
                quant_block_size=8, w1=torch.ones(2), w2=torch.ones(2), c1=1.0, c2=1.0,
                lr=1e-3, weight_decay=0.0, eps=1e-8, stats=False),
            "microadam_v_at": lambda: cpu.microadam_v_at(i16, Packed.pack(torch.zeros(2, 8)),
                block=8, n_full=1, k_full=1, tail=0, k_tail=0, w2=torch.ones(2), c2=1.0,
                index=torch.arange(4)),
        }
        for name, call in calls.items():
            try:
                call()
            except TypeError as exc:
                assert f"cpu.{name}:" in str(exc) and "Packed" in str(exc), (name, str(exc))
                print("refused", name)
            else:
                raise SystemExit(f"{name} accepted a subclass")
        assert not cpu.sums_apply([x]) and cpu.sums_apply([f32])
        # take_f32 routes anything else through torch ops, which dispatch through the subclass
        try:
            cpu.take_f32(x, torch.arange(3, dtype=torch.int32))
        except NotImplementedError as exc:
            assert "Packed does not implement" in str(exc)
            print("take_f32 dispatched")
    """)
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr[-3000:])
    assert result.stdout.count("refused") == 6 and "take_f32 dispatched" in result.stdout


class Snapshot:
    """A subclass state tensor's inner tensors, copied (the optimizer updates them in place)."""

    def __init__(self, x):
        self.kind, self.shape = type(x).__name__, x.shape
        for name in x.__tensor_flatten__()[0]:
            setattr(self, name, getattr(x, name).clone())


def _snapshot(value):
    if type(value) is torch.Tensor:
        return value.clone()
    return Snapshot(value) if isinstance(value, torch.Tensor) else value


def _watch(opt, model, steps, **monitor_kwargs):
    """Trains ``model`` with ``opt`` under the monitor; returns the history and, per step, the
    float64 gradients, parameters before and after, and the states' stored codes and scales."""
    names = {id(p): n for n, p in model.named_parameters()}
    seen, pending = {}, {}

    def pre(o, args, kwargs):
        pending["grads"] = {names[id(p)]: p.grad.double().clone() for p in model.parameters()}
        pending["before"] = {names[id(p)]: p.detach().double().clone()
                             for p in model.parameters()}

    def post(o, args, kwargs):
        step = len(seen) + 1
        seen[step] = dict(pending, after={names[id(p)]: p.detach().double().clone()
                                          for p in model.parameters()},
                          state={names[id(p)]: {k: _snapshot(v) for k, v in o.state[p].items()}
                                 for p in model.parameters()})

    opt.register_step_pre_hook(pre)
    opt.register_step_post_hook(post)
    mon = OptimizerMonitor(opt, model=model, every=1, sample_size=10**9, strict=True,
                           **monitor_kwargs)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 16, generator=gen)).square().mean().backward()
        opt.step()
    mon.close()
    return mon.history, seen


def _at(history, metric, scope, step):
    steps, values = history.series(metric, scope)
    return float(values[list(steps).index(step)])


def _assert_plain_metrics(history, seen):
    for step, rec in seen.items():
        for name, g in rec["grads"].items():
            p0, p1 = rec["before"][name], rec["after"][name]
            for metric, expected in (("grad_norm", g.norm()), ("weight_norm", p1.norm()),
                                     ("update_norm", (p1 - p0).norm())):
                got = _at(history, metric, name, step)
                assert math.isclose(got, float(expected), rel_tol=1e-5, abs_tol=1e-12), (
                    step, name, metric, got, float(expected))


def test_monitor_reads_a_dequantizable_subclass_state_through_dequantize():
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    history, seen = _watch(PackedAdam(model.parameters()), model, steps=3)
    _assert_plain_metrics(history, seen)
    for step, rec in seen.items():
        for name, state in rec["state"].items():
            for metric, key in (("moment1_norm", "exp_avg"), ("moment2_norm", "exp_avg_sq")):
                x = state[key]  # the oracle dequantizes the codes itself, in float64
                expected = float((x.codes.double() * x.scale.double()).norm())
                got = _at(history, metric, name, step)
                assert math.isclose(got, expected, rel_tol=1e-5), (step, name, metric, got)
    # state memory: the codes (1 byte) and scales it keeps, not the 4 bytes it poses as; and step
    expected_bytes = sum(2 * (p.numel() + 4) + 4 for p in model.parameters())
    assert _at(history, "state_bytes", "global", 3) == expected_bytes
    assert "moment1_norm" not in history.meta["skipped_metrics"]
    assert "keeps quantized state (Packed)" in history.meta["skipped_metrics"]["quant_error"]


def test_monitor_skips_moments_of_an_unreadable_subclass_with_a_reason_once():
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    history, seen = _watch(PackedAdam(model.parameters(), state_type=Opaque), model, steps=3)
    _assert_plain_metrics(history, seen)
    skipped = history.meta["skipped_metrics"]
    for metric in ("moment1_norm", "moment2_norm", "moment2_drift"):
        assert metric not in history.metrics()
        assert "Opaque, a tensor subclass without dequantize()" in skipped[metric], skipped


# ------------------------------------------------------------------------------------ torchao
TORCHAO_RUN = """
    import json, sys, torch
    from torchao.optim import AdamW4bit, AdamW8bit
    from test_subclass_state import _watch
    cls = {"8bit": AdamW8bit, "4bit": AdamW4bit}[sys.argv[1]]
    torch.manual_seed(0)
    # torchao quantizes the state of tensors of >= 4096 entries: the first weight (256 x 16);
    # the second (3 x 256) and the biases keep plain float32 state
    model = torch.nn.Sequential(torch.nn.Linear(16, 256), torch.nn.Tanh(), torch.nn.Linear(256, 3))
    opt = cls(model.parameters(), lr=1e-2)
    history, seen = _watch(opt, model, steps=3)
    torch.save(dict(seen=seen, series={(m, s): history.series(m, s) for m in history.metrics()
                                       for s in history.scopes(m)},
                    skipped=history.meta["skipped_metrics"]), sys.argv[2])
"""


def _dequantize64(x):
    """torchao's OptimState8bit/4bit values (a `Snapshot`) in float64, from their codes, block
    scales and quantization map (4-bit codes are packed two per byte, high nibble first)."""
    codes = x.codes
    if x.kind == "OptimState4bit":
        codes = torch.stack([codes >> 4, codes & 0b1111], dim=-1)
    values = x.qmap.double()[codes.long()].view(x.scale.shape[0], -1) * x.scale.double()[:, None]
    return values.reshape(x.shape)


@pytest.mark.slow
@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_monitor_on_torchao_low_bit_adamw(bits, tmp_path):
    pytest.importorskip("torchao.optim")
    out = tmp_path / "run.pt"
    # torchao compiles its step with torch.compile: a minute per optimizer on 2 CPU cores for
    # this model; eager runs the same subclass code, and the monitor reads the same state.
    result = _run(f"import sys; sys.argv = ['run', {bits!r}, {str(out)!r}]\n"
                  + textwrap.dedent(TORCHAO_RUN), env={"TORCHDYNAMO_DISABLE": "1"}, timeout=600)
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
    run = torch.load(out, weights_only=False)
    seen, series = run["seen"], run["series"]

    def at(metric, scope, step):
        steps, values = series[(metric, scope)]
        return float(values[list(steps).index(step)])

    quantized = 0
    for step, rec in seen.items():
        for name, g in rec["grads"].items():
            p0, p1 = rec["before"][name], rec["after"][name]
            for metric, expected in (("grad_norm", g.norm()), ("weight_norm", p1.norm()),
                                     ("update_norm", (p1 - p0).norm())):
                assert math.isclose(at(metric, name, step), float(expected), rel_tol=1e-5,
                                    abs_tol=1e-12), (bits, step, name, metric)
            for metric, key in (("moment1_norm", "exp_avg"), ("moment2_norm", "exp_avg_sq")):
                x = rec["state"][name][key]
                if type(x) is torch.Tensor:
                    expected = float(x.double().norm())
                else:
                    quantized += 1
                    expected = float(_dequantize64(x).norm())
                assert math.isclose(at(metric, name, step), expected, rel_tol=1e-5), (
                    bits, step, name, metric, at(metric, name, step), expected)
    assert quantized == 3 * 2  # the first weight's two moments at each of 3 steps
    assert "moment1_norm" not in run["skipped"] and "moment2_norm" not in run["skipped"]
    assert f"keeps quantized state (OptimState{bits})" in run["skipped"]["quant_error"]
