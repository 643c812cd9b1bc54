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
    trajectory, worker_sq, moments, true_grads = [], {}, [], []
    for t in range(1, steps + 1):
        true_grads.append([])
        for k, th in enumerate(theta):
            grads = [_grad(th, r, t, k) for r in range(world)]
            true_grads[-1].append(sum(g.double() for g in grads) / world)
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
                m[k] = simulate_allreduce(local, werr[k], serr[k]).masked_fill_(v[k] == 0, 0.0)
                worker_sq[(t, k)] = (float(werr[k][0].square().sum()), float(x0.square().sum()))
            bc1 = 1 - b1**t if bias_correction else 1.0
            bc2 = 1 - b2**min(t, freeze) if bias_correction else 1.0
            th.mul_(1 - lr * wd)
            th.addcdiv_(m[k], (v[k].sqrt() / bc2**0.5).add_(eps), value=-lr / bc1)
        trajectory.append([th.clone() for th in theta])
        moments.append(([x.clone() for x in m], [x.clone() for x in v]))
    return dict(trajectory=trajectory, m=m, v=v, worker_sq=worker_sq, moments=moments,
                true_grads=true_grads)


def exact_v(grads: list[list[torch.Tensor]], beta2: float) -> list[list[torch.Tensor]]:
    """Per step t (index t − 1), Adam's v of each tensor, never frozen, in float64 from the true
    gradients averaged over the ranks: v ← β2·v + (1 − β2)·ḡ²."""
    v = [torch.zeros(g.shape, dtype=torch.float64) for g in grads[0]]
    out = []
    for step in grads:
        v = [beta2 * x + (1 - beta2) * g.double().square() for x, g in zip(v, step)]
        out.append(v)
    return out


def exact_drift(v: list[list[torch.Tensor]], freeze: int) -> dict[int, float]:
    """‖v_t − v_T‖ / ‖v_T‖ over all the tensors' entries, for every step t >= T."""
    ref = v[freeze - 1]
    den = sum(float(x.square().sum()) for x in ref)
    return {t: math.sqrt(sum(float((a - b).square().sum()) for a, b in zip(v[t - 1], ref)) / den)
            for t in range(freeze, len(v) + 1)}


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


def _scenario_drift(rank: int, world: int, root: Path) -> dict:
    """The stationary-gradient drift run (defined below) on this rank's own gradients."""
    return {every: _stationary_run(every, 1024, rank) for every in (1, 7)}


SCENARIOS = {2: ("allreduce", "optimizer", "checkpoint", "ddp"), 3: ("allreduce", "optimizer")}
_RUN = {"allreduce": _scenario_allreduce, "optimizer": _scenario_optimizer,
        "checkpoint": _scenario_checkpoint, "ddp": _scenario_ddp, "drift": _scenario_drift}


