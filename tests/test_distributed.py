"""OptimizerMonitor across processes: two CPU ranks over gloo, replicated (DDP) and sharded
(FSDP2 ``fully_shard``, hand-made DTensors) parameters.

Each case runs once in a pair of spawned workers (a module-scoped fixture: starting two processes
that import torch costs ~3 s of this file's budget) and brings back, per rank, what the monitor
recorded next to what the test computed by brute force from the full tensors: gradients, θ⁻, θ⁺,
m and v copied by step hooks of the test's own and gathered into whole tensors after the step.
The tests below compare the two in this process.

What the figures mean across ranks, as the tests pin it down:

* Every rank computes the same reduced figures and keeps them in ``monitor.history``; only rank 0
  writes the run directory. A non-zero rank ignores ``log_dir``: it creates no directory and no
  file, whether it is given rank 0's path or one of its own.
* Sharded tensors: the per-tensor sums are summed (and max-reduced) over the ranks, so every
  metric is that of the whole tensor. Replicated tensors (plain tensors, ``Replicate()`` DTensors)
  count once, even when they sit in the same optimizer as sharded ones.
* ``state_bytes`` is not reduced: it is the memory of this process's optimizer state, a DTensor
  counting its local shard. Rank 0's log therefore holds rank 0's bytes; with torch's
  chunked ``Shard(0)`` rank 0 holds the largest shard of every tensor, so that is the per-device
  peak, which is what "does my optimizer state fit" asks.
* Coordinate samples are drawn per local shard (``sample_size`` coordinates per shard), so a
  sample is exact when ``sample_size`` is at least the largest local shard.
* The top-k probe's blocks are cut within each rank's shard: ``topk_coverage`` is the monitor's
  figure of the whole tensor when every shard starts at a multiple of ``topk_block`` (the tests
  choose ``topk_block=2`` so that this holds for their odd shapes).
* Collectives: on a sampled step of a sharded run, one all-reduce SUM and one all-reduce MAX;
  none on other steps, and none at all for replicated parameters.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from helpers import topk_mass
from optiscope.monitor.metrics import RANGE_SHARES
from spawn import spawn_ranks
from test_ranges import oracle_histogram, oracle_share

pytestmark = pytest.mark.distributed

WORLD = 2
JOIN_TIMEOUT_S = 150    # a spawn takes 4-8 s on a 2-core machine, 3x that when it is busy
COLLECTIVE_TIMEOUT = timedelta(seconds=60)  # a rank left waiting fails instead of hanging
RTOL = 2e-5             # float32 sums (reduced over ranks) against float64 brute force
EXACT = 10**6           # sample_size above every local shard: sampled statistics are exact
TOPK_DENSITY, TOPK_BLOCK = 0.5, 2

# ============================================================================== worker side


def _worker(rank: int, world: int, root: str, scenario: str) -> None:
    """Entry point of a spawned rank: runs ``scenario`` and pickles its result into ``root``."""
    torch.set_num_threads(1)  # two ranks on two cores
    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank,
                            world_size=world, timeout=COLLECTIVE_TIMEOUT)
    try:
        result = SCENARIOS[scenario](rank, world, Path(root))
        with open(Path(root) / f"result{rank}.pkl", "wb") as f:
            pickle.dump(result, f)
        dist.barrier()  # no rank tears its connections down while the other still talks
    finally:
        dist.destroy_process_group()
    # Leave without interpreter finalization: gloo's worker threads can still hold tensors then,
    # and freeing them after Python is gone aborts the process (a flaky SIGABRT in CI).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


_COLLECTIVES = ("all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor",
                "all_gather_object", "reduce_scatter", "reduce_scatter_tensor", "broadcast",
                "broadcast_object_list", "reduce", "gather", "scatter", "all_to_all",
                "all_to_all_single", "barrier")


@contextlib.contextmanager
def _counting_collectives():
    """Records every ``torch.distributed`` collective called inside the block as (name, op)."""
    calls: list[tuple[str, str | None]] = []
    originals = {n: getattr(dist, n) for n in _COLLECTIVES if hasattr(dist, n)}

    def counted(name, fn):
        def call(*args, **kwargs):
            op = None
            if name == "all_reduce":
                op = str(kwargs.get("op", args[1] if len(args) > 1 else dist.ReduceOp.SUM))
                op = op.rsplit(".", 1)[-1]
            calls.append((name, op))
            return fn(*args, **kwargs)
        return call

    for n, fn in originals.items():
        setattr(dist, n, counted(n, fn))
    try:
        yield calls
    finally:
        for n, fn in originals.items():
            setattr(dist, n, fn)


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _full(t) -> torch.Tensor:
    """The whole tensor as float64 (a collective for a sharded DTensor: call in rank order)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().double()


