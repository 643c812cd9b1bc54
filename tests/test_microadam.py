"""MicroAdam: the torch backend against a slow, literal reference of docs/optimizers.md written
here, the Triton backend (under the interpreter) against the torch backend, the state's size,
the quantizer's edge cases, checkpoints, and argument checks."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from helpers import TOLERANCES, assert_close, assert_equal
from optiscope.kernels.stats import NUM_STATS, Stat
from optiscope.optimizers import MicroAdam
from optiscope.optimizers.microadam import QUANT_BLOCK_SIZE, TOPK_BLOCK_SIZE, quantize

FP32 = TOLERANCES[torch.float32]
STATE_KEYS = ("error", "min_vals", "max_vals", "I", "V")


# ------------------------------------------------------------------------------------ reference
def bf16(x: torch.Tensor) -> torch.Tensor:
    """Rounded to bfloat16 (nearest, ties to even) and back to float32."""
    return x.to(torch.bfloat16).float()


def literal_dequantize(error, mins, maxs, d, qbs) -> torch.Tensor:
    """The quantizer's Q⁻¹, entry by entry: code·u + δ with u = (Δ − δ)/15, in float32."""
    out = torch.zeros(d, dtype=torch.float32)
    for j in range(d):
        byte = int(error[j // 2])
        code = byte >> 4 if j % 2 == 0 else byte & 15  # even entries: high nibble
        lo = mins[j // qbs]
        u = (maxs[j // qbs] - lo) / 15
        out[j] = code * u + lo
    return out


class ReferenceMicroAdam:
    """MicroAdam as docs/optimizers.md writes it, one tensor, one block, one bucket and one
    entry at a time.

    The dtype rules are the optimizer's documented ones: the accumulator a and the quantizer's
    arithmetic in float32; the kept values V and the bucket bounds δ, Δ stored in bf16; the
    moment estimates and the update in float64 here (float32 in the optimizer), the parameter
    rounded to its own dtype after each step. The window is a plain list of (step, coordinates,
    values), weighted by β^(t − step) for the entries of the last m steps: the paper's sum, with
    no ring buffer.
    """

    def __init__(self, params, *, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, m=10,
                 k_init=0.01, quant_block_size, topk_block_size):
        self.params = [p.detach().clone() for p in params]
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
        self.m, self.k_init = m, k_init
        self.qbs, self.block = quant_block_size, topk_block_size
        self.t = 0
        self.state = [None] * len(self.params)

    def dequantize(self, st, d):
        return literal_dequantize(st["error"], st["min"], st["max"], d, self.qbs)

    def quantize(self, x, st):
        d = x.numel()
        codes = []
        st["min"], st["max"] = [], []
        for start in range(0, d, self.qbs):
            bucket = x[start:start + self.qbs]
            lo, hi = bf16(bucket.min()), bf16(bucket.max())
            st["min"].append(lo)
            st["max"].append(hi)
            u = (hi - lo) / 15
            for value in bucket:
                code = 0 if u == 0 else int(torch.floor((value - lo) / u + 0.5))
                codes.append(min(max(code, 0), 15))
        codes += [0] * (d % 2)
        st["error"] = [(codes[2 * i] << 4) | codes[2 * i + 1] for i in range(len(codes) // 2)]

    def step(self, grads):
        self.t += 1
        t = self.t
        beta1, beta2 = self.betas
        for n, (p, g) in enumerate(zip(self.params, grads)):
            if g is None:
                continue
            d = p.numel()
            st = self.state[n]
            if st is None:  # e = 0, δ = Δ = 0
                st = self.state[n] = dict(error=[0] * ((d + 1) // 2), min=[torch.tensor(0.0)] *
                                          -(-d // self.qbs), max=[torch.tensor(0.0)] *
                                          -(-d // self.qbs), window=[])
            # 1. a = g + Q⁻¹(e_t)
            a = g.reshape(-1).float() + self.dequantize(st, d)
            # 2. top-k of |a| per block: the largest first, the lower index on equal |a|
            chosen = []
            for start in range(0, d, self.block):
                size = min(self.block, d - start)
                k = math.ceil(self.k_init * size)
                order = sorted(range(size), key=lambda j: (-abs(float(a[start + j])), j))
                chosen += sorted(start + j for j in order[:k])
            st["window"].append((t, chosen, [bf16(a[i]) for i in chosen]))
            # 4. a[I] = 0; 5.-6. e_{t+1} = Q(a)
            for i in chosen:
                a[i] = 0.0
            self.quantize(a, st)
            # 7.-9. θ(1 − ηλ), then m̂ / (√v̂ + ε) over the entries of the last m steps
            s1 = torch.zeros(d, dtype=torch.float64)
            s2 = torch.zeros(d, dtype=torch.float64)
            for written, where, values in st["window"]:
                age = t - written
                if age < self.m:
                    for i, v in zip(where, values):
                        s1[i] += beta1 ** age * float(v)
                        s2[i] += beta2 ** age * float(v) ** 2
            m_hat = (1 - beta1) / (1 - beta1 ** t) * s1
            v_hat = (1 - beta2) / (1 - beta2 ** t) * s2
            update = torch.where(s1 == 0, 0.0, m_hat / (v_hat.sqrt() + self.eps))
            theta = p.reshape(-1).double() * (1 - self.lr * self.wd) - self.lr * update
            p.copy_(theta.view(p.shape))
            st["m_hat"], st["v_hat"] = m_hat, v_hat

    def state_as_tensors(self, n):
        """Tensor ``n``'s quantized state in the optimizer's layout, for bitwise comparison."""
        st = self.state[n]
        return dict(error=torch.tensor(st["error"], dtype=torch.uint8),
                    min_vals=torch.stack(st["min"]).to(torch.bfloat16),
                    max_vals=torch.stack(st["max"]).to(torch.bfloat16))


# ---------------------------------------------------------------------------- shared fixtures
# Sizes around the small test blocks (16 entries, buckets of 4): a partial block, whole blocks,
# a tensor smaller than one block, a 0-d scalar, and a transposed (non-contiguous) matrix.
SHAPES = [(37,), (8, 6), (5,), (), (3, 7)]
SMALL = dict(quant_block_size=4, topk_block_size=16)


def make_params(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES[:-1]]
    params.append(nn.Parameter(torch.randn(7, 3, generator=gen).to(dtype).t()))
    return params


def make_grads(step, dtype=torch.float32, missing=()):
    """Tie-free random gradients, a different scale per tensor; None for the tensors in
    ``missing`` (indices)."""
    gen = torch.Generator().manual_seed(1000 + step)
    grads = [torch.randn(s, generator=gen) * (0.1 * (i + 1)) for i, s in enumerate(SHAPES)]
    grads[-1] = grads[-1].t().contiguous().t()  # a gradient with the parameter's layout
    return [None if i in missing else g.to(dtype) for i, g in enumerate(grads)]


def apply(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


@dataclass(frozen=True)
class Case:
    id: str
    settings: dict = field(default_factory=dict)
    # steps at which a tensor has no gradient: {step: (tensor indices)}
    missing: dict = field(default_factory=dict)

    @property
    def kwargs(self):
        return dict(lr=1e-2, **SMALL, **self.settings)


CASES = [
    Case("m10_k10pct", dict(m=10, k_init=0.1)),
    Case("m3_wd_betas", dict(m=3, k_init=0.2, weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6)),
    Case("m1_dense", dict(m=1, k_init=1.0)),
    Case("m4_skipped_steps", dict(m=4, k_init=0.15), missing={3: (0, 2), 4: (0,), 9: (1,),
                                                             10: (1,), 11: (1,), 12: (1,),
                                                             13: (1,), 20: (4,)}),
]


# ------------------------------------------------------------------ torch backend vs reference
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_torch_backend_follows_the_reference_for_50_steps(case):
    params = make_params()
    opt = MicroAdam(params, **case.kwargs, backend="torch")
    ref = ReferenceMicroAdam(params, **case.kwargs)
    for step in range(1, 51):
        grads = make_grads(step, missing=case.missing.get(step, ()))
        apply(params, grads)
        opt.step()
        ref.step(grads)
        for n, p in enumerate(params):
            what = f"step {step}, tensor {n} {tuple(p.shape)}"
            assert_close(p, ref.params[n], **FP32, what=what)
            if ref.state[n] is None:
                assert p not in opt.state
                continue
            for key, value in ref.state_as_tensors(n).items():
                assert_equal(opt.state[p][key], value, what=f"{what}, {key}")
            # the window's latest row: the reference's latest entry, in index order
            last, where, values = ref.state[n]["window"][-1]
            if last == step:
                row = (step - 1) % opt.state[p]["I"].shape[0]
                assert_equal(opt.state[p]["I"][row].long(),
                             torch.tensor(where) % SMALL["topk_block_size"], what=f"{what}, I")
                assert_equal(opt.state[p]["V"][row], torch.stack(values).to(torch.bfloat16),
                             what=f"{what}, V")
        assert opt.global_step == step


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_params_follow_the_reference_in_their_dtype(dtype):
    params = make_params(dtype)
    kwargs = CASES[1].kwargs
    opt = MicroAdam(params, **kwargs, backend="torch")
    ref = ReferenceMicroAdam(params, **kwargs)
    for step in range(1, 21):
        grads = make_grads(step, dtype)
        apply(params, grads)
        opt.step()
        ref.step(grads)
        for n, p in enumerate(params):
            assert p.dtype == dtype
            assert_close(p, ref.params[n], **TOLERANCES[dtype], what=f"step {step}, tensor {n}")
            for key, value in ref.state_as_tensors(n).items():
                assert_equal(opt.state[p][key], value, what=f"step {step}, tensor {n}, {key}")
            assert opt.state[p]["V"].dtype == torch.bfloat16


# ---------------------------------------------------------------------------- state and size
def test_state_is_under_0_9_bytes_per_parameter_plus_per_block_terms():
    # Default m = 10, k_init = 0.01 and block sizes; several whole blocks and a partial one.
    sizes = [64 * TOPK_BLOCK_SIZE + 1001, 2 * TOPK_BLOCK_SIZE, 777, 1]
    params = [nn.Parameter(torch.randn(n)) for n in sizes]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = MicroAdam(params, backend="torch")
    opt.step()
    for p in params:
        d = p.numel()
        state_bytes = sum(t.untyped_storage().nbytes() for t in opt.state[p].values())
        n_blocks = -(-d // TOPK_BLOCK_SIZE)
        n_buckets = -(-d // QUANT_BLOCK_SIZE)
        # Rounding k_b up adds under one entry (10 rows × 4 bytes) per block; each bucket has a
        # bf16 min and max; the 0-d step counter and an odd d's last byte are 4 + 1 bytes.
        assert state_bytes <= 0.9 * d + 40 * n_blocks + 4 * n_buckets + 5, (d, state_bytes)
    # A large tensor: 0.5 (codes) + 0.4004 (window) + 0.001 (bounds) bytes per parameter.
    large = params[0]
    measured = sum(t.untyped_storage().nbytes() for t in opt.state[large].values())
    assert 0.9010 < measured / large.numel() < 0.9020, measured / large.numel()


def test_state_layout_dtypes_and_devices():
    params = make_params(torch.bfloat16)
    apply(params, make_grads(1, torch.bfloat16))
    opt = MicroAdam(params, m=7, **SMALL, k_init=0.2, backend="torch")
    opt.step()
    for p in params:
        d = p.numel()
        st = opt.state[p]
        k = sum(math.ceil(0.2 * min(16, d - s)) for s in range(0, d, 16))
        assert {key: (tuple(st[key].shape), st[key].dtype) for key in STATE_KEYS} == {
            "error": (((d + 1) // 2,), torch.uint8),
            "min_vals": ((-(-d // 4),), torch.bfloat16),
            "max_vals": ((-(-d // 4),), torch.bfloat16),
            "I": ((7, k), torch.int16), "V": ((7, k), torch.bfloat16)}
        assert all(st[key].device == p.device for key in STATE_KEYS)
        assert st["step"].dtype == torch.float32 and st["step"].device.type == "cpu"


@pytest.mark.gpu
def test_state_lives_on_each_parameters_device():
    devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    groups = [{"params": [nn.Parameter(torch.randn(40, device=dev))]} for dev in devices]
    for g in groups:
        g["params"][0].grad = torch.randn_like(g["params"][0])
    opt = MicroAdam(groups, **SMALL)
    opt.step()
    for g in groups:
        p = g["params"][0]
        assert all(opt.state[p][key].device == p.device for key in STATE_KEYS)


# ---------------------------------------------------------------------------- the quantizer
def unpack(codes: torch.Tensor, d: int) -> list[int]:
    return [(int(codes[j // 2]) >> 4) if j % 2 == 0 else int(codes[j // 2]) & 15
            for j in range(d)]


def test_quantizer_packs_even_entries_high_and_pads_odd_sizes():
    x = torch.tensor([0.0, 15.0, 5.0, 10.0, 1.0])  # one bucket: δ = 0, Δ = 15, u = 1
    codes, lo, hi, decoded = quantize(x, 6)
    assert codes.tolist() == [0x0F, 0x5A, 0x10]  # the odd last entry: high nibble, low 0
    assert (lo.item(), hi.item()) == (0.0, 15.0)
    assert_equal(decoded, x)


def test_quantizer_constant_bucket_has_no_nan():
    x = torch.tensor([2.5, 2.5, 2.5, 2.5, 0.0, 0.0])  # Δ = δ in both buckets
    codes, lo, hi, decoded = quantize(x, 4)
    assert codes.tolist() == [0, 0, 0]
    assert_equal(decoded, x)


def test_quantizer_clamps_codes_past_the_rounded_bounds():
    # bf16 rounds the bounds −1006 and −998.1 to −1008 and −1000: unclamped, −998.1 would get
    # ⌊(−998.1 + 1008)/(8/15) + ½⌋ = 19, which overflows its nibble, and a value below the
    # rounded min a negative code.
    x = torch.tensor([-1006.0, -998.1, -1003.0, -999.0])
    codes, lo, hi, decoded = quantize(x, 4)
    assert (lo.item(), hi.item()) == (-1008.0, -1000.0)
    assert unpack(codes, 4) == [4, 15, 9, 15]
    assert torch.isfinite(decoded).all()
    assert (decoded >= -1008.0).all() and (decoded <= -1000.0).all()


@pytest.mark.parametrize("shape", [(), (1,), (3,), (5, 3)], ids=str)
def test_tiny_tensors_keep_their_largest_entry(shape):
    # One block, k = ⌈0.01·d⌉ = 1: a 1-entry tensor keeps everything and leaves a residual of 0
    # (a bucket with Δ = δ), the others keep their largest entry.
    p = nn.Parameter(torch.randn(shape))
    g = torch.randn(shape)
    p.grad = g.clone()
    opt = MicroAdam([p], lr=0.1, backend="torch")
    before = p.detach().clone()
    opt.step()
    st = opt.state[p]
    assert st["I"].shape == (10, 1)
    largest = int(g.reshape(-1).abs().argmax())
    assert st["I"][0, 0].item() == largest
    assert torch.isfinite(p).all()
    changed = (p.detach() != before).reshape(-1).nonzero().flatten().tolist()
    assert changed == [largest]  # the first step is sign(g) at the kept entry: θ ∓ lr
    assert_close(p.detach().reshape(-1)[largest], before.reshape(-1)[largest]
                 - 0.1 * g.reshape(-1)[largest].sign(), **FP32)
    assert torch.isfinite(st["min_vals"].float()).all()
    if p.numel() == 1:
        assert st["error"].tolist() == [0] and st["min_vals"].item() == st["max_vals"].item() == 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_an_empty_tensor_steps_with_the_others(backend):
    params = [nn.Parameter(torch.randn(0, 3)), nn.Parameter(torch.randn(5))]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = MicroAdam(params, **SMALL, backend=backend)
    opt.request_stats()
    opt.step()
    assert opt.state[params[0]]["I"].shape == (10, 0)
    assert opt.last_stats.values[0, :12].tolist() == [0.0] * 12
    assert torch.isfinite(opt.last_stats.values[1, :12]).all()


# ---------------------------------------------------------------------------- torch semantics
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradients_are_left_as_they_were(backend):
    params = make_params()
    grads = make_grads(1)
    apply(params, grads)
    MicroAdam(params, **SMALL, backend=backend).step()
    for p, g in zip(params, grads):
        assert_equal(p.grad, g)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sparse_gradient_is_rejected(backend):
    p = nn.Parameter(torch.zeros(5))
    p.grad = torch.zeros(5).to_sparse()
    with pytest.raises(RuntimeError, match=r"group0\.param0 has a sparse gradient"):
        MicroAdam([p], backend=backend).step()


def test_parameters_without_gradient_are_skipped_and_t_is_global():
    params = make_params()
    before = [p.detach().clone() for p in params]
    params[1].grad = torch.randn(8, 6)
    opt = MicroAdam(params, **SMALL, backend="torch")
    opt.step()
    opt.step()  # a second step: t = 2 for the tensor stepped now
    assert opt.global_step == 2 and opt.state[params[1]]["step"].item() == 2
    for i, (p, b) in enumerate(zip(params, before)):
        if i != 1:
            assert p not in opt.state
            assert_equal(p.detach(), b)


def test_lr_schedulers_drive_the_step_size():
    def first_step(lr, schedule):
        params = make_params()
        apply(params, make_grads(1))
        opt = MicroAdam(params, lr=lr, **SMALL, backend="torch")
        if schedule:
            torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.25)
        opt.step()
        return [p.detach() for p in params]

    for a, b in zip(first_step(0.04, True), first_step(0.01, False)):
        assert_equal(a, b)


def test_closure_loss_is_returned():
    p = nn.Parameter(torch.randn(6))

    def closure():
        p.grad = None
        loss = (p * p).sum()
        loss.backward()
        return loss

    opt = MicroAdam([p], backend="torch")
    assert opt.step(closure) is not None and opt.global_step == 1


# ----------------------------------------------------------------------------- state_dict
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_state_dict_round_trip_resumes_bit_for_bit(dtype):
    kwargs = dict(CASES[3].kwargs)
    missing = CASES[3].missing

    def run(params, opt, steps):
        for step in steps:
            apply(params, make_grads(step, dtype, missing.get(step, ())))
            opt.step()

    whole = make_params(dtype)
    whole_opt = MicroAdam(whole, **kwargs, backend="torch")
    run(whole, whole_opt, range(1, 17))
    part = make_params(dtype)
    part_opt = MicroAdam(part, **kwargs, backend="torch")
    run(part, part_opt, range(1, 10))

    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in part], "opt": part_opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = [nn.Parameter(p) for p in saved["params"]]
    opt = MicroAdam(resumed, **kwargs, backend="torch")
    opt.load_state_dict(saved["opt"])
    assert opt.global_step == 9
    for p in resumed:  # torch's loader would have cast V and the bounds to float32
        assert {k: opt.state[p][k].dtype for k in STATE_KEYS} == {
            "error": torch.uint8, "min_vals": torch.bfloat16, "max_vals": torch.bfloat16,
            "I": torch.int16, "V": torch.bfloat16}
    run(resumed, opt, range(10, 17))
    for i, (a, b) in enumerate(zip(resumed, whole)):
        assert_equal(a.detach(), b.detach(), what=f"param {i}")
        for key in STATE_KEYS:
            assert_equal(opt.state[a][key], whole_opt.state[b][key], what=f"param {i}, {key}")


def test_state_dict_without_global_step_resumes_from_the_latest_tensor_step():
    params = make_params()
    opt = MicroAdam(params, **SMALL, backend="torch")
    for step in (1, 2, 3):
        apply(params, make_grads(step))
        opt.step()
    saved = opt.state_dict()
    del saved["global_step"]
    fresh = MicroAdam(make_params(), **SMALL, backend="torch")
    fresh.load_state_dict(saved)
    assert fresh.global_step == 3


def test_indices_cast_to_float_are_refused():
    params = make_params()
    apply(params, make_grads(1))
    opt = MicroAdam(params, **SMALL, backend="torch")
    opt.step()
    saved = opt.state_dict()
    saved["state"][0]["I"] = saved["state"][0]["I"].to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"indices 'I' are torch\.bfloat16, not int16"):
        MicroAdam(make_params(), **SMALL, backend="torch").load_state_dict(saved)


def test_changing_the_window_shape_after_the_first_step_raises():
    params = make_params()
    apply(params, make_grads(1))
    opt = MicroAdam(params, **SMALL, backend="torch")
    opt.step()
    opt.param_groups[0]["m"] = 4
    with pytest.raises(ValueError, match=r"fix the state at a tensor's first step"):
        opt.step()


# --------------------------------------------------------------------- arguments
INVALID = [
    ("negative_lr", dict(lr=-1.0), r"lr must be >= 0\.0, got -1\.0"),
    ("beta1_one", dict(betas=(1.0, 0.999)), r"betas\[0\] must be in \[0\.0, 1\.0\), got 1\.0"),
    ("betas_not_a_pair", dict(betas=0.9), r"betas must be a pair \(beta1, beta2\), got 0\.9"),
    ("negative_eps", dict(eps=-1e-8), r"eps must be >= 0\.0, got -1e-08"),
    ("negative_weight_decay", dict(weight_decay=-0.1), r"weight_decay must be >= 0\.0"),
    ("m_zero", dict(m=0), r"m \(the window length\) must be an int >= 1, got 0"),
    ("m_float", dict(m=2.5), r"m \(the window length\) must be an int >= 1, got 2\.5"),
    ("k_init_zero", dict(k_init=0.0), r"k_init must be in \(0, 1\], got 0\.0"),
    ("k_init_above_one", dict(k_init=1.5), r"k_init must be in \(0, 1\], got 1\.5"),
    ("topk_block_not_power_of_two", dict(topk_block_size=3000),
     r"topk_block_size must be a power of two from 2 to 32768 .* got 3000"),
    ("topk_block_too_large", dict(topk_block_size=65536),
     r"topk_block_size must be a power of two from 2 to 32768 .* got 65536"),
    ("odd_bucket", dict(quant_block_size=63), r"quant_block_size must be an even int >= 2"),
    ("bucket_not_dividing", dict(quant_block_size=100000),
     r"quant_block_size must divide topk_block_size \(4096\) .* got 100000; pass a power of two"),
    ("unknown_backend", dict(backend="cuda"), r"backend must be one of .* got 'cuda'"),
]


@pytest.mark.parametrize("kwargs, message", [case[1:] for case in INVALID],
                         ids=[case[0] for case in INVALID])
def test_invalid_arguments_fail_at_construction(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=r"^MicroAdam: " + message):
        MicroAdam([nn.Parameter(torch.zeros(3))], **kwargs)


# --------------------------------------------------------------------- statistics (torch)
def brute_force_stats(feedback, grads, before, after, opt, params):
    """Statistics rows of one step from the tensors, in float64: the accumulator rebuilt from
    the error feedback before the step (``feedback``), what top-k kept and the new error
    feedback from the state after it."""
    rows = torch.full((len(params), NUM_STATS), math.nan, dtype=torch.float64)
    group = opt.param_groups[0]
    block, qbs = group["topk_block_size"], group["quant_block_size"]
    for n, p in enumerate(params):
        st = opt.state[p]
        d = p.numel()
        g = grads[n].reshape(-1).float()
        a = (g + feedback[n]).double()
        block_of_column = []
        for start in range(0, d, block):
            block_of_column += [start] * math.ceil(group["k_init"] * min(block, d - start))
        row = (opt.global_step - 1) % st["I"].shape[0]
        chosen = torch.tensor(block_of_column) + st["I"][row].long()
        kept = a[chosen].square().sum()
        residual = a.clone()
        residual[chosen] = 0
        decoded = literal_dequantize(st["error"].tolist(), list(st["min_vals"].float()),
                                     list(st["max_vals"].float()), d, qbs).double()
        rows[n, Stat.GRAD_SQ] = g.double().square().sum()
        rows[n, Stat.GRAD_ABSMAX] = g.abs().max()
        rows[n, Stat.GRAD_NONFINITE] = 0
        rows[n, Stat.PARAM_SQ_BEFORE] = before[n].double().square().sum()
        rows[n, Stat.PARAM_SQ_AFTER] = after[n].double().square().sum()
        rows[n, Stat.UPDATE_SQ] = (after[n].double() - before[n].double()).square().sum()
        rows[n, Stat.QUANT_ERROR_SQ] = (residual - decoded).square().sum()
        rows[n, Stat.QUANT_INPUT_SQ] = residual.square().sum()
        rows[n, Stat.TOPK_KEPT_SQ] = kept
        rows[n, Stat.TOPK_TOTAL_SQ] = a.square().sum()
    return rows


def test_torch_statistics_match_the_reference():
    params = make_params()
    kwargs = CASES[1].kwargs
    opt = MicroAdam(params, **kwargs, backend="torch")
    ref = ReferenceMicroAdam(params, **kwargs)
    for step in range(1, 8):
        grads = make_grads(step)
        feedback = [ref.dequantize(ref.state[n], p.numel()) if ref.state[n] else
                    torch.zeros(p.numel()) for n, p in enumerate(params)]
        before = [p.detach().clone() for p in params]
        apply(params, grads)
        opt.request_stats()
        opt.step()
        ref.step(grads)
        expected = brute_force_stats(feedback, grads, before, [p.detach() for p in params],
                                     opt, params)
        for n in range(len(params)):
            expected[n, Stat.MOMENT1_SQ] = ref.state[n]["m_hat"].square().sum()
            expected[n, Stat.MOMENT2_SQ] = ref.state[n]["v_hat"].square().sum()
        assert_close(opt.last_stats.values, expected, rtol=2e-5, atol=1e-12,
                     what=f"step {step}")
        for n, p in enumerate(params):
            assert_close(opt.moment2_at(p), ref.state[n]["v_hat"], rtol=2e-6, atol=1e-12,
                         what=f"step {step}, v̂ of tensor {n}")


# ------------------------------------------------------------ C kernel vs torch ops (CPU)
def _without_c_kernel(monkeypatch):
    from optiscope.optimizers import microadam as module

    monkeypatch.setattr(module, "_c_kernel_applies", lambda *args: False)


def _c_against_ops(make, kwargs, grads_for, steps, monkeypatch):
    """Steps two copies of the parameters ``make()`` gives, one with the C kernel and one with
    the torch ops alone, on the gradients ``grads_for(step)``; asserts parameters and state
    equal bit for bit and the statistics close after every step."""
    from optiscope.kernels import cpu

    if cpu.kernel() is None:
        pytest.skip("no C compiler here: every tensor takes the torch ops")
    c_params, ops_params = make(), make()
    c_opt = MicroAdam(c_params, **kwargs, backend="torch")
    ops_opt = MicroAdam(ops_params, **kwargs, backend="torch")
    for step in range(1, steps + 1):
        grads = grads_for(step)
        apply(c_params, grads)
        apply(ops_params, grads)
        c_opt.request_stats()
        c_opt.step()
        with monkeypatch.context() as m:
            _without_c_kernel(m)
            ops_opt.request_stats()
            ops_opt.step()
        for n, (a, b) in enumerate(zip(c_params, ops_params)):
            what = f"step {step}, tensor {n} {tuple(a.shape)}"
            assert_equal(a.detach(), b.detach(), what=what)
            if b in ops_opt.state:
                for key in STATE_KEYS:
                    assert_equal(c_opt.state[a][key], ops_opt.state[b][key], what=f"{what}, {key}")
        assert_close(c_opt.last_stats.values, ops_opt.last_stats.values, rtol=2e-5, atol=1e-12,
                     what=f"statistics, step {step}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_c_kernel_matches_torch_ops_bit_for_bit(case, monkeypatch):
    """The torch backend steps contiguous float32 CPU tensors with optiscope's C kernel; the
    torch ops (every other tensor, and machines without a C compiler) are its reference."""
    _c_against_ops(make_params, case.kwargs,
                   lambda step: make_grads(step, missing=case.missing.get(step, ())),
                   14 if case.missing else 8, monkeypatch)


@pytest.mark.parametrize("settings", [
    dict(),                                              # the defaults: blocks of 4096, k = 41
    dict(topk_block_size=1024, quant_block_size=64, k_init=0.05, weight_decay=0.1),
])
def test_c_kernel_matches_torch_ops_on_large_blocks_with_ties(settings, monkeypatch):
    """Blocks of the default size, a partial last block, and gradients with many equal
    magnitudes (ties go to the lower index) and exact zeros."""
    shapes = [(3 * 4096 + 1000,), (64, 130)]

    def make():
        gen = torch.Generator().manual_seed(5)
        return [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]

    def grads_for(step):
        gen = torch.Generator().manual_seed(50 + step)
        return [(torch.randn(s, generator=gen) * 4).round() / 4 for s in shapes]  # ties, zeros

    _c_against_ops(make, dict(lr=1e-3, **settings), grads_for, 5, monkeypatch)


def test_c_second_moment_at_coordinates_matches_the_full_window_sums(monkeypatch):
    """`moment2_at` (the monitor's v̂) gathers at the coordinates from the sampled blocks only,
    in C; the dense torch-ops sums are its reference, bit for bit, sorted or not."""
    from optiscope.kernels import cpu

    if cpu.kernel() is None:
        pytest.skip("no C compiler here: v̂ is always the dense torch-ops sums")
    gen = torch.Generator().manual_seed(2)
    p = nn.Parameter(torch.randn(5 * 1024 + 300, generator=gen))
    opt = MicroAdam([p], lr=1e-3, m=4, topk_block_size=1024, quant_block_size=64,
                    k_init=0.05, backend="torch")
    for _ in range(6):
        p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    full = opt.moment2_at(p)  # index None: the dense sums
    for index in (torch.tensor([0, 1, 1023, 1024, 4000, 5 * 1024 + 299]),
                  torch.randperm(p.numel(), generator=gen)[:700],       # unsorted
                  torch.arange(p.numel(), dtype=torch.int32)):
        assert_equal(opt.moment2_at(p, index), full[index.long()], what=f"{index.numel()} at")


# --------------------------------------------------------------------- Triton vs torch backend
def run_side_by_side(make, grads_for, steps, kwargs, check_state=True):
    runs = {b: (ps := make(), MicroAdam(ps, **kwargs, backend=b)) for b in ("torch", "triton")}
    for step in range(1, steps + 1):
        grads = grads_for(step)
        stats = {}
        for backend, (params, opt) in runs.items():
            apply(params, grads)
            opt.request_stats()
            opt.step()
            stats[backend] = opt.last_stats.values
        (rp, ropt), (tp, topt) = runs["torch"], runs["triton"]
        for n, (a, b) in enumerate(zip(tp, rp)):
            what = f"step {step}, tensor {n} {tuple(a.shape)}"
            assert a.stride() == b.stride(), what
            assert_equal(a.detach(), b.detach(), what=what)
            if b in ropt.state:
                for key in STATE_KEYS:
                    assert_equal(topt.state[a][key], ropt.state[b][key], what=f"{what}, {key}")
        assert_close(stats["triton"], stats["torch"], rtol=2e-5, atol=1e-12,
                     what=f"statistics, step {step}")
    return runs


TRITON_CASES = [CASES[0], CASES[1], CASES[3]]


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: c.id)
def test_triton_matches_torch_bit_for_bit(case):
    steps = 14 if case.missing else 6
    run_side_by_side(make_params, lambda s: make_grads(s, missing=case.missing.get(s, ())),
                     steps, case.kwargs)


def test_triton_programs_loop_over_blocks(monkeypatch):
    from optiscope.kernels import microadam as kernels

    monkeypatch.setattr(kernels, "max_programs", lambda device, tasks: 2)
    run_side_by_side(make_params, make_grads, 3, CASES[0].kwargs)


@pytest.mark.parametrize("dtype", [torch.float16], ids=str)
def test_triton_matches_torch_for_fp16(dtype):
    run_side_by_side(lambda: make_params(dtype), lambda s: make_grads(s, dtype), 3,
                     CASES[1].kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_triton_matches_torch_on_cuda(dtype):
    # On a GPU the compiler may contract a·b + c into one fused multiply-add where torch rounds
    # twice; with tie-free data the kept entries still agree and values differ by round-off.
    def make():
        return [nn.Parameter(p.detach().to("cuda")) for p in make_params(dtype)]

    kwargs = dict(lr=1e-3)
    runs = {b: (ps := make(), MicroAdam(ps, **kwargs, backend=b)) for b in ("torch", "triton")}
    for step in range(1, 6):
        grads = [g.to("cuda") for g in make_grads(step, dtype)]
        for params, opt in runs.values():
            apply(params, grads)
            opt.step()
        for n, (a, b) in enumerate(zip(runs["triton"][0], runs["torch"][0])):
            assert_close(a, b, **TOLERANCES[dtype], what=f"step {step}, tensor {n}")
            assert_equal(runs["triton"][1].state[a]["I"], runs["torch"][1].state[b]["I"])
