"""MicroAdam (Modoranu, Safaryan, Malinovsky, Kurtic, Robert, Richtárik, Alistarh, NeurIPS 2024,
"MicroAdam: Accurate Adaptive Optimization with Low Space Overhead and Provable Convergence",
arXiv 2405.15593).

Adam's moments are re-estimated at every step from a window of the last m sparse gradients: the
block-wise top-k of the error-corrected gradient. What top-k leaves out is carried to the next
step as error feedback quantized to 4 bits. With m = 10 and 1% density the whole state is about
0.9 bytes per parameter, against 8 for fp32 AdamW.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from optiscope.contract import MomentLayout, Stat, StatsRows
from optiscope.kernels import cpu
from optiscope.kernels.backend import resolve_backend
from optiscope.kernels.blocks import Blocks, blocks
from optiscope.kernels.launch import launch_groups, local
from optiscope.kernels.ranges import store_levels
from optiscope.kernels.stats import torch_grad_stats
from optiscope.kernels.whole_ranges import whole_counts
from optiscope.optimizers._base import (OptiscopeOptimizer, check_adam_hyperparameters,
                                         check_range)

__all__ = ["MicroAdam", "microadam", "TOPK_BLOCK_SIZE", "QUANT_BLOCK_SIZE", "Blocks", "blocks",
           "quantize", "dequantize", "select_topk", "window_sums", "window_weights",
           "bias_factors"]

# Top-k block: 4096 entries. A power of two (the Triton kernel holds one block in registers) and
# at most 2^15, so block-relative indices fit int16. k = ceil(0.01 · 4096) = 41 per block, 0.1%
# above 1% of the block: the window costs 10 · 41 · (2 + 2) / 4096 = 0.4004 bytes per parameter.
TOPK_BLOCK_SIZE = 4096
# Quantization bucket: 4096 entries, one per top-k block; its bf16 min and max cost 4 / 4096 =
# 0.001 bytes per parameter. The global quant_error at step 20 of the demo's 669k-parameter model
# (`python -m benchmarks.microadam_buckets`: lr 1e-3, m=10, 1% density) was 0.056 at 64, 0.067 at
# 256, 0.080 at 1024 and 0.084 at 4096, for 0.964, 0.917, 0.905 and 0.903 bytes of state per
# parameter: after top-k has removed a block's largest entries, its residual is bounded by the
# block's k-th largest |a|, so smaller buckets narrow the range little, and 64 (the reference's
# LLaMA setting) buys a third of the error for 0.06 bytes, 7% more state.
QUANT_BLOCK_SIZE = 4096

# The state keys and dtypes, kept through `MicroAdam.load_state_dict`.
_STATE_DTYPES = {"error": torch.uint8, "min_vals": torch.bfloat16, "max_vals": torch.bfloat16,
                 "I": torch.int16, "V": torch.bfloat16}
_LEVELS = 15  # 4-bit codes 0..15


class MicroAdam(OptiscopeOptimizer):
    r"""MicroAdam: Adam over a window of the last m block-wise top-k sparse gradients, with 4-bit
    quantized error feedback.

    Per step t (the optimizer's global step count) and parameter tensor, flattened to d entries:

    .. math::
        a &= g_t + Q^{-1}(e_t) &&\text{error-corrected gradient, float32} \\
        (I_t, V_t) &= \mathrm{TopK}_B(|a|) &&\text{per block of } B
            \text{ entries, } k_b = \lceil k_{init} \cdot |b| \rceil \text{ kept} \\
        e_{t+1} &= Q(a - a[I_t]) &&\text{the residual, 4 bits per entry} \\
        \theta &\leftarrow \theta (1 - \eta\lambda) \\
        \hat m_t &= \frac{1-\beta_1}{1-\beta_1^t} \sum_{i=0}^{m-1} \beta_1^{i}\, V_{t-i},\qquad
        \hat v_t = \frac{1-\beta_2}{1-\beta_2^t} \sum_{i=0}^{m-1} \beta_2^{i}\, V_{t-i}^2 \\
        \theta &\leftarrow \theta - \eta\, \hat m_t / (\sqrt{\hat v_t} + \epsilon)

    V_{t−i} is the sparse gradient of step t − i, scattered to its coordinates (zero elsewhere),
    so the update is zero outside the window's coordinates. Q is an asymmetric 4-bit quantizer
    per bucket of ``quant_block_size`` entries: with δ, Δ the bucket's min and max (stored
    bf16) and u = (Δ − δ)/15, the code of x is ⌊(x − δ)/u + ½⌋ clamped to [0, 15] (0 when
    u = 0), and it decodes to code·u + δ; two codes per byte, even entries in the high nibble.
    This is the reference implementation's order (ISTA-DASLab-Optimizers' ``MicroAdam``): the
    bias correction uses the full step t, not min(t, m), and includes the (1 − β) factors, and
    ε is added to the root.

    The step counter t is global, as in the reference: it counts `step` calls, and a tensor
    first stepped at t = 100 starts with the bias correction of t = 100. The window holds the
    sparse gradients of the last m optimizer steps, entry t written into row (t − 1) mod m of
    the ring buffer and weighted by β^((t − 1 − row) mod m); a step at which a tensor had no
    gradient contributes nothing to its window (its row is cleared), so that the exponents stay
    the ages of the entries.

    Where it departs from the reference implementation, on purpose:

    * The accumulator a is float32 whatever the parameter's dtype (the reference needs bf16
      gradients and accumulates in bf16), so float32, bfloat16 and float16 parameters work; θ
      is updated in float32 and rounded once to its dtype.
    * Quantization codes are clamped to [0, 15] and a bucket with Δ = δ stores code 0: with a
      float32 accumulator and bf16 δ/Δ the unclamped code could reach 16 and overflow into the
      neighbouring nibble, and u = 0 would give NaN.
    * ``p.grad`` is left as the gradient (the reference overwrites it with the update).
    * Top-k breaks ties deterministically: the larger |a| first, then the lower index, and each
      block's entries are stored in index order, so both backends keep the same entries.
    * State is allocated on each parameter's own device.
    * Quantization buckets nest in top-k blocks (``quant_block_size`` divides
      ``topk_block_size``), which lets the Triton kernel keep a block's accumulator in
      registers from dequantization to requantization.

    State, per parameter tensor of d entries, with n_b = ⌈d/B⌉ top-k blocks and k the kept
    entries per step (Σ k_b): ``step`` (float32 0-d CPU tensor, the global t of the tensor's
    latest step), ``error`` (uint8, ⌈d/2⌉: the packed 4-bit codes), ``min_vals`` and
    ``max_vals`` (bf16, ⌈d/quant_block_size⌉), ``I`` (int16, m × k: block-relative indices)
    and ``V`` (bf16, m × k: the kept signed values). That is d/2 + 4·m·k + 4·d/quant_block_size
    bytes: 0.9014 bytes per parameter at the defaults (m = 10, k_init = 0.01, 4096-entry blocks
    and buckets), plus less than 2 bytes per block for rounding k_b up.

    Statistics (``request_stats``): besides the gradient, parameter and update sums,
    ``QUANT_ERROR_SQ``/``QUANT_INPUT_SQ`` are ‖r − Q⁻¹(Q(r))‖² and ‖r‖² of the residual r the
    error feedback stores, ``TOPK_KEPT_SQ``/``TOPK_TOTAL_SQ`` the squared mass of a that top-k
    keeps and all of it, and ``MOMENT1_SQ``/``MOMENT2_SQ`` are ‖m̂_t‖² and ‖v̂_t‖² of the
    bias-corrected window estimates above. `moment2_at` gives the monitor v̂_t at sampled
    coordinates for ``moment2_drift``.

    Args:
        params: parameters or parameter groups (dicts), as for any torch optimizer.
        lr: learning rate η (default 1e-3).
        betas: decay rates β1, β2 of the window's moment estimates (default (0.9, 0.999)).
        eps: ε, added to √v̂ (default 1e-8).
        weight_decay: λ, decoupled: θ(1 − ηλ) before the update (default 0.0).
        m: length of the window of sparse gradients (default 10).
        k_init: density of the top-k, in (0, 1]: k_b = ⌈k_init · |b|⌉ per block (default 0.01).
        quant_block_size: entries per quantization bucket: an even divisor of
            ``topk_block_size`` (default `QUANT_BLOCK_SIZE`, 4096).
        topk_block_size: entries per top-k block: a power of two from 2 to 32768, so that
            block-relative indices fit int16 (default `TOPK_BLOCK_SIZE`, 4096).
        backend: ``"auto"`` (Triton on CUDA when importable, else torch), ``"triton"`` or
            ``"torch"`` (default ``"auto"``). The Triton backend runs one launch per launch group of
            tensors with equal dtypes and computes the statistics in it. The dynamic-range
            counts (`request_ranges`) are in the pass of the Triton kernel and of the C kernel
            (float32 CPU tensors); the torch ops (other dtypes, no compiler) count by an extra
            pass.

    ``m``, ``k_init`` and the block sizes fix the shape of a tensor's state at its first step;
    changing them in a group afterwards raises.
    """

    stat_columns: ClassVar[frozenset[Stat]] = frozenset(Stat(i) for i in range(12))
    roles: ClassVar[tuple[str, ...]] = ("errors", "min_vals", "max_vals", "indices", "values",
                                        "steps")
    state_layouts: ClassVar[tuple[MomentLayout, ...]] = (
        MomentLayout("microadam (v̂ re-estimated from the window of sparse gradients)",
                     requires=("I", "V"), v_computed=True),)

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, m: int = 10,
                 k_init: float = 0.01, quant_block_size: int = QUANT_BLOCK_SIZE,
                 topk_block_size: int = TOPK_BLOCK_SIZE, *, backend: str = "auto"):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, m=m,
                        k_init=k_init, quant_block_size=quant_block_size,
                        topk_block_size=topk_block_size)
        self.global_step = 0  # t: `step` calls so far
        super().__init__(params, defaults, backend=backend)

    def _validate_group(self, group: dict[str, Any]) -> None:
        owner = type(self).__name__
        check_adam_hyperparameters(owner, group)
        m = group["m"]
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"{owner}: m (the window length) must be an int >= 1, got {m!r}")
        k_init = group["k_init"]
        check_range(owner, "k_init", k_init, -math.inf)  # a number, not NaN
        if not 0 < k_init <= 1:
            raise ValueError(f"{owner}: k_init must be in (0, 1], got {k_init}")
        block = group["topk_block_size"]
        if (isinstance(block, bool) or not isinstance(block, int) or not 2 <= block <= 32768
                or block & (block - 1)):
            raise ValueError(f"{owner}: topk_block_size must be a power of two from 2 to 32768 "
                             f"(block-relative indices are int16), got {block!r}; pass e.g. "
                             f"{TOPK_BLOCK_SIZE}")
        bucket = group["quant_block_size"]
        if (isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 2
                or bucket % 2):
            raise ValueError(f"{owner}: quant_block_size must be an even int >= 2 (two 4-bit "
                             f"codes per byte), got {bucket!r}")
        if block % bucket:
            raise ValueError(f"{owner}: quant_block_size must divide topk_block_size ({block}) "
                             f"so that each top-k block holds whole quantization buckets, got "
                             f"{bucket}; pass a power of two up to {block}, e.g. "
                             f"{min(block, QUANT_BLOCK_SIZE)}")

    def _init_state(self, state: dict, p: Tensor, group: dict[str, Any]) -> None:
        d = local(p).numel()
        layout = blocks(d, group["topk_block_size"], group["k_init"])
        shape = (group["m"], layout.k)
        if state:
            if tuple(state["I"].shape) != shape or state["min_vals"].numel() != -(
                    -d // group["quant_block_size"]):
                raise ValueError(
                    f"{type(self).__name__}: the state of a tensor of {d} entries has "
                    f"I {tuple(state['I'].shape)} and {state['min_vals'].numel()} buckets, but "
                    f"the group's m, k_init, topk_block_size and quant_block_size now call for "
                    f"I {shape}; these fix the state at a tensor's first step, so restore them "
                    "(or start a new optimizer)")
            return
        device = p.device
        n_buckets = -(-d // group["quant_block_size"])
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["error"] = torch.zeros(-(-d // 2), dtype=torch.uint8, device=device)
        state["min_vals"] = torch.zeros(n_buckets, dtype=torch.bfloat16, device=device)
        state["max_vals"] = torch.zeros(n_buckets, dtype=torch.bfloat16, device=device)
        state["I"] = torch.zeros(shape, dtype=torch.int16, device=device)
        state["V"] = torch.zeros(shape, dtype=torch.bfloat16, device=device)

    def _state_tensors(self, state: dict, group: dict[str, Any]) -> dict[str, Any]:
        return dict(errors=state["error"], min_vals=state["min_vals"],
                    max_vals=state["max_vals"], indices=state["I"], values=state["V"],
                    steps=state["step"])

    @torch.no_grad()
    def step(self, closure=None):
        """Performs one optimization step (t advances even when no tensor has a gradient).

        Args:
            closure: re-evaluates the model and returns the loss (default None).
        """
        self.global_step += 1
        return super().step(closure)

    def _step_group(self, group: dict[str, Any], t: dict[str, list],
                    stats: StatsRows | None) -> None:
        beta1, beta2 = group["betas"]
        microadam(t["params"], t["grads"], t["errors"], t["min_vals"], t["max_vals"],
                  t["indices"], t["values"], t["steps"], step=self.global_step, lr=group["lr"],
                  beta1=beta1, beta2=beta2, eps=group["eps"],
                  weight_decay=group["weight_decay"], k_init=group["k_init"],
                  quant_block_size=group["quant_block_size"],
                  topk_block_size=group["topk_block_size"], backend=self.backend, stats=stats)

    # ----------------------------------------------------------------------------- the monitor
    @torch.no_grad()
    def moment2_at(self, param: Tensor, index: Tensor | None = None) -> Tensor:
        """v̂ of ``param``'s latest step at flat coordinates ``index``, as float32.

        MicroAdam stores no second moment; this re-estimates it from the window as the step
        did (bias-corrected), for the monitor's ``moment2_drift``.

        Args:
            param: a parameter this optimizer has stepped.
            index: flat (row-major) coordinates, or None for all of them.
        """
        group = next(g for g in self.param_groups if any(p is param for p in g["params"]))
        state = self.state[param]
        t = int(state["step"].item())
        d = local(param).numel()
        indices, values = local(state["I"]), local(state["V"])
        w1, w2 = window_weights(t, indices.shape[0], *group["betas"])
        layout = blocks(d, group["topk_block_size"], group["k_init"])
        c2 = bias_factors(t, *group["betas"])[1]
        if index is not None and indices.device.type == "cpu" and cpu.kernel() is not None:
            index = index.long()
            ordered = bool((index[1:] >= index[:-1]).all())  # the monitor's samples are sorted
            order = None if ordered else torch.argsort(index)
            v = cpu.microadam_v_at(indices, values.view(torch.int16), block=layout.size,
                                   n_full=layout.n_full, k_full=layout.k_full, tail=layout.tail,
                                   k_tail=layout.k_tail, w2=w2, c2=c2,
                                   index=index if ordered else index[order])
            return v if ordered else torch.empty_like(v).index_copy_(0, order, v)
        _, s2 = window_sums(indices, values, layout.column_starts(indices.device), w1, w2, d)
        v = s2 * c2
        return v if index is None else torch.index_select(v, 0, index.long())

    # ----------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The torch state dict, plus ``"global_step"``: t, for resuming the bias correction."""
        out = super().state_dict()
        out["global_step"] = self.global_step
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state dict, keeping every state tensor in its own dtype.

        `torch.optim.Optimizer.load_state_dict` casts floating-point state to the parameter's
        dtype, which would turn the bf16 window and bucket bounds of a float32 parameter into
        float32 (twice the bytes); the saved tensors are reloaded in their dtypes here, int16
        indices included. Without ``"global_step"`` (a state dict rebuilt by other tools), t
        resumes from the latest step of any tensor.

        Args:
            state_dict: as returned by `state_dict`.
        """
        super().load_state_dict(state_dict)
        for p, key, value in self._saved_state(state_dict):
            if key not in _STATE_DTYPES:
                continue
            if key == "I" and value.is_floating_point():
                raise ValueError(
                    f"{type(self).__name__}: the saved top-k indices 'I' are {value.dtype}, "
                    "not int16: something cast the state dict, and block-relative indices "
                    "above 256 do not survive a cast to bf16; save the optimizer's "
                    "state_dict() without casting its tensors")
            self.state[p][key] = value.to(device=p.device, dtype=_STATE_DTYPES[key])
        steps = [int(s["step"].item()) for s in self.state.values() if "step" in s]
        self.global_step = int(state_dict.get("global_step", max(steps, default=0)))


def window_weights(step: int, m: int, beta1: float, beta2: float) -> tuple[Tensor, Tensor]:
    """float32 ``[m]`` weights β^age of the window's rows at global step ``step``: row r holds the
    sparse gradient of age (step − 1 − r) mod m."""
    ages = [(step - 1 - r) % m for r in range(m)]
    return (torch.tensor([beta1 ** a for a in ages], dtype=torch.float32),
            torch.tensor([beta2 ** a for a in ages], dtype=torch.float32))


def bias_factors(step: int, beta1: float, beta2: float) -> tuple[float, float]:
    """(1 − β1)/(1 − β1^t) and (1 − β2)/(1 − β2^t): the reference's bias correction."""
    return (1.0 - beta1) / (1.0 - beta1 ** step), (1.0 - beta2) / (1.0 - beta2 ** step)