class _Recorder:
    """The test's own view of every step, through step hooks registered before the monitor's.

    Copies stay as they are (DTensor copies are local clones, no communication) until
    `gathered`, called after training on every rank, turns them into whole float64 tensors.
    """

    def __init__(self, opt: torch.optim.Optimizer, names: dict[int, str]):
        self.opt, self.names = opt, names
        self.grads, self.before, self.after, self.m, self.v = {}, {}, {}, {}, {}
        self.state_bytes: dict[int, dict[str, int]] = {}
        opt.register_step_pre_hook(self._pre)
        opt.register_step_post_hook(self._post)

    def _params(self):
        return [p for g in self.opt.param_groups for p in g["params"]]

    def _pre(self, opt, args, kwargs):
        step = len(self.before) + 1
        self.grads[step] = {self.names[id(p)]: p.grad.detach().clone() for p in self._params()
                            if p.grad is not None}
        self.before[step] = {self.names[id(p)]: p.detach().clone() for p in self._params()}

    def _post(self, opt, args, kwargs):
        step = len(self.before)
        self.after[step] = {self.names[id(p)]: p.detach().clone() for p in self._params()}
        self.m[step] = {self.names[id(p)]: opt.state[p]["exp_avg"].detach().clone()
                        for p in self._params() if p in opt.state}
        self.v[step] = {self.names[id(p)]: opt.state[p]["exp_avg_sq"].detach().clone()
                        for p in self._params() if p in opt.state}
        # this process's bytes: numel × itemsize of every state tensor, a DTensor's local shard
        self.state_bytes[step] = {
            self.names[id(p)]: sum(_local(v).numel() * _local(v).element_size()
                                   for v in opt.state[p].values() if isinstance(v, torch.Tensor))
            for p in self._params() if p in opt.state}

    def gathered(self) -> "_Recorder":
        for table in (self.grads, self.before, self.after, self.m, self.v):
            for step in sorted(table):
                table[step] = {n: _full(t) for n, t in sorted(table[step].items())}
        return self


def _norm(x: torch.Tensor) -> float:
    return float(x.norm())


