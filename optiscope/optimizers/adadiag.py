"""AdaDiag, AdaDiag++ and AdafacDiag (Nguyen, Liu, Chen & Liu, 2025, arXiv 2502.07488):
adaptive moments kept in a basis in which the gradient's second moment is close to diagonal.

A diagonal adaptive method (Adam, Adafactor) preconditions each coordinate on its own, which is
exact only when the gradient's second moment is diagonal in the parameter's coordinates. These
optimizers rotate each matrix gradient into the singular bases of a recent gradient, run the
diagonal method there, and rotate the update back. Related methods: GaLore (Zhao et al., 2024)
is the low-rank, one-sided version of the same projection; SOAP (Vyas et al., 2024) takes its
bases from running averages of GGᵀ and GᵀG instead of one gradient's SVD, at 2(m² + n²) more
floats per matrix.

The diagonal step in the rotated basis is the bundled optimizers' own functional step (`adam`,
`adafactor`), with their fused kernels and in-kernel statistics, run on a zero "parameter" buffer:
it leaves the method's update in the rotated basis, which one or two matrix products (cuBLAS
through torch) rotate back onto the parameter.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from optiscope.contract import MomentLayout, Stat, StatsRows
from optiscope.kernels.launch import local
from optiscope.kernels.stats import NUM_STATS, torch_grad_stats, torch_sq_norms
from optiscope.kernels.whole_ranges import whole_counts
from optiscope.optimizers._base import (OptiscopeOptimizer, check_adam_hyperparameters,
                                         check_range)
from optiscope.optimizers.adafactor import adafactor, check_adafactor_hyperparameters, factored_v
from optiscope.optimizers.adam import adam

__all__ = ["AdaDiag", "AdafacDiag", "adadiag", "adafacdiag"]


class _Rotating(OptiscopeOptimizer):
    """What AdaDiag and AdafacDiag share: the bases, their state and their checks."""

    stat_columns: ClassVar[frozenset[Stat]] = frozenset({
        Stat.GRAD_SQ, Stat.GRAD_ABSMAX, Stat.GRAD_NONFINITE, Stat.PARAM_SQ_BEFORE,
        Stat.PARAM_SQ_AFTER, Stat.UPDATE_SQ, Stat.MOMENT1_SQ, Stat.MOMENT2_SQ, Stat.GRAD_DIAG,
        Stat.GRAD_DIAG_ORIGINAL})

    def _validate_group(self, group: dict[str, Any]) -> None:
        owner = type(self).__name__
        self._refuse_sharded(group, "the SVD of its gradient needs the whole matrix")
        check_range(owner, "lr", group["lr"], 0.0)
        check_range(owner, "weight_decay", group["weight_decay"], 0.0)
        gap = group["update_proj_gap"]
        if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
            raise ValueError(f"{owner}: update_proj_gap must be a positive int (steps between "
                             f"basis refreshes), got {gap!r}")
        if not isinstance(group["two_sided"], bool):
            raise TypeError(f"{owner}: two_sided must be True or False, got "
                            f"{group['two_sided']!r}")

    def _init_bases(self, state: dict, p: Tensor, group: dict[str, Any]) -> tuple[int, int] | None:
        """Creates the bases of a matrix at its first step (identities until the first refresh,
        which is that step) and returns its matrix shape; None for a parameter stepped unrotated.
        """
        shape = _matrix_shape(p)
        if shape is None:
            return None
        m, n = shape
        two_sided = group["two_sided"]
        if state:
            if ("left_basis" in state and "right_basis" in state) != two_sided:
                raise ValueError(
                    f"{type(self).__name__}: two_sided={two_sided} for a parameter whose state "
                    f"was created with two_sided={not two_sided}; a parameter keeps the variant "
                    "it started with (build a new optimizer to switch)")
            return shape
        if two_sided or m <= n:
            state["left_basis"] = torch.eye(m, dtype=torch.float32, device=p.device)
        if two_sided or m > n:
            state["right_basis"] = torch.eye(n, dtype=torch.float32, device=p.device)
        return shape

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state dict, keeping float32 state float32 (see the class docstring).

        `torch.optim.Optimizer.load_state_dict` casts floating-point state to the parameter's
        dtype, which would round a bf16 matrix's float32 moments and bases to bf16 (a bf16 basis
        is not orthogonal) and break bit-exact resumption; the saved float32 values are reloaded
        in float32 instead.

        Args:
            state_dict: as returned by `state_dict`.
        """
        super().load_state_dict(state_dict)
        for p, key, value in self._saved_state(state_dict):
            if key != "step" and isinstance(value, Tensor) and value.dtype == torch.float32:
                self.state[p][key] = value.to(device=p.device, dtype=torch.float32)


