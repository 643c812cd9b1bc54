"""1-bit Adam: the compressed all-reduce and the optimizer against a single-process simulation.

The simulation below is written from the algorithm (docs/optimizers.md, 1-bit Adam, and the
`onebit_allreduce` docstring), with w simulated ranks in one process, ±1 signs as float tensors
and no bit packing. The same float32 operations in the same order give the same bits, so the
spawned gloo runs on 2 and 3 processes are compared with it bit for bit.

Each world size is one spawn (a module-scoped fixture running every scenario: starting processes
that import torch costs seconds on this machine); the test functions compare what the ranks
pickled with the simulation, in this process.
"""

from __future__ import annotations

import copy
import math
import os
import pickle
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from optiscope.kernels.stats import Stat
from optiscope.optimizers import OneBitAdam
from optiscope.optimizers.onebit import (chunk_size, compressed_bytes, onebit_allreduce,
                                         onebit_ddp_hook, pack_signs, ring_allreduce_bytes,
                                         unpack_signs)
from conftest import requires_triton
from helpers import assert_equal
from spawn import spawn_ranks

JOIN_TIMEOUT_S = 180
COLLECTIVE_TIMEOUT = timedelta(seconds=60)

# Odd sizes and an empty tensor: with 3 ranks the 1- and 7-entry tensors leave ranks 1 and 2
# with chunks of padding only.
SHAPES = [(0,), (1,), (7,), (3, 5), (8,), (33,), (4097,)]
ROUNDS = 3
PARAM_SHAPES = [(5, 3), (7,), (0,), (1,), (2, 9)]
HYPER = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
FREEZE, STEPS = 3, 8


def _inputs(rank: int, rnd: int) -> list[torch.Tensor]:
    """What rank ``rank`` averages in round ``rnd``; entry 0 is an exact 0 (sign +1)."""
    gen = torch.Generator().manual_seed(1000 * rnd + 17 * rank + 1)
    out = []
    for shape in SHAPES:
        x = torch.randn(shape, generator=gen)
        if x.numel():
            x.view(-1)[0] = 0.0
        out.append(x)
    return out


def _initial_params() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(s, generator=gen) for s in PARAM_SHAPES]


def _grad(theta: torch.Tensor, rank: int, step: int, k: int) -> torch.Tensor:
    """Rank ``rank``'s gradient of parameter ``k`` at ``step``: a quadratic pull towards a target
    of its own, plus noise of its own."""
    gen = torch.Generator().manual_seed(100 * step + 10 * rank + k)
    return 0.5 * theta - torch.randn(theta.shape, generator=gen)


# ============================================================================ the simulation


def simulate_allreduce(xs: list[torch.Tensor], worker_err: list[torch.Tensor],
                       server_err: list[torch.Tensor]) -> torch.Tensor:
    """One tensor's compressed average over ``len(xs)`` simulated ranks.

    Args:
        xs: rank r's tensor.
        worker_err: rank r's worker error (the tensor's size), updated in place.
        server_err: rank r's server error (its chunk), updated in place.
    """
    w, d = len(xs), xs[0].numel()
    if d == 0:
        return torch.zeros(xs[0].shape)
    c = 8 * math.ceil(d / (8 * w))
    signs, scales = [], []
    for r in range(w):
        x = xs[r].reshape(-1).float() + worker_err[r].reshape(-1)
        s = torch.linalg.vector_norm(x) / math.sqrt(d)
        sign = torch.where(x >= 0, 1.0, -1.0)
        worker_err[r].copy_((x - s * sign).view_as(worker_err[r]))
        signs.append(torch.cat([sign, torch.ones(w * c - d)]))  # padding: 0 has sign +1
        scales.append(s)
    out = []
    for j in range(w):  # rank j serves chunk j
        acc = torch.zeros(c)
        for r in range(w):
            acc = acc + signs[r][j * c:(j + 1) * c] * (scales[r] / w)
        real = min(max(d - j * c, 0), c)
        acc[real:] = 0
        acc = acc + server_err[j]
        norm = torch.linalg.vector_norm(acc[:real])
        s = norm / math.sqrt(real) if real else norm
        sign = torch.where(acc >= 0, 1.0, -1.0)
        err = acc - s * sign
        err[real:] = 0
        server_err[j].copy_(err)
        out.append(s * sign)
    return torch.cat(out)[:d].view(xs[0].shape)