def _brute_force(rec: _Recorder, sampled: list[int], *, topk: tuple[float, int] | None,
                 grads_only: tuple[int, ...] = ()) -> dict:
    """Every metric of `TENSOR_METRICS`, per tensor and global, from the whole tensors.

    Returns ``{metric: {scope: {step: value}}}``; steps in ``grads_only`` get the gradient
    metrics only (their update is NaN by construction).
    """
    out: dict = {}

    def put(metric, scope, step, value):
        out.setdefault(metric, {}).setdefault(scope, {})[step] = float(value)

    def ranges(quantity: str, step: int, tensors: dict) -> None:
        """Format shares and log2 histograms (as ``hist:<quantity>:<bin>`` and the entries
        as ``hist:<quantity>:entries``): counts add up, so the shards' must give the whole's."""
        for scope, x in [*tensors.items(), ("global", torch.cat([t.flatten() for t in
                                                                 tensors.values()]))]:
            for fmt, what in RANGE_SHARES:
                put(f"{quantity}_{fmt}_{what}", scope, step, oracle_share(x, fmt, what))
            if scope == "global":
                continue
            put(f"hist:{quantity}:entries", scope, step, x.numel())
            for b, count in enumerate(oracle_histogram(x)):
                if count:
                    put(f"hist:{quantity}:{b}", scope, step, count)

    previous = None
    for step in sampled:
        grads, before, after = rec.grads[step], rec.before[step], rec.after[step]
        # the monitor's update is θ⁺ − θ⁻ in float32 (the whole tensors here are float64 copies)
        ranges("grad", step, {n: g.float() for n, g in grads.items()})
        if step not in grads_only:
            ranges("update", step, {n: after[n].float() - before[n].float() for n in grads})
            ranges("moment2", step, {n: v.float() for n, v in rec.v[step].items()})
        m, v = rec.m[step], rec.v[step]
        sums = dict.fromkeys(("g", "after", "upd", "before", "m", "v", "dd", "dp", "kept", "tot"),
                             0.0)
        nonfinite, gmax = 0, 0.0
        for name, g in grads.items():
            finite = torch.isfinite(g)
            bad = int((~finite).sum())
            absmax = math.inf if bad else float(g.abs().max())
            put("grad_norm", name, step, _norm(g))
            put("grad_max", name, step, absmax)
            put("nonfinite_grads", name, step, bad)
            sums["g"] += float(g.square().sum())
            nonfinite += bad
            gmax = max(gmax, absmax)
            if step in grads_only:
                continue
            upd = after[name] - before[name]
            put("weight_norm", name, step, _norm(after[name]))
            put("update_norm", name, step, _norm(upd))
            put("update_ratio", name, step, _norm(upd) / _norm(before[name]))
            put("moment1_norm", name, step, _norm(m[name]))
            put("moment2_norm", name, step, _norm(v[name]))
            sums["after"] += float(after[name].square().sum())
            sums["upd"] += float(upd.square().sum())
            sums["before"] += float(before[name].square().sum())
            sums["m"] += float(m[name].square().sum())
            sums["v"] += float(v[name].square().sum())
            if previous is not None:
                vp = rec.v[previous][name]
                put("moment2_drift", name, step, _norm(v[name] - vp) / _norm(vp))
                sums["dd"] += float((v[name] - vp).square().sum())
                sums["dp"] += float(vp.square().sum())
            if topk is not None:
                kept, total = topk_mass(g, *topk)
                put("topk_coverage", name, step, kept / total)
                sums["kept"] += kept
                sums["tot"] += total
        put("grad_norm", "global", step, math.sqrt(sums["g"]))
        put("grad_max", "global", step, gmax)
        put("nonfinite_grads", "global", step, nonfinite)
        if step in grads_only:
            continue
        put("weight_norm", "global", step, math.sqrt(sums["after"]))
        put("update_norm", "global", step, math.sqrt(sums["upd"]))
        put("update_ratio", "global", step, math.sqrt(sums["upd"] / sums["before"]))
        put("moment1_norm", "global", step, math.sqrt(sums["m"]))
        put("moment2_norm", "global", step, math.sqrt(sums["v"]))
        if previous is not None:
            put("moment2_drift", "global", step, math.sqrt(sums["dd"] / sums["dp"]))
        if topk is not None:
            put("topk_coverage", "global", step, sums["kept"] / sums["tot"])
        for name, nbytes in rec.state_bytes[step].items():
            put("state_bytes", name, step, nbytes)
        put("state_bytes", "global", step, sum(rec.state_bytes[step].values()))
        for i, group in enumerate(rec.opt.param_groups):
            put("lr", f"group{i}", step, group["lr"])
        previous = step
    return out


def _recorded(history) -> dict:
    """A history as ``{metric: {scope: {step: value}}}`` (plain Python, to pickle)."""
    out = {}
    for metric in history.metrics():
        out[metric] = {}
        for scope in history.scopes(metric):
            steps, values = history.series(metric, scope)
            out[metric][scope] = dict(zip(map(int, steps), map(float, values)))
    for quantity in history.histogram_quantities():  # as `_brute_force` names them
        for scope in history.histogram_scopes(quantity)[1:]:
            steps, counts = history.histograms(quantity, scope)
            for step, row in zip(map(int, steps), counts):
                out.setdefault(f"hist:{quantity}:entries", {}).setdefault(scope, {})[step] = \
                    float(row.sum())
                for b in row.nonzero()[0]:
                    out.setdefault(f"hist:{quantity}:{b}", {}).setdefault(scope, {})[step] = \
                        float(row[b])
    return out


def _train(model, opt, mon, steps: int, data, loss=lambda y: y.square().mean()) -> dict:
    """Runs ``steps`` steps; returns the collectives each ``opt.step()`` called."""
    calls = {}
    for step in range(1, steps + 1):
        opt.zero_grad()
        loss(model(data(step))).backward()
        with _counting_collectives() as seen:
            opt.step()
        calls[step] = seen
    mon.close()
    return calls


class _Net(nn.Module):
    """Odd shapes: on 2 ranks ``embed`` shards 4 + 3 rows, ``mid`` 2 + 2, and ``head`` 1 + 0 (an
    empty shard on rank 1)."""

    def __init__(self, width: int = 5, hidden: int = 7):
        super().__init__()
        self.embed = nn.Linear(width, hidden)
        self.mid = nn.Linear(hidden, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.mid(torch.tanh(self.embed(x)))))


def _data(rank: int, width: int = 5):
    """Different data on every rank, so that the gradient the optimizer sees is the average."""
    return lambda step: torch.randn(
        4, width, generator=torch.Generator().manual_seed(100 * step + rank))