def window_sums(indices: Tensor, values: Tensor, column_starts: Tensor, w1: Tensor, w2: Tensor,
                numel: int) -> tuple[Tensor, Tensor]:
    """S1 = Σ_r w1[r]·V[r] and S2 = Σ_r w2[r]·V[r]² scattered to the tensor's coordinates,
    float32 ``[numel]``, added row by row in row order (the Triton kernel's order)."""
    where = column_starts[None, :] + indices.long()
    v = values.float()
    w1, w2 = w1.to(v.device), w2.to(v.device)
    s1 = torch.zeros(numel, dtype=torch.float32, device=v.device)
    s2 = torch.zeros(numel, dtype=torch.float32, device=v.device)
    for r in range(indices.shape[0]):  # a row's indices are distinct: one addition per entry
        s1.index_add_(0, where[r], v[r] * w1[r])
        s2.index_add_(0, where[r], v[r].square() * w2[r])
    return s1, s2


def clear_skipped_rows(values: Tensor, last: int, step: int) -> None:
    """Zeroes the window rows of the steps in (last, step) that a tensor missed (rows written
    before would otherwise be read with the wrong age); the row of ``step`` is written anew."""
    m = values.shape[0]
    if last == 0 or step - last <= 1:
        return
    rows = sorted({(s - 1) % m for s in range(max(last + 1, step - m + 1), step)})
    values[rows] = 0


