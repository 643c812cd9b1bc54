"""Adam and AdamW: torch.optim's semantics on the torch backend, the Triton backend against it,
statistics against brute force, dtypes, checkpoints and bad input."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field

import pytest
import torch

from helpers import TOLERANCES, assert_close, assert_equal
from models import TinyTransformer, batches, decay_groups, loss_fn
from optiscope.kernels.stats import NUM_STATS, Stat
from optiscope.optimizers import Adam, AdamW

FP32 = TOLERANCES[torch.float32]


@dataclass(frozen=True)
class Case:
    """One configuration, run through ours and through torch.optim."""

    name: str
    ours: type
    theirs: type
    kwargs: dict = field(default_factory=dict)


CASES = [
    Case("adam", Adam, torch.optim.Adam),
    Case("adam-l2", Adam, torch.optim.Adam, dict(weight_decay=0.05)),
    Case("adam-amsgrad-maximize", Adam, torch.optim.Adam, dict(amsgrad=True, maximize=True)),
    Case("adamw", AdamW, torch.optim.AdamW),
    Case("adamw-amsgrad", AdamW, torch.optim.AdamW, dict(amsgrad=True, weight_decay=0.1)),
    Case("adamw-betas-eps", AdamW, torch.optim.AdamW, dict(betas=(0.8, 0.95), eps=1e-6)),
    Case("adamw-beta1-small", AdamW, torch.optim.AdamW, dict(betas=(0.3, 0.6))),
]


def _make_pair(case: Case, backend: str = "torch"):
    torch.manual_seed(1)
    model = TinyTransformer()
    twin = copy.deepcopy(model)
    wd = case.kwargs.get("weight_decay", 0.02)
    rest = {k: v for k, v in case.kwargs.items() if k != "weight_decay"}
    ours = case.ours(decay_groups(model, 3e-3, wd), backend=backend, **rest)
    theirs = case.theirs(decay_groups(twin, 3e-3, wd), foreach=False, **rest)
    return model, twin, ours, theirs


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_torch_backend_matches_torch_optim_over_100_steps(case, cpu_path):
    model, twin, ours, theirs = _make_pair(case)
    sched_ours = torch.optim.lr_scheduler.CosineAnnealingLR(ours, T_max=100, eta_min=1e-4)
    sched_theirs = torch.optim.lr_scheduler.CosineAnnealingLR(theirs, T_max=100, eta_min=1e-4)
    for step, (x, y) in enumerate(batches(100)):
        for m, opt, sched in ((model, ours, sched_ours), (twin, theirs, sched_theirs)):
            opt.zero_grad()
            loss_fn(m, x, y).backward()
            opt.step()
            sched.step()
        for (name, a), b in zip(model.named_parameters(), twin.parameters()):
            assert_close(a, b, **FP32, what=f"{case.name} step {step} {name}")
    assert ours.param_groups[0]["lr"] == theirs.param_groups[0]["lr"]
    for a, b in zip(model.parameters(), twin.parameters()):
        sa, sb = ours.state[a], theirs.state[b]
        assert set(sa) == set(sb), "state keys must be torch's"
        assert sa["step"].dtype == sb["step"].dtype == torch.float32
        assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], **FP32, what="exp_avg_sq")


def _tiny_params(dtype=torch.float32, shapes=((1,), (7,), (3, 5), (4097,))):
    return [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in shapes]


def _set_grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_triton_backend_matches_torch_backend(case):
    a = _tiny_params()
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    kwargs = dict(lr=1e-2, weight_decay=0.1, **{k: v for k, v in case.kwargs.items() if k != "weight_decay"})
    ours_torch = case.ours([dict(params=a[:2]), dict(params=a[2:], lr=3e-2)], backend="torch", **kwargs)
    ours_triton = case.ours([dict(params=b[:2]), dict(params=b[2:], lr=3e-2)], backend="triton", **kwargs)
    for step in range(6):
        _set_grads(a, step)
        _set_grads(b, step)
        ours_torch.request_stats()
        ours_triton.request_stats()
        ours_torch.step()
        ours_triton.step()
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(y, x, **FP32, what=f"step {step} param {i}")
            for key in ours_torch.state[x]:
                assert_close(ours_triton.state[y][key], ours_torch.state[x][key], **FP32,
                             what=f"step {step} param {i} {key}")
        cols = sorted(Adam.stat_columns)
        assert_close(ours_triton.last_stats.values[:, cols], ours_torch.last_stats.values[:, cols],
                     rtol=1e-5, atol=1e-9, what=f"step {step} statistics")


def _brute_force_stats(before, after, grads, exp_avgs, exp_avg_sqs):
    rows = []
    for p0, p1, g, m, v in zip(before, after, grads, exp_avgs, exp_avg_sqs):
        g, p0, p1, m, v = (t.detach().double() for t in (g, p0, p1, m, v))
        finite = torch.isfinite(g)
        rows.append([
            (g ** 2).sum(),
            g.abs().max() if finite.all() else torch.tensor(float("inf")),
            (~finite).sum(),
            (p0 ** 2).sum(), (p1 ** 2).sum(), ((p1 - p0) ** 2).sum(), (m ** 2).sum(), (v ** 2).sum(),
        ])
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_statistics_match_brute_force(backend, amsgrad, cpu_path):
    params = _tiny_params()
    opt = AdamW(params, lr=1e-2, amsgrad=amsgrad, backend=backend)
    for step in range(3):
        _set_grads(params, step)
        before = [p.detach().clone() for p in params]
        opt.request_stats()
        opt.step()
    stats = opt.last_stats
    assert stats.step == 3 and stats.params == params
    assert stats.values.shape == (len(params), NUM_STATS)
    expected = _brute_force_stats(before, params, [p.grad for p in params],
                                  [opt.state[p]["exp_avg"] for p in params],
                                  [opt.state[p]["exp_avg_sq"] for p in params])
    cols = sorted(AdamW.stat_columns)
    assert_close(stats.values[:, cols], expected, rtol=2e-6, atol=1e-12, what="statistics")
    not_produced = [c for c in range(NUM_STATS) if c not in cols]
    assert stats.values[:, not_produced].isnan().all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN on purpose
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_statistics_count_non_finite_gradients(backend, cpu_path):
    params = _tiny_params(shapes=((7,), (3, 5), (9000,)))
    opt = Adam(params, backend=backend)
    params[0].grad = torch.tensor([1.0, float("nan"), -2.0, float("inf"), 0.0, float("-inf"), 3.0])
    params[1].grad = torch.ones(3, 5)
    # past the first cache-sized piece of the CPU kernel's blocks, and in its second block
    params[2].grad = torch.zeros(9000)
    params[2].grad[[700, 4200, 8999]] = torch.tensor([float("nan"), 5.0, float("-inf")])
    opt.request_stats()
    opt.step()
    values = opt.last_stats.values
    assert values[:, Stat.GRAD_NONFINITE].tolist() == [3, 0, 2]
    assert values[:, Stat.GRAD_ABSMAX].tolist() == [float("inf"), 1.0, float("inf")]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_statistics_only_when_requested(backend):
    params = _tiny_params(shapes=((5,),))
    opt = Adam(params, backend=backend)
    _set_grads(params, 0)
    opt.step()
    assert opt.last_stats is None
    opt.request_stats()
    opt.step()
    first = opt.last_stats
    opt.step()
    assert opt.last_stats is first, "a step that was not asked for statistics must not make any"


@pytest.mark.parametrize("backend, shapes", [
    ("torch", ((1,), (7,), (3, 5), (4097,), (300_001,), (0,))),  # several statistics chunks
    ("triton", ((1,), (7,), (3, 5), (4097,))),
])
def test_requesting_statistics_does_not_change_the_trajectory(backend, shapes, cpu_path):
    a = _tiny_params(shapes=shapes)
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    watched, plain = AdamW(a, lr=1e-2, backend=backend), AdamW(b, lr=1e-2, backend=backend)
    for step in range(4):
        _set_grads(a, step)
        _set_grads(b, step)
        watched.request_stats()
        watched.step()
        plain.step()
    for x, y in zip(a, b):
        assert_equal(x, y, what="parameters with and without statistics")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_low_precision_parameters_keep_their_dtype_and_track_fp32(dtype, backend):
    params = _tiny_params(dtype)
    master = [torch.nn.Parameter(p.detach().float()) for p in params]
    opt = AdamW(params, lr=1e-2, backend=backend)
    ref = torch.optim.AdamW(master, lr=1e-2, foreach=False)
    for step in range(5):
        _set_grads(params, step)
        for p, q in zip(params, master):
            q.grad = p.grad.float()
        opt.step()
        ref.step()
    for p, q in zip(params, master):
        assert p.dtype == dtype and opt.state[p]["exp_avg"].dtype == dtype
        # five steps of lr 1e-2 move a parameter by at most ~5e-2; rounding to the storage dtype
        # each step costs at most half an ulp of |θ| ≤ ~4
        assert_close(p.float(), q, rtol=2e-2, atol=2e-2, what=f"{dtype} vs fp32")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_parameters_without_gradient_are_skipped(backend):
    a, b = _tiny_params(shapes=((3,), (4,)))
    opt = Adam([a, b], backend=backend)
    a.grad = torch.ones(3)
    before = b.detach().clone()
    opt.request_stats()
    opt.step()
    assert b not in opt.state and torch.equal(b, before)
    assert opt.last_stats.params == [a]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("layout", ["transposed", "channels_last", "strided-slice"])
def test_parameters_and_gradients_in_any_layout(backend, layout, cpu_path):
    # torch.optim.AdamW(fused=True) gets this wrong on CPU when the gradient's layout differs
    # from the parameter's; foreach=False is the oracle.
    p = torch.nn.Parameter({
        "transposed": lambda: torch.randn(5, 3).t(),
        "channels_last": lambda: torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
        "strided-slice": lambda: torch.randn(4, 10)[:, ::3],
    }[layout]())
    q = torch.nn.Parameter(p.detach().clone())
    stride = p.stride()
    ours, ref = AdamW([p], lr=1e-2, backend=backend), torch.optim.AdamW([q], lr=1e-2, foreach=False)
    for step in range(3):
        p.grad = torch.randn(p.shape).contiguous()  # a layout unlike the parameter's
        q.grad = p.grad.clone()
        ours.request_stats()
        ours.step()
        ref.step()
    assert_close(p, q, **FP32, what=layout)
    assert p.stride() == stride, "the parameter keeps its layout"
    assert_close(ours.last_stats.values[0, Stat.PARAM_SQ_AFTER], (q.detach().double() ** 2).sum(),
                 rtol=1e-5, atol=0, what="statistics of a non-contiguous parameter")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_on_views_at_an_unaligned_offset_matches_the_aligned_path(dtype):
    # The kernel's vectorised path needs every address 16-byte aligned; a parameter (and its
    # gradient) one element into a larger buffer takes the element-wise path, and with it the
    # whole launch. Both parameters span a full 4096-entry chunk and a partial one. The two paths
    # must store the same bits; float32 is also checked against the torch backend (bf16 is not:
    # the interpreter rounds float32 to bf16 by truncation, torch to nearest).
    def make(offset):
        torch.manual_seed(3)
        values = torch.randn(4096 + 5).to(dtype)
        buf = torch.zeros(2 * 4096 + 9, dtype=dtype)
        buf[offset:offset + values.numel()] = values
        return [torch.nn.Parameter(buf[offset:offset + values.numel()]),
                torch.nn.Parameter(torch.randn(4096 + 3).to(dtype))]

    ref, odd, even = make(0), make(1), make(0)
    assert odd[0].data_ptr() % 16 != 0 and all(p.data_ptr() % 16 == 0 for p in even)
    opts = [AdamW(ps, lr=1e-2, weight_decay=0.1, backend=backend)
            for ps, backend in ((ref, "torch"), (odd, "triton"), (even, "triton"))]
    for step in range(3):
        grads = [torch.randn(p.numel() + 1).to(dtype) for p in ref]
        for ps in (ref, odd, even):
            for p, g in zip(ps, grads):
                p.grad = g.clone()[1:] if ps is odd else g[1:].clone()
        assert odd[0].grad.data_ptr() % 16 != 0
        before = [q.detach().double() for q in odd]
        for opt in opts[1:]:
            opt.request_stats()
        for opt in opts:
            opt.step()
        for i in range(2):
            assert_equal(odd[i], even[i], what=f"step {step} param {i}: unaligned against aligned")
            if dtype == torch.float32:
                assert_close(odd[i], ref[i], **FP32, what=f"step {step} param {i} against torch")
        produced = sorted(Adam.stat_columns)
        assert_equal(opts[1].last_stats.values[:, produced], opts[2].last_stats.values[:, produced],
                     what="statistics")
        # the statistics of what the kernel stored, against float64 sums of the same values
        after = [q.detach().double() for q in odd]
        expected = torch.tensor([[(q.grad.double() ** 2).sum(), (p0 ** 2).sum(), (p1 ** 2).sum(),
                                  ((p1 - p0) ** 2).sum()] for q, p0, p1 in zip(odd, before, after)])
        cols = [Stat.GRAD_SQ, Stat.PARAM_SQ_BEFORE, Stat.PARAM_SQ_AFTER, Stat.UPDATE_SQ]
        assert_close(opts[1].last_stats.values[:, cols].double(), expected, rtol=1e-5,
                     atol=1e-12, what=f"step {step} statistics")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_closure_is_evaluated_with_gradients(backend):
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = Adam([p], lr=0.1, backend=backend)

    def closure():
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 5.0
    assert_close(p.detach(), torch.tensor([0.9, -1.9]), rtol=1e-6, atol=1e-7)


def test_state_dict_loads_into_torch_optim_and_back():
    model, twin, ours, theirs = _make_pair(CASES[3])
    for x, y in batches(3):
        for m, opt in ((model, ours), (twin, theirs)):
            opt.zero_grad()
            loss_fn(m, x, y).backward()
            opt.step()
    # deep copies: a loaded state dict shares its CPU `step` tensors with the one saved
    theirs.load_state_dict(copy.deepcopy(ours.state_dict()))
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    twin.load_state_dict(model.state_dict())
    for x, y in batches(3, seed=1):
        for m, opt in ((model, ours), (twin, theirs)):
            opt.zero_grad()
            loss_fn(m, x, y).backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert_close(a, b, **FP32, what="after swapping state dicts")


RESUME_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from models import TinyTransformer, batches, decay_groups, loss_fn
    from optiscope.optimizers import {cls}
    torch.manual_seed(1)
    model = TinyTransformer()
    opt = {cls}(decay_groups(model, 3e-3, 0.05), amsgrad=True, backend="torch")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    data = list(batches(12))
    if {resume}:
        ckpt = torch.load({path!r})
        model.load_state_dict(ckpt["model"]); opt.load_state_dict(ckpt["opt"]); sched.load_state_dict(ckpt["sched"])
        data = data[6:]
    else:
        data = data[:6]
    for x, y in data:
        opt.zero_grad(); loss_fn(model, x, y).backward(); opt.step(); sched.step()
    torch.save(dict(model=model.state_dict(), opt=opt.state_dict(), sched=sched.state_dict()), {path!r})
""")