class AdaDiag(_Rotating):
    r"""AdaDiag (``two_sided=False``) and AdaDiag++ (``two_sided=True``): Adam in the singular
    bases of a recent gradient.

    Per matrix parameter W ∈ ℝ^{m×n} with gradient G at step t (counted per tensor), learning
    rate η, T = ``update_proj_gap``:

    .. math::
        \text{if } t \equiv 1 \ (\mathrm{mod}\ T):&\quad U\Sigma V^\top = \mathrm{svd}(G),
            \quad P \leftarrow U \in \mathbb{R}^{m\times m},\ Q \leftarrow V \in \mathbb{R}^{n\times n} \\
        \tilde G &= P^\top G \ (m \le n) \text{ or } G Q \ (m > n);
            \qquad \tilde G = P^\top G Q \text{ (two-sided)} \\
        M &\leftarrow \beta_1 M + (1-\beta_1)\tilde G,\qquad
            V \leftarrow \beta_2 V + (1-\beta_2)\tilde G^2 \\
        D &= -\frac{\eta}{1-\beta_1^t}\,\frac{M}{\sqrt{V}/\sqrt{1-\beta_2^t} + \epsilon} \\
        W &\leftarrow W(1 - \eta\lambda) + P D \ \text{ or }\ D Q^\top
            \ \text{ or }\ P D Q^\top \text{ (two-sided)}

    D is computed by optiscope's Adam step (`adam`: the Triton kernel, or the torch backend's
    fused CPU/torch kernels) applied to a zero buffer in place of the parameter, with the
    rotated gradient G̃ and the rotated moments: Adam's update of a zero parameter is exactly D.

    Matrices. A parameter of two or more dimensions, shape (d₀, d₁, …, d_k), is the d₀ × (d₁⋯d_k)
    matrix of its flattened rows: a convolution's output channels against everything one output
    reads. Its moments are kept in that matrix shape. Parameters with fewer than two dimensions
    (biases, norms, scalars) and empty ones are stepped by the diagonal method itself, unrotated:
    here AdamW, bit-identical to `optiscope.optimizers.AdamW` (state in the parameter's dtype).

    Choices the paper leaves open (arXiv 2502.07488 publishes no code), and why:

    1. Which side a one-sided rotation takes: the smaller dimension (GaLore's convention): a
       left basis P (m×m) when m ≤ n, else a right basis Q (n×n). The basis costs min(m, n)²
       floats rather than max(m, n)² (768² against 3072² for GPT-2's MLP), and its SVD is the
       thin one, O(mn·min(m, n)).
    2. Complete bases. One-sided: the thin SVD's basis of the smaller side is already square,
       hence complete. Two-sided: ``full_matrices=True``, so P is m×m and Q is n×n, not m×k and
       n×k (k = min(m, n)): G̃ = PᵀGQ is then invertible, and a later gradient's component
       outside the span of the snapshot's k singular vectors is not dropped.
    3. Moments at a basis change are kept as they are, not rotated into the new basis (GaLore's
       choice, and the paper's update as summarised). The first moment could be rotated exactly,
       but the diagonal second moment cannot (only its diagonal survives a rotation), and
       rotating one without the other would pair a first moment in one basis with a second
       moment in another; the EMAs forget the old basis at their own rates instead.
    4. The refresh period T = ``update_proj_gap``: 200 by default, GaLore's default (the paper's
       value is not published). Bases are refreshed at a tensor's steps 1, T+1, 2T+1, …
    5. Parameters with fewer than two dimensions: the diagonal method unrotated (as GaLore and
       SOAP do). Seen as a 1×n matrix, a vector's one-sided basis is 1×1, a sign; a two-sided
       one would be n×n, from a rank-one gradient.
    6. The SVD of the current gradient (not of an average of GGᵀ as in SOAP), in float32 whatever
       the parameter's dtype (``torch.linalg.svd``; GaLore does the same): LAPACK/cuSOLVER have
       no bf16 SVD, and a basis rounded to bf16 is orthogonal only to ~1e-2.

    Further choices:

    * Weight decay is decoupled, θ(1 − ηλ), applied to the parameter in its own basis before the
      update, as AdamW: the decay is isotropic, so the basis it is applied in changes nothing but
      the cost (the parameter is never rotated).
    * A gradient with non-finite entries at a refresh step keeps the previous basis (the identity
      at a tensor's first step): the SVD is undefined there and LAPACK raises. The step itself
      proceeds as the diagonal method would, and the monitor's ``nonfinite_grads`` reports it.
    * State of matrices is float32 whatever the parameter's dtype: the rotated gradient is
      computed in float32 from float32 bases; bf16/fp16 matrices are updated through a float32
      copy, rounded once when written back. ``load_state_dict`` keeps it float32.
    * Sharded parameters (FSDP2 DTensors) are refused: the SVD needs the whole matrix.

    Cost per matrix (m×n, k = min(m, n)): one-sided state 2mn + k² floats (AdaDiag) and per step
    two GEMMs of 2k·mn FLOPs (rotate, rotate back); two-sided 2mn + m² + n² floats and four GEMMs.
    Every T steps an SVD, O(mn·k) but far slower per FLOP than a GEMM: it dominates a refresh step
    (``benchmarks/adadiag.py`` measures it).

    Monitor. ``grad_norm``, ``weight_norm``, ``update_norm`` and ``update_ratio`` are of the real
    gradient, parameter and update; ``moment1_norm`` and ``moment2_norm`` (and the drift) are of
    the moments in the rotated basis, where they live. ``grad_diagonality`` tests the method's
    premise: with S = G̃G̃ᵀ for a left basis (G̃ᵀG̃ for a right one), the share
    Σᵢ Sᵢᵢ² / Σᵢⱼ Sᵢⱼ² of S's squared Frobenius norm on its diagonal, 1 when S is diagonal; for
    two-sided bases the product of both sides' shares (the share of the Kronecker-factored
    covariance (G̃G̃ᵀ) ⊗ (G̃ᵀG̃) on its diagonal). ``grad_diagonality_original`` is the same with
    the unrotated G. S is the current step's: a one-sample estimate of E[G̃G̃ᵀ] that needs no
    extra state and costs one Gram matrix on sampled steps only (a running average would cost
    another m² + n² floats per matrix and GEMMs on every step, which is SOAP). At a refresh step
    the one-sided share is 1 by construction (the basis diagonalises that very gradient); between
    refreshes it says how well one gradient's basis still diagonalises later ones. The global
    value is the mean over the rotated matrices.

    State, per matrix: ``step`` (float32 0-d CPU tensor), ``exp_avg`` and ``exp_avg_sq`` (m×n,
    rotated basis), ``left_basis`` (P, m×m) and/or ``right_basis`` (Q, n×n); all float32. Per
    other parameter: AdamW's (``step``, ``exp_avg``, ``exp_avg_sq`` in the parameter's dtype).

    Args:
        params: parameters or parameter groups (dicts), as for any torch optimizer.
        lr: learning rate η (default 1e-3).
        betas: decay rates of the first and second moment (default (0.9, 0.999)).
        eps: added to the bias-corrected √V (default 1e-8).
        weight_decay: λ, decoupled as in AdamW (default 0.0).
        update_proj_gap: T, steps between basis refreshes (default 200).
        two_sided: rotate both sides (AdaDiag++) instead of the smaller one (default False).
        backend: ``"auto"`` (Triton on CUDA when importable, else torch), ``"triton"`` or
            ``"torch"`` (default ``"auto"``): the backend of the Adam step in the rotated basis.
            Rotations and SVDs are torch operations on either, so the dynamic-range counts of a
            rotated matrix (`request_ranges`) are an extra pass on both; vectors count as Adam.
    """

    roles: ClassVar[tuple[str, ...]] = ("exp_avgs", "exp_avg_sqs", "left_bases", "right_bases",
                                        "steps")
    state_layouts: ClassVar[tuple[MomentLayout, ...]] = (
        MomentLayout("adadiag (matrices: moments in the rotated basis)", m="exp_avg",
                     v="exp_avg_sq"),)

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, update_proj_gap: int = 200,
                 two_sided: bool = False, backend: str = "auto"):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        update_proj_gap=update_proj_gap, two_sided=two_sided)
        super().__init__(params, defaults, backend=backend)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)  # lr and weight_decay
        check_adam_hyperparameters(type(self).__name__, group, lr=False, weight_decay=False)

    def _init_state(self, state: dict, p: Tensor, group: dict[str, Any]) -> None:
        fresh = not state
        shape = self._init_bases(state, p, group)
        if not fresh:
            return
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        if shape is None:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        else:
            state["exp_avg"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
            state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=p.device)

    def _state_tensors(self, state: dict, group: dict[str, Any]) -> dict[str, Any]:
        return dict(exp_avgs=state["exp_avg"], exp_avg_sqs=state["exp_avg_sq"],
                    left_bases=state.get("left_basis"), right_bases=state.get("right_basis"),
                    steps=state["step"])

    def _step_group(self, group: dict[str, Any], t: dict[str, list],
                    stats: StatsRows | None) -> None:
        beta1, beta2 = group["betas"]
        adadiag(t["params"], t["grads"], t["exp_avgs"], t["exp_avg_sqs"], t["left_bases"],
                t["right_bases"], t["steps"], lr=group["lr"], beta1=beta1, beta2=beta2,
                eps=group["eps"], weight_decay=group["weight_decay"],
                update_proj_gap=group["update_proj_gap"], backend=self.backend, stats=stats)