def simulate_rounds(world: int) -> list[list[torch.Tensor]]:
    """Outputs of `ROUNDS` compressed averages of `_inputs` over ``world`` simulated ranks."""
    werr = [[torch.zeros(s) for _ in range(world)] for s in SHAPES]
    serr = [[torch.zeros(chunk_size(math.prod(s), world)) for _ in range(world)] for s in SHAPES]
    rounds = []
    for rnd in range(ROUNDS):
        xs = [_inputs(r, rnd) for r in range(world)]
        rounds.append([simulate_allreduce([xs[r][k] for r in range(world)], werr[k], serr[k])
                       for k in range(len(SHAPES))])
    return rounds


def simulate_onebit_adam(world: int, steps: int, *, bias_correction: bool = True,
                         freeze: int = FREEZE) -> dict:
    """1-bit Adam over ``world`` simulated ranks on `_grad`, from `_initial_params`."""
    lr, (b1, b2), eps, wd = HYPER["lr"], HYPER["betas"], HYPER["eps"], HYPER["weight_decay"]
    theta = _initial_params()
    m = [torch.zeros(t.shape) for t in theta]
    v = [torch.zeros(t.shape) for t in theta]
    werr = [[torch.zeros(t.shape) for _ in range(world)] for t in theta]
    serr = [[torch.zeros(chunk_size(t.numel(), world)) for _ in range(world)] for t in theta]
    trajectory, worker_sq, moments = [], {}, []
    for t in range(1, steps + 1):
        for k, th in enumerate(theta):
            grads = [_grad(th, r, t, k) for r in range(world)]
            if t <= freeze:
                g = grads[0]
                for r in range(1, world):
                    g = g + grads[r]
                g = g / world
                m[k].lerp_(g, 1 - b1)
                v[k].mul_(b2).addcmul_(g, g, value=1 - b2)
            else:
                local = [m[k].clone().lerp_(grads[r], 1 - b1) for r in range(world)]
                x0 = local[0].reshape(-1) + werr[k][0].reshape(-1)
                m[k] = simulate_allreduce(local, werr[k], serr[k])
                worker_sq[(t, k)] = (float(werr[k][0].square().sum()), float(x0.square().sum()))
            bc1 = 1 - b1**t if bias_correction else 1.0
            bc2 = 1 - b2**min(t, freeze) if bias_correction else 1.0
            th.mul_(1 - lr * wd)
            th.addcdiv_(m[k], (v[k].sqrt() / bc2**0.5).add_(eps), value=-lr / bc1)
        trajectory.append([th.clone() for th in theta])
        moments.append(([x.clone() for x in m], [x.clone() for x in v]))
    return dict(trajectory=trajectory, m=m, v=v, worker_sq=worker_sq, moments=moments)


def unfrozen_v(sim: dict, freeze: int = FREEZE) -> dict[int, list[torch.Tensor]]:
    """Per step t >= T, the v each parameter would have had without freezing, from the averaged
    gradients its momentum implies: ĝ = (m_t − β1·m_{t−1}) / (1 − β1), v ← β2·v + (1 − β2)·ĝ²."""
    (b1, b2), moments = HYPER["betas"], sim["moments"]
    v = [x.clone() for x in moments[freeze - 1][1]]
    out = {freeze: [x.clone() for x in v]}
    for t in range(freeze + 1, len(moments) + 1):
        for k in range(len(v)):
            g_hat = (moments[t - 1][0][k] - b1 * moments[t - 2][0][k]) / (1 - b1)
            v[k] = b2 * v[k] + (1 - b2) * g_hat.square()
        out[t] = [x.clone() for x in v]
    return out


def _run_optimizer(opt: OneBitAdam, params: list[torch.Tensor], rank: int, first: int,
                   last: int, stats_step: int | None = None) -> tuple[list, dict]:
    trajectory, stats = [], {}
    for t in range(first, last + 1):
        for k, p in enumerate(params):
            p.grad = _grad(p.detach().float(), rank, t, k).to(p.dtype)
        if t == stats_step:
            opt.request_stats()
        opt.step()
        if t == stats_step:
            stats = dict(values=opt.last_stats.values.clone(), report=opt.last_compression)
        trajectory.append([p.detach().clone() for p in params])
    return trajectory, stats


# ============================================================================ worker side

