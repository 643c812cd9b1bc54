"""optiscope's CPU kernels: Adam with the monitor's statistics in one pass over float32 tensors,
MicroAdam's step in one pass per top-k block, and the monitor's sums.

The C sources (``cpu_kernels.c``, ``cpu_microadam.c``, no torch headers) are compiled on first use
with the system's C compiler (``$CC``, else ``cc``/``gcc``) into one library in a cache directory
(``$OPTISCOPE_CACHE_DIR``, else ``~/.cache/optiscope``), keyed by the sources, the compiler
command and version, the flags and the platform, and loaded with ctypes: once per machine; a
cached library that does not load is rebuilt once. Without a compiler (said once, at WARNING), or
with ``OPTISCOPE_CPU_KERNEL=0``, the torch backends run torch ops instead: Adam torch's fused kernel
with the statistics taken by torch reductions (several more passes over the tensors when
statistics are asked for; the C kernel takes them in the update's pass), MicroAdam its torch-ops
step (many passes where the C kernel makes one).

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
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from optiscope.kernels.launch import is_dense
from optiscope.kernels.ranges import range_cuts

__all__ = ["kernel", "is_plain", "unavailable_reason", "compiler_command", "library_path", "adam_f32", "BlockSums", "ADAM_STATS", "sums_apply", "sq_sums_f32",
           "sq_sums_small_f32", "grad_sums_f32", "take_f32", "microadam_f32",
           "microadam_v_at", "MICROADAM_STATS"]

log = logging.getLogger("optiscope.kernels")
# One library of the C kernels: Adam with statistics and the monitor's sums (cpu_kernels.c),
# MicroAdam's step (cpu_microadam.c), and the run log's numbers as text (cpu_format.c).
SOURCES = (Path(__file__).with_name("cpu_kernels.c"), Path(__file__).with_name("cpu_microadam.c"),
           Path(__file__).with_name("cpu_format.c"))
# Columns the kernels fill, Stat's first ADAM_STATS (gradient, parameter, update and moment
# sums) and MICROADAM_STATS (those and the quantization and top-k sums); the Triton kernels
# (kernels/adam.py, kernels/microadam.py) use the same names.
ADAM_STATS = 8
MICROADAM_STATS = 12
# -ffp-contract=off: no fused multiply-adds, so an element's result does not depend on how the
# loop was vectorised; no -ffast-math: NaN and inf behave as in torch. -fno-math-errno lets sqrtf
# vectorise (it changes no result): without it the loop stays scalar.
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


# What a user who lost the C kernel can do about it, said with the reason.
FIX = ("install a C compiler (gcc or clang) or point $CC at one; OPTISCOPE_CPU_KERNEL=0 chooses "
       "torch ops and silences this warning")
_why_not: str | None = None  # why `kernel` returned None, once it has


def unavailable_reason() -> str | None:
    """Why the C kernel is not in use in this process (None when it is); builds it if needed."""
    kernel()
    return _why_not


def _without(reason: str, *, warn: bool = True) -> None:
    """Records why there is no C kernel and says so once (`kernel` is called once)."""
    global _why_not
    _why_not = reason
    if warn:
        log.warning("optiscope: the one-pass CPU kernel is not available (%s); the torch backend "
                    "runs torch ops instead (Adam with statistics about 2x slower, MicroAdam "
                    "10-20x). To fix: %s", reason, FIX)
    else:
        log.info("optiscope: the one-pass CPU kernel is off (%s); the torch backend runs torch "
                 "ops", reason)
    return None


def compiler_command() -> list[str] | None:
    """The C compiler command: ``$CC`` split as a shell would (``CC='gcc -m64'`` is a compiler
    and a flag), else ``cc`` or ``gcc`` from the PATH; None when there is none."""
    cc = os.environ.get("CC", "").strip()
    if cc:
        return shlex.split(cc)
    found = shutil.which("cc") or shutil.which("gcc")
    return [found] if found else None


def library_path(command: list[str], version: str) -> Path:
    """The cached library for this compiler: keyed by the sources, the compiler command and its
    version, the flags and the platform (OS, machine, CPU features), so that no other build is
    ever loaded for this one."""
    source = b"".join(path.read_bytes() for path in SOURCES)
    identity = "\0".join([" ".join(command), version, " ".join(FLAGS), platform.system(),
                           " ".join(platform.libc_ver()), _cpu_signature()])
    key = hashlib.sha256(hashlib.sha256(source).digest() + identity.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("OPTISCOPE_CACHE_DIR") or Path.home() / ".cache" / "optiscope")
    return cache / f"optiscope_cpu-{key}.so"


def _build(command: list[str], library: Path) -> str | None:
    """Compiles the sources into ``library``; None on success, else why not.

    The compiler writes a file of its own in the cache directory, which is then renamed over
    ``library`` in one step: a concurrent process sees either no library or a whole one.
    """
    try:
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
            built = Path(tmp) / library.name
            result = subprocess.run([*command, *FLAGS, *map(str, SOURCES), "-o", str(built),
                                     "-lm"], capture_output=True, text=True, timeout=300)
            if result.returncode != 0:
                log.info("optiscope: compiling the CPU kernel with %s failed:\n%s",
                         shlex.join(command), result.stderr.strip()[-2000:])
                last = (result.stderr.strip().splitlines() or ["no message"])[-1]
                return f"compiling it with {shlex.join(command)} failed: {last[:200]}"
            os.replace(built, library)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"building it in {library.parent} failed: {exc}"
    return None


@functools.lru_cache(maxsize=1)
def kernel() -> ctypes.CDLL | None:
    """The compiled kernel, or None when it cannot be had; the reason is said once, at WARNING
    (`unavailable_reason` returns it), and the torch backends run torch ops instead."""
    global _why_not
    _why_not = None
    if os.environ.get("OPTISCOPE_CPU_KERNEL", "1") == "0":
        return _without("OPTISCOPE_CPU_KERNEL=0", warn=False)
    try:
        command = compiler_command()
    except ValueError as exc:  # shlex: an unbalanced quote
        return _without(f"$CC={os.environ.get('CC')!r} is not a command line ({exc})")
    if command is None:
        return _without("no C compiler found: no $CC, no cc or gcc on the PATH")
    try:
        version = subprocess.run([*command, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return _without(f"the C compiler {shlex.join(command)} does not run ({exc})")
    library = library_path(command, version)
    for attempt in range(2):
        if not library.exists() and (why := _build(command, library)) is not None:
            return _without(why)
        try:
            return _declare(ctypes.CDLL(str(library)))
        except (OSError, AttributeError) as exc:  # truncated, foreign, or missing a symbol
            if attempt:
                return _without(f"the library built in {library} does not load ({exc})")
            log.warning("optiscope: the cached CPU kernel %s does not load (%s); rebuilding it",
                        library, exc)
            try:
                library.unlink()
            except FileNotFoundError:  # another process got there first
                pass
            except OSError as unlink_exc:
                return _without(f"the cached library {library} does not load ({exc}) and "
                                f"cannot be removed ({unlink_exc})")
    return None


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declares the C functions' signatures (AttributeError when one is missing)."""
    f = lib.optiscope_adam_f32
    f.restype = None
    f.argtypes = ([ctypes.c_void_p] * 5 + [ctypes.c_int64] + [ctypes.c_float] * 9
                  + [ctypes.c_int] * 3 + [ctypes.c_void_p] * 3 + [ctypes.c_int])
    lib.optiscope_range_cuts.restype = ctypes.c_int64
    lib.optiscope_block_size.restype = ctypes.c_int64
    lib.optiscope_microadam_f32.restype = ctypes.c_int
    lib.optiscope_microadam_f32.argtypes = ([ctypes.c_void_p] * 7 + [ctypes.c_int64] * 8
                                            + [ctypes.c_void_p] * 2 + [ctypes.c_float] * 4
                                            + [ctypes.c_int, ctypes.c_float, ctypes.c_void_p,
                                               ctypes.c_int] + [ctypes.c_void_p] * 2)
    lib.optiscope_microadam_v_at.restype = ctypes.c_int
    lib.optiscope_microadam_v_at.argtypes = ([ctypes.c_void_p] * 2 + [ctypes.c_int64] * 6
                                             + [ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p,
                                                ctypes.c_int64, ctypes.c_void_p, ctypes.c_int])
    lib.optiscope_sq_sums_many.restype = None
    lib.optiscope_sq_sums_many.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                           ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    lib.optiscope_gather_f32.restype = None
    lib.optiscope_gather_f32.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                         ctypes.c_void_p, ctypes.c_int]
    for name in ("optiscope_sq_sums_f32", "optiscope_grad_sums_f32"):
        f = getattr(lib, name)
        f.restype = None
        f.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    lib.optiscope_format_f64.restype = ctypes.c_int64  # kernels/cpu_format.py
    lib.optiscope_format_f64.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    lib.optiscope_format_f64_many.restype = None
    lib.optiscope_format_f64_many.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                              ctypes.c_void_p, ctypes.c_void_p]
    lib.optiscope_format_histograms.restype = ctypes.c_int64
    lib.optiscope_format_histograms.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                                ctypes.c_void_p]
    return lib