class AdafacDiag(_Rotating):
    r"""AdafacDiag: Adafactor's factored second moment in the singular bases of a recent
    gradient.

    The bases, rotations and refreshes are AdaDiag's (one-sided by default, ``two_sided=True``
    for both sides); the diagonal method in the rotated basis is optiscope's `Adafactor` with a
    fixed step size and no parameter scaling. Per matrix, with G̃ the rotated gradient, step t:

    .. math::
        \hat\beta_{2,t} &= 1 - t^{\text{decay\_rate}},\qquad A = \tilde G^2 + \epsilon \\
        R &\leftarrow \hat\beta_2 R + (1-\hat\beta_2)\,\mathrm{mean}_{\text{cols}}(A),\quad
        C \leftarrow \hat\beta_2 C + (1-\hat\beta_2)\,\mathrm{mean}_{\text{rows}}(A),\quad
        \hat V_{ij} = R_i C_j / \mathrm{mean}(R) \\
        D &= -\eta\, U / \max(1, \mathrm{RMS}(U)/d),\quad U = \tilde G / \sqrt{\hat V};
        \qquad M \leftarrow \beta_1 M - (1-\beta_1) D,\ D \leftarrow -M
        \ \text{ if } \beta_1 \text{ is set} \\
        W &\leftarrow W(1 - \eta\lambda) + P D \ \text{ or }\ D Q^\top
            \ \text{ or }\ P D Q^\top

    As in transformers' Adafactor (and `Adafactor`), the first moment is an EMA of the clipped,
    lr-scaled update. RMS is invariant under the orthogonal rotation, so clipping in the rotated
    basis clips the real update by the same factor. A fixed η rather than Adafactor's relative
    step and RMS(θ) scaling: those replace a tuned schedule, and AdafacDiag is compared with
    AdaDiag and Adam at a tuned η under the same LR scheduler. Parameters with fewer than two
    dimensions are stepped by that same Adafactor rule (unfactored second moment), unrotated.

    The bases, their refreshes, the matrix view of tensors with more dimensions, the weight
    decay, float32 state and the monitor's metrics (``grad_diagonality`` included) are
    AdaDiag's, with the same choices and reasons: see `AdaDiag`. ``moment2_norm`` is of the
    reconstructed v̂ in the rotated basis.

    Cost per one-sided matrix: m + n + min(m, n)² floats without beta1, plus mn with it; the
    per-step GEMMs and the refresh's SVD are AdaDiag's.

    State, all float32: ``step``; per matrix ``exp_avg_sq_row`` (m), ``exp_avg_sq_col`` (n),
    ``exp_avg`` (m×n, when beta1 is set), ``left_basis`` and/or ``right_basis``; per other
    parameter ``exp_avg_sq`` (its shape) and ``exp_avg`` (when beta1 is set). Without beta1 a
    one-sided matrix keeps m + n + min(m, n)² floats: Adafactor's memory plus the basis.

    Args:
        params: parameters or parameter groups (dicts), as for any torch optimizer.
        lr: the fixed step size η (default 1e-3).
        eps: added to G̃² before the row/column means (default 1e-30).
        clip_threshold: d, the RMS the unscaled update is clipped to (default 1.0).
        decay_rate: exponent of β̂2 = 1 − t^decay_rate, in [-1, 0) (default -0.8).
        beta1: decay of the first moment, in [0, 1), or None for none (default None).
        weight_decay: λ, decoupled (default 0.0).
        update_proj_gap: T, steps between basis refreshes (default 200).
        two_sided: rotate both sides instead of the smaller one (default False).
        backend: ``"auto"`` (Triton on CUDA when importable, else torch), ``"triton"`` or
            ``"torch"`` (default ``"auto"``): the backend of the Adafactor step. The
            dynamic-range counts of a rotated matrix (`request_ranges`) are an extra pass on
            both; vectors count as Adafactor.
    """

    roles: ClassVar[tuple[str, ...]] = ("row_vars", "col_vars", "exp_avg_sqs", "exp_avgs",
                                        "left_bases", "right_bases", "steps")
    state_layouts: ClassVar[tuple[MomentLayout, ...]] = (
        MomentLayout("adafacdiag (rotated basis; v̂ = row ⊗ col / mean(row))", m="exp_avg",
                     v="exp_avg_sq", v_row="exp_avg_sq_row", v_col="exp_avg_sq_col",
                     m_optional=True),)

    def __init__(self, params, lr: float = 1e-3, eps: float = 1e-30, clip_threshold: float = 1.0,
                 decay_rate: float = -0.8, beta1: float | None = None, weight_decay: float = 0.0,
                 *, update_proj_gap: int = 200, two_sided: bool = False, backend: str = "auto"):
        defaults = dict(lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate,
                        beta1=beta1, weight_decay=weight_decay, update_proj_gap=update_proj_gap,
                        two_sided=two_sided)
        super().__init__(params, defaults, backend=backend)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        owner = type(self).__name__
        check_range(owner, "eps", group["eps"], 0.0)
        check_adafactor_hyperparameters(owner, group)

    def _init_state(self, state: dict, p: Tensor, group: dict[str, Any]) -> None:
        def zeros(shape):
            return torch.zeros(shape, dtype=torch.float32, device=p.device)

        fresh = not state
        shape = self._init_bases(state, p, group)
        if fresh:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            if shape is None:
                state["exp_avg_sq"] = zeros(p.shape)
            else:
                state["exp_avg_sq_row"] = zeros(shape[:1])
                state["exp_avg_sq_col"] = zeros(shape[1:])
        # Also when beta1 is set on a group after its first steps.
        if group["beta1"] is not None and "exp_avg" not in state:
            state["exp_avg"] = zeros(shape if shape is not None else p.shape)

    def _state_tensors(self, state: dict, group: dict[str, Any]) -> dict[str, Any]:
        return dict(row_vars=state.get("exp_avg_sq_row"), col_vars=state.get("exp_avg_sq_col"),
                    exp_avg_sqs=state.get("exp_avg_sq"), exp_avgs=state.get("exp_avg"),
                    left_bases=state.get("left_basis"), right_bases=state.get("right_basis"),
                    steps=state["step"])

    def _step_group(self, group: dict[str, Any], t: dict[str, list],
                    stats: StatsRows | None) -> None:
        adafacdiag(t["params"], t["grads"], t["row_vars"], t["col_vars"], t["exp_avg_sqs"],
                   t["exp_avgs"] if group["beta1"] is not None else None, t["left_bases"],
                   t["right_bases"], t["steps"], lr=group["lr"], eps=group["eps"],
                   clip_threshold=group["clip_threshold"], decay_rate=group["decay_rate"],
                   beta1=group["beta1"], weight_decay=group["weight_decay"],
                   update_proj_gap=group["update_proj_gap"], backend=self.backend, stats=stats)