@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
def test_resume_in_a_fresh_process_is_bit_for_bit(cls, tmp_path, cpu_path, monkeypatch):
    if cpu_path == "torch-fused":  # the fresh processes too
        monkeypatch.setenv("OPTISCOPE_CPU_KERNEL", "0")
    import os

    tests = os.path.dirname(__file__)
    ckpt = tmp_path / "ckpt.pt"
    for resume in (False, True):
        script = RESUME_SCRIPT.format(tests=tests, cls=cls, resume=resume, path=str(ckpt))
        subprocess.run([sys.executable, "-c", script], check=True)
    resumed = torch.load(ckpt)["model"]

    torch.manual_seed(1)
    model = TinyTransformer()
    opt = {"Adam": Adam, "AdamW": AdamW}[cls](decay_groups(model, 3e-3, 0.05), amsgrad=True, backend="torch")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    for x, y in batches(12):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
        sched.step()
    for name, value in model.state_dict().items():
        assert_equal(resumed[name], value, what=f"resumed {name}")


def _param():
    return torch.nn.Parameter(torch.zeros(3))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(lr=-1e-3), ValueError, r"Adam: lr must be >= 0.0, got -0.001"),
    (dict(betas=(1.0, 0.999)), ValueError, r"betas\[0\] must be in \[0.0, 1.0\), got 1.0"),
    (dict(betas=(0.9, -0.1)), ValueError, r"betas\[1\] must be in \[0.0, 1.0\), got -0.1"),
    (dict(betas=(0.9,)), ValueError, r"betas must be a pair"),
    (dict(eps=-1.0), ValueError, r"eps must be >= 0.0, got -1.0"),
    (dict(weight_decay=-0.1), ValueError, r"weight_decay must be >= 0.0"),
    (dict(lr=torch.tensor(0.1)), TypeError, r"lr must be a Python number, got a Tensor"),
    (dict(lr=float("nan")), TypeError, r"lr must be a number, got nan"),
])
def test_bad_hyperparameters_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        Adam([_param()], **kwargs)