def microadam(params: list[Tensor], grads: list[Tensor], errors: list[Tensor],
              min_vals: list[Tensor], max_vals: list[Tensor], indices: list[Tensor],
              values: list[Tensor], state_steps: list[Tensor], *, step: int, lr: float,
              beta1: float, beta2: float, eps: float, weight_decay: float, k_init: float,
              quant_block_size: int, topk_block_size: int, backend: str = "auto",
              stats: StatsRows | None = None) -> None:
    """Functional MicroAdam over tensors on one device: updates parameters and state in place
    and sets ``state_steps`` to ``step``.

    Args:
        params, grads: one entry per parameter; gradients are read, not modified.
        errors, min_vals, max_vals: the 4-bit error feedback and its buckets' bounds.
        indices, values: the window ``I`` (int16) and ``V`` (bf16), m × k each.
        state_steps: float32 0-d CPU tensors, the global step of each tensor's latest update.
        step: t, the optimizer's global step count including this step.
        lr, beta1, beta2, eps, weight_decay, k_init, quant_block_size, topk_block_size:
            hyperparameters, as in `MicroAdam`.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (default ``"auto"``).
        stats: where to write statistics rows (`MicroAdam.stat_columns`), or None.
    """
    params, grads, errors, min_vals, max_vals, indices, values = (
        [local(t) for t in ts] for ts in (params, grads, errors, min_vals, max_vals, indices,
                                          values))
    for v, s in zip(values, state_steps):
        clear_skipped_rows(v, int(s.item()), step)
        s.fill_(step)
    impl = {"triton": _microadam_triton, "torch": _microadam_torch}[
        resolve_backend(backend, params[0].device, "MicroAdam")]
    impl(params, grads, errors, min_vals, max_vals, indices, values, step=step, lr=lr,
         beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, k_init=k_init,
         quant_block_size=quant_block_size, topk_block_size=topk_block_size, stats=stats)


