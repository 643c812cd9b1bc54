"""Optimizer-state memory of real model shapes, counted from the tensors the optimizers allocate.

Each model's parameters are created on the ``meta`` device (shapes and dtypes, no storage, no
download), and each optimizer allocates its state for them through the same `_init_state` its
first `step` calls, so the count is of the tensors the optimizer really creates — not a formula.
`tests/test_bench_memory.py` checks, at small scale, that this equals the state a real step
leaves behind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from optiscope.bench.cases import format_count, gpt2_shapes
from optiscope.contract import capabilities

__all__ = ["MemoryModel", "MemoryOptimizer", "MEMORY_MODELS", "MEMORY_OPTIMIZERS", "llama_shapes",
           "state_bytes", "memory_table"]

Shape = tuple[int, ...]


def llama_shapes(d_model: int, n_layer: int, d_ff: int, vocab: int = 32000) -> tuple[Shape, ...]:
    """Parameter shapes of a Llama-style decoder (Touvron et al., 2023) in ``named_parameters()``
    order: token embedding; per block RMSNorm, q/k/v/o projections without bias, RMSNorm, SwiGLU
    gate/up/down; final RMSNorm; an untied output head."""
    d = d_model
    block = ((d,), (d, d), (d, d), (d, d), (d, d), (d,), (d_ff, d), (d_ff, d), (d, d_ff))
    return ((vocab, d),) + block * n_layer + ((d,), (vocab, d))


@dataclass(frozen=True)
class MemoryModel:
    """A model's parameter shapes and how to describe it."""

    slug: str
    title: str
    shapes: tuple[Shape, ...]

    @property
    def params(self) -> int:
        return sum(_numel(s) for s in self.shapes)


@dataclass(frozen=True)
class MemoryOptimizer:
    """An optimizer to count: a factory over a parameter list, in a parameter dtype."""

    slug: str
    title: str
    dtype: torch.dtype
    build: Callable[[list[Tensor]], torch.optim.Optimizer]
    steps: int = 1  # steps to its steady state (1-bit Adam allocates its error buffers later)


MEMORY_MODELS: dict[str, MemoryModel] = {
    "gpt2-small": MemoryModel("gpt2-small", "GPT-2 small", gpt2_shapes()),
    "llama-1.3b": MemoryModel("llama-1.3b", "Llama-style 1.3B (d 2048, 24 blocks, d_ff 5504)",
                              llama_shapes(2048, 24, 5504)),
    "llama-7b": MemoryModel("llama-7b", "Llama-style 7B (d 4096, 32 blocks, d_ff 11008)",
                            llama_shapes(4096, 32, 11008)),
}


def _optimizers() -> dict[str, MemoryOptimizer]:
    from optiscope.optimizers import AdaDiag, Adafactor, AdafacDiag, AdamW, MicroAdam, OneBitAdam

    return {o.slug: o for o in (
        MemoryOptimizer("adamw-fp32", "AdamW, fp32 parameters and states", torch.float32,
                        lambda ps: AdamW(ps, backend="torch")),
        MemoryOptimizer("adamw-bf16", "AdamW, bf16 parameters and states", torch.bfloat16,
                        lambda ps: AdamW(ps, backend="torch")),
        MemoryOptimizer("adafactor", "Adafactor (no beta1; float32 factors)", torch.float32,
                        lambda ps: Adafactor(ps, backend="torch")),
        MemoryOptimizer("microadam", "MicroAdam (m=10, k_init=1%, default blocks)", torch.bfloat16,
                        lambda ps: MicroAdam(ps, lr=1e-4, m=10, k_init=0.01, backend="torch")),
        MemoryOptimizer("onebit-adam", "1-bit Adam after its freeze step, one process (the "
                        "server error is 4/W B/param over W ranks)", torch.float32,
                        lambda ps: OneBitAdam(ps, freeze_step=1, backend="torch"), steps=2),
        MemoryOptimizer("adadiag", "AdaDiag (one-sided; float32 moments and basis)",
                        torch.float32, lambda ps: AdaDiag(ps, backend="torch")),
        MemoryOptimizer("adadiag++", "AdaDiag++ (two-sided; float32 moments and bases)",
                        torch.float32, lambda ps: AdaDiag(ps, two_sided=True, backend="torch")),
        MemoryOptimizer("adafacdiag", "AdafacDiag (one-sided, no beta1; float32 factors, basis)",
                        torch.float32, lambda ps: AdafacDiag(ps, backend="torch")),
    )}


MEMORY_OPTIMIZERS = _optimizers


def _numel(shape: Shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def state_bytes(optimizer: MemoryOptimizer, shapes: tuple[Shape, ...], *,
                device: str | torch.device = "meta") -> tuple[int, dict[str, int]]:
    """Bytes of the state ``optimizer`` allocates for parameters of ``shapes``: total and per
    state key (storages counted once, plus the optimizer's shared buffers under ``"shared"``)."""
    params = [torch.nn.Parameter(torch.empty(s, device=device, dtype=optimizer.dtype))
              for s in shapes]
    opt = optimizer.build(params)
    per_key: dict[str, int] = {}
    seen: set[int] = set()
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state[p]
            if not state:
                opt._init_state(state, p, group)
            for _ in range(optimizer.steps - 1):  # what later steps allocate
                state["step"] += 1
                opt._init_state(state, p, group)
            for key, value in state.items():
                if not isinstance(value, Tensor) or id(value) in seen:
                    continue
                seen.add(id(value))
                per_key[key] = per_key.get(key, 0) + value.numel() * value.element_size()
    shared = capabilities(opt).shared_state_bytes
    if shared is not None and shared():
        per_key["shared"] = int(shared())
    return sum(per_key.values()), per_key


def memory_table(models=None, optimizers=None) -> list[dict]:
    """One row per (model, optimizer): parameters, state bytes, bytes per parameter, per key."""
    models = models or list(MEMORY_MODELS.values())
    optimizers = optimizers or list(MEMORY_OPTIMIZERS().values())
    rows = []
    for model in models:
        for opt in optimizers:
            total, per_key = state_bytes(opt, model.shapes)
            rows.append(dict(model=model.slug, model_title=model.title, params=model.params,
                             params_text=format_count(model.params), tensors=len(model.shapes),
                             optimizer=opt.slug, optimizer_title=opt.title,
                             param_dtype=str(opt.dtype).removeprefix("torch."),
                             state_bytes=total, bytes_per_param=total / model.params,
                             per_key=per_key))
    return rows