def _worker(rank: int, world: int, root: str, names: tuple[str, ...] | None = None) -> None:
    """A spawned rank: runs its world's scenarios and pickles the results into ``root``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank,
                            world_size=world, timeout=COLLECTIVE_TIMEOUT)
    try:
        result = {name: _RUN[name](rank, world, Path(root)) for name in names or SCENARIOS[world]}
        with open(Path(root) / f"result{rank}.pkl", "wb") as f:
            pickle.dump(result, f)
        dist.barrier()  # no rank tears its connections down while another still talks
    finally:
        dist.destroy_process_group()
    # gloo's threads may still hold tensors at interpreter exit, which can abort the process
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(world: int, root: Path, names: tuple[str, ...] | None = None,
           timeout: float = JOIN_TIMEOUT_S) -> list[dict]:
    return spawn_ranks(_worker, (world, str(root), names), world, root, f"world {world}", timeout)


@pytest.fixture(scope="module")
def gloo2(tmp_path_factory):
    return _spawn(2, tmp_path_factory.mktemp("onebit2"))


@pytest.fixture(scope="module")
def gloo3(tmp_path_factory):
    return _spawn(3, tmp_path_factory.mktemp("onebit3"))


@pytest.fixture(scope="module")
def gloo2_drift(tmp_path_factory):
    return _spawn(2, tmp_path_factory.mktemp("onebit2drift"), ("drift",), timeout=900)


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
        _run_optimizer(opt, params, 0, 1, STEPS)  # v' is tracked on unsampled steps 4 and 6 too
    assert mon.history.meta["freeze_probe"] == FREEZE, "the optimizer's freeze step is T"
    steps, values = mon.history.series("moment2_drift_since_freeze", "global")
    assert list(steps) == [3, 5, 7]
    want = exact_drift(exact_v(simulate_onebit_adam(1, STEPS)["true_grads"], HYPER["betas"][1]),
                       FREEZE)
    for step, value in zip(steps, values):
        assert math.isclose(value, want[int(step)], rel_tol=1e-5, abs_tol=1e-7), step
    assert values[0] == 0 and values[-1] > 0
    # v itself stayed frozen: the ordinary drift between samples after T is zero
    drift_steps, drift = mon.history.series("moment2_drift", "global")
    assert [d for s, d in zip(drift_steps, drift) if s > FREEZE] == [0.0, 0.0]


def test_unfrozen_second_at_tracks_the_chosen_coordinates():
    params = [p.requires_grad_() for p in _initial_params()]
    opt = OneBitAdam(params, **HYPER, freeze_step=FREEZE)
    index = torch.tensor([0, 4, 14], dtype=torch.int32)
    assert_equal(opt.unfrozen_second_at(params[0], index), torch.zeros(3), "v before step 1")
    _run_optimizer(opt, params, 0, 1, 1)
    first = opt.unfrozen_second_at(params[0], index)  # before the freeze: the real v
    assert_equal(first, opt.state[params[0]]["exp_avg_sq"].reshape(-1)[index.long()], "v")
    _run_optimizer(opt, params, 0, 2, 6)
    want = exact_v(simulate_onebit_adam(1, 6)["true_grads"], HYPER["betas"][1])[5][0]
    torch.testing.assert_close(opt.unfrozen_second_at(params[0], index),
                               want.reshape(-1)[index.long()].float(), rtol=1e-5, atol=0)
    assert opt.last_compression.probe_bytes == 0, "one process: nothing to all-reduce"


# ---------------------------------------------------------------- drift on stationary gradients

# g = μ + N(0, 1) on one 4,096-entry tensor: v settles, and its drift after the freeze is the
# noise of a β2-average of g², about 0.14 of ‖v_T‖. The compressed momentum's error is larger
# than that by far: an estimate that read the gradient back from m would report several times it.
DRIFT_N, DRIFT_FREEZE, DRIFT_STEPS, DRIFT_BETAS = 4096, 400, 650, (0.9, 0.99)


def _stationary_grads(rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 + rank)


def _stationary_mu() -> torch.Tensor:
    return torch.randn(DRIFT_N, generator=torch.Generator().manual_seed(5))


def _stationary_run(every: int, sample_size: int | None, rank: int = 0) -> dict:
    """A monitored OneBitAdam run on rank ``rank``'s stationary gradients: the drift series."""
    from optiscope import OptimizerMonitor

    mu, gen = _stationary_mu(), _stationary_grads(rank)
    p = torch.zeros(DRIFT_N, requires_grad=True)
    opt = OneBitAdam([p], lr=1e-3, betas=DRIFT_BETAS, freeze_step=DRIFT_FREEZE)
    probe_bytes = set()
    with OptimizerMonitor(opt, every=every, sample_size=sample_size, console=None,
                          strict=True) as mon:
        for _ in range(DRIFT_STEPS):
            p.grad = mu + torch.randn(DRIFT_N, generator=gen)
            opt.step()
            if opt.last_compression is not None:
                probe_bytes.add(opt.last_compression.probe_bytes)
    steps, values = mon.history.series("moment2_drift_since_freeze", "global") \
        if getattr(mon, "history", None) is not None else ([], [])
    return dict(steps=[int(s) for s in steps], values=[float(v) for v in values],
                probe_bytes=sorted(probe_bytes), sent=opt.last_compression.bytes_sent)


def _stationary_exact(world: int) -> dict[int, float]:
    """The exact drift since the freeze, float64, from the rank-averaged gradients fed."""
    mu, gens = _stationary_mu(), [_stationary_grads(r) for r in range(world)]
    grads = []
    for _ in range(DRIFT_STEPS):
        fed = [mu + torch.randn(DRIFT_N, generator=g) for g in gens]
        grads.append([sum(g.double() for g in fed) / world])
    return exact_drift(exact_v(grads, DRIFT_BETAS[1]), DRIFT_FREEZE)


def _check_drift(run: dict, exact: dict[int, float], every: int) -> None:
    after = [(s, v) for s, v in zip(run["steps"], run["values"]) if s >= DRIFT_FREEZE + 25]
    assert len(after) >= (DRIFT_STEPS - DRIFT_FREEZE - 25) // every - 1, run["steps"]
    for step, value in after:
        assert abs(value - exact[step]) <= 0.25 * exact[step], (
            f"every={every}, step {step}: monitor {value:.4f}, exact {exact[step]:.4f}")
    assert 0.05 < exact[DRIFT_STEPS - 1] < 0.5, "the regime this test is about"