def _microadam_triton(params, grads, errors, min_vals, max_vals, indices, values, *, step, lr,
                      beta1, beta2, eps, weight_decay, k_init, quant_block_size, topk_block_size,
                      stats):
    from optiscope.kernels.microadam import microadam_step

    c1, c2 = bias_factors(step, beta1, beta2)
    w1, w2 = window_weights(step, indices[0].shape[0], beta1, beta2)
    for _, idx in launch_groups([(p.dtype, g.dtype) for p, g in zip(params, grads)]).items():
        microadam_step(
            [params[i] for i in idx], [grads[i] for i in idx], [errors[i] for i in idx],
            [min_vals[i] for i in idx], [max_vals[i] for i in idx], [indices[i] for i in idx],
            [values[i] for i in idx], slot=(step - 1) % indices[0].shape[0], w1=w1, w2=w2,
            c1=c1, c2=c2, lr=lr, eps=eps, weight_decay=weight_decay, k_init=k_init,
            quant_block_size=quant_block_size, topk_block_size=topk_block_size,
            stats=stats.subset(idx) if stats is not None else None)


def _microadam_torch(params, grads, errors, min_vals, max_vals, indices, values, *, step, lr,
                     beta1, beta2, eps, weight_decay, k_init, quant_block_size, topk_block_size,
                     stats):
    c1, c2 = bias_factors(step, beta1, beta2)
    w1, w2 = window_weights(step, indices[0].shape[0], beta1, beta2)
    slot = (step - 1) % indices[0].shape[0]
    rows: list[Tensor | None] = []  # per tensor: the 12 sums of cpu.MICROADAM_STATS' order
    by_ops = []  # the tensors the torch ops stepped: their gradient sums are taken together
    # the range counts (`request_ranges`): the C kernel's in its pass, into `counters`; the
    # torch ops' by an extra pass over g, θ⁺ − θ⁻ and v̂ (`whole_counts`), into `counted`
    counters = (cpu.range_buffer(len(params))
                if stats is not None and stats.ranges is not None else None)
    in_pass, counted = [], {}
    for i, p in enumerate(params):
        d = p.numel()
        if d == 0:  # nothing to select or update; its statistics row is zeros
            rows.append(torch.zeros(cpu.MICROADAM_STATS, dtype=torch.float64, device=p.device))
            if counters is not None:  # its counts stay zero: nothing to count
                in_pass.append(i)
            continue
        layout = blocks(d, topk_block_size, k_init)
        if _c_kernel_applies(p, grads[i]):
            rows.append(cpu.microadam_f32(
                p, grads[i], errors[i], min_vals[i], max_vals[i], indices[i], values[i],
                block=layout.size, n_full=layout.n_full, k_full=layout.k_full,
                tail=layout.tail, k_tail=layout.k_tail, slot=slot,
                quant_block_size=quant_block_size, w1=w1, w2=w2, c1=c1, c2=c2, lr=lr,
                weight_decay=weight_decay, eps=eps, stats=stats is not None,
                ranges=counters[i] if counters is not None else None))
            if counters is not None:
                in_pass.append(i)
            continue
        rows.append(_microadam_ops(p, grads[i], errors[i], min_vals[i], max_vals[i], indices[i],
                                   values[i], layout, slot=slot, w1=w1, w2=w2, c1=c1, c2=c2,
                                   lr=lr, weight_decay=weight_decay, eps=eps,
                                   quant_block_size=quant_block_size, stats=stats is not None,
                                   ranges=counted.setdefault(i, []) if counters is not None
                                   else None))
        by_ops.append(i)
    if stats is None:
        return
    if in_pass:
        store_levels(stats.ranges, torch.tensor([stats.rows[i] for i in in_pass]),
                     torch.from_numpy(counters[in_pass].astype("int64")))
    for i, counts in counted.items():
        stats.ranges[stats.rows[i]] = counts[0].to(stats.ranges.device)
    device = params[0].device
    if by_ops:  # Σg², max |g|, the non-finite count of the tensors stepped by torch ops
        grad = torch_grad_stats([grads[i].reshape(-1) for i in by_ops])
        for k, i in enumerate(by_ops):
            rows[i] = torch.cat([torch.stack([grad[s][k] for s in (
                Stat.GRAD_SQ, Stat.GRAD_ABSMAX, Stat.GRAD_NONFINITE)]).to(device, torch.float64),
                rows[i].to(device, torch.float64)])
    table = torch.stack([r.to(device, torch.float64) for r in rows]).float()
    table[:, 1] = torch.where(table[:, 2] > 0, float("inf"), table[:, 1])
    stats.write({stat: table[:, k] for k, stat in enumerate(_C_STATS)})


