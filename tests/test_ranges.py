"""Dynamic range: log2 histograms of g, θ⁺ − θ⁻ and v, and the shares low-precision casts lose.

Oracles: `torch.histc` of log2|x| in float64 on whole tensors the test reads itself (the
gradient it sets, θ before and after, the optimizer's v), and torch's own casts to bf16, fp16,
float8_e4m3fn and float8_e5m2 for the shares.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from optiscope import OptimizerMonitor
from optiscope.monitor.metrics import EXP_MAX, EXP_MIN, HIST_BINS, RANGE_QUANTITIES, RANGE_SHARES
from optiscope.dashboards.report import write_report
from optiscope.kernels.cpu import kernel
from optiscope.dashboards.report.ranges import range_figure
from optiscope.monitor.ranges import range_counts
from optiscope.monitor.runlog import load_run
from optiscope.optimizers import AdamW

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8e4m3": torch.float8_e4m3fn,
          "fp8e5m2": torch.float8_e5m2}


def oracle_histogram(x: torch.Tensor) -> np.ndarray:
    """Counts per bin from torch.histc of log2|x| in float64."""
    a = x.detach().double().abs().flatten()
    finite = torch.isfinite(a)
    positive = a[(a > 0) & finite]
    log = torch.log2(positive)
    inside = log[(log >= EXP_MIN) & (log < EXP_MAX)]
    middle = torch.histc(inside, bins=EXP_MAX - EXP_MIN, min=EXP_MIN, max=EXP_MAX)
    return np.concatenate([[int((a == 0).sum()), int((log < EXP_MIN).sum())],
                           middle.numpy(), [int((log >= EXP_MAX).sum()), int((~finite).sum())]])


def oracle_share(x: torch.Tensor, fmt: str, what: str) -> float:
    """The share of entries torch's cast to ``fmt`` flushes to zero, or overflows: returns a
    non-finite value, or (float8_e4m3fn saturates) one more than half an ulp from x."""
    x = x.detach().float().flatten()
    info = torch.finfo(DTYPES[fmt])
    cast = x.to(DTYPES[fmt]).double()
    if what == "underflow":
        lost = (x != 0) & (cast == 0)
    else:
        half_ulp = 2.0 ** math.floor(math.log2(info.max)) * info.eps / 2
        lost = torch.isfinite(x) & (~torch.isfinite(cast) | ((cast - x.double()).abs() > half_ulp))
    return float(lost.sum()) / x.numel()


def wide_gradient(shape, generator) -> torch.Tensor:
    """Magnitudes from 2^-150 to 2^20, zeros, and every format's exact thresholds."""
    n = math.prod(shape)
    exponent = torch.randint(-150, 20, (n,), generator=generator).float()
    g = torch.randn(n, generator=generator) * torch.pow(2.0, exponent)
    g[torch.randperm(n, generator=generator)[: n // 20]] = 0.0
    edges = [2.0 ** -25, 65520.0, 65519.99, 61440.0, 464.0, 464.01, 2.0 ** -10, 2.0 ** -17,
             2.0 ** -134, 2.0 ** -133, 2.0 ** -149, 480.0, 1e-45]
    g[: len(edges)] = torch.tensor(edges[:n])
    return g.view(shape)


def test_range_counts_match_histc_and_casts():
    gen = torch.Generator().manual_seed(1)
    parts = [wide_gradient((300,), gen), wide_gradient((41,), gen)]
    parts[1][5:8] = torch.tensor([math.inf, -math.inf, math.nan])
    parts[1][8] = 2.0 ** 40  # above the last exponent bin
    counts = range_counts(torch.cat(parts), torch.tensor([300, 41]), torch.tensor([1.0, 2.0]))
    for i, (x, scale) in enumerate(zip(parts, (1.0, 2.0))):
        assert counts[i, 0] == x.numel() * scale
        np.testing.assert_array_equal(counts[i, 1 + len(RANGE_SHARES):].numpy(),
                                      oracle_histogram(x) * scale)
        for j, (fmt, what) in enumerate(RANGE_SHARES):
            assert counts[i, 1 + j] / counts[i, 0] == pytest.approx(oracle_share(x, fmt, what),
                                                                    abs=0), (fmt, what)
    assert counts[:, 1 + len(RANGE_SHARES):].shape[1] == HIST_BINS


class Recorder:
    """θ before and after each step, and the gradient, of every tensor."""

    def __init__(self, model, opt):
        self.before, self.after, self.grads = {}, {}, {}
        self.model = model
        opt.register_step_pre_hook(self.pre)
        opt.register_step_post_hook(self.post)
        self.step = 0

    def pre(self, opt, args, kwargs):
        self.step += 1
        self.before[self.step] = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.grads[self.step] = {n: p.grad.clone() for n, p in self.model.named_parameters()}

    def post(self, opt, args, kwargs):
        self.after[self.step] = {n: p.detach().clone() for n, p in self.model.named_parameters()}


@pytest.mark.parametrize("factory, sample_size, mode", [
    (lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1), 10**9, True),
    (lambda ps: AdamW(ps, lr=1e-2, weight_decay=0.1), 10**9, True),
    (lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9), 10**9, True),
    # a sample of 8 entries per tensor: only counts of every entry, in the C kernel's pass,
    # match the whole tensors
    (lambda ps: AdamW(ps, lr=1e-2, weight_decay=0.1), 8, "exact"),
    (lambda ps: AdamW(ps, lr=1e-2, weight_decay=0.1, backend="triton"), 8, "exact"),
], ids=["torch-adamw", "optiscope-adamw", "torch-sgd", "optiscope-adamw-exact",
        "optiscope-adamw-triton-exact"])
