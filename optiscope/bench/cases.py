"""The registry of what the harness times: implementations of a step (`CASES`), the optimizers
whose monitor overhead is measured (`watched_optimizers`), and workloads (`MODELS`,
`single_tensor`).

A case is one implementation of an optimizer step: how to build it for a list of tensors, the
bytes one step must move (for the bandwidth column) and the state it keeps (for the memory plan).
A workload is the parameter shapes one optimizer updates. Adding an optimizer to the benchmark is
one `_register_optiscope` or `_register` call at the end of the case section.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

__all__ = ["Shape", "Case", "CASES", "WatchedOptimizer", "watched_optimizers", "Workload",
           "MODELS", "single_tensor", "gpt2_shapes", "triton_requirement", "format_count"]

# ================================================================ implementations (cases)
Shape = tuple[int, ...]


def _numel(shape: Shape) -> int:
    return math.prod(shape)


def _adamw_bytes(shape: Shape, itemsize: int) -> int:
    # Read θ, g, m, v; write θ, m, v: 7 words per parameter (state in the parameter's dtype).
    return 7 * _numel(shape) * itemsize


def _adamw_state(shape: Shape, itemsize: int) -> int:
    return 2 * _numel(shape) * itemsize


def _adafactor_bytes(shape: Shape, itemsize: int) -> int:
    # The update is clipped by RMS(update), which needs the new second-moment estimate of every
    # entry before any entry can be written, and the relative step needs RMS(θ): at least three
    # passes. Factored (≥ 2-D; the row/column factors are negligible): read g, θ (Σg² per row and
    # column, Σθ²); read g (Σ update²); read g, θ, write θ = 6 words. Unfactored (1-D): read g, θ,
    # v, write v; read g, v; read g, v, θ, write θ = 10 words.
    return (6 if len(shape) >= 2 else 10) * _numel(shape) * itemsize


def _microadam_bytes(shape: Shape, itemsize: int) -> int:
    # Read g, read and write θ; read and write the packed 4-bit error feedback (1 byte); read the
    # window of m=10 rows of k=1% (int16 index + bf16 value: 0.4 B) and write one row (0.04 B).
    n = _numel(shape)
    return 3 * n * itemsize + n + math.ceil(0.44 * n)


def _microadam_state(shape: Shape, itemsize: int) -> int:
    # 4-bit error feedback + min/max per 4096-entry quantization block + the window (m=10, k=41).
    n = _numel(shape)
    blocks = math.ceil(n / 4096)
    return math.ceil(n / 2) + 4 * blocks + 10 * 41 * 4 * blocks


def _onebit_bytes(shape: Shape, itemsize: int) -> int:
    # A compressed step in one process: read g; read and write m, θ, the worker and the server
    # error (the server's chunk is the whole tensor on one rank); read the frozen v (float32
    # state): 10 words.
    return _numel(shape) * (itemsize + 9 * 4)


def _onebit_state(shape: Shape, itemsize: int) -> int:
    return 16 * _numel(shape)


def _basis_side(shape: Shape) -> int:
    """The side AdaDiag rotates: the smaller of a matrix's two (tensors of more dimensions are
    d0 × the rest); 0 for vectors, which take plain AdamW."""
    if len(shape) < 2:
        return 0
    rows, cols = shape[0], _numel(shape[1:])
    return min(rows, cols)


def _adadiag_bytes(shape: Shape, itemsize: int) -> int:
    # AdamW's 7 words on the rotated tensor, plus writing and reading the rotated gradient and
    # the rotated-back update, plus reading the basis twice. A lower bound: the two products
    # with the basis are compute-bound on a CPU.
    side = _basis_side(shape)
    return (7 + 4) * _numel(shape) * itemsize + 2 * side * side * 4


def _adadiag_state(shape: Shape, itemsize: int) -> int:
    side = _basis_side(shape)
    return 8 * _numel(shape) + 4 * side * side


def _adafactor_state(shape: Shape, itemsize: int) -> int:
    if len(shape) >= 2:
        rows = _numel(shape[:-1])
        cols = _numel(shape[:-2]) * shape[-1]
        return (rows + cols) * itemsize
    return _numel(shape) * itemsize


def _no_requirement(device: torch.device) -> str | None:
    return None


def triton_requirement(device: torch.device) -> str | None:
    """Why the Triton backend is not timed on ``device`` (None: it is)."""
    from optiscope.kernels.backend import triton_available

    if device.type != "cuda":
        return (f"the Triton backend is timed on CUDA only (device here: {device.type}; the "
                "Triton interpreter on CPU checks correctness, not speed)")
    return None if triton_available() else "`import triton` fails here"


@dataclass(frozen=True)
class Case:
    """One implementation of an optimizer step, one row per workload in the results.

    Attributes:
        name: identifier used by ``--cases`` and in the results (``torch-adamw-fused``).
        label: what the table shows (``torch.optim.AdamW (fused)``).
        algorithm: rows are compared with the ``torch.optim`` baselines of the same algorithm.
        build: makes the optimizer for a list of parameters (raising when it cannot run there).
        bytes_moved: bytes one step must move for a tensor of ``shape`` and ``itemsize``.
        state_bytes: bytes of optimizer state for such a tensor (for the memory plan).
        baseline: a ``torch.optim`` implementation, candidate reference for the ratio column.
        stats: call ``request_stats()`` before every step (the cost of the monitor's statistics).
        shares: step the optimizer built for that case instead of building one (same state: the
            with-statistics row times the very optimizer its plain row times).
        requires: returns why the case cannot run on a device, or None when it can.
    """

    name: str
    label: str
    algorithm: str
    build: Callable[[list[Tensor]], torch.optim.Optimizer]
    bytes_moved: Callable[[Shape, int], int]
    state_bytes: Callable[[Shape, int], int]
    baseline: bool = False
    stats: bool = False
    shares: str | None = None
    requires: Callable[[torch.device], str | None] = _no_requirement


CASES: dict[str, Case] = {}


def _register(case: Case) -> None:
    if case.name in CASES:
        raise ValueError(f"benchmark case {case.name!r} is registered twice")
    CASES[case.name] = case


def _register_optiscope(slug: str, class_name: str, algorithm: str, *,
                        bytes_moved: Callable[[Shape, int], int],
                        state_bytes: Callable[[Shape, int], int], label: str | None = None,
                        **options) -> None:
    """Registers a bundled optimizer: each backend, with and without statistics (four cases),
    built with ``options`` besides the backend."""

    def factory(backend: str) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
        def build(params: list[Tensor]) -> torch.optim.Optimizer:
            import optiscope.optimizers as bundled

            try:
                cls = getattr(bundled, class_name)
            except AttributeError:
                raise ImportError(f"cannot import name {class_name!r} from "
                                  "'optiscope.optimizers'") from None
            return cls(params, backend=backend, **options)
        return build

    def requirement(backend: str) -> Callable[[torch.device], str | None]:
        def requires(device: torch.device) -> str | None:
            try:
                import optiscope.optimizers as bundled
                getattr(bundled, class_name)
            except Exception as exc:  # ImportError, or the module failing while it is written
                return (f"`from optiscope.optimizers import {class_name}` fails here "
                        f"({type(exc).__name__}: {exc})")
            return triton_requirement(device) if backend == "triton" else None
        return requires

    for backend in ("torch", "triton"):
        plain = f"optiscope-{slug}-{backend}"
        shown = f"optiscope {label or class_name} (backend={backend})"
        common = dict(algorithm=algorithm, build=factory(backend), bytes_moved=bytes_moved,
                      state_bytes=state_bytes, requires=requirement(backend))
        _register(Case(plain, shown, **common))
        _register(Case(f"{plain}-stats", f"{shown} + stats", stats=True, shares=plain, **common))


def _torch_adamw(**variant) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
    return lambda params: torch.optim.AdamW(params, **variant)


_register(Case("torch-adamw-forloop", "torch.optim.AdamW (for-loop)", "AdamW",
               _torch_adamw(foreach=False), _adamw_bytes, _adamw_state, baseline=True))
_register(Case("torch-adamw-foreach", "torch.optim.AdamW (foreach)", "AdamW",
               _torch_adamw(foreach=True), _adamw_bytes, _adamw_state, baseline=True))
_register(Case("torch-adamw-fused", "torch.optim.AdamW (fused)", "AdamW",
               _torch_adamw(fused=True), _adamw_bytes, _adamw_state, baseline=True))
_register_optiscope("adamw", "AdamW", "AdamW", bytes_moved=_adamw_bytes, state_bytes=_adamw_state)


def _torch_adafactor(**variant) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
    return lambda params: torch.optim.Adafactor(params, **variant)


def _torch_has_adafactor(device: torch.device) -> str | None:
    return None if hasattr(torch.optim, "Adafactor") else (
        f"torch {torch.__version__} has no torch.optim.Adafactor (added in 2.5)")


# torch.optim.Adafactor (torch >= 2.5) is the same algorithm as optiscope's with its defaults
# (factored second moment, relative step min(1e-2, 1/√t) scaled by RMS(θ), update clipping at
# d = 1, no first moment) and differs in details that move no bytes: ε₁ clamps v̂ instead of
# being added to g², weight decay uses the raw lr. It is the baseline of the Adafactor rows.
_register(Case("torch-adafactor-forloop", "torch.optim.Adafactor (for-loop)", "Adafactor",
               _torch_adafactor(foreach=False), _adafactor_bytes, _adafactor_state,
               baseline=True, requires=_torch_has_adafactor))
_register(Case("torch-adafactor-foreach", "torch.optim.Adafactor (foreach)", "Adafactor",
               _torch_adafactor(foreach=True), _adafactor_bytes, _adafactor_state,
               baseline=True, requires=_torch_has_adafactor))
_register_optiscope("adafactor", "Adafactor", "Adafactor", bytes_moved=_adafactor_bytes,
                    state_bytes=_adafactor_state)
# No torch.optim MicroAdam: its floor is against our fused AdamW, on the same tensors.
_register_optiscope("microadam", "MicroAdam", "MicroAdam", bytes_moved=_microadam_bytes,
                    state_bytes=_microadam_state)
# Adam: AdamW's kernel with the L2 term in the gradient; against torch's fused Adam.
_register(Case("torch-adam-fused", "torch.optim.Adam (fused)", "Adam",
               lambda params: torch.optim.Adam(params, fused=True, weight_decay=0.01), _adamw_bytes,
               _adamw_state,
               baseline=True))
_register_optiscope("adam", "Adam", "Adam", bytes_moved=_adamw_bytes, state_bytes=_adamw_state,
                    weight_decay=0.01)
# 1-bit Adam past its freeze step (freeze_step=1: every timed step is compressed), in one
# process: the compression and error feedback without the exchange.
_register_optiscope("onebit", "OneBitAdam", "OneBitAdam", bytes_moved=_onebit_bytes,
                    state_bytes=_onebit_state, label="OneBitAdam past freeze_step",
                    freeze_step=1)
# AdaDiag between basis refreshes (the refresh, an SVD every update_proj_gap steps, is timed by
# `python -m benchmarks.adadiag`); one-sided: AdaDiag++'s embedding basis alone is 9.4 GiB.
_register_optiscope("adadiag", "AdaDiag", "AdaDiag", bytes_moved=_adadiag_bytes,
                    state_bytes=_adadiag_state)


# ============================================================================ watched by a monitor
@dataclass(frozen=True)
class WatchedOptimizer:
    """An optimizer whose step the monitor-overhead benchmark watches (`optiscope.bench.overhead`).

    Attributes:
        name: identifier in the results (``optiscope-adamw-torch``).
        label: what the table shows.
        bundled: one of optiscope's optimizers (its step computes the statistics itself).
        backend: the bundled optimizer's backend (None for a foreign optimizer).
        build: makes the optimizer for a list of parameters.
        requires: why it cannot run on a device, or None when it can.
    """

    name: str
    label: str
    bundled: bool
    backend: str | None
    build: Callable[[list[Tensor]], torch.optim.Optimizer]
    requires: Callable[[torch.device], str | None]


def _bundled(backend: str) -> WatchedOptimizer:
    def build(params: list[Tensor]) -> torch.optim.Optimizer:
        from optiscope.optimizers import AdamW

        return AdamW(params, backend=backend)

    def requires(device: torch.device) -> str | None:
        try:
            import optiscope.optimizers as bundled
            getattr(bundled, "AdamW")
        except Exception as exc:  # ImportError, or the module failing while it is written
            return (f"`from optiscope.optimizers import AdamW` fails here "
                    f"({type(exc).__name__}: {exc})")
        if backend == "triton":
            return triton_requirement(device)
        return None

    return WatchedOptimizer(f"optiscope-adamw-{backend}", f"optiscope AdamW (backend={backend})",
                            True, backend, build, requires)


def _torch_fused_works(device: torch.device) -> bool:
    try:
        p = torch.zeros(1, device=device, requires_grad=True)
        p.grad = torch.zeros(1, device=device)
        torch.optim.AdamW([p], fused=True).step()
    except (RuntimeError, ValueError):  # no fused kernel for this device
        return False
    return True


def watched_optimizers(device: torch.device) -> list[WatchedOptimizer]:
    """The optimizers whose overhead is measured on ``device``: optiscope's AdamW on each backend,
    and ``torch.optim.AdamW``, fused where torch has the kernel for the device, else foreach."""
    variant = "fused" if _torch_fused_works(device) else "foreach"
    foreign = WatchedOptimizer(
        f"torch-adamw-{variant}", f"torch.optim.AdamW ({variant})", False, None,
        lambda params: torch.optim.AdamW(params, **{variant: True}), lambda device: None)
    return [_bundled("torch"), _bundled("triton"), foreign]


# ============================================================================ workloads
@dataclass(frozen=True)
class Workload:
    """Tensors one optimizer updates: ``shapes`` of the parameters, all of one dtype."""

    name: str
    description: str
    shapes: tuple[Shape, ...]

    @property
    def params(self) -> int:
        return sum(_numel(s) for s in self.shapes)


def single_tensor(n: int) -> Workload:
    """One 1-D tensor of ``n`` parameters."""
    return Workload(f"1 tensor of {format_count(n)}", f"one tensor of shape ({n},)", ((n,),))


def gpt2_shapes(n_layer: int = 12, d_model: int = 768, vocab: int = 50257,
                n_ctx: int = 1024) -> tuple[Shape, ...]:
    """Parameter shapes of GPT-2 (Radford et al., 2019) in ``named_parameters()`` order, with the
    Conv1D weights stored (in, out). The defaults are GPT-2 small: 148 tensors, 124,439,808
    parameters."""
    d = d_model
    block = ((d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,),      # ln_1, attn.c_attn, attn.c_proj
             (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,))  # ln_2, mlp.c_fc, mlp.c_proj
    return ((vocab, d), (n_ctx, d)) + block * n_layer + ((d,), (d,))


MODELS: dict[str, Workload] = {
    "gpt2-small": Workload("GPT-2 small: 148 tensors, 124.4M",
                           "GPT-2 small's parameter shapes (d_model=768, 12 blocks, vocab 50257, "
                           "n_ctx 1024)", gpt2_shapes()),
    # Same 12-block structure (148 tensors), tiny dimensions: for --quick and the tests.
    "gpt2-tiny": Workload("GPT-2 tiny: 148 tensors, 44k",
                          "GPT-2's 148 tensors at d_model=16, vocab=256, n_ctx=32",
                          gpt2_shapes(d_model=16, vocab=256, n_ctx=32)),
}


def format_count(n: int) -> str:
    """10**6 -> '1e6', 4097 -> '4,097'."""
    if n >= 1000 and n == 10 ** round(math.log10(n)):
        return f"1e{round(math.log10(n))}"
    return f"{n:,}"