def _scenario_ddp(rank: int, world: int, root: Path) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    from optiscope import OptimizerMonitor, load_run
    from optiscope.optimizers import AdamW

    out = {}
    factories = {"torch.optim.AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
                 "optiscope AdamW": lambda ps: AdamW(ps, lr=1e-2, backend="torch")}
    for kind, factory in factories.items():
        torch.manual_seed(0)  # the same initial model on every rank
        model = DistributedDataParallel(_Net())
        opt = factory(model.parameters())
        names = {id(p): n.removeprefix("module.") for n, p in model.named_parameters()}
        rec = _Recorder(opt, names)
        # the foreign run gives every rank the same log_dir, the bundled run one per rank
        log_dir = root / ("ddp-foreign" if kind.startswith("torch") else f"ddp-bundled-rank{rank}")
        mon = OptimizerMonitor(opt, model=model, every=2, log_dir=log_dir, sample_size=EXACT,
                               topk_density=TOPK_DENSITY, topk_block=TOPK_BLOCK, strict=True,
                               range_probes=True)
        calls = _train(model, opt, mon, 5, _data(rank))
        dist.barrier()  # both ranks have closed their monitors before rank 0 looks at the files
        out[kind] = dict(
            recorded=_recorded(mon.history),
            expected=_brute_force(rec.gathered(), [1, 3, 5], topk=(TOPK_DENSITY, TOPK_BLOCK)),
            scopes=mon.history.scopes("grad_norm"),
            meta_names=[p["name"] for p in mon.history.meta["params"]],
            model_names=[n for n, _ in model.named_parameters()],
            calls=calls, writer=type(mon.writer).__name__,
            log_dir=str(log_dir),
            files=sorted(os.listdir(log_dir)) if log_dir.exists() else None,
            loaded=_recorded(load_run(log_dir)) if rank == 0 else None,
        )

    # Resuming the shared run: every rank must go on from step 5, or the ranks sample different
    # steps (in a sharded run, rank 0 would wait in an all-reduce that rank 1 never enters).
    net = _Net()  # the logged run's model and optimizer: resume refuses another run's log
    resumed = OptimizerMonitor(torch.optim.AdamW(net.parameters(), lr=1e-2), model=net, every=2,
                               log_dir=root / "ddp-foreign", resume=True)
    out["resumed_step"] = resumed.step
    resumed.close()

    # An inner module whose name ends in, or is, "module": only DDP's leading prefix may go.
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.submodule = nn.Linear(2, 2)
            self.module = nn.Linear(2, 1)

    wrapped = DistributedDataParallel(Inner())
    mon = OptimizerMonitor(torch.optim.SGD(wrapped.parameters(), lr=0.1), model=wrapped)
    out["inner_names"] = [p["name"] for p in mon.history.meta["params"]]
    mon.close()
    return out