_COUNTED = ("all_reduce", "all_to_all_single", "all_gather")


class _Traffic:
    """Counts the collectives called through ``torch.distributed`` and the bytes they send from
    this rank: all-to-all the share of its buffer that leaves it, all-gather its tensor to each
    peer, all-reduce as a ring would."""

    def __init__(self, world: int):
        self.world, self.calls, self.bytes = world, [], 0
        self._originals = {n: getattr(dist, n) for n in _COUNTED}

    def __enter__(self):
        w = self.world

        def sent(name, args):
            t = args[0] if name == "all_reduce" else args[1]  # the tensor this rank sends
            nbytes = t.numel() * t.element_size()
            return {"all_to_all_single": nbytes * (w - 1) // w, "all_gather": nbytes * (w - 1),
                    "all_reduce": 2 * (w - 1) * nbytes // w}[name]

        def counted(name, fn):
            def call(*args, **kwargs):
                self.calls.append(name)
                self.bytes += sent(name, args)
                return fn(*args, **kwargs)
            return call

        for n, fn in self._originals.items():
            setattr(dist, n, counted(n, fn))
        return self

    def __exit__(self, *exc):
        for n, fn in self._originals.items():
            setattr(dist, n, fn)


def _scenario_allreduce(rank: int, world: int, root: Path) -> dict:
    werr = [torch.zeros(s) for s in SHAPES]
    serr = [torch.zeros(chunk_size(math.prod(s), world)) for s in SHAPES]
    rounds, reports, traffic = [], [], []
    for rnd in range(ROUNDS):
        with _Traffic(world) as seen:
            out, report = onebit_allreduce(_inputs(rank, rnd), werr, serr, backend="torch",
                                           with_errors=True)
        rounds.append(out)
        reports.append(report)
        traffic.append((seen.calls, seen.bytes))
    return dict(rounds=rounds, reports=reports, traffic=traffic, worker_err=werr, server_err=serr)


def _scenario_optimizer(rank: int, world: int, root: Path) -> dict:
    params = [p.requires_grad_() for p in _initial_params()]
    opt = OneBitAdam(params, **HYPER, freeze_step=FREEZE, backend="torch")
    trajectory, stats = _run_optimizer(opt, params, rank, 1, STEPS, stats_step=FREEZE + 2)
    return dict(trajectory=trajectory, stats=stats)


def _scenario_checkpoint(rank: int, world: int, root: Path) -> dict:
    params = [p.requires_grad_() for p in _initial_params()]
    opt = OneBitAdam(params, **HYPER, freeze_step=FREEZE, backend="torch")
    _run_optimizer(opt, params, rank, 1, 5)
    saved = copy.deepcopy(opt.state_dict())
    torch.save(saved, root / f"opt{rank}.pt")
    at5 = [p.detach().clone() for p in params]
    straight, _ = _run_optimizer(opt, params, rank, 6, STEPS)

    resumed_params = [p.clone().requires_grad_() for p in at5]
    resumed = OneBitAdam(resumed_params, **HYPER, freeze_step=FREEZE, backend="torch")
    dist.barrier()  # every rank has written its file
    resumed.load_state_dict(torch.load(root / f"opt{rank}.pt"))
    after, _ = _run_optimizer(resumed, resumed_params, rank, 6, STEPS)

    other = OneBitAdam([p.clone() for p in at5], **HYPER, freeze_step=FREEZE)
    try:
        other.load_state_dict(torch.load(root / f"opt{(rank + 1) % world}.pt"))
        wrong_rank = None
    except ValueError as exc:
        wrong_rank = str(exc)
    return dict(straight=straight, resumed=after, saved=saved, wrong_rank=wrong_rank)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(5, 1)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _scenario_ddp(rank: int, world: int, root: Path) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    def data(step):
        return torch.randn(4, 6, generator=torch.Generator().manual_seed(100 * step + rank))

    runs = {}
    for kind in ("ddp+hook", "plain"):
        torch.manual_seed(0)
        net = _Net()
        model = DistributedDataParallel(net) if kind == "ddp+hook" else net
        opt = OneBitAdam(model.parameters(), lr=1e-2, freeze_step=2, backend="torch")
        if kind == "ddp+hook":
            model.register_comm_hook(opt, onebit_ddp_hook)
        backward_calls, step_calls = [], []
        for step in range(1, 6):
            opt.zero_grad()
            with _Traffic(world) as seen:
                model(data(step)).square().mean().backward()
            backward_calls.append(seen.calls)
            with _Traffic(world) as seen:
                opt.step()
            step_calls.append(seen.calls)
        runs[kind] = dict(params=[p.detach().clone() for p in net.parameters()],
                          backward=backward_calls, step=step_calls)
    return runs


SCENARIOS = {2: ("allreduce", "optimizer", "checkpoint", "ddp"), 3: ("allreduce", "optimizer")}
_RUN = {"allreduce": _scenario_allreduce, "optimizer": _scenario_optimizer,
        "checkpoint": _scenario_checkpoint, "ddp": _scenario_ddp}


def _worker(rank: int, world: int, root: str) -> None:
    """A spawned rank: runs its world's scenarios and pickles the results into ``root``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank,
                            world_size=world, timeout=COLLECTIVE_TIMEOUT)
    try:
        result = {name: _RUN[name](rank, world, Path(root)) for name in SCENARIOS[world]}
        with open(Path(root) / f"result{rank}.pkl", "wb") as f:
            pickle.dump(result, f)
        dist.barrier()  # no rank tears its connections down while another still talks
    finally:
        dist.destroy_process_group()
    # gloo's threads may still hold tensors at interpreter exit, which can abort the process
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(world: int, root: Path) -> list[dict]:
    return spawn_ranks(_worker, (world, str(root)), world, root, f"world {world}",
                       JOIN_TIMEOUT_S)


@pytest.fixture(scope="module")
def gloo2(tmp_path_factory):
    return _spawn(2, tmp_path_factory.mktemp("onebit2"))


@pytest.fixture(scope="module")
def gloo3(tmp_path_factory):
    return _spawn(3, tmp_path_factory.mktemp("onebit3"))


@pytest.fixture(params=[2, 3])
def gloo(request):
    return request.param, request.getfixturevalue(f"gloo{request.param}")


# ============================================================================ distributed tests


@pytest.mark.distributed
def test_compressed_allreduce_equals_the_simulation_bit_for_bit(gloo):
    world, results = gloo
    expected = simulate_rounds(world)
    for rank, result in enumerate(results):
        for rnd in range(ROUNDS):
            for k, shape in enumerate(SHAPES):
                assert_equal(result["allreduce"]["rounds"][rnd][k], expected[rnd][k],
                             f"world {world}, rank {rank}, round {rnd}, shape {shape}")


@pytest.mark.distributed
def test_error_buffers_are_per_rank_and_match_the_simulation(gloo):
    world, results = gloo
    werr = [[torch.zeros(s) for _ in range(world)] for s in SHAPES]
    serr = [[torch.zeros(chunk_size(math.prod(s), world)) for _ in range(world)] for s in SHAPES]
    for rnd in range(ROUNDS):
        xs = [_inputs(r, rnd) for r in range(world)]
        for k in range(len(SHAPES)):
            simulate_allreduce([xs[r][k] for r in range(world)], werr[k], serr[k])
    for rank, result in enumerate(results):
        for k, shape in enumerate(SHAPES):
            assert_equal(result["allreduce"]["worker_err"][k], werr[k][rank],
                         f"worker error, rank {rank}, shape {shape}")
            assert_equal(result["allreduce"]["server_err"][k], serr[k][rank],
                         f"server error, rank {rank}, shape {shape}")
    # padding never reaches an error buffer: the 1-entry tensor's chunk on rank 1 is padding only
    assert not results[1]["allreduce"]["server_err"][1].any()


@pytest.mark.distributed
def test_bytes_sent_per_rank_are_at_most_a_25th_of_a_ring_allreduce(gloo):
    world, results = gloo
    numels = [math.prod(s) for s in SHAPES]
    ring = 2 * (world - 1) * 4 * sum(numels) // world
    for rank, result in enumerate(results):
        for rnd, (calls, counted) in enumerate(result["allreduce"]["traffic"]):
            report = result["allreduce"]["reports"][rnd]
            assert calls == ["all_to_all_single", "all_gather"], calls
            # what left this rank through the collectives is what the report and formula say
            assert counted == report.bytes_sent == compressed_bytes(numels, world)
            assert report.fp32_ring_bytes == ring_allreduce_bytes(numels, world) == ring
            assert counted * 25 <= ring, f"world {world}: {counted} bytes against a ring's {ring}"


def test_demo_model_compression_stage_sends_at_most_a_25th_of_a_ring_allreduce():
    from optiscope.demo import CharGPT

    numels = [p.numel() for p in CharGPT().parameters()]
    for world in (2, 3, 8):
        sent, ring = compressed_bytes(numels, world), ring_allreduce_bytes(numels, world)
        assert sent * 25 <= ring, f"world {world}: {sent} bytes against {ring}"
        assert sent * 33 >= ring  # about 1/32: one bit per 32-bit entry, twice


@pytest.mark.distributed
def test_optimizer_trajectory_over_two_processes_equals_the_simulation(gloo2):
    sim = simulate_onebit_adam(2, STEPS)
    for rank, result in enumerate(gloo2):
        for t, (got, want) in enumerate(zip(result["optimizer"]["trajectory"],
                                            sim["trajectory"]), start=1):
            for k, (a, b) in enumerate(zip(got, want)):
                assert_equal(a, b, f"rank {rank}, step {t}, parameter {k}")


@pytest.mark.distributed
def test_three_processes_agree_with_each_other_and_with_the_simulation(gloo3):
    # Warmup sums three gradients, whose order gloo chooses: the same bits on every rank, and the
    # simulation's up to float32 rounding.
    sim = simulate_onebit_adam(3, STEPS)
    first = gloo3[0]["optimizer"]["trajectory"]
    for rank, result in enumerate(gloo3):
        for t, step in enumerate(result["optimizer"]["trajectory"], start=1):
            for k, p in enumerate(step):
                assert_equal(p, first[t - 1][k], f"rank {rank} against rank 0, step {t}")
                torch.testing.assert_close(p, sim["trajectory"][t - 1][k], rtol=1e-5, atol=1e-6)


@pytest.mark.distributed
def test_quant_error_statistics_are_the_worker_compression_of_each_rank(gloo2):
    sim = simulate_onebit_adam(2, STEPS)
    t = FREEZE + 2
    stats = gloo2[0]["optimizer"]["stats"]
    rows = stats["values"]
    live = [k for k, s in enumerate(PARAM_SHAPES) if math.prod(s)]
    for k in live:
        err, inp = sim["worker_sq"][(t, k)]
        assert math.isclose(float(rows[k, Stat.QUANT_ERROR_SQ]), err, rel_tol=1e-5)
        assert math.isclose(float(rows[k, Stat.QUANT_INPUT_SQ]), inp, rel_tol=1e-5)
        assert float(rows[k, Stat.QUANT_ERROR_SQ]) < float(rows[k, Stat.QUANT_INPUT_SQ])
    report = stats["report"]
    assert report.server_error_sq is not None and (report.server_error_sq >= 0).all()
    assert report.bytes_sent * 25 > 0


@pytest.mark.distributed
def test_checkpoint_resumes_bit_for_bit_on_every_rank(gloo2):
    for rank, result in enumerate(gloo2):
        run = result["checkpoint"]
        for t, (a, b) in enumerate(zip(run["resumed"], run["straight"]), start=6):
            for k, (x, y) in enumerate(zip(a, b)):
                assert_equal(x, y, f"rank {rank}, step {t}, parameter {k}")
        state = run["saved"]["state"][0]
        assert state["error_rank"] == rank and state["error_world_size"] == 2
        assert state["worker_error"].dtype == torch.float32 and state["worker_error"].any()


@pytest.mark.distributed
def test_loading_another_ranks_error_buffers_is_refused(gloo2):
    for rank, result in enumerate(gloo2):
        message = result["checkpoint"]["wrong_rank"]
        assert message is not None
        assert f"error buffers of rank {1 - rank}, loaded on rank {rank}" in message
        assert "load rank r's file on rank r" in message


def test_world_size_change_is_detected_and_resets_only_the_error_feedback(gloo2):
    saved = gloo2[0]["checkpoint"]["saved"]
    params = [p.detach().clone().requires_grad_() for p in _initial_params()]
    opt = OneBitAdam(params, **HYPER, freeze_step=FREEZE)  # a world of one
    with pytest.warns(UserWarning, match=r"saved over \[2\] rank\(s\), this run has 1"):
        opt.load_state_dict(saved)
    for k, p in enumerate(params):
        state = opt.state[p]
        assert "worker_error" not in state and "server_error" not in state
        assert_equal(state["exp_avg"], saved["state"][k]["exp_avg"], f"m of parameter {k}")
    _run_optimizer(opt, params, 0, 6, 7)  # error buffers are made again for a world of one
    assert opt.state[params[0]]["server_error"].numel() == chunk_size(15, 1)


@pytest.mark.distributed
def test_ddp_hook_averages_during_warmup_and_then_stops_gradient_communication(gloo2):
    for rank, result in enumerate(gloo2):
        hooked, plain = result["ddp"]["ddp+hook"], result["ddp"]["plain"]
        for k, (a, b) in enumerate(zip(hooked["params"], plain["params"])):
            assert_equal(a, b, f"rank {rank}, parameter {k}: DDP + hook against the optimizer's "
                               "own averaging")
        # warmup (steps 1-2): DDP's backward all-reduces, the optimizer does not
        assert all("all_reduce" in calls for calls in hooked["backward"][:2])
        assert hooked["step"][:2] == [[], []]
        # compression (steps 3-5): nothing in backward, the 1-bit exchange in the step
        assert hooked["backward"][2:] == [[], [], []]
        assert hooked["step"][2:] == [["all_to_all_single", "all_gather"]] * 3
        # without DDP the optimizer averages the gradients itself during warmup
        assert plain["step"][:2] == [["all_reduce"], ["all_reduce"]]
    assert_equal(gloo2[0]["ddp"]["ddp+hook"]["params"][0], gloo2[1]["ddp"]["ddp+hook"]["params"][0])


# ============================================================================ single process


@pytest.mark.parametrize("n", [8, 16, 4104])
def test_pack_signs_matches_numpy_packbits_and_unpacks(n):
    x = torch.randn(n)
    x[::5] = 0.0  # sign(0) = +1
    x[1] = -0.0   # -0.0 >= 0 too
    packed = pack_signs(x)
    assert packed.dtype == torch.uint8 and packed.numel() == n // 8
    assert np.array_equal(packed.numpy(), np.packbits((x >= 0).numpy()))
    assert_equal(unpack_signs(packed), torch.where(x >= 0, 1.0, -1.0), "unpacked signs")


def test_pack_signs_refuses_a_size_that_is_not_whole_bytes():
    with pytest.raises(ValueError, match="multiple of 8, got 7; zero-pad"):
        pack_signs(torch.randn(7))


@requires_triton
@pytest.mark.parametrize("n", [0, 8, 1032, 8 * 1024 + 64])
def test_triton_pack_matches_torch(n):
    from optiscope.kernels.onebit import pack_signs_triton

    x = torch.randn(n)
    if n:
        x[::3] = 0.0
    assert_equal(pack_signs_triton(x), pack_signs(x), f"{n} entries")


@pytest.mark.gpu
@pytest.mark.parametrize("n", [8, 1032, 8 * 1024 + 64, 1 << 22])
def test_triton_pack_on_cuda_matches_torch(n):
    from optiscope.kernels.onebit import pack_signs_triton

    x = torch.randn(n, device="cuda")
    x[::3] = 0.0
    assert_equal(pack_signs_triton(x).cpu(), pack_signs(x.cpu()), f"{n} entries on CUDA")


def test_world_of_one_equals_the_simulation():
    werr = [torch.zeros(s) for s in SHAPES]
    serr = [torch.zeros(chunk_size(math.prod(s), 1)) for s in SHAPES]
    expected = simulate_rounds(1)
    for rnd in range(ROUNDS):
        out, report = onebit_allreduce(_inputs(0, rnd), werr, serr)
        assert report.bytes_sent == 0 and report.fp32_ring_bytes == 0
        for k, shape in enumerate(SHAPES):
            assert out[k].shape == shape
            assert_equal(out[k], expected[rnd][k], f"round {rnd}, shape {shape}")


def test_empty_tensors_only():
    out, report = onebit_allreduce([torch.zeros(0), torch.zeros(0, 3)],
                                   [torch.zeros(0), torch.zeros(0, 3)],
                                   [torch.zeros(0), torch.zeros(0)], with_errors=True)
    assert [o.shape for o in out] == [(0,), (0, 3)] and report.bytes_sent == 0


def test_error_buffers_of_the_wrong_size_are_refused():
    with pytest.raises(ValueError, match=r"server error of 16, got 7 and 8"):
        onebit_allreduce([torch.zeros(9)], [torch.zeros(7)], [torch.zeros(8)])


@pytest.mark.parametrize("bias_correction", [True, False])
def test_world_of_one_optimizer_equals_the_simulation(bias_correction):
    params = [p.requires_grad_() for p in _initial_params()]
    opt = OneBitAdam(params, **HYPER, freeze_step=FREEZE, bias_correction=bias_correction)
    got, _ = _run_optimizer(opt, params, 0, 1, STEPS)
    sim = simulate_onebit_adam(1, STEPS, bias_correction=bias_correction)
    for t, (a, b) in enumerate(zip(got, sim["trajectory"]), start=1):
        for k, (x, y) in enumerate(zip(a, b)):
            assert_equal(x, y, f"step {t}, parameter {k}")


def test_bias_correction_changes_the_trajectory():
    on = simulate_onebit_adam(1, 2, bias_correction=True)["trajectory"][-1]
    off = simulate_onebit_adam(1, 2, bias_correction=False)["trajectory"][-1]
    # without correction the first steps are (1 - β1)/√(1 - β2) ≈ 1 times as long as with it
    assert all(not torch.equal(a, b) for a, b in zip(on, off) if a.numel())


def test_first_step_is_a_real_adamw_step_and_warmup_is_adamw():
    ref_params = [p.clone().requires_grad_() for p in _initial_params()]
    params = [p.clone().requires_grad_() for p in _initial_params()]
    ref = torch.optim.AdamW(ref_params, **HYPER, foreach=False)
    opt = OneBitAdam(params, **HYPER, freeze_step=FREEZE)
    for t in range(1, FREEZE + 1):
        for k, (p, q) in enumerate(zip(params, ref_params)):
            p.grad = _grad(p.detach(), 0, t, k)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
        for k, (p, q) in enumerate(zip(params, ref_params)):
            assert_equal(p.detach(), q.detach(), f"step {t}, parameter {k}")
    assert not torch.equal(params[0].detach(), _initial_params()[0])


def test_v_is_frozen_after_the_freeze_step_and_m_keeps_moving():
    params = [p.requires_grad_() for p in _initial_params()]
    opt = OneBitAdam(params, **HYPER, freeze_step=FREEZE)
    assert not opt.compressing
    _run_optimizer(opt, params, 0, 1, FREEZE)
    assert opt.compressing
    v, m = opt.state[params[0]]["exp_avg_sq"].clone(), opt.state[params[0]]["exp_avg"].clone()
    assert "worker_error" not in opt.state[params[0]], "warmup carries no error buffers"
    _run_optimizer(opt, params, 0, FREEZE + 1, FREEZE + 3)
    assert_equal(opt.state[params[0]]["exp_avg_sq"], v, "frozen v")
    assert not torch.equal(opt.state[params[0]]["exp_avg"], m)


def test_state_dict_round_trip_continues_bit_for_bit_and_keeps_float32_state():
    params = [p.to(torch.bfloat16).requires_grad_() for p in _initial_params()]
    opt = OneBitAdam(params, **HYPER, freeze_step=FREEZE)
    _run_optimizer(opt, params, 0, 1, 5)
    saved = copy.deepcopy(opt.state_dict())
    twin = [p.detach().clone().requires_grad_() for p in params]
    straight, _ = _run_optimizer(opt, params, 0, 6, STEPS)
    resumed_opt = OneBitAdam(twin, **HYPER, freeze_step=FREEZE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same rank and world: no reset, no warning
        resumed_opt.load_state_dict(saved)
    state = resumed_opt.state[twin[0]]
    assert all(state[k].dtype == torch.float32 for k in ("exp_avg", "exp_avg_sq", "worker_error",
                                                         "server_error"))
    resumed, _ = _run_optimizer(resumed_opt, twin, 0, 6, STEPS)
    for t, (a, b) in enumerate(zip(resumed, straight), start=6):
        for k, (x, y) in enumerate(zip(a, b)):
            assert_equal(x, y, f"step {t}, parameter {k}")


def test_monitor_records_quant_error_on_compressed_steps_only():
    from optiscope import OptimizerMonitor

    params = [p.requires_grad_() for p in _initial_params()]
    opt = OneBitAdam(params, **HYPER, freeze_step=FREEZE)
    with OptimizerMonitor(opt, every=1, console=None, strict=True) as mon:
        _run_optimizer(opt, params, 0, 1, 5)
    steps, values = mon.history.series("quant_error", "global")
    assert list(steps) == [4, 5]
    sim = simulate_onebit_adam(1, 5)["worker_sq"]
    for step, value in zip(steps, values):
        err = sum(sim[(int(step), k)][0] for k in range(len(PARAM_SHAPES)) if (int(step), k) in sim)
        inp = sum(sim[(int(step), k)][1] for k in range(len(PARAM_SHAPES)) if (int(step), k) in sim)
        assert math.isclose(value, math.sqrt(err / inp), rel_tol=1e-5)
        assert 0 < value < 1


def test_monitor_records_drift_since_freeze_against_the_v_without_freezing():
    from optiscope import OptimizerMonitor

    params = [p.requires_grad_() for p in _initial_params()]
    opt = OneBitAdam(params, **HYPER, freeze_step=FREEZE)
    with OptimizerMonitor(opt, every=2, sample_size=10**9, console=None, strict=True) as mon:
        _run_optimizer(opt, params, 0, 1, STEPS)  # ĝ is tracked on unsampled steps 4 and 6 too
    assert mon.history.meta["freeze_probe"] == FREEZE, "the optimizer's freeze step is T"
    steps, values = mon.history.series("moment2_drift_since_freeze", "global")
    assert list(steps) == [3, 5, 7]
    sim = simulate_onebit_adam(1, STEPS)
    v_t, v_free = sim["moments"][FREEZE - 1][1], unfrozen_v(sim)
    for step, value in zip(steps, values):
        diff = sum(float((a - b).square().sum()) for a, b in zip(v_free[int(step)], v_t))
        ref = sum(float(b.square().sum()) for b in v_t)
        assert math.isclose(value, math.sqrt(diff / ref), rel_tol=1e-4, abs_tol=1e-7), step
    assert values[0] == 0 and values[-1] > 0
    # v itself stayed frozen: the ordinary drift between samples after T is zero
    drift_steps, drift = mon.history.series("moment2_drift", "global")
    assert [d for s, d in zip(drift_steps, drift) if s > FREEZE] == [0.0, 0.0]


def test_unfrozen_second_at_tracks_the_chosen_coordinates():
    params = [p.requires_grad_() for p in _initial_params()]
    opt = OneBitAdam(params, **HYPER, freeze_step=FREEZE)
    index = torch.tensor([0, 4, 14], dtype=torch.int32)
    _run_optimizer(opt, params, 0, 1, 1)
    first = opt.unfrozen_second_at(params[0], index)  # before the freeze: the real v
    assert_equal(first, opt.state[params[0]]["exp_avg_sq"].reshape(-1)[index.long()], "v")
    _run_optimizer(opt, params, 0, 2, 6)
    want = unfrozen_v(simulate_onebit_adam(1, 6))[6][0].reshape(-1)[index.long()]
    torch.testing.assert_close(opt.unfrozen_second_at(params[0], index), want, rtol=1e-6,
                               atol=0)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(freeze_step=0), ValueError, r"freeze_step must be an int >= 1 .* got 0"),
    (dict(freeze_step=2.5), ValueError, r"freeze_step must be an int >= 1 .* got 2.5"),
    (dict(freeze_step=True), ValueError, r"freeze_step must be an int >= 1 .* got True"),
    (dict(freeze_step=5, bias_correction="yes"), TypeError,
     r"bias_correction must be True or False, got 'yes'"),
    (dict(freeze_step=5, lr=-1.0), ValueError, r"lr must be >= 0.0, got -1.0"),
    (dict(freeze_step=5, betas=(0.9, 1.0)), ValueError, r"betas\[1\] must be in \[0.0, 1.0\)"),
    (dict(freeze_step=5, backend="cuda"), ValueError, r"backend must be one of"),
    (dict(freeze_step=5, process_group=object()), RuntimeError,
     r"torch.distributed is not initialized"),
])
def test_argument_errors_name_the_value_and_the_fix(kwargs, error, match):
    with pytest.raises(error, match=match):
        OneBitAdam([torch.zeros(3, requires_grad=True)], **kwargs)


def test_freeze_step_is_required():
    with pytest.raises(TypeError, match="freeze_step"):
        OneBitAdam([torch.zeros(3, requires_grad=True)])