# The columns of a statistics row of the step, in the order of cpu_microadam.c.
_C_STATS = (Stat.GRAD_SQ, Stat.GRAD_ABSMAX, Stat.GRAD_NONFINITE, Stat.PARAM_SQ_BEFORE,
            Stat.PARAM_SQ_AFTER, Stat.UPDATE_SQ, Stat.MOMENT1_SQ, Stat.MOMENT2_SQ,
            Stat.QUANT_ERROR_SQ, Stat.QUANT_INPUT_SQ, Stat.TOPK_KEPT_SQ, Stat.TOPK_TOTAL_SQ)


def _c_kernel_applies(p: Tensor, g: Tensor) -> bool:
    """optiscope's C step takes contiguous float32 CPU tensors, when it compiled here (it relies
    on what `MicroAdam` validates: even block and bucket sizes, so a byte of 4-bit codes never
    spans two blocks)."""
    return (p.device.type == "cpu" and p.dtype == torch.float32 and g.dtype == torch.float32
            and p.is_contiguous() and g.is_contiguous() and not g.is_sparse
            and cpu.kernel() is not None)


def _microadam_ops(p, g, error, min_vals, max_vals, indices, values, layout, *, slot, w1, w2, c1,
                   c2, lr, weight_decay, eps, quant_block_size, stats,
                   ranges: list | None = None) -> Tensor | None:
    """One tensor's step by torch ops (any dtype, layout and device); with ``stats``, its 9 sums
    after the gradient's (`_C_STATS` from PARAM_SQ_BEFORE on), float64, and with ``ranges`` (a
    list) too, the range counts of g, θ⁺ − θ⁻ and v̂ appended to it: float64 ``[3,
    RANGE_BLOCK]``, an extra pass over the three (`whole_counts`)."""
    d = p.numel()
    g = g.reshape(-1).float()
    # 1. error feedback: a = g + Q⁻¹(e_t)
    a = g + dequantize(error, min_vals, max_vals, d, quant_block_size)
    # 2.-4. block-wise top-k into row `slot` of the window, then a ← a − a[I]
    where = select_topk(a, layout)
    indices[slot] = (where - layout.column_starts(a.device)).to(torch.int16)
    values[slot] = a[where].to(torch.bfloat16)
    kept = a[where]
    total_sq = a.square().sum()
    a[where] = 0
    # 5.-6. the residual, quantized, is the next error feedback
    codes, lo, hi, decoded = quantize(a, quant_block_size)
    error.copy_(codes)
    min_vals.copy_(lo)
    max_vals.copy_(hi)
    # 7.-9. decoupled weight decay, then the update from the window
    s1, s2 = window_sums(indices, values, layout.column_starts(a.device), w1, w2, d)
    m_hat, v_hat = c1 * s1, c2 * s2
    # √ through float64: torch's float32 CPU sqrt is not correctly rounded (√0.0096468087
    # lands one ulp above), the Triton kernel's sqrt_rn is. Where S1 = 0 (a coordinate
    # outside the window) u = 0, also when eps = 0.
    root = v_hat.double().sqrt().float()
    u = torch.where(s1 == 0, 0.0, m_hat / (root + eps))
    flat = p.view(-1) if p.is_contiguous() else p.reshape(-1)
    theta = flat.float()
    before = theta.clone() if stats else None
    if weight_decay != 0:
        theta = theta * (1.0 - lr * weight_decay)
    theta = theta - lr * u
    if p.is_contiguous():
        flat.copy_(theta)
    else:
        p.copy_(theta.view(p.shape))
    if not stats:
        return None
    after = p.reshape(-1).float()
    if ranges is not None:
        ranges.append(whole_counts([g, after - before, v_hat]))
    return torch.stack([
        before.square().sum(), after.square().sum(), (after - before).square().sum(),
        m_hat.square().sum(), v_hat.square().sum(), (a - decoded).square().sum(),
        a.square().sum(), kept.square().sum(), total_sq]).double()


