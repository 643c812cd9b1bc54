"""The requantization error of compressed optimizer state and the int8/int4 probes
(optiscope/monitor/compression.py), against oracles computed here in float64 on whole tensors:

- requantization: the optimizer's own dequantized state, read from ``optimizer.state`` before and
  after each step (torchao's ``dequantize()``, bitsandbytes' ``dequantize_blockwise``, a bf16
  tensor as it is), and the gradient the step saw;
- probes: a plain implementation of each scheme below (nearest code by arg-min over the code
  table; torchao's code tables where torchao has them), on every full block of the final m, v.
"""

from __future__ import annotations

import math

import pytest
import torch

from optiscope import OptimizerMonitor
from optiscope.monitor import compression
from optiscope.optimizers import AdamW as BundledAdamW
from models import TinyTransformer, batches, loss_fn

torchao_optim = pytest.importorskip("torchao.optim")
quant_utils = pytest.importorskip("torchao.optim.quant_utils")
subclass_4bit = pytest.importorskip("torchao.optim.subclass_4bit")

try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_f
except Exception as exc:  # noqa: BLE001 - any failure to load the wheel
    bnb, BNB_MISSING = None, f"bitsandbytes does not import here: {exc!r}"
else:
    BNB_MISSING = None


@pytest.fixture(autouse=True)
def _eager(monkeypatch):
    # torchao compiles its step with torch.compile on every call: a minute per optimizer on 2
    # CPU cores. Eager runs the same subclass code and stores the same state.
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)


def _model(dtype=torch.float32):
    # torchao and bitsandbytes compress tensors of >= 4096 entries: the 128 x 32 weight; the
    # rest keeps float32 state (the probes see 256 of the biases' entries, none of the last 4)
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.Tanh(), torch.nn.Linear(128, 256),
                               torch.nn.Tanh(), torch.nn.Linear(256, 4)).to(dtype)


def _dequantized(state: dict, key: str) -> torch.Tensor:
    """The optimizer's own reading of a state moment, float64."""
    x = state[key]
    if type(x) is not torch.Tensor:
        return x.dequantize().double()
    if x.dtype == torch.uint8:  # bitsandbytes: codes, qmap and absmax beside them
        n = key[-1]
        return bnb_f.dequantize_blockwise(x, absmax=state[f"absmax{n}"], code=state[f"qmap{n}"],
                                          blocksize=256).double()
    return x.double()


def _train(opt, model, steps, dtype=torch.float32, loss=None, **monitor_kwargs):
    """Trains under the monitor (every step sampled unless told), on random inputs or on
    ``loss(model, step)``; returns the monitor and, per step and tensor, the dequantized m and v
    before and after the step, g and θ before it."""
    names = {id(p): n for n, p in model.named_parameters()}
    keys = {}
    seen, pending = {}, {}

    def read(o):
        out = {}
        for p in model.parameters():
            state = o.state.get(p)
            if state:
                k = keys.setdefault(id(p), compression.moment_keys(state))
                out[names[id(p)]] = tuple(_dequantized(state, key) for key in k)
        return out

    def pre(o, args, kwargs):
        pending.update(before=read(o), grads={names[id(p)]: p.grad.double().clone()
                                              for p in model.parameters()},
                       params={names[id(p)]: p.detach().double().clone()
                               for p in model.parameters()})

    def post(o, args, kwargs):
        seen[len(seen) + 1] = dict(pending, after=read(o))

    opt.register_step_pre_hook(pre)
    opt.register_step_post_hook(post)
    monitor_kwargs = dict(dict(every=1, sample_size=10**9, strict=True, console=False,
                               quant_probes=True), **monitor_kwargs)
    mon = OptimizerMonitor(opt, model=model, **monitor_kwargs)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        opt.zero_grad()
        if loss is None:
            model(torch.randn(16, 32, generator=gen).to(dtype)).square().mean().backward()
        else:
            loss(model, step).backward()
        opt.step()
    mon.close()
    return mon, seen


def _at(history, metric, scope, step):
    steps, values = history.series(metric, scope)
    return float(values[list(steps).index(step)])


