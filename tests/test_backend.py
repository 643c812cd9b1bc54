"""backend="auto" | "triton" | "torch": kernels/backend.py's rules, errors that say what to do."""

import logging
import os
import subprocess
import sys
from pathlib import Path

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


# ----------------------------------------------------------------------- the C library's cache
@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """`cpu.kernel()` looked up afresh, with its cache in ``tmp_path``; the process's own kernel
    again afterwards. Builds copy the library this process already has (a real compile takes
    seconds; `test_a_corrupt_cache_entry_in_a_fresh_process_is_rebuilt` does one)."""
    from optiscope.kernels import cpu

    real = cpu.kernel()
    if real is None:
        pytest.skip("no C compiler here")
    builds = []

    def build(command, library):
        builds.append(command)
        library.parent.mkdir(parents=True, exist_ok=True)
        library.write_bytes(Path(real._name).read_bytes())
        return None

    monkeypatch.setenv("OPTISCOPE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu, "_build", build)
    cpu.kernel.cache_clear()
    yield cpu, builds
    cpu.kernel.cache_clear()


def _cached_library(cpu):
    command = cpu.compiler_command()
    version = subprocess.run([*command, "--version"], capture_output=True, text=True).stdout
    return cpu.library_path(command, version)


def test_a_truncated_cached_library_is_rebuilt_once(fresh_kernel, caplog):
    cpu, builds = fresh_kernel
    library = _cached_library(cpu)
    library.parent.mkdir(parents=True, exist_ok=True)
    library.write_bytes(b"\x7fELF")  # "file too short"
    with caplog.at_level(logging.WARNING, logger="optiscope.kernels"):
        lib = cpu.kernel()
    assert lib is not None and len(builds) == 1 and cpu.unavailable_reason() is None
    assert "does not load" in caplog.text and "rebuilding" in caplog.text
    assert lib.optiscope_block_size() > 0


def test_a_library_that_never_loads_falls_back_to_torch_with_a_warning(fresh_kernel, monkeypatch,
                                                                      caplog):
    cpu, builds = fresh_kernel

    def build(command, library):
        builds.append(command)
        library.write_bytes(b"not a library")

    monkeypatch.setattr(cpu, "_build", build)
    with caplog.at_level(logging.WARNING, logger="optiscope.kernels"):
        torch.manual_seed(0)
        p, q = (torch.nn.Parameter(torch.randn(40)) for _ in range(2))
        q.data.copy_(p.data)
        ours, ref = Adam([p], lr=0.1), torch.optim.Adam([q], lr=0.1)
        for _ in range(3):
            p.grad, q.grad = torch.arange(40.0) - 20, torch.arange(40.0) - 20
            ours.request_stats()
            ours.step()
            ref.step()
    assert cpu.kernel() is None and len(builds) == 2, "one rebuild, then torch"
    reason = cpu.unavailable_reason()
    assert "does not load" in reason and str(_cached_library(cpu)) in reason
    fallbacks = [r for r in caplog.records if "not available" in r.getMessage()]
    assert len(fallbacks) == 1 and fallbacks[0].levelno == logging.WARNING
    assert "install a C compiler" in fallbacks[0].getMessage()
    torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert ours.last_stats is not None


def test_cc_is_split_like_a_shell_and_keys_the_cache(fresh_kernel, monkeypatch):
    cpu, builds = fresh_kernel
    monkeypatch.setenv("CC", "gcc -m64")
    assert cpu.compiler_command() == ["gcc", "-m64"]
    assert cpu.kernel() is not None and builds == [["gcc", "-m64"]]
    assert cpu.library_path(["gcc", "-m64"], "v") != cpu.library_path(["gcc"], "v")
    assert cpu.library_path(["gcc"], "v") != cpu.library_path(["gcc"], "v2")
    monkeypatch.setenv("CC", "'/opt/my compilers/cc' -O1")
    assert cpu.compiler_command() == ["/opt/my compilers/cc", "-O1"]


def test_no_compiler_is_one_warning_and_meta_backend_says_what_runs(fresh_kernel, monkeypatch,
                                                                    caplog, tmp_path):
    from optiscope import OptimizerMonitor

    cpu, _ = fresh_kernel
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    p = torch.nn.Parameter(torch.randn(8))
    with caplog.at_level(logging.INFO, logger="optiscope.kernels"):
        mon = OptimizerMonitor(Adam([p], lr=0.1), strict=True, console=False)
        for _ in range(2):
            p.grad = torch.ones(8)
            mon.optimizer.step()
        mon.close()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "no-such-cc" in warnings[0].getMessage() and "install a C compiler" in warnings[0].getMessage()
    assert mon.history.meta["backend"].startswith("auto: torch (fallback: the C compiler ")
    assert "no-such-cc" in mon.history.meta["backend"]


def test_a_failed_compile_leaves_nothing_in_the_cache(monkeypatch, tmp_path):
    from optiscope.kernels import cpu

    monkeypatch.setenv("CC", "sh -c 'echo broken >&2; exit 1' --")
    library = tmp_path / "cache" / "optiscope_cpu-x.so"
    why = cpu._build(cpu.compiler_command(), library)
    assert "failed: broken" in why
    assert list(library.parent.iterdir()) == []


def test_meta_backend_names_the_c_kernel():
    from optiscope import OptimizerMonitor
    from optiscope.kernels import cpu

    if cpu.kernel() is None:
        pytest.skip("no C compiler here")
    p = torch.nn.Parameter(torch.randn(8))
    mon = OptimizerMonitor(Adam([p], lr=0.1), console=False)
    mon.close()
    assert mon.history.meta["backend"] == "auto: torch (C kernel)"
    mon = OptimizerMonitor(Adam([p], lr=0.1, backend="torch"), console=False)
    mon.close()
    assert mon.history.meta["backend"] == "torch", "an explicit choice is recorded as made"


def test_cuda_without_triton_is_said_once(monkeypatch, caplog):
    monkeypatch.setattr(backend_mod, "_triton_import_error", lambda: "ImportError: no triton")
    backend_mod._say_cuda_without_triton.cache_clear()
    with caplog.at_level(logging.WARNING, logger="optiscope.kernels"):
        for _ in range(3):
            assert resolve_backend("auto", torch.device("cuda"), "Adam") == "torch"
    backend_mod._say_cuda_without_triton.cache_clear()
    assert caplog.text.count("runs CUDA tensors on the torch backend") == 1
    assert "optiscope[triton]" in caplog.text and "ImportError: no triton" in caplog.text


@pytest.mark.slow
def test_a_corrupt_cache_entry_in_a_fresh_process_is_rebuilt(tmp_path):
    """The reported case: `optiscope_cpu-*.so: file too short` in the cache, a bundled optimizer's
    first step in a new process (a real compile)."""
    from optiscope.kernels import cpu

    if cpu.compiler_command() is None:
        pytest.skip("no C compiler here")
    env = dict(os.environ, OPTISCOPE_CACHE_DIR=str(tmp_path))
    code = ("import torch, logging; logging.basicConfig(level=logging.WARNING)\n"
            "from optiscope.kernels import cpu\n"
            "from optiscope.optimizers import AdamW\n"
            "import subprocess\n"
            "c = cpu.compiler_command()\n"
            "v = subprocess.run([*c, '--version'], capture_output=True, text=True).stdout\n"
            "lib = cpu.library_path(c, v); lib.parent.mkdir(parents=True, exist_ok=True)\n"
            "lib.write_bytes(b'')\n"
            "p = torch.nn.Parameter(torch.ones(5)); opt = AdamW([p]); p.grad = torch.ones(5)\n"
            "opt.request_stats(); opt.step()\n"
            "assert cpu.kernel() is not None and lib.stat().st_size > 1000\n"
            "print('stepped', float(p.sum()))\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "stepped" in out.stdout and "rebuilding" in out.stderr