def _scenario_sharded(rank: int, world: int, root: Path) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Replicate, Shard

    from optiscope import OptimizerMonitor
    from optiscope.optimizers import AdamW

    out = {}

    # --- FSDP2: every parameter a Shard(0) DTensor, gradients reduce-scattered by FSDP
    torch.manual_seed(0)
    model = fully_shard(_Net())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rec = _Recorder(opt, {id(p): n for n, p in model.named_parameters()})
    mon = OptimizerMonitor(opt, model=model, every=3, log_dir=root / "fsdp", sample_size=EXACT,
                           topk_density=TOPK_DENSITY, topk_block=TOPK_BLOCK, strict=True,
                           range_probes=True)
    calls = _train(model, opt, mon, 7, _data(rank))
    out["fsdp"] = dict(
        recorded=_recorded(mon.history), calls=calls, sharded=mon.history.meta["sharded"],
        local_shapes={n: tuple(_local(p).shape) for n, p in model.named_parameters()},
        expected=_brute_force(rec.gathered(), [1, 4, 7], topk=(TOPK_DENSITY, TOPK_BLOCK)),
    )

    # --- a bundled optimizer over FSDP2 parameters (even shards: a failure is the same on both
    # ranks, so neither is left waiting in the monitor's all-reduce)
    torch.manual_seed(0)
    model = fully_shard(nn.Linear(4, 6))
    opt = AdamW(model.parameters(), lr=1e-2, backend="torch")
    rec = _Recorder(opt, {id(p): n for n, p in model.named_parameters()})
    mon = OptimizerMonitor(opt, model=model, sample_size=EXACT, topk_density=None, strict=True,
                           range_probes=True)
    try:
        _train(model, opt, mon, 2, _data(rank, 4))
        out["bundled_fsdp"] = dict(recorded=_recorded(mon.history), error=None,
                                   expected=_brute_force(rec.gathered(), [1, 2], topk=None))
    except Exception as exc:
        out["bundled_fsdp"] = dict(error=f"{type(exc).__name__}: {exc}")

    # --- hand-made DTensors: sharded, Replicate() and plain tensors in one optimizer, gradients
    # set per rank from a full gradient every rank draws alike; at step 7 one entry of rank 1's
    # shard is infinite.
    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(0)
    full = {"shard_uneven": torch.randn(5, 2, generator=g),
            "shard_even": torch.randn(4, 2, generator=g),
            "replicate": torch.randn(3, 2, generator=g), "plain": torch.randn(6, generator=g)}
    placement = {"shard_uneven": Shard(0), "shard_even": Shard(0), "replicate": Replicate()}

    def as_placed(name, t):
        if name not in placement:
            return t.clone()
        local = t.chunk(world, dim=0)[rank] if placement[name].is_shard() else t
        return DTensor.from_local(local.clone(), mesh, [placement[name]], run_check=False,
                                  shape=t.shape, stride=t.stride())

    params = {n: nn.Parameter(as_placed(n, t)) for n, t in full.items()}
    opt = torch.optim.AdamW([
        {"params": [(n, params[n]) for n in ("shard_uneven", "shard_even")], "lr": 1e-2},
        {"params": [(n, params[n]) for n in ("replicate", "plain")], "lr": 3e-2}])
    rec = _Recorder(opt, {id(p): n for n, p in params.items()})
    mon = OptimizerMonitor(opt, every=3, sample_size=EXACT, topk_density=TOPK_DENSITY,
                           topk_block=TOPK_BLOCK, strict=True, range_probes=True)
    calls = {}
    for step in range(1, 8):
        gg = torch.Generator().manual_seed(step)
        for name, t in full.items():
            grad = torch.randn(t.shape, generator=gg)
            if step == 7 and name == "shard_uneven":
                grad[4, 1] = math.inf  # row 4: rank 1's shard (rows 3-4)
            params[name].grad = as_placed(name, grad)
        with _counting_collectives() as seen:
            opt.step()
        calls[step] = seen
    mon.close()
    out["dtensor"] = dict(
        recorded=_recorded(mon.history), calls=calls,
        alerts=[(a.step, a.kind, a.tensors) for a in mon.history.alerts],
        expected=_brute_force(rec.gathered(), [1, 4, 7], topk=(TOPK_DENSITY, TOPK_BLOCK),
                              grads_only=(7,)),
    )

    # --- FSDP2 with the default coordinate sample: a 512 × 256 weight, 65,536 entries per shard,
    # of which the monitor keeps 1/512 = 128 per rank; the default top-k block (4096) divides the
    # shard, so the probe samples whole blocks of the tensor's own blocking (1 of 16 per rank).
    torch.manual_seed(0)
    model = fully_shard(nn.Linear(256, 512, bias=False))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rec = _Recorder(opt, {id(p): n for n, p in model.named_parameters()})
    mon = OptimizerMonitor(opt, model=model, every=1, strict=True)
    steps = [1, 2, 3, 4]
    _train(model, opt, mon, len(steps), _data(rank, 256))
    rec.gathered()
    slot = mon.slots[0]
    # every rank's sample as flat coordinates of the whole tensor (rank r's shard starts where
    # rank r-1's ends), with the blocks of its top-k probe
    local = (slot.sample.numel, slot.sample.index.long().tolist(), slot.blocks.tolist())
    shards = [None] * world
    dist.all_gather_object(shards, local)
    out["default_sampling"] = dict(
        recorded=_recorded(mon.history), sampled=mon.history.meta["params"][0]["sampled"],
        expected=_brute_force(rec, steps, topk=(0.01, 4096)),
        on_sample=_on_sample(rec, steps, "weight", shards, density=0.01, block=4096),
        update_rel_sd={s: _rel_sd((rec.after[s]["weight"] - rec.before[s]["weight"]).square(),
                                  sum(len(i) for _, i, _ in shards)) for s in steps},
        block_coverage={s: _block_coverage(rec.grads[s]["weight"], 0.01, 4096) for s in steps},
    )

    # --- the monitor fails on rank 1 only, at step 2 (not strict): rank 1 still takes part in
    # the all-reduce, so rank 0 is not left waiting, and the sample of step 2 reads NaN
    torch.manual_seed(0)
    model = fully_shard(nn.Linear(4, 6))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mon = OptimizerMonitor(opt, model=model)
    original = mon.collector.begin

    def begin(kwargs):
        if rank == 1 and mon.step == 2:
            raise RuntimeError("injected failure on rank 1")
        original(kwargs)

    mon.collector.begin = begin
    _train(model, opt, mon, 3, _data(rank, 4))
    steps, values = mon.history.series("grad_norm", "global")
    out["one_rank_fails"] = dict(steps=steps.tolist(), values=values.tolist())
    return out


