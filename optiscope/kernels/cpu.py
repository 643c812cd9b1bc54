"""optiscope's CPU kernel: Adam with the monitor's statistics in one pass over float32 tensors.

The C source (``cpu_adam.c``, no torch headers) is compiled on first use with the system's C
compiler (``$CC``, else ``cc``/``gcc``) into a cache directory (``$OPTISCOPE_CACHE_DIR``, else
``~/.cache/optiscope``), keyed by the source, the compiler and the CPU, and loaded with ctypes:
under a second, once per machine. Without a compiler, or with ``OPTISCOPE_CPU_KERNEL=0``, the
torch backend runs torch's fused kernel and takes the statistics with torch reductions instead
(about 2x the step's time when statistics are asked for; this kernel: about 1.1x).

The same library sums tensors for the monitor when an optimizer produces no statistics of its
own (`sq_sums_f32`, `grad_sums_f32`): one pass for a gradient's three statistics, where torch
takes three.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["kernel", "adam_f32", "NSTATS", "sums_apply", "sq_sums_f32", "grad_sums_f32"]

log = logging.getLogger("optiscope.kernels")
SOURCE = Path(__file__).with_name("cpu_adam.c")
NSTATS = 8
# -ffp-contract=off: no fused multiply-adds, so an element's result does not depend on how the
# loop was vectorised; no -ffast-math: NaN and inf behave as in torch. -fno-math-errno lets sqrtf
# vectorise (it changes no result): without it the step ran at 1/3 of torch's fused kernel.
# -fno-trapping-math lets the branch-free comparisons of the statistics vectorise (no result
# changes: nothing reads the floating-point exception flags).
FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno",
         "-fno-trapping-math", "-fPIC", "-shared", "-std=c11"]


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


@functools.lru_cache(maxsize=1)
def kernel() -> ctypes.CDLL | None:
    """The compiled kernel, or None (with the reason logged once) when it cannot be had."""
    if os.environ.get("OPTISCOPE_CPU_KERNEL", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("optiscope: no C compiler found; the torch backend uses torch's fused Adam and "
                 "torch reductions for statistics (set CC to enable the one-pass CPU kernel)")
        return None
    source = SOURCE.read_bytes()
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.info("optiscope: the C compiler %s does not run (%s); using torch's fused Adam",
                 compiler, exc)
        return None
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + version.encode()
                         + _cpu_signature().encode()).hexdigest()[:16]
    cache = Path(os.environ.get("OPTISCOPE_CACHE_DIR") or Path.home() / ".cache" / "optiscope")
    library = cache / f"cpu_adam-{key}.so"
    if not library.exists():
        try:
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:  # concurrent builds: rename wins
                built = Path(tmp) / library.name
                result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"],
                                        capture_output=True, text=True, timeout=120)
                if result.returncode != 0:
                    log.info("optiscope: compiling the CPU kernel failed; using torch's fused "
                             "Adam:\n%s", result.stderr.strip()[-2000:])
                    return None
                os.replace(built, library)
        except (OSError, subprocess.SubprocessError) as exc:
            log.info("optiscope: building the CPU kernel in %s failed (%s); using torch's fused "
                     "Adam", cache, exc)
            return None
    lib = ctypes.CDLL(str(library))
    f = lib.optiscope_adam_f32
    f.restype = None
    f.argtypes = ([ctypes.c_void_p] * 5 + [ctypes.c_int64] + [ctypes.c_float] * 9
                  + [ctypes.c_int] * 3 + [ctypes.c_void_p, ctypes.c_int])
    lib.optiscope_block_size.restype = ctypes.c_int64
    for name in ("optiscope_sq_sums_f32", "optiscope_grad_sums_f32"):
        f = getattr(lib, name)
        f.restype = None
        f.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    return lib


def adam_f32(p: Tensor, g: Tensor, m: Tensor, v: Tensor, vmax: Tensor | None, *, lr: float,
             beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
             decoupled: bool, maximize: bool, stats: bool) -> Tensor | None:
    """One float32 tensor's Adam step in place; its 8 statistics (float64, `_CHUNK_STATS` order
    of `optiscope.optimizers.adam`, before the non-finite fix-up) when ``stats``.

    All tensors contiguous float32 on the CPU, same size.
    """
    lib = kernel()
    n = p.numel()
    block_stats = None
    if stats:
        blocks = -(-n // lib.optiscope_block_size())
        block_stats = torch.empty((max(blocks, 1), NSTATS), dtype=torch.float64)
    # Constants in double, rounded once to float, as torch.optim's Python code computes them.
    one_minus_b1 = 1.0 - beta1
    lerp_rest = 1.0 - ctypes.c_float(one_minus_b1).value  # torch's lerp: 1 - weight in float
    lib.optiscope_adam_f32(
        p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(),
        vmax.data_ptr() if vmax is not None else None, n, 1.0 - lr * weight_decay, one_minus_b1,
        lerp_rest, beta2, 1.0 - beta2, eps, weight_decay, -lr / (1.0 - beta1 ** step),
        (1.0 - beta2 ** step) ** 0.5, int(decoupled), int(vmax is not None), int(maximize),
        block_stats.data_ptr() if block_stats is not None else None, torch.get_num_threads())
    if block_stats is None:
        return None
    if n == 0:
        return torch.zeros(NSTATS, dtype=torch.float64)
    sums = block_stats.sum(dim=0)  # blocks in a fixed order: reproducible
    sums[1] = block_stats[:, 1].max()
    return sums


def sums_apply(tensors: list[Tensor]) -> bool:
    """The monitor's sums run here: contiguous float32 CPU tensors, and the kernel compiled."""
    return (bool(tensors) and all(t.device.type == "cpu" and t.dtype == torch.float32
                                  and t.is_contiguous() and not t.is_sparse for t in tensors)
            and kernel() is not None)


def _block_sums(name: str, tensors: list[Tensor], width: int) -> tuple[Tensor, Tensor]:
    """Per-block partial sums of each tensor (``[blocks, width]`` float64) and the block count
    of each tensor (an empty tensor has one block of zeros)."""
    lib = kernel()
    size = lib.optiscope_block_size()
    counts = [max(1, -(-t.numel() // size)) for t in tensors]
    out = torch.zeros((sum(counts), width), dtype=torch.float64)
    f, base, threads, offset = getattr(lib, name), out.data_ptr(), torch.get_num_threads(), 0
    for t, c in zip(tensors, counts):
        f(t.data_ptr(), t.numel(), base + 8 * width * offset, threads)
        offset += c
    return out, torch.tensor(counts)


def sq_sums_f32(tensors: list[Tensor]) -> Tensor:
    """Σx² of each tensor (see `sums_apply`), as a float64 vector."""
    out, counts = _block_sums("optiscope_sq_sums_f32", tensors, 1)
    return torch.segment_reduce(out[:, 0], "sum", lengths=counts)


def grad_sums_f32(grads: list[Tensor]) -> Tensor:
    """``[len(grads), 3]`` float64: Σg², max |g| over the finite entries, the count of
    non-finite entries of each gradient (see `sums_apply`)."""
    out, counts = _block_sums("optiscope_grad_sums_f32", grads, 3)
    sums = torch.segment_reduce(out, "sum", lengths=counts, axis=0)
    sums[:, 1] = torch.segment_reduce(out[:, 1].contiguous(), "max", lengths=counts)
    return sums