def test_monitor_histograms_and_shares_match_whole_tensors(factory, sample_size, mode, tmp_path):
    if mode == "exact" and kernel() is None:
        pytest.skip("the C kernel is not available here (no compiler)")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 16), torch.nn.Linear(16, 5))
    opt = factory(model.parameters())
    # the monitor's hooks go first: the recorder sees θ as the optimizer does
    mon = OptimizerMonitor(opt, model=model, every=2, sample_size=sample_size, log_dir=tmp_path,
                           console=False, tensorboard=False, report=False, strict=True,
                           range_probes=mode)
    rec = Recorder(model, opt)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p in model.parameters():
            p.grad = wide_gradient(p.shape, gen)
        opt.step()
    mon.close()
    h = mon.history
    assert h == load_run(tmp_path), "the run log gives back the histograms the monitor kept"
    quantities = ["grad", "update"] + (["moment2"] if "sgd" not in type(opt).__name__.lower()
                                       else [])
    assert h.histogram_quantities() == quantities
    names = [n for n, _ in model.named_parameters()]
    for step in (1, 3):
        state = {n: opt.state[p] for n, p in model.named_parameters()}
        tensors = {
            "grad": rec.grads[step],
            "update": {n: rec.after[step][n].float() - rec.before[step][n].float() for n in names},
        }
        if "moment2" in quantities and step == 3:  # v as it is after the last step
            tensors["moment2"] = {n: state[n]["exp_avg_sq"] for n in names}
        for q, by_name in tensors.items():
            glob = 0
            for name in names:
                steps, counts = h.histograms(q, name)
                row = counts[list(steps).index(step)]
                expected = oracle_histogram(by_name[name])
                np.testing.assert_array_equal(row, expected, err_msg=f"{q} {name} step {step}")
                glob = glob + expected
            steps, counts = h.histograms(q)
            np.testing.assert_array_equal(counts[list(steps).index(step)], glob)
            whole = torch.cat([by_name[n].flatten() for n in names])
            for fmt, what in RANGE_SHARES:
                metric = f"{q}_{fmt}_{what}"
                steps, values = h.series(metric)
                assert values[list(steps).index(step)] == pytest.approx(
                    oracle_share(whole, fmt, what), abs=1e-12), (metric, step)
    assert not any(m.endswith("_bf16_overflow") for m in h.metrics())
    assert set(RANGE_QUANTITIES) >= set(quantities)