def _rel_sd(x: torch.Tensor, count: int) -> float:
    """Relative standard error of Σx estimated as N·mean of ``count`` of x's N entries drawn
    uniformly without replacement."""
    x = x.reshape(-1)
    return math.sqrt((1 - count / x.numel()) / count) * float(x.std() / x.mean().abs())


def _block_coverage(g: torch.Tensor, density: float, block: int) -> list[float]:
    """The top-k coverage of each whole block of ``g``."""
    sq = g.reshape(-1, block).square()
    k = math.ceil(density * block)
    return (sq.sort(dim=1, descending=True).values[:, :k].sum(1) / sq.sum(1)).tolist()


def _on_sample(rec: _Recorder, steps: list[int], name: str, shards, *, density: float,
               block: int) -> dict:
    """The sampled statistics as the monitor defines them on a given sample: every rank's sum over
    its coordinates, scaled by its shard's numel / count, added over the ranks."""
    def estimate(x: torch.Tensor) -> float:
        flat, total, offset = x.reshape(-1), 0.0, 0
        for numel, index, _ in shards:
            total += float(flat[torch.tensor(index) + offset].square().sum()) * numel / len(index)
            offset += numel
        return total

    out: dict = {}
    for i, step in enumerate(steps):
        before, after = rec.before[step][name], rec.after[step][name]
        upd_sq = estimate(after - before)
        out.setdefault("update_norm", {})[step] = math.sqrt(upd_sq)
        out.setdefault("update_ratio", {})[step] = math.sqrt(upd_sq / float(before.square().sum()))
        if i:
            v, vp = rec.v[step][name], rec.v[steps[i - 1]][name]
            out.setdefault("moment2_drift", {})[step] = math.sqrt(estimate(v - vp) / estimate(vp))
        sq = rec.grads[step][name].reshape(-1).square()
        kept = total = 0.0
        offset, k = 0, math.ceil(density * block)
        for numel, _, blocks in shards:
            rows = sq[offset:offset + numel].reshape(-1, block)[torch.tensor(blocks)]
            scale = numel / rows.numel()
            kept += float(rows.sort(dim=1, descending=True).values[:, :k].sum()) * scale
            total += float(rows.sum()) * scale
            offset += numel
        out.setdefault("topk_coverage", {})[step] = kept / total
    return out


SCENARIOS = {"ddp": _scenario_ddp, "sharded": _scenario_sharded}

# ============================================================================== test side


def _spawn(scenario: str, root: Path) -> list[dict]:
    """Runs ``scenario`` on WORLD spawned ranks; a worker's exception fails the test with its
    traceback, and a rank that hangs is killed after JOIN_TIMEOUT_S."""
    return spawn_ranks(_worker, (WORLD, str(root), scenario), WORLD, root, scenario,
                       JOIN_TIMEOUT_S)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return _spawn("ddp", tmp_path_factory.mktemp("ddp"))


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return _spawn("sharded", tmp_path_factory.mktemp("sharded"))


def _same(actual: float, expected: float, rtol: float) -> bool:
    if math.isnan(expected) or math.isinf(expected):
        return actual == expected or (math.isnan(actual) and math.isnan(expected))
    return math.isclose(actual, expected, rel_tol=rtol, abs_tol=1e-12)


def _assert_matches(recorded: dict, expected: dict, what: str, rtol: float = RTOL) -> None:
    """Every expected (metric, scope, step) was recorded with a close value; lists every miss."""
    misses, checked = [], 0
    for metric, scopes in expected.items():
        for scope, steps in scopes.items():
            for step, value in steps.items():
                checked += 1
                got = recorded.get(metric, {}).get(scope, {}).get(step)
                if got is None or not _same(got, value, rtol):
                    misses.append(f"  {metric}[{scope}] step {step}: monitor {got!r}, "
                                  f"brute force {value!r}")
    assert not misses, (f"{what}: {len(misses)} of {checked} values differ (rtol={rtol}):\n"
                        + "\n".join(misses[:25]))


# ----------------------------------------------------------------------------- replicated


