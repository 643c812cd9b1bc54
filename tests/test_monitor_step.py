"""The sampled step's cost in dispatched ops (deterministic: a floor, not a timing) and the flat
path's values (`optiscope.monitor.flat`) against float64 oracles from the inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from optiscope.bench.sampled_step import count_ops
from optiscope.monitor.collect import Collector, TensorSlot
from optiscope.monitor.metrics import Col

OP_FLOOR = 150  # dispatched non-view aten ops per sampled step at 148 tensors (issue 17)
# calls into the C library per sampled step on the CPU, one per set of tensors read: the
# gradients (sums and top-k probe), θ before and after (sums, samples, the update's sample sums),
# m (sums), v (sums, samples, drift sums); the bundled AdamW gives most of them from its pass
C_CALLS = {"bundled": 2, "foreign": 5}


@pytest.mark.parametrize("kind", ["bundled", "foreign"])
def test_a_sampled_step_of_148_tensors_dispatches_at_most_150_ops(kind):
    """The monitor's own metrics, without the readiness probes (quant_probes, range_probes),
    which still gather each tensor's sample (see the README's overhead figures)."""
    ops = count_ops(kind, 148, probes=False)
    assert ops["ops"] <= OP_FLOOR, ops["op_counts"]
    assert ops["c_calls"] <= C_CALLS[kind]  # per set of tensors, not per tensor (below)


@pytest.mark.slow
def test_the_op_count_does_not_grow_with_the_number_of_tensors():
    small, large = count_ops("foreign", 148, probes=False), count_ops("foreign", 1000, probes=False)
    assert (large["ops"], large["c_calls"]) == (small["ops"], small["c_calls"])


def _close(rtol, a, b) -> bool:
    return bool(torch.isclose(a, b, rtol=rtol, equal_nan=True))


def _topk_oracle(g: torch.Tensor, slot: TensorSlot, block: int, rho: float):
    """(kept, total) of the blockwise top-k from the definition, float64."""
    flat = g.double().reshape(-1)
    n_full = flat.numel() // block
    if slot.blocks is not None:
        rows = [flat[b * block:(b + 1) * block] for b in slot.blocks.tolist()]
        scale = flat.numel() / (len(rows) * block)
    else:
        rows = [flat[b * block:(b + 1) * block] for b in range(n_full)]
        if flat.numel() > n_full * block:
            rows.append(flat[n_full * block:])
        scale = 1.0
    kept = sum(r.square().sort(descending=True).values[:math.ceil(rho * r.numel())].sum()
               for r in rows)
    total = sum(r.square().sum() for r in rows)
    return float(kept) * scale, float(total) * scale


@pytest.mark.parametrize("path", ["c", "torch"])
def test_the_flat_path_matches_float64_oracles(path, monkeypatch):
    """On the CPU the flat path sums float32 tensors in C (`flat_cpu`); the torch ops it falls
    back to (any other dtype or device) are the other case."""
    from optiscope.monitor import flat_cpu
    if path == "torch":
        monkeypatch.setattr(flat_cpu, "host_sums_apply", lambda device, wide: False)
    elif not flat_cpu.host_sums_apply(torch.device("cpu"), torch.float64):
        pytest.skip("the C library is not available here (no compiler)")
    # sizes: tails of 16, 48, 100 (one padded group), 700 (another), one tensor whose blocks
    # are sampled (20,000 entries, 78 blocks of 256), one above FLAT_MAX (per-tensor path)
    torch.manual_seed(0)
    shapes = [(16,), (4, 12), (100,), (7, 100), (4096 + 100,), (20000,), (70000,)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = torch.optim.AdamW(params, lr=1e-2)
    slots = [TensorSlot(f"t{i}", p) for i, p in enumerate(params)]
    block, rho = 256, 0.05
    c = Collector(opt, slots, sample_size=64, topk_density=rho, topk_block=block,
                  freeze_step=2, seed=0)
    prev_v = None
    for step in (1, 2, 3):
        grads = [torch.randn(s) for s in shapes]
        grads[1][0, 0] = math.inf  # its neighbour's padded tail row reads it: masked
        for p, g in zip(params, grads):
            p.grad = g.clone()
        before = [p.detach().double().clone() for p in params]
        c.begin({})
        opt.step()
        rows = c.end(step)
        assert c._plan is not None and c._rest == [6]
        assert (c._plan.host is not None) == (path == "c")
        for i, (slot, g, p0) in enumerate(zip(slots, grads, before)):
            # torch's flat path sums float64 squares; C (the flat path on the CPU, and the
            # per-tensor one) float32 squares per block of 4096 lanes, added in double
            rtol = 1e-12 if i < 6 and path == "torch" else 1e-6
            r, p1 = rows[i], params[i].detach().double()
            gd = g.double()
            finite = torch.isfinite(gd)
            assert r[Col.GRAD_NONFINITE] == (~finite).sum()
            if finite.all():
                assert _close(rtol, r[Col.GRAD_SQ], gd.square().sum())
                assert r[Col.GRAD_ABSMAX] == gd.abs().max()
                kept, total = _topk_oracle(g, slot, block, rho)
                assert math.isclose(r[Col.TOPK_KEPT_SQ], kept, rel_tol=1e-12)
                assert math.isclose(r[Col.TOPK_TOTAL_SQ], total, rel_tol=1e-12)
            else:
                assert r[Col.GRAD_ABSMAX] == math.inf
            assert _close(rtol, r[Col.PARAM_SQ_BEFORE], p0.square().sum())
            assert _close(rtol, r[Col.PARAM_SQ_AFTER], p1.square().sum())
            index = slot.sample.index
            take = (lambda x: x.reshape(-1)) if index is None else (
                lambda x: x.reshape(-1)[index.long()])
            d = take(p1.float().double()) - take(p0.float().double())
            assert _close(rtol, r[Col.UPDATE_SQ], d.square().sum() * slot.sample.scale)
            state = opt.state[params[i]]
            assert _close(rtol, r[Col.MOMENT1_SQ], state["exp_avg"].double().square().sum())
            assert _close(rtol, r[Col.MOMENT2_SQ], state["exp_avg_sq"].double().square().sum())
        v = [take_v.reshape(-1)[s.sample.index.long()].double() if s.sample.index is not None
             else take_v.reshape(-1).double()
             for s, take_v in zip(slots, (opt.state[p]["exp_avg_sq"] for p in params))]
        for i, slot in enumerate(slots):
            if prev_v is None:
                assert math.isnan(rows[i, Col.DRIFT_DIFF_SQ])
            else:
                want = (v[i] - prev_v[i]).square().sum() * slot.sample.scale
                assert _close(1e-12, rows[i, Col.DRIFT_DIFF_SQ], want)
                assert _close(1e-12, rows[i, Col.DRIFT_PREV_SQ],
                                     prev_v[i].square().sum() * slot.sample.scale)
        prev_v = v
    assert slots[5].blocks is not None  # the sampled-block case was exercised


def test_background_decoding_records_what_the_training_thread_records(tmp_path):
    from optiscope import OptimizerMonitor, load_run

    def run(background: bool, log_dir):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8),
                                    torch.nn.Linear(8, 2))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        mon = OptimizerMonitor(opt, model=model, log_dir=log_dir, console=False,
                               tensorboard=False, report=False, background=background)
        for _ in range(5):
            opt.zero_grad()
            model(torch.randn(4, 8)).square().mean().backward()
            opt.step()
            mon.log_scalar("loss", 1.0)
        mon.close()
        return mon.history, load_run(log_dir)

    (fg, _), (bg, bg_log) = run(False, tmp_path / "fg"), run(True, tmp_path / "bg")
    assert fg.metrics() == bg.metrics() == bg_log.metrics() and len(fg.metrics()) > 10
    for metric in fg.metrics():
        assert fg.scopes(metric) == bg.scopes(metric) == bg_log.scopes(metric)
        for scope in fg.scopes(metric):
            want = fg.series(metric, scope)
            for got in (bg.series(metric, scope), bg_log.series(metric, scope)):
                assert np.array_equal(want[0], got[0])
                if metric != "cuda_memory_allocated":
                    assert np.array_equal(want[1], got[1], equal_nan=True), (metric, scope)


def test_the_flat_path_reads_the_optimizers_state_after_it_was_replaced():
    """The C path keeps the per-tensor state dicts between steps (found without hashing the
    parameters); a state loaded from a checkpoint, or dicts replaced in place, are read anew:
    the moment sums against float64 sums of the state the step left."""
    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(16,), (4, 12), (300,)]]
    opt = torch.optim.AdamW(params, lr=1e-2)
    c = Collector(opt, [TensorSlot(f"t{i}", p) for i, p in enumerate(params)], sample_size=64,
                  topk_density=0.01, topk_block=256, freeze_step=None, seed=0)

    def step(n):
        for p in params:
            p.grad = torch.randn(p.shape)
        c.begin({})
        opt.step()
        rows = c.end(n)
        for i, p in enumerate(params):
            state = opt.state[p]
            assert _close(1e-6, rows[i, Col.MOMENT1_SQ], state["exp_avg"].double().square().sum())
            assert _close(1e-6, rows[i, Col.MOMENT2_SQ],
                          state["exp_avg_sq"].double().square().sum())

    step(1)
    saved = opt.state_dict()
    for s in saved["state"].values():
        s["exp_avg_sq"] = s["exp_avg_sq"] * 9.0
    opt.load_state_dict(saved)  # a new state mapping
    step(2)
    for p in params:  # the same mapping, new dicts of new tensors
        opt.state[p] = {k: v * 5.0 if k != "step" else v.clone() for k, v in opt.state[p].items()}
    step(3)
    assert c._plan is not None and c._plan.host is not None