# 1,024 of the 4,096 coordinates: the automatic budget (16 here) is exact in expectation, but
# at one step its estimate can be 60 % off, which is the sample's noise, not the probe's.
@pytest.mark.slow
@pytest.mark.parametrize("every", [1, 7])
def test_drift_since_freeze_is_within_a_quarter_of_the_exact_value(every):
    _check_drift(_stationary_run(every, 1024), _stationary_exact(1), every)


@pytest.mark.slow
@pytest.mark.distributed
def test_drift_since_freeze_over_two_ranks_is_within_a_quarter_of_the_exact_value(gloo2_drift):
    exact = _stationary_exact(2)  # from the average of the two ranks' gradients
    for every in (1, 7):
        run = gloo2_drift[0]["drift"][every]  # rank 0 writes the history
        _check_drift(run, exact, every)
        # one float32 all-reduce of the 1,024 sampled gradients a step: 2(w - 1)/w x 4 B each
        assert run["probe_bytes"] == [ring_allreduce_bytes([1024], 2)] == [4096]


# ---------------------------------------------------------------- coordinates without gradients

def _half_dead_run(steps: int, freeze: int, mask: torch.Tensor | None = None,
                   weight_decay: float = 0.0) -> list[torch.Tensor]:
    """A [64, 64] parameter whose rows 32-63 never get a gradient; θ after each step."""
    gen = torch.Generator().manual_seed(3)
    p = torch.randn(64, 64, generator=gen).requires_grad_()
    group = dict(params=[p]) if mask is None else dict(params=[p], exp_avg_mask=mask)
    opt = OneBitAdam([group], lr=1e-3, weight_decay=weight_decay, freeze_step=freeze)
    out = [p.detach().clone()]
    for _ in range(steps):
        g = torch.randn(64, 64, generator=gen)
        g[32:] = 0.0
        p.grad = g
        opt.step()
        out.append(p.detach().clone())
    return out


def test_coordinates_that_never_had_a_gradient_do_not_move_after_the_freeze():
    theta = _half_dead_run(80, 50)
    moved = (theta[80] - theta[50]).abs()
    assert float(moved[32:].max()) <= 1e-6, "rows without a gradient moved after the freeze"
    assert_equal(theta[80][32:], theta[0][32:], "nor before it (m = 0 there)")
    assert float(moved[:32].min()) > 0, "the rows with gradients keep training"


def test_weight_decay_still_applies_to_coordinates_without_gradients():
    # The choice (DeepSpeed's): decoupled decay is applied to every coordinate, masked or not.
    theta = _half_dead_run(80, 50, weight_decay=0.1)
    want = theta[0][32:].double() * (1 - 1e-3 * 0.1) ** 80
    torch.testing.assert_close(theta[80][32:].double(), want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_exp_avg_mask_stops_rows_that_had_gradients_after_the_freeze(dtype):
    mask = torch.ones(64, 1, dtype=dtype)
    mask[16:32] = 0  # rows 16-31 get gradients, but are padding the user masks
    theta = _half_dead_run(80, 50, mask=mask)
    moved = (theta[80] - theta[50]).abs()
    assert float(moved[16:].max()) <= 1e-6
    assert float(moved[:16].min()) > 0
    # during warm-up the mask is not applied (as in DeepSpeed): those rows trained like Adam
    assert float((theta[50][16:32] - theta[0][16:32]).abs().min()) > 0


@pytest.mark.parametrize("mask, error, match", [
    ([1.0, 0.0], TypeError, r"exp_avg_mask of parameter group 0 must be a tensor .* got list"),
    (torch.ones(3, dtype=torch.int64), TypeError, r"has dtype torch.int64; pass a float or bool"),
    (torch.tensor([1.0, float("nan"), 1.0]), ValueError, r"holds non-finite values"),
    (torch.ones(4), ValueError,
     r"has shape \(4,\), which does not broadcast to its parameter 0 of shape \(2, 3\); give each"),
    (torch.ones(2, 3, 1), ValueError, r"shape \(2, 3, 1\), which does not broadcast"),
])
def test_exp_avg_mask_errors_name_the_value_and_the_fix(mask, error, match):
    with pytest.raises(error, match=match):
        OneBitAdam([dict(params=[torch.zeros(2, 3, requires_grad=True)], exp_avg_mask=mask)],
                   freeze_step=5)


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