def test_bad_group_added_later_fails_when_added():
    opt = AdamW([_param()])
    with pytest.raises(ValueError, match=r"AdamW: lr must be >= 0.0, got -5"):
        opt.add_param_group(dict(params=[_param()], lr=-5))


@pytest.mark.parametrize("tensor, error, match", [
    (torch.zeros(3, dtype=torch.complex64), TypeError, r"group0.param0 is complex \(torch.complex64\).*view_as_real"),
    (torch.zeros(3, dtype=torch.int64), TypeError, r"group0.param0 has dtype torch.int64"),
])
def test_bad_parameters_fail_at_construction(tensor, error, match):
    with pytest.raises(error, match=match):
        Adam([tensor])


def test_one_group_on_two_devices_fails_at_construction():
    with pytest.raises(ValueError, match=r"parameter group 0 are on different devices .*cpu.*meta"):
        Adam([torch.zeros(2, requires_grad=True), torch.zeros(2, device="meta", requires_grad=True)])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sparse_gradient_names_the_parameter(backend):
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = Adam(list(emb.named_parameters()), backend=backend)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=r"parameter weight has a sparse gradient.*SparseAdam"):
        opt.step()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_statistics_are_float32_sums_of_the_stored_values(dtype):
    p = torch.nn.Parameter(torch.randn(300_001).to(dtype))  # two statistics chunks
    opt = AdamW([p], lr=1e-2, backend="torch")
    p.grad = torch.randn(p.shape).to(dtype)
    before = p.detach().clone()
    opt.request_stats()
    opt.step()
    values = opt.last_stats.values[0]
    d = p.detach().double() - before.double()
    assert_close(values[Stat.UPDATE_SQ], d.square().sum(), rtol=1e-5, atol=0, what="update")
    assert_close(values[Stat.GRAD_SQ], p.grad.double().square().sum(), rtol=1e-5, atol=0,
                 what="gradient")