def adadiag(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
            exp_avg_sqs: list[Tensor], left_bases: list[Tensor | None],
            right_bases: list[Tensor | None], state_steps: list[Tensor], *, lr: float,
            beta1: float, beta2: float, eps: float, weight_decay: float, update_proj_gap: int,
            backend: str = "auto", stats: StatsRows | None = None) -> None:
    """Functional AdaDiag / AdaDiag++ over tensors on one device: increments ``state_steps``,
    refreshes the bases when due, and updates parameters and state in place.

    Args:
        params, grads: one entry per parameter.
        exp_avgs, exp_avg_sqs: the moments (m×n float32 in the rotated basis for matrices).
        left_bases, right_bases: P and Q of each matrix (None for a side it does not rotate);
            both None for a parameter stepped by AdamW itself.
        state_steps: float32 0-d CPU tensors, the step count of each parameter.
        lr, beta1, beta2, eps, weight_decay, update_proj_gap: hyperparameters, as in `AdaDiag`.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (default ``"auto"``).
        stats: where to write statistics rows (`AdaDiag.stat_columns`), or None.
    """
    def diagonal(idx, targets, gs, decay, rows):
        adam(targets, gs, [exp_avgs[i] for i in idx], [exp_avg_sqs[i] for i in idx], None,
             [state_steps[i] for i in idx], lr=lr, beta1=beta1, beta2=beta2, eps=eps,
             weight_decay=decay, decoupled_weight_decay=True, maximize=False, backend=backend,
             stats=rows)

    _rotated_step(params, grads, left_bases, right_bases, state_steps, lr=lr,
                  weight_decay=weight_decay, update_proj_gap=update_proj_gap, diagonal=diagonal,
                  stats=stats, moment2=lambda i: exp_avg_sqs[i])