def select_topk(a: Tensor, layout: Blocks) -> Tensor:
    """Flat indices of the block-wise top-k of |a| (int64 ``[k]``), each block's in index order.

    Ties go to the lower index: top-k runs on the int64 key bits(|a|)·B + (B − 1 − j), j the
    block-relative index, which orders like |a| for non-negative floats and has no ties.
    """
    size = layout.size
    key = a.abs().view(torch.int32).long() * size
    picked = []
    if layout.n_full:
        full = key[: layout.n_full * size].view(layout.n_full, size)
        full = full + torch.arange(size - 1, -1, -1, device=a.device)
        chosen = full.topk(layout.k_full, dim=1, sorted=False).indices.sort(dim=1).values
        starts = torch.arange(layout.n_full, device=a.device)[:, None] * size
        picked.append((chosen + starts).reshape(-1))
    if layout.tail:
        tail = key[layout.n_full * size:] + torch.arange(size - 1, size - 1 - layout.tail, -1,
                                                         device=a.device)
        chosen = tail.topk(layout.k_tail, sorted=False).indices.sort().values
        picked.append(chosen + layout.n_full * size)
    return torch.cat(picked)


def _buckets(x: Tensor, size: int, fill: float) -> Tensor:
    """``x`` as rows of ``size`` entries, the last row padded with ``fill``."""
    pad = -x.numel() % size
    if pad:
        x = torch.cat([x, x.new_full((pad,), fill)])
    return x.view(-1, size)


