"""Adafactor (Shazeer & Stern, 2018, "Adafactor: Adaptive Learning Rates with Sublinear Memory
Cost", arXiv 1804.04235), with the update rule of ``transformers.Adafactor``.

The second moment of a matrix is kept as its row and column means, so the optimizer state of an
m×n weight is m + n floats instead of m·n; the step size is relative to the parameter's own scale.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from optiscope.contract import MomentLayout, Stat, StatsRows
from optiscope.kernels import cpu
from optiscope.kernels.backend import resolve_backend
from optiscope.kernels.launch import launch_groups, local_all
from optiscope.kernels.whole_ranges import whole_counts
from optiscope.kernels.stats import sq_sum, torch_grad_stats, torch_sq_norms
from optiscope.optimizers._base import OptiscopeOptimizer, advance_steps, check_range

__all__ = ["Adafactor", "adafactor", "factored_v"]


class Adafactor(OptiscopeOptimizer):
    r"""Adafactor with the update rule of ``transformers.Adafactor``.

    Per parameter θ with gradient g, step t (counted per tensor), all in float32 (for float64
    parameters too):

    .. math::
        \rho_t &= \min(10^{-6} t \text{ if warmup\_init else } 10^{-2},\ 1/\sqrt t)
            \text{ if relative\_step, else lr} \\
        \eta_t &= \max(\epsilon_2, \mathrm{RMS}(\theta))\,\rho_t
            \text{ if scale\_parameter, else } \rho_t \\
        \hat\beta_{2,t} &= 1 - t^{\text{decay\_rate}},\qquad G = g^2 + \epsilon_1 \\
        \text{factored: } R &\leftarrow \hat\beta_2 R + (1-\hat\beta_2)\,\mathrm{mean}_{-1}(G),
            \quad C \leftarrow \hat\beta_2 C + (1-\hat\beta_2)\,\mathrm{mean}_{-2}(G),
            \quad \hat v_{ij} = R_i C_j / \mathrm{mean}(R) \\
        \text{otherwise: } \hat v &\leftarrow \hat\beta_2 \hat v + (1-\hat\beta_2)\,G \\
        U &= g / \sqrt{\hat v},\qquad U \leftarrow \eta_t\, U / \max(1, \mathrm{RMS}(U)/d) \\
        m &\leftarrow \beta_1 m + (1-\beta_1) U,\quad U \leftarrow m
            \quad\text{if } \beta_1 \text{ is set} \\
        \theta &\leftarrow \theta - \lambda\,\eta_t\,\theta - U

    with RMS(x) = ‖x‖₂/√numel, RMS(θ) taken before the step, and d = ``clip_threshold``. Tensors
    of two or more dimensions are factored over their last two dimensions (leading dimensions are
    a batch of matrices, each with its own row and column statistics); others, 0-d included, keep
    the full second moment. The first moment is an EMA of the *clipped, scaled* update, as in
    transformers, tensor2tensor and optax (transformers #34506), not of the gradient.

    State, per parameter: ``step`` (float32 0-d CPU tensor, as torch optimizers keep it),
    ``exp_avg_sq_row`` (shape[:-1]) and ``exp_avg_sq_col`` (shape[:-2] + shape[-1:]) for factored
    tensors, else ``exp_avg_sq`` (the parameter's shape), and ``exp_avg`` when beta1 is set. State
    tensors are float32 whatever the parameter's dtype, on the parameter's device, and stay float32
    through ``load_state_dict``: bf16/fp16 parameters are updated through a float32 copy and
    written back rounded to their own dtype (no stochastic rounding).

    Differences from ``torch.optim.Adafactor``:

    * eps1 is added to g² before the row/column means (paper and transformers); torch clamps
      v̂ and the row mean at eps1 instead, with eps1 defaulting to the dtype's machine epsilon.
    * The relative step and the parameter scaling can each be switched off (fixed ``lr``,
      ``scale_parameter=False``); torch always uses both, with ``lr`` as the cap on ρ_t.
    * An optional first moment (``beta1``); torch has none.
    * Weight decay is θ·(1 − λη_t) with the *scaled* step size η_t; torch decays with the raw lr.
    * bf16/fp16 parameters get float32 arithmetic and float32 state; torch keeps the state in the
      gradient's dtype and computes in it.

    Args:
        params: parameters or parameter groups (dicts), as for any torch optimizer.
        lr: fixed step size ρ, only with ``relative_step=False`` (default None: required then,
            rejected with ``relative_step=True``).
        eps: (eps1, eps2): eps1 is added to g²; eps2 is the floor of RMS(θ) in the parameter
            scaling (default (1e-30, 1e-3)).
        clip_threshold: d, the RMS the unscaled update is clipped to (default 1.0).
        decay_rate: exponent of β̂2 = 1 − t^decay_rate, in [-1, 0) (default -0.8). -1 averages
            all squared gradients so far uniformly; values towards 0 forget faster. 0 would keep
            no memory at all, values below -1 weight early gradients above recent ones, and values
            above 0 make β̂2 negative (a negative second moment): all three are rejected.
        beta1: decay of the first moment, in [0, 1), or None for no first moment (default None).
        weight_decay: λ, decoupled decay scaled by η_t (default 0.0).
        scale_parameter: multiply ρ_t by max(eps2, RMS(θ)) (default True).
        relative_step: ρ_t = min(cap, 1/√t) instead of a fixed lr (default True).
        warmup_init: with ``relative_step``, cap = 1e-6·t (a linear warmup) instead of 1e-2
            (default False).
        backend: ``"auto"`` (Triton on CUDA when importable, else torch), ``"triton"`` or
            ``"torch"`` (default ``"auto"``). The Triton backend runs four launches per launch group of
            tensors with equal dtypes and step, and computes the monitor's statistics in them,
            and the dynamic-range counts (`request_ranges`) in its update pass; the torch
            backend counts them by an extra pass.

    With ``relative_step=True`` the group's ``lr`` is None, so LR schedulers, which scale ``lr``,
    need ``relative_step=False``.
    """

    stat_columns: ClassVar[frozenset[Stat]] = frozenset({
        Stat.GRAD_SQ, Stat.GRAD_ABSMAX, Stat.GRAD_NONFINITE, Stat.PARAM_SQ_BEFORE,
        Stat.PARAM_SQ_AFTER, Stat.UPDATE_SQ, Stat.MOMENT1_SQ, Stat.MOMENT2_SQ})
    roles: ClassVar[tuple[str, ...]] = ("row_vars", "col_vars", "exp_avg_sqs", "exp_avgs", "steps")
    state_layouts: ClassVar[tuple[MomentLayout, ...]] = (
        MomentLayout("adafactor (v̂ = row ⊗ col / mean(row))", m="exp_avg", v="exp_avg_sq",
                     v_row="exp_avg_sq_row", v_col="exp_avg_sq_col", m_optional=True),)

    def __init__(self, params, lr: float | None = None,
                 eps: tuple[float, float] = (1e-30, 1e-3), clip_threshold: float = 1.0,
                 decay_rate: float = -0.8, beta1: float | None = None, weight_decay: float = 0.0,
                 scale_parameter: bool = True, relative_step: bool = True,
                 warmup_init: bool = False, *, backend: str = "auto"):
        defaults = dict(lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate,
                        beta1=beta1, weight_decay=weight_decay, scale_parameter=scale_parameter,
                        relative_step=relative_step, warmup_init=warmup_init)
        super().__init__(params, defaults, backend=backend)

    def _validate_group(self, group: dict[str, Any]) -> None:
        owner = type(self).__name__
        self._refuse_sharded(group, "Adafactor's row/column statistics and RMS need the whole "
                                    "tensor")
        for flag in ("scale_parameter", "relative_step", "warmup_init"):
            if not isinstance(group[flag], bool):
                raise TypeError(f"{owner}: {flag} must be True or False, got {group[flag]!r}")
        lr = group["lr"]
        if group["relative_step"]:
            if lr is not None:
                raise ValueError(
                    f"{owner}: lr={lr!r} cannot be combined with relative_step=True "
                    "(relative_step computes the step size itself); pass relative_step=False "
                    "to use a fixed lr")
        else:
            if lr is None:
                raise ValueError(
                    f"{owner}: relative_step=False needs a fixed step size, got lr=None; pass "
                    "lr=... (e.g. lr=1e-3), or relative_step=True for the relative step")
            if group["warmup_init"]:
                raise ValueError(
                    f"{owner}: warmup_init=True warms up the relative step, but "
                    "relative_step=False; pass relative_step=True, or warmup_init=False")
            check_range(owner, "lr", lr, 0.0)
        eps = group["eps"]
        if not isinstance(eps, (tuple, list)) or len(eps) != 2:
            raise ValueError(f"{owner}: eps must be a pair (eps1, eps2), got {eps!r}")
        check_range(owner, "eps[0]", eps[0], 0.0)
        check_range(owner, "eps[1]", eps[1], 0.0)
        check_adafactor_hyperparameters(owner, group)
        check_range(owner, "weight_decay", group["weight_decay"], 0.0)

    def _gather_states(self, states: list[dict], group: dict[str, Any]) -> dict[str, list]:
        return dict(row_vars=[s.get("exp_avg_sq_row") for s in states],
                    col_vars=[s.get("exp_avg_sq_col") for s in states],
                    exp_avg_sqs=[s.get("exp_avg_sq") for s in states],
                    exp_avgs=[s.get("exp_avg") for s in states],
                    steps=[s["step"] for s in states])

    def _step_group(self, group: dict[str, Any], t: dict[str, list],
                    stats: StatsRows | None) -> None:
        adafactor(t["params"], t["grads"], t["row_vars"], t["col_vars"], t["exp_avg_sqs"],
                  t["exp_avgs"] if group["beta1"] is not None else None, t["steps"],
                  lr=group["lr"], eps=tuple(group["eps"]),
                  clip_threshold=group["clip_threshold"], decay_rate=group["decay_rate"],
                  beta1=group["beta1"], weight_decay=group["weight_decay"],
                  scale_parameter=group["scale_parameter"],
                  relative_step=group["relative_step"], warmup_init=group["warmup_init"],
                  backend=self.backend, stats=stats)

    def _init_state(self, state: dict[str, Tensor], p: Tensor, group: dict[str, Any]) -> None:
        # float32 whatever p's dtype: a bf16 second moment loses the small EMA increments
        # (β̂2 → 1), which is why transformers keeps it in float32 too.
        def zeros(shape):
            return torch.zeros(shape, dtype=torch.float32, device=p.device)

        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            if p.dim() >= 2:
                state["exp_avg_sq_row"] = zeros(p.shape[:-1])
                state["exp_avg_sq_col"] = zeros(p.shape[:-2] + p.shape[-1:])
            else:
                state["exp_avg_sq"] = zeros(p.shape)
        # Also when beta1 is set on a group after its first steps.
        if group["beta1"] is not None and "exp_avg" not in state:
            state["exp_avg"] = zeros(p.shape)

    def group_lrs(self) -> list[float | None]:
        """Each group's step size ρ_t at its latest step (before parameter scaling): the fixed
        lr, or the relative step the optimizer computes itself. The monitor records it as
        ``lr``, since a relative-step group has ``lr=None``."""
        out = []
        for group in self.param_groups:
            steps = [float(self.state[p]["step"]) for p in group["params"] if p in self.state]
            out.append(_step_size(max(steps), group["lr"], group["relative_step"],
                                  group["warmup_init"]) if steps else group["lr"])
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state dict, keeping the float32 state float32 (see the class docstring).

        `torch.optim.Optimizer.load_state_dict` casts floating-point state to the parameter's
        dtype, which would round a bf16 parameter's float32 moments to bf16 and break bit-exact
        resumption; the saved values are reloaded here in float32 instead. The cast is a static
        method that torch calls through its own class, so it cannot be overridden itself.

        Args:
            state_dict: as returned by `state_dict`.
        """
        super().load_state_dict(state_dict)
        for p, key, value in self._saved_state(state_dict):
            if key != "step" and isinstance(value, Tensor) and value.is_floating_point():
                self.state[p][key] = value.to(device=p.device, dtype=torch.float32)


def check_adafactor_hyperparameters(owner: str, group: dict[str, Any]) -> None:
    """Checks the group's clip_threshold (> 0), decay_rate (in [-1, 0)) and beta1 (None or in
    [0, 1)), in that order; shared by Adafactor and AdafacDiag."""
    clip = group["clip_threshold"]
    check_range(owner, "clip_threshold", clip, -math.inf)  # a number, not NaN
    if not clip > 0:
        raise ValueError(f"{owner}: clip_threshold must be > 0 (the RMS updates are clipped "
                         f"to), got {clip}; pass math.inf to turn clipping off")
    check_range(owner, "decay_rate", group["decay_rate"], -1.0, 0.0)
    if group["beta1"] is not None:
        check_range(owner, "beta1", group["beta1"], 0.0, 1.0)


def adafactor(params: list[Tensor], grads: list[Tensor], row_vars: list[Tensor | None],
              col_vars: list[Tensor | None], exp_avg_sqs: list[Tensor | None],
              exp_avgs: list[Tensor] | None, state_steps: list[Tensor], *, lr: float | None,
              eps: tuple[float, float], clip_threshold: float, decay_rate: float,
              beta1: float | None, weight_decay: float, scale_parameter: bool,
              relative_step: bool, warmup_init: bool, backend: str = "auto",
              stats: StatsRows | None = None) -> None:
    """Functional Adafactor over tensors on one device: increments ``state_steps`` and updates
    parameters and state in place.

    Args:
        params, grads: one entry per parameter.
        row_vars, col_vars: ``exp_avg_sq_row`` / ``exp_avg_sq_col`` of factored parameters (two or
            more dimensions), None for the others.
        exp_avg_sqs: ``exp_avg_sq`` of non-factored parameters, None for factored ones.
        exp_avgs: first moments when ``beta1`` is set, else None.
        state_steps: float32 0-d CPU tensors, the step count of each parameter.
        lr, eps, clip_threshold, decay_rate, beta1, weight_decay, scale_parameter, relative_step,
            warmup_init: hyperparameters, as in `Adafactor`.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (default ``"auto"``).
        stats: where to write statistics rows (`Adafactor.stat_columns`), or None.
    """
    # The local tensors of (replicated) DTensors, as `adam` takes them: a DTensor's data_ptr is 0,
    # not an address the Triton kernel may read (sharded ones are refused by `Adafactor`).
    params, grads, row_vars, col_vars, exp_avg_sqs = (
        local_all(ts) for ts in (params, grads, row_vars, col_vars, exp_avg_sqs))
    exp_avgs = local_all(exp_avgs) if exp_avgs is not None else None
    impl = {"triton": _adafactor_triton, "torch": _adafactor_torch}[
        resolve_backend(backend, params[0].device, "Adafactor")]
    impl(params, grads, row_vars, col_vars, exp_avg_sqs, exp_avgs, state_steps, lr=lr, eps=eps,
         clip_threshold=clip_threshold, decay_rate=decay_rate, beta1=beta1,
         weight_decay=weight_decay, scale_parameter=scale_parameter, relative_step=relative_step,
         warmup_init=warmup_init, stats=stats)


def factored_v(row: Tensor, col: Tensor) -> Tensor:
    """v̂ of factored statistics, R_i / mean(R) · C_j per matrix (the monitor's reading of it,
    contract.py's `second_at`, by the same float32 operations): ``row`` ``[..., m]``, ``col``
    ``[..., n]`` give ``[..., m, n]``."""
    return (row / row.mean(dim=-1, keepdim=True)).unsqueeze(-1) * col.unsqueeze(-2)


def _step_size(step: float, lr: float | None, relative_step: bool, warmup_init: bool) -> float:
    """ρ_t, the step size before parameter scaling."""
    if not relative_step:
        return lr
    return min(1e-6 * step if warmup_init else 1e-2, 1.0 / math.sqrt(step))


def _rms(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x) / math.sqrt(x.numel())


def _apply(theta: Tensor, update: Tensor, exp_avg: Tensor | None, scale: Tensor,
           decay: Tensor | float | None, beta1: float | None) -> None:
    """θ ← θ − η·wd·θ, then θ ← θ − scale·u (or, with β₁, m ← β₁m + (1 − β₁)·scale·u and θ ← θ − m),
    in place; every operation elementwise, so a chunk of the tensors gives the bits of the whole."""
    if decay is not None:
        theta.sub_(theta * decay)
    if exp_avg is not None:
        exp_avg.mul_(beta1).addcmul_(update, scale, value=1.0 - beta1)
        theta.sub_(exp_avg)
    else:
        theta.addcmul_(update, scale, value=-1.0)


# 2^18 entries (1 MiB of float32): θ's chunk, its copy and the update's chunk stay in L2 while
# they are summed. A multiple of 64, so torch's vector/tail split of each elementwise operation,
# and with it every element's result, is that of the whole tensor. The sums ride on the update's
# passes instead of a clone of θ and three more passes over it (`optiscope bench --cases
# 'optiscope-adafactor-torch*'` measures the step with statistics against the step without).
_CHUNK = 1 << 18


def _apply_with_sums(theta: Tensor, update: Tensor, exp_avg: Tensor | None, scale: Tensor,
                     decay: Tensor | float | None, beta1: float | None) -> Tensor:
    """`_apply` chunk by chunk on contiguous float32 CPU tensors, with Σθ⁻², Σθ⁺², Σ(θ⁺ − θ⁻)² and
    Σm² (0 without β₁) as float32 ``[4]`` (float64 over chunks), taken while each chunk is in
    cache."""
    t, u = theta.view(-1), update.view(-1)
    m = exp_avg.view(-1) if exp_avg is not None else None
    # float32 sums of whole chunks drift (a BLAS dot of 2^18 equal entries: 1.8e-5): in C where
    # it compiled, else per 4096-entry rows; added over chunks in float64
    sums_of = cpu.sq_sums_small_f32 if cpu.sums_apply([t]) else (
        lambda xs: [float(sq_sum(x)) for x in xs])
    before = torch.empty(min(t.numel(), _CHUNK), dtype=torch.float32)
    total = [0.0] * 4  # Python floats: float64
    for start in range(0, t.numel(), _CHUNK):
        tc = t[start:start + _CHUNK]
        mc = m[start:start + _CHUNK] if m is not None else None
        b = before[: tc.numel()]
        b.copy_(tc)
        _apply(tc, u[start:start + _CHUNK], mc, scale, decay, beta1)
        (sq_before,) = sums_of([b])
        b.sub_(tc)  # θ⁻ − θ⁺
        sums = [sq_before, *sums_of([tc, b] if mc is None else [tc, b, mc])]
        total = [x + y for x, y in zip(total, sums + [0.0] * (4 - len(sums)))]
    return torch.tensor(total, dtype=torch.float32)


def _adafactor_triton(params, grads, row_vars, col_vars, exp_avg_sqs, exp_avgs, state_steps, *,
                      lr, eps, clip_threshold, decay_rate, beta1, weight_decay, scale_parameter,
                      relative_step, warmup_init, stats):
    from optiscope.kernels.adafactor import adafactor_step

    counts = advance_steps(state_steps)
    keys = [(p.dtype, g.dtype, float(c)) for p, g, c in zip(params, grads, counts)]
    for (_, _, step), idx in launch_groups(keys).items():
        adafactor_step(
            [params[i] for i in idx], [grads[i] for i in idx], [row_vars[i] for i in idx],
            [col_vars[i] for i in idx], [exp_avg_sqs[i] for i in idx],
            [exp_avgs[i] for i in idx] if exp_avgs is not None else None,
            rho=_step_size(step, lr, relative_step, warmup_init),
            beta2t=1.0 - step ** decay_rate, eps1=eps[0], eps2=eps[1],
            clip_threshold=clip_threshold, beta1=beta1, weight_decay=weight_decay,
            scale_parameter=scale_parameter,
            stats=stats.subset(idx) if stats is not None else None)


def _adafactor_torch(params, grads, row_vars, col_vars, exp_avg_sqs, exp_avgs, state_steps, *,
                     lr, eps, clip_threshold, decay_rate, beta1, weight_decay, scale_parameter,
                     relative_step, warmup_init, stats):
    eps1, eps2 = eps
    # the range counts (`request_ranges`): torch ops have no pass of their own to count in, so
    # g, θ⁺ − θ⁻ and v̂ are counted by an extra pass over each (`whole_counts`)
    counting = stats is not None and stats.ranges is not None
    if stats is not None:
        columns = torch_grad_stats(grads)
        theta_sq = []  # per tensor: Σθ⁻², Σθ⁺², Σ(θ⁺ − θ⁻)², Σm²
        moment2_sq = []
    for i, p in enumerate(params):
        step = state_steps[i].add_(1).item()  # a CPU tensor: no device synchronisation
        rho = _step_size(step, lr, relative_step, warmup_init)
        beta2t = 1.0 - step ** decay_rate
        g = grads[i].float()
        theta = p.float()  # p itself when p is float32, so the in-place updates below land in p
        # η_t stays a device tensor: `.item()` would synchronise once per parameter.
        lr_t = _rms(theta).clamp(min=eps2) * rho if scale_parameter else rho

        if row_vars[i] is not None:
            update = g.square().add_(eps1)
            row, col = row_vars[i], col_vars[i]
            row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(update.mean(dim=-2), alpha=1.0 - beta2t)
            row_mean = row.mean(dim=-1, keepdim=True)
            # g / √v̂ with v̂ = R Cᵀ / mean(R), without materialising v̂.
            r_factor = (row / row_mean).rsqrt_().unsqueeze(-1)
            update = r_factor.mul(col.unsqueeze(-2).rsqrt()).mul_(g)
            if stats is not None:  # Σ v̂² = Σ_b (Σ R²)(Σ C²) / mean(R)², exactly, per matrix b
                moment2_sq.append((row.square().sum(-1) * col.square().sum(-1)
                                   / row_mean.squeeze(-1).square()).sum())
            if counting:
                v_hat = factored_v(row, col)
        else:
            # v ← β̂ v + (1 − β̂)(g² + ε₁), g² taken inside addcmul_: no g² temporary (and the
            # update is scaled inside θ's addcmul_ below: no temporary there either).
            exp_avg_sq = exp_avg_sqs[i]
            exp_avg_sq.mul_(beta2t).addcmul_(g, g, value=1.0 - beta2t).add_((1.0 - beta2t) * eps1)
            update = exp_avg_sq.rsqrt().mul_(g)
            if stats is not None:
                moment2_sq.append(torch_sq_norms([exp_avg_sq])[0])  # one pass, not two
            v_hat = exp_avg_sq

        # η_t / max(1, RMS(u) / d) as a 0-d tensor, applied in the pass that uses the update
        scale = lr_t / (_rms(update) / clip_threshold).clamp_(min=1.0)
        decay = weight_decay * lr_t if weight_decay != 0 else None
        exp_avg = exp_avgs[i] if beta1 is not None else None
        if stats is None:
            _apply(theta, update, exp_avg, scale, decay, beta1)
        elif not counting and theta is p and p.device.type == "cpu" and all(
                t.is_contiguous() for t in (p, update, *([exp_avg] if beta1 is not None else []))):
            theta_sq.append(_apply_with_sums(theta, update, exp_avg, scale, decay, beta1))
        else:  # another dtype or layout: θ⁻ kept whole, the sums of the stored parameter
            before = theta.clone()
            _apply(theta, update, exp_avg, scale, decay, beta1)
            if theta is not p:
                p.copy_(theta)
            after = p.float()
            zero = before.new_zeros((), dtype=torch.float64)
            theta_sq.append(torch.stack([
                sq_sum(before), sq_sum(after), sq_sum(after - before),
                sq_sum(exp_avg) if exp_avg is not None else zero]).float())
            if counting:
                stats.ranges[stats.rows[i]] = whole_counts([grads[i], after - before, v_hat]).to(
                    stats.ranges.device)
            continue
        if theta is not p:
            p.copy_(theta)

    if stats is not None:
        sums = torch.stack(theta_sq)
        columns[Stat.PARAM_SQ_BEFORE] = sums[:, 0]
        columns[Stat.PARAM_SQ_AFTER] = sums[:, 1]
        columns[Stat.UPDATE_SQ] = sums[:, 2]
        columns[Stat.MOMENT2_SQ] = torch.stack(moment2_sq)
        if exp_avgs is not None:
            columns[Stat.MOMENT1_SQ] = sums[:, 3]
        stats.write(columns)