def adafacdiag(params: list[Tensor], grads: list[Tensor], row_vars: list[Tensor | None],
               col_vars: list[Tensor | None], exp_avg_sqs: list[Tensor | None],
               exp_avgs: list[Tensor] | None, left_bases: list[Tensor | None],
               right_bases: list[Tensor | None], state_steps: list[Tensor], *, lr: float,
               eps: float, clip_threshold: float, decay_rate: float, beta1: float | None,
               weight_decay: float, update_proj_gap: int, backend: str = "auto",
               stats: StatsRows | None = None) -> None:
    """Functional AdafacDiag over tensors on one device: increments ``state_steps``, refreshes
    the bases when due, and updates parameters and state in place.

    Args:
        params, grads: one entry per parameter.
        row_vars, col_vars: ``exp_avg_sq_row`` / ``exp_avg_sq_col`` of matrices, None for the
            others.
        exp_avg_sqs: ``exp_avg_sq`` of parameters stepped unrotated, None for matrices.
        exp_avgs: first moments when ``beta1`` is set, else None.
        left_bases, right_bases: P and Q of each matrix (None for a side it does not rotate).
        state_steps: float32 0-d CPU tensors, the step count of each parameter.
        lr, eps, clip_threshold, decay_rate, beta1, weight_decay, update_proj_gap:
            hyperparameters, as in `AdafacDiag`.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (default ``"auto"``).
        stats: where to write statistics rows (`AdafacDiag.stat_columns`), or None.
    """
    def diagonal(idx, targets, gs, decay, rows):
        adafactor(targets, gs, [row_vars[i] for i in idx], [col_vars[i] for i in idx],
                  [exp_avg_sqs[i] for i in idx],
                  [exp_avgs[i] for i in idx] if exp_avgs is not None else None,
                  [state_steps[i] for i in idx], lr=lr, eps=(eps, 0.0),
                  clip_threshold=clip_threshold, decay_rate=decay_rate, beta1=beta1,
                  weight_decay=decay, scale_parameter=False, relative_step=False,
                  warmup_init=False, backend=backend, stats=rows)

    def moment2(i):
        return factored_v(row_vars[i], col_vars[i]) if row_vars[i] is not None else exp_avg_sqs[i]

    _rotated_step(params, grads, left_bases, right_bases, state_steps, lr=lr,
                  weight_decay=weight_decay, update_proj_gap=update_proj_gap, diagonal=diagonal,
                  stats=stats, moment2=moment2)