# The exact types whose ``data_ptr`` is the address of their own elements. A tensor subclass
# (torchao's OptimState8bit, a DTensor, a FakeTensor) reports another pointer, or 0, for storage
# it does not own: the C code would read invalid memory and take the training process down.
# ``isinstance`` admits every subclass, hence the exact type.
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def is_plain(t, dtype: torch.dtype = torch.float32, *, contiguous: bool = True) -> bool:
    """True when ``t`` is a tensor the C kernels may read through its raw pointer: exactly a
    `torch.Tensor` (or `torch.nn.Parameter`), strided, on the CPU, of ``dtype``, and contiguous
    (with ``contiguous=False``: dense, ``numel`` consecutive elements in some order)."""
    return (type(t) in _PLAIN_TYPES and t.dtype == dtype and t.is_cpu and t.layout == torch.strided
            and (t.is_contiguous() or (not contiguous and is_dense(t))))


def _require_plain(function: str, name: str, t, dtype: torch.dtype = torch.float32, *,
                   contiguous: bool = True) -> None:
    """Raises TypeError unless `is_plain(t, dtype, contiguous=contiguous)`: a caller that passes
    anything else to a raw-pointer kernel is a bug, caught here rather than as a segmentation
    fault."""
    if t is None or is_plain(t, dtype, contiguous=contiguous):
        return
    what = f"a {type(t).__module__}.{type(t).__qualname__}"
    if isinstance(t, Tensor):
        try:  # a subclass may not answer
            what += (f" ({t.dtype}, {t.layout}, device {t.device}, "
                     f"{'contiguous' if t.is_contiguous() else 'non-contiguous'})")
        except Exception:
            pass
    raise TypeError(f"optiscope.kernels.cpu.{function}: {name} must be a plain "
                    f"{'contiguous' if contiguous else 'dense'} {dtype} "
                    f"CPU torch.Tensor (its raw pointer is read), got {what}; route other "
                    "tensors (subclasses, DTensors, other dtypes or devices) through torch ops")