# --------------------------------------------------------------------------- requantization
def _oracle(rec, name, beta1, beta2, coupled_decay=0.0):
    """The one-step requantization error of m and v on the whole tensor, float64."""
    (m0, v0), (m1, v1) = rec["before"][name], rec["after"][name]
    g = rec["grads"][name] + coupled_decay * rec["params"][name]
    m_ref, v_ref = beta1 * m0 + (1 - beta1) * g, beta2 * v0 + (1 - beta2) * g * g
    return (float((m1 - m_ref).norm() / m_ref.norm()), float((v1 - v_ref).norm() / v_ref.norm()))


CASES = {
    "torchao-AdamW8bit": lambda ps: torchao_optim.AdamW8bit(ps, lr=1e-3),
    "torchao-AdamW4bit": lambda ps: torchao_optim.AdamW4bit(ps, lr=1e-3),
    "torchao-AdamWFp8": lambda ps: torchao_optim.AdamWFp8(ps, lr=1e-3),
    # coupled decay: torchao's Adam adds λθ to g before the moments
    "torchao-Adam8bit-l2": lambda ps: torchao_optim.Adam8bit(ps, lr=1e-3, weight_decay=0.1),
    "bnb-AdamW8bit": lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3),
    # bitsandbytes' Adam8bit decays θ directly (decoupled) whatever its name says
    "bnb-Adam8bit-decay": lambda ps: bnb.optim.Adam8bit(ps, lr=1e-3, weight_decay=0.1),
    "torch-AdamW-bf16": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
    "optiscope-AdamW-bf16": lambda ps: BundledAdamW(ps, lr=1e-3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_requantization_error_matches_the_optimizers_own_state(case):
    if case.startswith("bnb") and bnb is None:
        pytest.skip(BNB_MISSING)
    dtype = torch.bfloat16 if case.endswith("bf16") else torch.float32
    model = _model(dtype)
    opt = CASES[case](model.parameters())
    mon, seen = _train(opt, model, steps=3, dtype=dtype)
    history = mon.history
    decay = 0.1 if case.endswith("-l2") else 0.0
    checked = 0
    for step, rec in seen.items():
        for name in rec["after"]:
            state = opt.state[dict(model.named_parameters())[name]]
            if not any(compression.is_compressed(state[k])
                       for k in compression.moment_keys(state)):
                assert not (("moment1_quant_error" in history.metrics())
                            and name in history.scopes("moment1_quant_error")
                            and math.isfinite(_at(history, "moment1_quant_error", name, step)))
                continue
            for metric, x in zip(("moment1_norm", "moment2_norm"), rec["after"][name]):
                got = _at(history, metric, name, step)  # read through the state's codes
                assert math.isclose(got, float(x.norm()), rel_tol=1e-5), (case, metric, got)
            if name not in rec["before"]:  # the state's first step: no value
                assert step == 1
                continue
            m_err, v_err = _oracle(rec, name, 0.9, 0.999, decay)
            for metric, expected in (("moment1_quant_error", m_err),
                                     ("moment2_quant_error", v_err)):
                got = _at(history, metric, name, step)
                assert math.isclose(got, expected, rel_tol=1e-3), (case, step, name, metric, got,
                                                                   expected)
                assert expected > 0
            checked += 1
    assert checked >= 2  # steps 2 and 3 of the compressed tensors
    assert "moment1_quant_error" not in history.meta["skipped_metrics"]


@pytest.mark.slow  # torchao's eager 8-bit requantization of 65,536 entries: ~0.2 s a step
def test_adamw8bit_requantization_error_on_a_256x256_layer_and_on_a_sample():
    """The issue's reference figures (about 1.1 % on m and 0.5 % on v a step), and the sampled
    estimate on a sample of 4,096 of its 65,536 coordinates within 20 % of the whole tensor."""
    model = torch.nn.Linear(256, 256)
    opt = torchao_optim.AdamW8bit(model.parameters(), lr=1e-3)
    mon, seen = _train(opt, torch.nn.Sequential(torch.nn.Linear(32, 256), model), steps=5,
                       sample_size=4096)
    for step in range(3, 6):
        m_err, v_err = _oracle(seen[step], "1.weight", 0.9, 0.999)
        assert 0.005 < m_err < 0.02 and 0.002 < v_err < 0.01, (m_err, v_err)
        for metric, expected in (("moment1_quant_error", m_err), ("moment2_quant_error", v_err)):
            got = _at(mon.history, metric, "1.weight", step)
            assert abs(got - expected) < 0.2 * expected, (step, metric, got, expected)


@pytest.mark.parametrize("case", ["torchao-AdamW4bit", "bnb-AdamW8bit"])
def test_state_bytes_are_the_codes_scales_and_tables_the_optimizer_keeps(case):
    if case.startswith("bnb") and bnb is None:
        pytest.skip(BNB_MISSING)
    model = _model()
    opt = CASES[case](model.parameters())
    mon, _ = _train(opt, model, steps=2)
    expected, storages = 0, {}
    for state in opt.state.values():
        for value in state.values():
            if type(value) is torch.Tensor:  # bitsandbytes: codes, absmax, and a shared qmap
                storages[value.untyped_storage().data_ptr()] = value.nbytes
            elif isinstance(value, torch.Tensor):  # torchao: 4-bit codes two a byte, scales, table
                expected += value.codes.nbytes + value.scale.nbytes + value.qmap.nbytes
    expected += sum(storages.values())
    assert _at(mon.history, "state_bytes", "global", 2) == expected
    logical = sum(2 * p.numel() * 4 for p in model.parameters())
    assert expected < logical / 3


def test_stored_values_are_the_subclass_dequantized_at_any_coordinates():
    x = torch.randn(64, 256).abs()
    index = torch.randperm(x.numel())[:500].sort().values.to(torch.int32)
    for cls, kw in ((subclass_4bit.OptimState4bit, dict(signed=False, block_size=128)),
                    (torchao_optim.subclass_8bit.OptimState8bit, dict(signed=True, block_size=256)),
                    (torchao_optim.subclass_fp8.OptimStateFp8, dict(block_size=256))):
        state = cls.zeros(x.shape, **kw)
        state.copy_(x)
        full = state.dequantize().double().reshape(-1)
        got = compression.stored_values_at({"exp_avg": state}, "exp_avg", index)
        torch.testing.assert_close(got, full[index.long()], rtol=1e-6, atol=0, msg=cls.__name__)


# ------------------------------------------------------------------------------------ probes
def _nearest(x, code):
    """Dequantized nearest code value of each entry of x (normalised), by arg-min."""
    return code[(x[..., None] - code).abs().argmin(dim=-1)]


def _probe_oracles(m, v):
    """The five probe errors on all full blocks of m and v (whole tensors, float64)."""
    dyn8s = torch.tensor(quant_utils.create_dynamic_map(True), dtype=torch.float64)
    dyn8u = torch.tensor(quant_utils.create_dynamic_map(False), dtype=torch.float64)
    dyn4s = torch.tensor(quant_utils.create_dynamic_map(True, 3, 4), dtype=torch.float64)
    lin4 = torch.linspace(0, 1, 16, dtype=torch.float64)
    lin4nz = torch.tensor(subclass_4bit.get_qmap_unsigned(), dtype=torch.float64)
    n = m.numel() // 256 * 256

    def blockwise(x, block, code):
        rows = x.reshape(-1)[:n].reshape(-1, block)
        scale = rows.abs().amax(dim=1, keepdim=True)
        q = _nearest(rows / torch.where(scale > 0, scale, 1), code) * scale
        return float((rows - q).square().sum()), float(rows.square().sum())

    out = {}
    for name, x, block, code in (("probe_int8_m", m, 256, dyn8s), ("probe_int4_m", m, 128, dyn4s),
                                 ("probe_int8_v", v, 256, dyn8u), ("probe_int4_v", v, 128, lin4)):
        out[name] = blockwise(x, block, code)
    mat = v.reshape(v.shape[0], -1) if v.dim() >= 2 else v.reshape(1, -1)
    if v.dim() >= 2:
        norm = torch.minimum(mat.amax(dim=1, keepdim=True), mat.amax(dim=0, keepdim=True))
    else:
        norm = mat.amax().expand_as(mat)
    q = _nearest(mat / torch.where(norm > 0, norm, 1), lin4nz) * norm
    err = (mat - q).reshape(-1)[:n]
    out["probe_int4_v_rank1"] = (float(err.square().sum()), float(mat.reshape(-1)[:n].square().sum()))
    return out


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_probes_match_plain_schemes_on_a_plain_adamw_run(kind):
    """Floors: 0 < int8 < int4 for m and v, and int8 m within 5 %, on torch.optim.AdamW after 30
    steps (an MLP on random data; a small transformer on a next-token task)."""
    if kind == "mlp":
        model, loss = _model(), None
    else:
        torch.manual_seed(0)
        model = TinyTransformer(dim=32)
        data = list(batches(30))

        def loss(model, step):
            return loss_fn(model, *data[step])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mon, seen = _train(opt, model, steps=30, every=29, loss=loss)  # sampled at steps 1 and 30
    totals = {}
    for name, p in model.named_parameters():
        state = opt.state[p]
        m, v = state["exp_avg"].double(), state["exp_avg_sq"].double()
        if p.numel() < 256:
            assert "probe_int8_m" not in mon.history.metrics() or name not in mon.history.scopes(
                "probe_int8_m")
            continue
        for metric, (err, ref) in _probe_oracles(m, v).items():
            got = _at(mon.history, metric, name, 30)
            assert math.isclose(got, math.sqrt(err / ref), rel_tol=1e-6), (name, metric, got)
            total = totals.setdefault(metric, [0.0, 0.0])
            total[0] += err
            total[1] += ref
    glob = {k: math.sqrt(e / r) for k, (e, r) in totals.items()}
    for metric, expected in glob.items():
        assert math.isclose(_at(mon.history, metric, "global", 30), expected, rel_tol=1e-6)
    # floors: 0 < int8 < int4 for both moments; int8 keeps m within 5 %
    assert 0 < glob["probe_int8_m"] < glob["probe_int4_m"]
    assert 0 < glob["probe_int8_v"] < glob["probe_int4_v"]
    assert 0 < glob["probe_int8_v"] < glob["probe_int4_v_rank1"]
    assert glob["probe_int8_m"] < 0.05


@pytest.mark.parametrize("topk_density", [0.01, None])
def test_probes_on_sampled_blocks_are_those_blocks_errors(topk_density):
    """A tensor larger than its sample: the probe quantizes the top-k probe's sampled blocks
    (whole 256-entry blocks inside them), or blocks of its own when the top-k probe is off."""
    model = torch.nn.Linear(512, 256, bias=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mon, _ = _train(opt, torch.nn.Sequential(torch.nn.Linear(32, 512), model), steps=3,
                    sample_size=8192, topk_block=4096, topk_density=topk_density)
    slot = next(s for s in mon.collector.slots if s.scope == "1.weight")
    if topk_density is None:
        rows = mon.collector.compression._blocks[id(slot)]
        assert rows.numel() == 8192 // 256 and len(set(rows.tolist())) == rows.numel()
    else:
        assert slot.blocks is not None and slot.blocks.numel() == 2
        rows = (slot.blocks[:, None] * 16 + torch.arange(16)).reshape(-1)
    state = opt.state[model.weight]
    m, v = state["exp_avg"].double(), state["exp_avg_sq"].double()
    mb, vb = m.reshape(-1, 256)[rows].reshape(-1), v.reshape(-1, 256)[rows].reshape(-1)
    oracles = _probe_oracles(mb, vb)
    # rank-1 normalises by the whole tensor's row and column maxima, not the blocks'
    lin4nz = torch.tensor(subclass_4bit.get_qmap_unsigned(), dtype=torch.float64)
    norm = torch.minimum(v.amax(dim=1, keepdim=True), v.amax(dim=0, keepdim=True))
    entries = (rows[:, None] * 256 + torch.arange(256)).reshape(-1)
    x, nrm = v.reshape(-1)[entries], norm.expand_as(v).reshape(-1)[entries]
    q = _nearest(x / nrm, lin4nz) * nrm
    oracles["probe_int4_v_rank1"] = (float((x - q).square().sum()), float(x.square().sum()))
    for metric, (err, ref) in oracles.items():
        got = _at(mon.history, metric, "1.weight", 3)
        assert math.isclose(got, math.sqrt(err / ref), rel_tol=1e-6), (metric, got)


def test_quant_probes_off_and_its_validation():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mon, _ = _train(opt, model, steps=2, quant_probes=False)
    skipped = mon.history.meta["skipped_metrics"]
    for metric in ("probe_int8_m", "probe_int8_v", "probe_int4_m", "probe_int4_v",
                   "probe_int4_v_rank1"):
        assert metric not in mon.history.metrics() and skipped[metric] == "off: quant_probes=False"
    assert "nothing requantizes" in skipped["moment1_quant_error"]
    assert mon.history.meta["quant_probes"] is False
    with pytest.raises(TypeError, match="quant_probes must be True or False, got 'yes'"):
        OptimizerMonitor(opt, quant_probes="yes")


def test_code_tables_are_bitsandbytes_and_torchaos():
    assert compression.dynamic_map(True) == quant_utils.create_dynamic_map(True)
    assert compression.dynamic_map(False) == quant_utils.create_dynamic_map(False)
    assert compression.dynamic_map(True, 3, 4) == quant_utils.create_dynamic_map(True, 3, 4)
    assert list(compression.LINEAR4_NO_ZERO) == list(subclass_4bit.get_qmap_unsigned())
    if bnb is not None:
        for signed in (True, False):
            assert torch.equal(torch.tensor(compression.dynamic_map(signed)),
                               bnb_f.create_dynamic_map(signed=signed))


def test_moments_compressed_during_the_run_are_found_at_the_next_sampled_step():
    """Which tensors keep compressed moments is looked up again when the state's tensors
    change: a moment replaced by a bf16 copy is measured from the next step on, whether the
    replacement happened inside a step (every=1: the monitor's own look after the step) or
    across unsampled steps (every=2: the probe's own look)."""

    class Adam16(torch.optim.Optimizer):
        """Adam with m and v in bf16 for param0 from the start, for param1 from step 3."""

        def __init__(self, params):
            super().__init__(params, dict(lr=1e-2, betas=(0.9, 0.99)))
            self.calls = 0

        @torch.no_grad()
        def step(self, closure=None):
            self.calls += 1
            for g in self.param_groups:
                b1, b2 = g["betas"]
                for j, p in enumerate(g["params"]):
                    state = self.state[p]
                    dtype = torch.bfloat16 if j == 0 or self.calls >= 3 else torch.float32
                    if not state:
                        state["exp_avg"] = torch.zeros_like(p, dtype=dtype)
                        state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype)
                    for key in ("exp_avg", "exp_avg_sq"):
                        if state[key].dtype != dtype:  # a new tensor: the old one is freed
                            state[key] = state[key].to(dtype)
                    m = state["exp_avg"].float().mul_(b1).add_(p.grad, alpha=1 - b1)
                    v = state["exp_avg_sq"].float().mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                    state["exp_avg"].copy_(m)
                    state["exp_avg_sq"].copy_(v)
                    p.sub_(m / (v.sqrt() + 1e-8), alpha=g["lr"])

    for every in (1, 2):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(64)) for _ in range(2)]
        opt = Adam16(params)
        mon = OptimizerMonitor(opt, every=every, strict=True)
        for _ in range(7):
            for p in params:
                p.grad = torch.randn(64)
            opt.step()
        mon.close()
        h = mon.history
        sampled = list(range(1, 8, every))
        assert list(h.series("moment1_quant_error", "group0.param0")[0]) == sampled[1:]
        assert list(h.series("moment1_quant_error", "group0.param1")[0]) == [
            s for s in sampled if s > 3], every