def test_tensorboard_histograms_and_report_heatmap(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    model = torch.nn.Linear(30, 20)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    mon = OptimizerMonitor(opt, model=model, every=1, sample_size=10**9, log_dir=tmp_path,
                           console=False, tensorboard=True, report=False, strict=True,
                           range_probes=True)
    gen = torch.Generator().manual_seed(3)
    grads = []
    for _ in range(2):
        for p in model.parameters():
            p.grad = wide_gradient(p.shape, gen)
        grads.append(model.weight.grad.clone())
        opt.step()
    mon.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0})
    acc.Reload()
    assert "grad_log2_abs/weight" in acc.Tags()["histograms"]
    events = acc.Histograms("grad_log2_abs/weight")
    assert [e.step for e in events] == [1, 2]
    for event, g in zip(events, grads):
        hist = event.histogram_value
        expected = oracle_histogram(g)[1:-1]  # nonzero finite: below, exponents, above
        used = np.flatnonzero(expected)
        np.testing.assert_array_equal(hist.bucket, expected[used[0]: used[-1] + 1])
        # bucket i holds log2|x| below its limit: 2^(EXP_MIN + i) for the i-th inner bin
        assert list(hist.bucket_limit) == [float(EXP_MIN + i) for i in range(used[0], used[-1] + 1)]
        assert hist.num == int(((g != 0) & torch.isfinite(g)).sum())
    assert "update_log2_abs/global" in acc.Tags()["histograms"]

    # the report's heatmap: per column, log10 of each exponent's share of the entries
    fig = range_figure(mon.history, "grad", "weight")
    heat = fig.data[0]
    z = np.asarray(heat.z, dtype=np.float64)
    for column, g in enumerate(grads):
        expected = oracle_histogram(g)
        inner = expected[1:-1]
        used = np.flatnonzero(inner)
        rows = inner[used[0]: used[-1] + 1] / g.numel()
        with np.errstate(divide="ignore"):
            want = np.where(rows > 0, np.log10(rows), np.nan)
        np.testing.assert_allclose(z[:, column], want, rtol=1e-6)
    out = write_report(mon.history, tmp_path / "report.html")
    html = out.read_text()
    assert re.search(r'<section id="[^"]*ranges">', html)
    whole = torch.cat([grads[-1].flatten(), model.bias.grad.flatten()])
    share = oracle_share(whole, "fp16", "underflow")  # the table's last sample
    assert f"<td>grad</td><td>fp16</td><td>underflow</td><td class=num>{share:.3%}</td>" in html


def test_the_decoder_checks_histogram_records():
    from optiscope.monitor.records import RecordDecoder

    class Sink:
        def __init__(self):
            self.got = []

        def on_histograms(self, step, histograms):
            self.got.append((step, histograms))

    sink = Sink()
    decoder = RecordDecoder(sink, source="test")
    good = {"type": "histograms", "step": 4, "values": {"grad": [0, [[5, 1, 0, 2], []]]}}
    bad = [
        {"type": "histograms", "step": 5, "values": {"grad": [0, [[HIST_BINS - 1, 1, 1], []]]}},
        {"type": "histograms", "step": 6, "values": {"grad": [0, [[3, -1], []]]}},
        {"type": "histograms", "step": 7, "values": {"grad": [0, [[3, 1]]]}},
    ]
    with pytest.warns(RuntimeWarning, match="skipped 4 record"):
        decoder.feed([{"type": "scopes", "id": 0, "names": ["a", "b"]}, good, *bad,
                      {"type": "histograms", "step": 8, "values": {"grad": [9, [[]]]}}])
    assert [step for step, _ in sink.got] == [4]  # 8: its only quantity dropped, counted
    names, counts = sink.got[0][1]["grad"]
    assert names == ["a", "b"] and counts.shape == (2, HIST_BINS)
    assert counts[0, 5:8].tolist() == [1, 0, 2] and counts.sum() == 3