class BlockSums:
    """Per-block partial sums of several tensors in one float64 buffer, reduced per tensor at
    once: one reduction for a step's tensors instead of one per tensor, whose fixed costs add up
    over a model's hundreds of tensors.

    Args:
        numels: the tensors' sizes; each gets ``ceil(n / block)`` rows (one row of zeros for an
            empty tensor).
        width: sums per row.
    """

    # (numels) -> (counts, offsets, empty tensors' rows, one block each): the layout of a set of
    # tensors, the same at every sampled step; a few sets kept
    _layouts: dict[tuple, tuple] = {}

    def __init__(self, numels: list[int], width: int):
        key = tuple(numels)
        layout = BlockSums._layouts.get(key)
        if layout is None:
            size = kernel().optiscope_block_size()
            counts = [max(1, -(-n // size)) for n in numels]
            offsets = [0]
            for c in counts[:-1]:
                offsets.append(offsets[-1] + c)
            empty = [o for n, o in zip(numels, offsets) if n == 0]
            if len(BlockSums._layouts) > 16:
                BlockSums._layouts.clear()
            layout = BlockSums._layouts[key] = (counts, offsets, empty,
                                                all(c == 1 for c in counts))
        self.counts, self.offsets, empty, self._single = layout
        self.width = width
        # numpy: zeroed rows and the per-tensor reduction without a torch op (each costs ~100 us
        # on a CPU, more than the sums of a model's small tensors themselves)
        self.array = np.empty((sum(self.counts), width), dtype=np.float64)
        self.buffer = torch.from_numpy(self.array)
        self._base = self.array.ctypes.data
        if empty:
            self.array[empty] = 0.0

    def pointer(self, i: int) -> int:
        """Where tensor ``i``'s rows start, for the C functions."""
        return self._base + 8 * self.width * self.offsets[i]

    def row_offsets(self) -> np.ndarray:
        """Each tensor's first row, int64 (for the C functions over many tensors)."""
        return np.array(self.offsets, dtype=np.int64)

    def reduce(self, max_columns: tuple[int, ...] = ()) -> Tensor:
        """``[n_tensors, width]`` float64: each tensor's rows summed in a fixed order (the same
        inputs give the same sums whatever the thread count), the ``max_columns`` maximised."""
        return torch.from_numpy(self.reduce_numpy(max_columns, copy=True))

    def reduce_numpy(self, max_columns: tuple[int, ...] = (), copy: bool = False) -> np.ndarray:
        """`reduce` as a numpy array; with one block per tensor (tensors of up to 4096
        entries) the rows themselves unless ``copy``."""
        if self._single:
            return self.array.copy() if copy else self.array
        sums = np.add.reduceat(self.array, self.offsets, axis=0)
        for col in max_columns:
            sums[:, col] = np.maximum.reduceat(self.array[:, col], self.offsets)
        return sums


# The range counts' thresholds: kernels/ranges.py's, as the C code reads them (uint32 compares).
_RANGE_CUTS = np.array(range_cuts(), dtype=np.int32)
RANGE_FIELDS = 256
RANGE_SHAPE = (3, RANGE_FIELDS + len(_RANGE_CUTS))


def range_cuts_pointer() -> int:
    """The address of the range thresholds' array the C kernels read (kept for the process)."""
    return _RANGE_CUTS.ctypes.data


def range_buffer(count: int) -> np.ndarray:
    """Zeroed range counters for ``count`` tensors: ``[count, *RANGE_SHAPE]`` uint64; pass
    ``buffer[i]`` to `adam_f32`."""
    return np.zeros((count, *RANGE_SHAPE), dtype=np.uint64)


def adam_f32(p: Tensor, g: Tensor, m: Tensor, v: Tensor, vmax: Tensor | None, *, lr: float,
             beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
             decoupled: bool, maximize: bool, stats: BlockSums | None = None,
             index: int = 0, ranges: np.ndarray | None = None) -> None:
    """One float32 tensor's Adam step in place; with ``stats``, its 8 statistics per block
    (`_CHUNK_STATS` order of `optiscope.optimizers.adam`, before the non-finite fix-up) go to
    the rows of tensor ``index`` there.

    With ``stats`` and ``ranges`` (`range_buffer`: uint64 ``[3, RANGE_FIELDS + cuts]``, zeroed
    by the caller), the dynamic range of g, θ⁺ − θ⁻ and v over every entry is added to it: per
    quantity the histogram of |x|'s biased float32 exponent, then how many |x| (as bits) exceed
    each of `kernels.ranges`' thresholds (`range_levels` turns them into its layout).

    All tensors float32 on the CPU, same size, dense with the same strides (walked flat).
    """
    if ranges is not None and (ranges.dtype != np.uint64 or ranges.shape != RANGE_SHAPE
                               or not ranges.flags.c_contiguous):
        raise TypeError(f"optiscope.kernels.cpu.adam_f32: ranges must be a C-contiguous uint64 "
                        f"array of shape {RANGE_SHAPE} (range_buffer), got {ranges.dtype} "
                        f"{ranges.shape}")
    for name, t in (("p", p), ("g", g), ("m", m), ("v", v), ("vmax", vmax)):
        _require_plain("adam_f32", name, t, contiguous=False)
        if t is not None and (t.numel() != p.numel() or t.stride() != p.stride()):
            raise ValueError(f"optiscope.kernels.cpu.adam_f32: {name} has {t.numel()} entries "
                             f"with strides {t.stride()}, p {p.numel()} with {p.stride()}; the "
                             "tensors of one step share p's size and layout")
    lib = kernel()
    # Constants in double, rounded once to float, as torch.optim's Python code computes them.
    one_minus_b1 = 1.0 - beta1
    lerp_rest = 1.0 - ctypes.c_float(one_minus_b1).value  # torch's lerp: 1 - weight in float
    lib.optiscope_adam_f32(
        p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(),
        vmax.data_ptr() if vmax is not None else None, p.numel(), 1.0 - lr * weight_decay,
        one_minus_b1, lerp_rest, beta2, 1.0 - beta2, eps, weight_decay,
        -lr / (1.0 - beta1 ** step), (1.0 - beta2 ** step) ** 0.5, int(decoupled),
        int(vmax is not None), int(maximize), stats.pointer(index) if stats is not None else None,
        ranges.ctypes.data if ranges is not None else None,
        _RANGE_CUTS.ctypes.data if ranges is not None else None, torch.get_num_threads())


def sums_apply(tensors: list[Tensor]) -> bool:
    """The monitor's sums run here: plain contiguous float32 CPU tensors (`is_plain`), and the
    kernel compiled."""
    return bool(tensors) and all(is_plain(t) for t in tensors) and kernel() is not None


def _block_sums(name: str, tensors: list[Tensor], width: int) -> BlockSums:
    """Per-block partial sums of each tensor by the C function ``name``."""
    for i, t in enumerate(tensors):
        _require_plain(name.removeprefix("optiscope_"), f"tensors[{i}]", t)
    sums = BlockSums([t.numel() for t in tensors], width)
    f, threads = getattr(kernel(), name), torch.get_num_threads()
    for i, t in enumerate(tensors):
        f(t.data_ptr(), t.numel(), sums.pointer(i), threads)
    return sums


def sq_sums_f32(tensors: list[Tensor]) -> Tensor:
    """Σx² of each tensor (see `sums_apply`), as a float64 vector."""
    return _block_sums("optiscope_sq_sums_f32", tensors, 1).reduce()[:, 0]


def sq_sums_small_f32(tensors: list[Tensor]) -> list[float]:
    """Σx² of each of a few tensors that are in cache (see `sums_apply`), in one call
    (3 sums of 2^18 entries: 25 us; `sq_sums_f32`: 80 us)."""
    for i, t in enumerate(tensors):
        _require_plain("sq_sums_small_f32", f"tensors[{i}]", t)
    lib, count = kernel(), len(tensors)
    pointers = (ctypes.c_void_p * count)(*(t.data_ptr() for t in tensors))
    sizes = (ctypes.c_int64 * count)(*(t.numel() for t in tensors))
    blocks = max(1, -(-max(t.numel() for t in tensors) // lib.optiscope_block_size()))
    scratch = (ctypes.c_double * blocks)()
    out = (ctypes.c_double * count)()
    lib.optiscope_sq_sums_many(pointers, sizes, count, out, scratch, torch.get_num_threads())
    return list(out)


def grad_sums_f32(grads: list[Tensor]) -> Tensor:
    """``[len(grads), 3]`` float64: Σg², max |g| over the finite entries, the count of
    non-finite entries of each gradient (see `sums_apply`)."""
    return _block_sums("optiscope_grad_sums_f32", grads, 3).reduce(max_columns=(1,))


def take_f32(x: Tensor, index: Tensor) -> Tensor:
    """``x.reshape(-1)[index]`` as a float32 copy: in C for a contiguous float32 CPU tensor and
    int32 indices (one cache miss per sample, no index conversion), by index_select else (on CPU
    far faster than advanced indexing)."""
    flat = x.detach().reshape(-1)
    if is_plain(index, torch.int32) and sums_apply([flat]):
        out = torch.empty(index.numel(), dtype=torch.float32)
        kernel().optiscope_gather_f32(flat.data_ptr(), index.data_ptr(), index.numel(),
                                      out.data_ptr(), torch.get_num_threads())
        return out
    return torch.index_select(flat, 0, index).float()



def microadam_f32(p: Tensor, g: Tensor, error: Tensor, min_vals: Tensor, max_vals: Tensor,
                  indices: Tensor, values: Tensor, *, block: int, n_full: int, k_full: int,
                  tail: int, k_tail: int, slot: int, quant_block_size: int, w1: Tensor,
                  w2: Tensor, c1: float, c2: float, lr: float, weight_decay: float, eps: float,
                  stats: bool, ranges: np.ndarray | None = None) -> Tensor | None:
    """One float32 tensor's MicroAdam step in place (``cpu_microadam.c``); with ``stats``, its
    12 statistics (the C file's order), float64, and with ``ranges`` too (`range_buffer`'s row,
    as `adam_f32` takes it), the range counts of g, θ⁺ − θ⁻ and v̂ over every entry, in the pass.

    ``p`` and ``g`` contiguous float32 CPU tensors; the state as `MicroAdam` keeps it (the bf16
    tensors are read and written as their bits); ``w1``, ``w2`` float32 [m] weights.
    """
    for name, t, dtype in (("p", p, torch.float32), ("g", g, torch.float32),
                           ("error", error, torch.uint8), ("min_vals", min_vals, torch.bfloat16),
                           ("max_vals", max_vals, torch.bfloat16), ("indices", indices, torch.int16),
                           ("values", values, torch.bfloat16), ("w1", w1.contiguous(), torch.float32),
                           ("w2", w2.contiguous(), torch.float32)):
        _require_plain("microadam_f32", name, t, dtype)
    if ranges is not None and (ranges.dtype != np.uint64 or ranges.shape != RANGE_SHAPE
                               or not ranges.flags.c_contiguous):  # C writes through it
        raise TypeError(f"optiscope.kernels.cpu.microadam_f32: ranges must be a C-contiguous "
                        f"uint64 array of shape {RANGE_SHAPE} (a row of range_buffer), got "
                        f"{ranges.dtype} {ranges.shape}")
    lib = kernel()
    blocks_ = n_full + (tail > 0)
    out = torch.empty((max(blocks_, 1), MICROADAM_STATS), dtype=torch.float64) if stats else None
    w1, w2 = w1.contiguous(), w2.contiguous()
    failed = lib.optiscope_microadam_f32(
        p.data_ptr(), g.data_ptr(), error.data_ptr(), min_vals.data_ptr(), max_vals.data_ptr(),
        indices.data_ptr(), values.data_ptr(), block, n_full, k_full, tail, k_tail,
        indices.shape[0], slot, quant_block_size, w1.data_ptr(), w2.data_ptr(), c1, c2, lr,
        1.0 - lr * weight_decay, int(weight_decay != 0), eps,
        out.data_ptr() if out is not None else None, torch.get_num_threads(),
        ranges.ctypes.data if ranges is not None and stats else None,
        _RANGE_CUTS.ctypes.data if ranges is not None and stats else None)
    if failed:
        raise MemoryError(f"MicroAdam: the CPU kernel could not allocate its scratch for a "
                          f"tensor of {p.numel()} entries")
    if out is None:
        return None
    sums = out[:blocks_].sum(dim=0)
    sums[1] = out[:blocks_, 1].max() if blocks_ else 0.0
    return sums


def microadam_v_at(indices: Tensor, values: Tensor, *, block: int, n_full: int, k_full: int,
                   tail: int, k_tail: int, w2: Tensor, c2: float, index: Tensor) -> Tensor:
    """MicroAdam's v̂ = c2·S2 at sorted flat coordinates ``index`` (float32, the bits of the
    step's own v̂ there), from the window ``indices`` (int16) and ``values`` (bf16) on the CPU."""
    index = index.to(torch.int64).contiguous()
    w2 = w2.contiguous()
    for name, t, dtype in (("indices", indices, torch.int16), ("values", values, torch.int16),
                           ("w2", w2, torch.float32), ("index", index, torch.int64)):
        _require_plain("microadam_v_at", name, t, dtype)
    lib = kernel()
    out = torch.empty(index.numel(), dtype=torch.float32)
    failed = lib.optiscope_microadam_v_at(
        indices.data_ptr(), values.data_ptr(), block, n_full, k_full, tail, k_tail,
        indices.shape[0], w2.data_ptr(), c2, index.data_ptr(), index.numel(), out.data_ptr(),
        torch.get_num_threads())
    if failed:
        raise MemoryError("MicroAdam: the CPU kernel could not allocate its scratch for v̂")
    return out