@pytest.mark.parametrize("kind", ["torch.optim.AdamW", "optiscope AdamW"])
def test_ddp_metrics_match_brute_force_on_every_rank(ddp, kind):
    for rank, result in enumerate(ddp):
        run = result[kind]
        _assert_matches(run["recorded"], run["expected"], f"{kind}, rank {rank}")
        assert sorted(run["recorded"]["grad_norm"]["global"]) == [1, 3, 5]
    # replicated: every rank saw the same gradients and parameters, and records the same figures
    assert ddp[0][kind]["expected"] == ddp[1][kind]["expected"]
    assert ddp[0][kind]["recorded"] == ddp[1][kind]["recorded"]


@pytest.mark.parametrize("kind", ["torch.optim.AdamW", "optiscope AdamW"])
def test_ddp_no_collectives(ddp, kind):
    for rank, result in enumerate(ddp):
        calls = result[kind]["calls"]
        assert all(c == [] for c in calls.values()), f"rank {rank}: {calls}"


RUN_FILES = ["events", "meta.json", "report.html", "runlog.jsonl", "trends.png"]


def _run_files(files: list[str]) -> list[str]:
    """A run directory's files, TensorBoard's event files (named by host and pid) as "events"."""
    return sorted("events" if f.startswith("events.out.tfevents.") else f for f in files)


def test_ddp_only_rank0_writes_and_rank1_ignores_log_dir(ddp):
    # One writer: two event files would mean rank 1 wrote TensorBoard events too.
    # the same log_dir on both ranks: rank 0's files only, and the log is rank 0's history
    shared = [r["torch.optim.AdamW"] for r in ddp]
    assert shared[0]["log_dir"] == shared[1]["log_dir"]
    assert _run_files(shared[0]["files"]) == RUN_FILES
    assert shared[0]["writer"] == "RunLogWriter" and shared[1]["writer"] == "NullWriter"
    _assert_matches(shared[0]["loaded"], shared[0]["recorded"], "load_run", rtol=1e-6)
    # a log_dir of its own: rank 1 does not even create the directory
    own = [r["optiscope AdamW"] for r in ddp]
    assert _run_files(own[0]["files"]) == RUN_FILES
    _assert_matches(own[0]["loaded"], own[0]["recorded"], "load_run", rtol=1e-6)
    assert own[1]["files"] is None and not Path(own[1]["log_dir"]).exists()
    assert own[1]["writer"] == "NullWriter"


def test_ddp_names_drop_the_module_prefix(ddp):
    run = ddp[0]["torch.optim.AdamW"]
    expected = ["embed.weight", "embed.bias", "mid.weight", "mid.bias", "head.weight", "head.bias"]
    assert run["model_names"] == ["module." + n for n in expected]
    assert run["meta_names"] == expected
    assert run["scopes"] == ["global", *expected]


def test_a_monitor_failure_on_one_rank_leaves_no_rank_waiting(sharded):
    # each rank finished (the fixture would have timed out otherwise); step 2 is NaN on rank 0,
    # where rank 1's rows were NaN; rank 1 lost that sample
    zero, one = (r["one_rank_fails"] for r in sharded)
    assert zero["steps"] == [1, 2, 3] and math.isnan(zero["values"][1])
    assert all(math.isfinite(v) for v in (zero["values"][0], zero["values"][2]))
    assert one["steps"] == [1, 3] and zero["values"][2] == one["values"][1]


def test_ddp_names_keep_inner_modules_called_module(ddp):
    assert ddp[0]["inner_names"] == ["submodule.weight", "submodule.bias", "module.weight",
                                     "module.bias"]


def test_resume_continues_the_step_count_on_every_rank(ddp):
    assert [r["resumed_step"] for r in ddp] == [5] * WORLD


# ----------------------------------------------------------------------------- sharded


def test_fsdp2_metrics_are_those_of_the_whole_tensors(sharded):
    for rank, result in enumerate(sharded):
        run = result["fsdp"]
        assert run["sharded"] is True
        expected = {k: v for k, v in run["expected"].items() if k != "state_bytes"}
        _assert_matches(run["recorded"], expected, f"FSDP2, rank {rank}")
        assert sorted(run["recorded"]["grad_norm"]["global"]) == [1, 4, 7]
    assert sharded[0]["fsdp"]["local_shapes"]["head.bias"] == (1,)
    assert sharded[1]["fsdp"]["local_shapes"]["head.bias"] == (0,), "an empty shard is covered"
    # the reduced figures are the same on every rank; state_bytes is each rank's own
    r0, r1 = (r["fsdp"]["recorded"] for r in sharded)
    assert {k: v for k, v in r0.items() if k != "state_bytes"} == {
        k: v for k, v in r1.items() if k != "state_bytes"}