@pytest.mark.skipif(kernel() is None, reason="the C kernel is not available here (no compiler)")
@pytest.mark.parametrize("n", [1, 100, 4096, 5000, 100_000])
def test_the_c_kernel_counts_every_entry_in_its_pass(n):
    """Adam's C kernel with ``ranges``: the counts of g, θ⁺ − θ⁻ and v equal `range_counts`
    of the whole tensors (100,000 entries: blocks on both threads), and the update is the one
    without counts, bit for bit."""
    from optiscope.kernels import cpu
    from optiscope.kernels.ranges import range_levels
    gen = torch.Generator().manual_seed(n)
    p = torch.randn(n, generator=gen)
    g = torch.randn(n, generator=gen) * 1e-3
    g[: n // 7] *= 1e-30  # subnormal and tiny
    if n > 10:
        g[3:8] = torch.tensor([0.0, math.inf, 7e4, -1e-40, math.nan])
    m, v = torch.zeros(n), torch.rand(n, generator=gen) * 1e-8
    p2, m2, v2, before = p.clone(), m.clone(), v.clone(), p.clone()
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=3,
              decoupled=True, maximize=False)
    counts = cpu.range_buffer(1)
    cpu.adam_f32(p, g, m, v, None, stats=cpu.BlockSums([n], 8), ranges=counts[0], **kw)
    cpu.adam_f32(p2, g, m2, v2, None, **kw)
    assert torch.equal(p.nan_to_num(7.0), p2.nan_to_num(7.0))
    assert torch.equal(v.nan_to_num(7.0), v2.nan_to_num(7.0))
    whole = torch.from_numpy(counts[0].astype(np.int64))
    for q, x in enumerate((g, p - before, v)):
        want = range_counts(x, torch.tensor([n]), torch.ones(1))
        got = range_levels(whole[None, q, :cpu.RANGE_FIELDS], whole[None, q, cpu.RANGE_FIELDS:])
        assert torch.equal(want, got), q


def test_range_probes_takes_true_false_or_exact():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(TypeError, match='range_probes must be True, False or "exact"'):
        OptimizerMonitor(opt, console=False, tensorboard=False, report=False,
                         range_probes="approx")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_triton_kernel_counts_every_entry_in_its_pass(dtype):
    """Adam's Triton kernel with ``StatsRows.ranges`` (under TRITON_INTERPRET here): the counts
    of g, θ⁺ − θ⁻ and v equal `range_counts` of the whole tensors, for a tensor with a masked
    last chunk, a small one, one of exactly one chunk, and a misaligned view. (bf16 without
    subnormal gradients: the interpreter converts bf16 subnormals wrongly, 1e-39 to 4.4e-39.)"""
    from optiscope.kernels.adam import adam_step
    from optiscope.kernels.ranges import RANGE_BLOCK
    from optiscope.kernels.stats import NUM_STATS, StatsRows
    gen = torch.Generator().manual_seed(1)
    sizes = [5000, 100, 4096]
    ps = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    base = torch.randn(1001, generator=gen).to(dtype)
    ps.append(base[1:])  # a view 2 or 4 bytes past an aligned address
    sizes.append(1000)
    gs = [(torch.randn(n, generator=gen) * 1e-3).to(dtype) for n in sizes]
    gs[0][:700] *= 1e-30 if dtype == torch.float32 else 1e-20
    gs[0][3:8] = torch.tensor([0.0, math.inf, 7e4, -1e-40 if dtype == torch.float32 else -1e-20,
                               math.nan]).to(dtype)
    ms = [torch.zeros(n, dtype=dtype) for n in sizes]
    vs = [(torch.rand(n, generator=gen) * 1e-8).to(dtype) for n in sizes]
    before = [p.float().clone() for p in ps]
    ranges = torch.full((len(sizes), 3, RANGE_BLOCK), math.nan, dtype=torch.float64)
    stats = StatsRows(torch.full((len(sizes), NUM_STATS), math.nan, dtype=torch.float64),
                      list(range(len(sizes))), ranges)
    adam_step(ps, gs, ms, vs, None, step=3, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
              weight_decay=0.01, decoupled_weight_decay=True, maximize=False, stats=stats)
    for i, n in enumerate(sizes):
        for q, x in enumerate((gs[i].float(), ps[i].float() - before[i], vs[i].float())):
            want = range_counts(x, torch.tensor([n]), torch.ones(1))[0]
            assert torch.equal(want, ranges[i, q]), (i, q)
