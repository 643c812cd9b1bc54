"""backend="auto" | "triton" | "torch": kernels/backend.py's rules, errors that say what to do."""

import pytest
import torch

from optiscope.kernels import backend as backend_mod
from optiscope.kernels.backend import check_backend, resolve_backend
from optiscope.optimizers import Adam


def test_auto_picks_torch_for_cpu_tensors_even_under_the_interpreter():
    assert resolve_backend("auto", torch.device("cpu"), "Adam") == "torch"


def test_auto_picks_triton_for_cuda_tensors_when_importable(monkeypatch):
    monkeypatch.setattr(backend_mod, "triton_available", lambda: True)
    assert resolve_backend("auto", torch.device("cuda"), "Adam") == "triton"
    monkeypatch.setattr(backend_mod, "triton_available", lambda: False)
    assert resolve_backend("auto", torch.device("cuda"), "Adam") == "torch"


def test_torch_is_never_overridden():
    assert resolve_backend("torch", torch.device("cuda"), "Adam") == "torch"


def test_unknown_backend_fails_at_construction():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'cuda'"):
        Adam([p], backend="cuda")


def test_triton_without_triton_says_what_to_do(monkeypatch):
    monkeypatch.setattr(backend_mod, "_triton_import_error", lambda: "ImportError: no triton")
    with pytest.raises(RuntimeError, match="install triton .* backend='torch'"):
        check_backend("triton", "Adam")


def test_triton_on_cpu_without_interpreter_says_what_to_do(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="runs on CUDA tensors .* backend='torch'"):
        resolve_backend("triton", torch.device("cpu"), "Adam")


def test_triton_on_cpu_under_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", torch.device("cpu"), "Adam") == "triton"


def test_import_does_not_import_triton():
    import subprocess
    import sys

    code = ("import sys, optiscope, optiscope.optimizers; "
            "assert 'triton' not in sys.modules, 'importing optiscope imported triton'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_monitor_sums_in_c_match_float64_brute_force_and_torch():
    from optiscope.kernels import cpu, stats

    if cpu.kernel() is None:
        pytest.skip("no C compiler here: the monitor's sums run as torch reductions")
    torch.manual_seed(0)
    tensors = [torch.randn(n) * 3 for n in (0, 1, 15, 16, 4095, 4096, 4097, 3 * 4096 + 5,
                                            10 ** 6 + 7)]
    tensors[6][4096] = float("nan")  # the first entry of a second block
    tensors[7][5] = float("inf")
    tensors[7][-1] = float("-inf")
    assert cpu.sums_apply(tensors)
    sq = cpu.sq_sums_f32(tensors)
    grads = cpu.grad_sums_f32(tensors)
    for i, t in enumerate(tensors):
        d = t.double()
        finite = d[torch.isfinite(d)]
        assert torch.equal(grads[i, 0].isnan(), d.square().sum().isnan())
        if torch.isfinite(d).all():
            expected = float(d.square().sum())
            assert sq[i] == pytest.approx(expected, rel=2e-6, abs=1e-12)
            assert grads[i, 0] == pytest.approx(expected, rel=2e-6, abs=1e-12)
        assert grads[i, 1] == (float(finite.abs().max()) if finite.numel() else 0.0)
        assert grads[i, 2] == int((~torch.isfinite(d)).sum())
    # what the monitor and the optimizers call: the C path for float32, torch's otherwise
    by_torch = stats.torch_grad_stats([t.double() for t in tensors])
    by_c = stats.torch_grad_stats(tensors)
    for stat in by_c:
        torch.testing.assert_close(by_c[stat], by_torch[stat].float(), rtol=2e-6, atol=0,
                                   equal_nan=True)
    assert not cpu.sums_apply([tensors[3].double()]) and not cpu.sums_apply([tensors[8][::2]])


def test_coordinate_gather_in_c_matches_index_select():
    from optiscope.kernels import cpu

    if cpu.kernel() is None:
        pytest.skip("no C compiler here: the gathers run as index_select")
    torch.manual_seed(0)
    for numel, count in ((1, 1), (7, 3), (4097, 4097), (10 ** 6 + 7, 9000)):
        x = torch.randn(numel)
        x[numel // 2] = float("nan")
        index = torch.randperm(numel)[:count].sort().values.to(torch.int32)
        expected = x[index.long()]
        got = cpu.take_f32(x.view(-1, 1) if numel > 1 else x, index)
        assert got.dtype == torch.float32 and got.shape == (count,)
        assert torch.equal(got.isnan(), expected.isnan())
        assert torch.equal(got.nan_to_num(), expected.nan_to_num())
    # the torch path: other dtypes, int64 indices, a strided tensor
    x = torch.randn(100, dtype=torch.float64)
    index = torch.tensor([0, 5, 99])
    assert torch.equal(cpu.take_f32(x, index), x[index].float())
    y = torch.randn(50, 4)[:, 0]
    assert torch.equal(cpu.take_f32(y, index[:2].int()), y[index[:2]])