def dequantize(codes: Tensor, lo: Tensor, hi: Tensor, numel: int, size: int) -> Tensor:
    """Q⁻¹: float32 ``[numel]`` values code·u + δ of packed 4-bit codes, u = (Δ − δ)/15 per
    bucket of ``size`` entries."""
    unpacked = torch.stack((codes >> 4, codes & 15), dim=1).reshape(-1)[:numel]
    q = _buckets(unpacked.float(), size, 0.0)
    lo32, hi32 = lo.float()[:, None], hi.float()[:, None]
    return (q * ((hi32 - lo32) / _LEVELS) + lo32).reshape(-1)[:numel]


def quantize(x: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Q: the packed 4-bit codes (uint8 ``[⌈numel/2⌉]``), bucket minima and maxima (bf16) of
    float32 ``x``, and the values the codes decode to (float32, for the statistics)."""
    n = x.numel()
    lo = _buckets(x, size, math.inf).amin(dim=1).to(torch.bfloat16)
    hi = _buckets(x, size, -math.inf).amax(dim=1).to(torch.bfloat16)
    lo32, hi32 = lo.float()[:, None], hi.float()[:, None]
    scale = (hi32 - lo32) / _LEVELS
    # u = 0 (a constant bucket) stores code 0; x below the bf16-rounded min or above the max
    # gives codes past 0..15, and 16 would overflow into the neighbouring nibble.
    q = ((_buckets(x, size, 0.0) - lo32) / torch.where(scale == 0, 1.0, scale) + 0.5).floor()
    q = torch.where((scale == 0) | q.isnan(), 0.0, q).clamp_(0, _LEVELS)
    decoded = (q * scale + lo32).reshape(-1)[:n]
    q = q.reshape(-1)[:n].to(torch.uint8)
    if n % 2:
        q = torch.cat([q, q.new_zeros(1)])
    pairs = q.view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1], lo, hi, decoded