def test_fsdp2_with_a_bundled_optimizer(sharded):
    for rank, result in enumerate(sharded):
        run = result["bundled_fsdp"]
        assert run["error"] is None, f"rank {rank}: {run['error']}"
        _assert_matches(run["recorded"], run["expected"], f"bundled AdamW on FSDP2, rank {rank}")


def test_dtensor_mixed_placements_count_replicated_tensors_once(sharded):
    for rank, result in enumerate(sharded):
        run = result["dtensor"]
        expected = {k: v for k, v in run["expected"].items() if k != "state_bytes"}
        _assert_matches(run["recorded"], expected, f"DTensor, rank {rank}")


def test_nonfinite_gradient_on_one_rank_reaches_the_global_figures(sharded):
    for rank, result in enumerate(sharded):
        rec = result["dtensor"]["recorded"]
        assert rec["nonfinite_grads"]["shard_uneven"][7] == 1
        assert rec["nonfinite_grads"]["global"][7] == 1
        assert rec["grad_max"]["shard_uneven"][7] == math.inf
        assert rec["grad_norm"]["global"][7] == math.inf
        assert (7, "nonfinite_grads", ["shard_uneven"]) in result["dtensor"]["alerts"], rank


@pytest.mark.parametrize("case", ["fsdp", "dtensor"])
def test_state_bytes_count_this_ranks_local_shards(sharded, case):
    # Each rank's figure is its own local shards' bytes (numel × itemsize of every state tensor,
    # `step` included); rank 0's, the one logged, is the larger with chunked Shard(0).
    for rank, result in enumerate(sharded):
        run = result[case]
        _assert_matches(run["recorded"], {"state_bytes": run["expected"]["state_bytes"]},
                        f"{case}, rank {rank}", rtol=0)
    r0 = sharded[0][case]["expected"]["state_bytes"]["global"]
    r1 = sharded[1][case]["expected"]["state_bytes"]["global"]
    assert all(r0[s] > r1[s] for s in r0), "uneven shards: rank 0 holds more"


@pytest.mark.parametrize("case", ["fsdp", "dtensor"])
def test_one_collective_per_reduction_kind_on_sampled_steps_only(sharded, case):
    for rank, result in enumerate(sharded):
        calls = result[case]["calls"]
        for step, seen in calls.items():
            want = [("all_reduce", "SUM"), ("all_reduce", "MAX")] if step in (1, 4, 7) else []
            assert seen == want, f"rank {rank}, step {step}: {seen}"


def test_default_sampling_is_exact_on_its_sample_and_close_to_the_whole_tensor(sharded):
    # ... and the dynamic range (shares, histograms): counted on the sample, scaled
    sampled = ("update_norm", "update_ratio", "moment2_drift", "topk_coverage")
    for rank, result in enumerate(sharded):
        run = result["default_sampling"]
        assert run["sampled"] == 128, "1/512 of a 65,536-entry shard"
        exact = {k: v for k, v in run["expected"].items() if k not in sampled
                 and not k.startswith("hist:") and not k.endswith(("_underflow", "_overflow"))}
        _assert_matches(run["recorded"], exact, f"default sampling, rank {rank}, exact metrics")
        # what each rank's sample sums to, scaled per shard and added over the ranks
        on_sample = {k: {"weight": v} for k, v in run["on_sample"].items()}
        _assert_matches(run["recorded"], on_sample, f"default sampling, rank {rank}, on its sample")

    run, rec = sharded[0]["default_sampling"], sharded[0]["default_sampling"]["recorded"]
    for step, rel_sd in run["update_rel_sd"].items():
        # 256 of 131,072 coordinates: within 5 standard errors of the whole tensor's Σ(θ⁺ − θ⁻)²
        # (the norm's relative error is about half the sum's)
        got = rec["update_norm"]["weight"][step]
        want = run["expected"]["update_norm"]["weight"][step]
        assert abs(got**2 / want**2 - 1) <= 5 * rel_sd, (
            f"update_norm step {step}: {got} vs {want} (sum within ±{5 * rel_sd:.3f})")
        # top-k: 1 block of 16 per rank; the figure is a mix of the blocks' own coverages
        blocks = run["block_coverage"][step]
        got = rec["topk_coverage"]["weight"][step]
        assert min(blocks) <= got * (1 + RTOL) and got <= max(blocks) * (1 + RTOL), (
            f"topk_coverage step {step}: {got} outside the blocks' range "
            f"[{min(blocks)}, {max(blocks)}]")
    # moment2_drift is Σ(v_t − v_p)² over Σv_p², heavy-tailed in v: 256 coordinates pin it only
    # to within several times itself, so it is checked on its sample (above), not against the
    # whole tensor.