# The diagonal method's functional step over the tensors ``idx`` of the step, applied to
# ``targets`` (the parameters, or zero buffers in the rotated basis) with gradients ``grads``,
# decoupled weight decay ``decay``, statistics into ``rows`` (or None).
DiagonalStep = Callable[[list[int], list[Tensor], list[Tensor], float, "StatsRows | None"], None]


def _matrix_shape(p: Tensor) -> tuple[int, int] | None:
    """(m, n) of the matrix a parameter is rotated as, or None when it is stepped unrotated."""
    if p.dim() < 2 or p.numel() == 0:
        return None
    return p.shape[0], p.numel() // p.shape[0]


def _rotated_step(params, grads, left_bases, right_bases, state_steps, *, lr: float,
                  weight_decay: float, update_proj_gap: int, diagonal: DiagonalStep,
                  stats: StatsRows | None, moment2: Callable[[int], Tensor]) -> None:
    """The step of every tensor: the diagonal method on those it does not rotate (which count
    the range, `request_ranges`, as that method does), on the rotated gradient of the others.
    For those, the counts of the real g, θ⁺ − θ⁻ and v (``moment2(i)``, in the rotated basis,
    as the state holds it) are an extra pass over each (`whole_counts`): what the diagonal
    method's pass sees is the rotated gradient and update."""
    params, grads = [local(p) for p in params], [local(g) for g in grads]
    plain = [i for i, (lb, rb) in enumerate(zip(left_bases, right_bases))
             if lb is None and rb is None]
    if plain:  # the diagonal method itself, in place, statistics and all
        diagonal(plain, [params[i] for i in plain], [grads[i] for i in plain], weight_decay,
                 stats.subset(plain) if stats is not None else None)
    rotated = sorted(set(range(len(params))) - set(plain))
    if not rotated:
        return
    if stats is not None:
        # Of the real gradient and parameter: the kernel's own figures are of the rotated
        # gradient and of the zero buffer.
        columns = torch_grad_stats([grads[i] for i in rotated])
        columns[Stat.PARAM_SQ_BEFORE] = torch_sq_norms([params[i] for i in rotated])
        per_tensor: list[Tensor] = []
    # One tensor at a time: the rotated gradient and the buffer are transient m×n float32
    # tensors, and batching a whole group's would hold as many bytes as the moments themselves,
    # to save one kernel launch beside the two GEMMs each tensor needs anyway.
    for i in rotated:
        p, left, right = params[i], left_bases[i], right_bases[i]
        m, n = _matrix_shape(p)
        g = grads[i].reshape(m, n).float()
        sigma = None
        if int(state_steps[i].item()) % update_proj_gap == 0:  # a CPU tensor: no sync
            sigma = _refresh(g, left, right)
        buffer = torch.zeros((m, n), dtype=torch.float32, device=p.device)
        rows = (StatsRows(torch.full((1, NUM_STATS), math.nan, device=p.device), [0])
                if stats is not None else None)
        g_rotated = _rotate(g, left, right) if sigma is None else _rotate_own(g, sigma, left,
                                                                               right)
        diagonal([i], [buffer], [g_rotated], 0.0, rows)

        in_place = p.dtype == torch.float32 and p.is_contiguous()
        theta = p.view(m, n) if in_place else p.reshape(m, n).to(torch.float32, copy=True)
        before = theta.clone() if stats is not None else None
        if weight_decay != 0:
            theta.mul_(1.0 - lr * weight_decay)
        _add_rotated_back(theta, buffer, left, right)
        if not in_place:
            p.copy_(theta.view(p.shape))
        if stats is not None:
            after = theta if in_place else p.reshape(m, n).float()
            after_sq = torch_sq_norms([after])[0]
            update_sq = torch_sq_norms([before.sub_(after)])[0]  # θ⁻ − θ⁺ in place: no temporary
            if stats.ranges is not None:  # |θ⁻ − θ⁺| = |θ⁺ − θ⁻| bit for bit: counted as is
                stats.ranges[stats.rows[i]] = whole_counts(
                    [grads[i], before, moment2(i)]).to(stats.ranges.device)
            shares = _diagonal_shares(g, g_rotated, left, right)
            per_tensor.append(torch.stack([
                after_sq, update_sq, rows.values[0, Stat.MOMENT1_SQ],
                rows.values[0, Stat.MOMENT2_SQ], *shares]))
        del g_rotated
    if stats is not None:
        table = torch.stack(per_tensor)
        for k, stat in enumerate((Stat.PARAM_SQ_AFTER, Stat.UPDATE_SQ, Stat.MOMENT1_SQ,
                                  Stat.MOMENT2_SQ, Stat.GRAD_DIAG, Stat.GRAD_DIAG_ORIGINAL)):
            columns[stat] = table[:, k]
        stats.subset(rotated).write(columns)