# ----------------------------------------------------------------------------------- on a GPU
_CUDA_SHAPES = ((1,), (7,), (3, 5), (4097,), (257, 1031), (1 << 20,))


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_triton_on_cuda_matches_torch_optim_and_its_statistics_brute_force(case):
    """The compiled kernels (not the interpreter) against torch.optim's for-loop on the same
    CUDA tensors over 20 steps, and their statistics against float64 brute force."""
    a = _tiny_params(shapes=_CUDA_SHAPES)
    ours_p = [torch.nn.Parameter(p.detach().cuda()) for p in a]
    theirs_p = [torch.nn.Parameter(p.detach().cuda()) for p in a]
    kwargs = dict(lr=1e-2, weight_decay=0.1, **{k: v for k, v in case.kwargs.items()
                                                if k != "weight_decay"})
    ours = case.ours(ours_p, backend="triton", **kwargs)
    theirs = case.theirs(theirs_p, foreach=False, **kwargs)
    for step in range(20):
        _set_grads(a, step)
        for x, y, g in zip(ours_p, theirs_p, a):
            x.grad, y.grad = g.grad.cuda(), g.grad.cuda()
        before = [x.detach().clone() for x in ours_p]
        ours.request_stats()
        ours.step()
        theirs.step()
        for i, (x, y) in enumerate(zip(ours_p, theirs_p)):
            assert_close(x, y, **FP32, what=f"step {step} param {i}")
    expected = _brute_force_stats(before, ours_p, [x.grad for x in ours_p],
                                  [ours.state[x]["exp_avg"] for x in ours_p],
                                  [ours.state[x]["exp_avg_sq"] for x in ours_p])
    cols = sorted(Adam.stat_columns)
    assert_close(ours.last_stats.values[:, cols].cpu().double(), expected.cpu(), rtol=2e-6,
                 atol=1e-12, what="statistics on CUDA")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_triton_on_cuda_keeps_low_precision_parameters_and_tracks_fp32(dtype):
    """As the CPU test above, with the compiled kernel: the interpreter's bf16 is not
    faithful, so only a GPU checks this path. The CPU test's shapes, so its bound holds."""
    a = _tiny_params(dtype)
    params = [torch.nn.Parameter(p.detach().cuda()) for p in a]
    master = [torch.nn.Parameter(p.detach().float().cuda()) for p in a]
    opt = AdamW(params, lr=1e-2, backend="triton")
    ref = torch.optim.AdamW(master, lr=1e-2, foreach=False)
    for step in range(5):
        _set_grads(a, step)
        for p, q, g in zip(params, master, a):
            p.grad, q.grad = g.grad.cuda(), g.grad.float().cuda()
        opt.step()
        ref.step()
    for i, (p, q) in enumerate(zip(params, master)):
        assert p.dtype == dtype and opt.state[p]["exp_avg"].dtype == dtype
        assert_close(p.float(), q, rtol=2e-2, atol=2e-2, what=f"{dtype} vs fp32, param {i}")