def _refresh(g: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor | None:
    """Overwrites the bases with the singular vectors of the float32 gradient matrix ``g`` and
    returns its singular values (None when the bases were kept).

    A non-finite ``g`` keeps the previous bases (see the class docstring). The check costs a
    device synchronisation, but only on refresh steps, whose SVD synchronises anyway.
    """
    if not bool(torch.isfinite(g).all()):
        return None
    if left is not None and right is not None:
        u, sigma, vh = torch.linalg.svd(g, full_matrices=True)
        left.copy_(u)
        right.copy_(vh.mT)
    else:  # the smaller side: its thin-SVD basis is square, hence complete
        u, sigma, vh = torch.linalg.svd(g, full_matrices=False)
        if left is not None:
            left.copy_(u)
        else:
            right.copy_(vh.mT)
    return sigma


def _rotate_own(g: Tensor, sigma: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
    """G̃ at a refresh step, whose bases were just taken from this same G's SVD UΣVᵀ.

    Two-sided, PᵀGQ = UᵀGV = Σ by definition: ``diag(σ)`` (m×n), the SVD's own values, zero off
    the diagonal. The GEMMs would leave ~1e-7·σ₁ of float32 round-off there instead of 0, and
    Adam's first step moves every coordinate with a nonzero gradient by about ±η whatever its
    size: each round-off entry became a full step (a 64×256 matrix moved by ‖ΔW‖ = 1.22 instead
    of η√64 = 0.08 at lr 0.01), and AdafacDiag's factored second moment read a column of
    round-off as a coordinate of its own. Off a refresh step G̃ is the product, as before.

    One-sided, PᵀG = ΣVᵀ (GQ = UΣ) is not diagonal: its entries are the gradient's own, and the
    product is kept (its round-off is relative to entries of the size Adam normalises anyway).
    """
    if left is None or right is None:
        return _rotate(g, left, right)
    g_rotated = g.new_zeros(g.shape)
    g_rotated.diagonal().copy_(sigma)
    return g_rotated


def _rotate(g: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
    """G̃ = Pᵀ G, G Q or Pᵀ G Q."""
    if left is not None:
        g = left.mT @ g
    if right is not None:
        g = g @ right
    return g


def _add_rotated_back(theta: Tensor, d: Tensor, left: Tensor | None, right: Tensor | None) -> None:
    """θ += P D, D Qᵀ or P D Qᵀ, the last product accumulated into θ by the GEMM itself."""
    if left is not None and right is not None:
        theta.addmm_(left @ d, right.mT)
    elif left is not None:
        theta.addmm_(left, d)
    else:
        theta.addmm_(d, right.mT)


def _diagonal_shares(g: Tensor, g_rotated: Tensor, left: Tensor | None,
                     right: Tensor | None) -> tuple[Tensor, Tensor]:
    """``grad_diagonality`` in the optimizer's bases and in the original one (class docstring):
    per rotated side, the share of the Gram matrix's squared Frobenius norm on its diagonal.

    The diagonal of G̃G̃ᵀ holds the squared row norms of G̃ (of G̃ᵀG̃, its column norms), and an
    orthogonal change of basis keeps the Frobenius norm: ‖G̃G̃ᵀ‖ = ‖G̃ᵀG̃‖ = ‖GGᵀ‖ = (Σσᵢ⁴)^½ for
    any sides. So one Gram matrix, of G's smaller side, serves every share. Computing S̃ = PᵀSP
    per side cost two more k×k×k GEMMs each, and a two-sided basis of GPT-2 small's token
    embedding a 50,257² Gram matrix (10 GB).
    """
    gram = g.mT @ g if g.shape[0] >= g.shape[1] else g @ g.mT
    frobenius_sq = gram.square().sum()
    rotated = original = g.new_ones(())
    for basis, dim in ((left, 1), (right, 0)):
        if basis is None:
            continue
        original = original * _diag_share(g.square().sum(dim=dim), frobenius_sq)
        rotated = rotated * _diag_share(g_rotated.square().sum(dim=dim), frobenius_sq)
    return rotated, original


def _diag_share(diagonal: Tensor, frobenius_sq: Tensor) -> Tensor:
    """Σᵢ sᵢᵢ² / Σᵢⱼ sᵢⱼ² from S's diagonal and Σᵢⱼ sᵢⱼ² (NaN for a zero matrix)."""
    return diagonal.square().sum() / frobenius_sq