@pytest.mark.gpu
@pytest.mark.parametrize("make", [
    lambda ps: AdamW(ps, lr=1e-2, backend="triton"),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
], ids=["bundled-triton", "torch-fused"])
def test_monitor_on_cuda_matches_brute_force(make):
    from optiscope import OptimizerMonitor

    a = _tiny_params(shapes=_CUDA_SHAPES)
    params = [torch.nn.Parameter(p.detach().cuda()) for p in a]
    opt = make(params)
    seen = {}
    opt.register_step_pre_hook(lambda o, args, kw: seen.update(
        grads=[p.grad.double().clone() for p in params],
        before=[p.detach().double().clone() for p in params]))
    with OptimizerMonitor(opt, every=1, sample_size=10**9, console=False, strict=True) as mon:
        for step in range(3):
            _set_grads(a, step)
            for x, g in zip(params, a):
                x.grad = g.grad.cuda()
            opt.step()
    h = mon.history
    for i, p in enumerate(params):
        scope = f"group0.param{i}"
        g, p0, p1 = seen["grads"][i], seen["before"][i], p.detach().double()
        for metric, expected in (("grad_norm", g.norm()), ("weight_norm", p1.norm()),
                                 ("update_norm", (p1 - p0).norm()),
                                 ("moment2_norm", opt.state[p]["exp_avg_sq"].double().norm())):
            _, values = h.series(metric, scope)
            assert values[-1] == pytest.approx(float(expected), rel=2e-5), (metric, scope)
