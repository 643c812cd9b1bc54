"""What a run's records say beyond the numbers: analyses of a `RunHistory` that every view shares.

`freeze_verdict` decides whether, and from which step, Adam's second moment v was stable enough
to freeze (as 1-bit Adam does). The HTML report shows it; it is plain data and text, so any sink
or script can use it. This module knows no dashboard.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from optiscope.formatting import format_number
from optiscope.monitor.history import RunHistory

__all__ = ["FreezeVerdict", "freeze_verdict"]


@dataclass
class FreezeVerdict:
    """Whether, and from which step, Adam's second moment v was stable enough to freeze.

    Attributes:
        available: the run recorded ``moment2_drift`` or ``moment2_drift_since_freeze``
            (False: no verdict; ``message`` says why).
        stable: v was shown to stay within ``tol`` of its value at some step, by the summed
            drift or by the freeze probe.
        freeze_step: the earliest step shown stable (None when not stable).
        evidence: what showed it: ``"summed drift"`` or ``"freeze probe"`` (None when not
            stable).
        bound: the summed-drift bound on ‖v_e − v_T‖/‖v_T‖ at the bound's own earliest stable
            step, or, when it shows none, the least bound among the steps that leave
            ``min_tail`` of the run; None without drift samples.
        tol: the tolerance the verdict used.
        message: the verdict in a few sentences, for people.
        probe_step: the ``freeze_probe`` step T₀ when the run recorded
            ``moment2_drift_since_freeze``, else None.
        probe_max: the largest ‖v_t − v_T₀‖/‖v_T₀‖ measured after T₀ (None without the probe).
        probe_last: its last value.
        probe_last_step: the step of ``probe_last``.
        steps: the candidate steps T of the summed drift (sampled steps), for plotting.
        remaining: the bound from each of ``steps`` to the end of the run (inf: not finite).
    """

    available: bool
    stable: bool
    freeze_step: int | None
    evidence: str | None
    bound: float | None
    tol: float
    message: str
    probe_step: int | None = None
    probe_max: float | None = None
    probe_last: float | None = None
    probe_last_step: int | None = None
    steps: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)
    remaining: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)


def freeze_verdict(history: RunHistory, tol: float = 0.1, *,
                   min_tail: float = 0.2) -> FreezeVerdict:
    """From which step Adam's second moment v could have been frozen (as 1-bit Adam does).

    Freezing v at step T is safe when v stays close to v_T for the rest of the run. Two kinds of
    evidence count:

    * Summed drift. The monitor records the global ``moment2_drift``
      d_i = ‖v_i − v_p‖/‖v_p‖ between consecutive samples p < i, so by the triangle
      inequality, for every later sample e,

          ‖v_e − v_T‖ / ‖v_T‖  ≤  Σ_{samples i after T} d_i · ‖v_p(i)‖ / ‖v_T‖,

      with ‖v‖ the global ``moment2_norm`` (without it every ‖v‖ ratio is taken as 1). The
      bound's freeze step is the earliest sampled T whose bound is at most ``tol`` and which
      leaves at least ``min_tail`` of the sampled span after it: near the end of a run the
      bound is small only because little is left to measure. The bound is conservative: noise
      that cancels out over many steps adds up in it, the more so the more often the run was
      sampled.
    * The freeze probe. With ``freeze_probe=T₀`` the monitor measures
      ``moment2_drift_since_freeze`` = ‖v_t − v_T₀‖/‖v_T₀‖ directly; if its largest value after
      T₀ is at most ``tol`` (and T₀ leaves ``min_tail`` of the run), freezing at T₀ was safe.

    The verdict's freeze step is the earlier of the two.

    Args:
        history: the run.
        tol: the largest relative change of v that counts as stable (default 0.1).
        min_tail: share of the sampled span that must follow the freeze step (default 0.2).

    Returns:
        A `FreezeVerdict`.
    """
    if isinstance(tol, bool) or not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"freeze_verdict: tol must be a number > 0, got {tol!r}")
    if isinstance(min_tail, bool) or not (isinstance(min_tail, (int, float)) and 0 <= min_tail < 1):
        raise ValueError(f"freeze_verdict: min_tail must be in [0, 1), got {min_tail!r}")
    probe = _probe(history, tol, min_tail)
    frozen_at = history.meta.get("second_moment_frozen_at")
    if frozen_at is not None:  # OneBitAdam: its v stops moving at T by construction
        steps, remaining, how = np.zeros(0, np.int64), np.zeros(0), ""
    else:
        steps, remaining, how = _summed_drift(history)
    common = dict(tol=tol, probe_step=probe.step, probe_max=probe.worst, probe_last=probe.last,
                  probe_last_step=probe.last_step, steps=steps, remaining=remaining)
    skipped = history.meta.get("skipped_metrics") or {}
    why = (f"the optimizer froze v itself at step {frozen_at:,}, so the drift of its own v says "
           "nothing after that; the freeze probe compares v_T with the v it would have had"
           if frozen_at is not None else
           skipped.get("moment2_drift") or skipped.get("moment2_norm")
           or "no moment2_drift was recorded (it needs at least two sampled steps)")
    if not len(steps) and probe.step is None:
        return FreezeVerdict(False, False, None, None, None,
                             message=f"No verdict on freezing the second moment: {why}.", **common)

    bound, bound_step, drift_text = None, None, f"No summed drift: {why}."
    if len(steps):
        span = steps[-1] - steps[0]
        long_enough = ((steps[-1] - steps) >= min_tail * span if span > 0
                       else np.zeros(len(steps), bool))
        quiet = long_enough & (remaining <= tol)
        if quiet.any():
            k = int(np.argmax(quiet))
            bound_step, bound = int(steps[k]), float(remaining[k])
            drift_text = (f"Summed drift: from step {bound_step:,} to the end (step "
                          f"{int(steps[-1]):,}) v moved by at most {bound:.3g} of ‖v‖ "
                          f"(tolerance {tol:g}; {how}).")
        elif long_enough.any():
            candidates = np.flatnonzero(long_enough)
            k = int(candidates[np.argmin(remaining[candidates])])
            least = float(remaining[k])
            bound = least if math.isfinite(least) else None
            drift_text = (f"Summed drift: not stable over the first {1 - min_tail:.0%} of the "
                          "run; " + (f"the smallest bound, {least:.3g} of ‖v‖ from step "
                                     f"{int(steps[k]):,}, is above the tolerance {tol:g}"
                                     if bound is not None else "a non-finite drift leaves no "
                                                               "bound") +
                          f" ({how}; the bound is conservative: noise that cancels out over "
                          "many steps adds up in it).")
        else:
            drift_text = "Summed drift: too few samples to tell."

    found = [(s, e) for s, e in ((bound_step, "summed drift"), (probe.stable_step, "freeze probe"))
             if s is not None]
    freeze, evidence = min(found) if found else (None, None)
    if freeze is not None:
        head = f"Stable enough to freeze from step {freeze:,} (shown by the {evidence})."
    else:
        head = "Not shown stable enough to freeze."
        if probe.step is None:
            drift_text += (" Run with freeze_probe=T to measure ‖v_t − v_T‖ directly.")
    message = " ".join(t for t in (head, drift_text, probe.text) if t)
    return FreezeVerdict(True, freeze is not None, freeze, evidence, bound, message=message,
                         **common)


def _summed_drift(history: RunHistory) -> tuple[np.ndarray, np.ndarray, str]:
    """(candidate steps T, bound from each T to the end, how the drifts were weighted)."""
    metrics = history.metrics()
    if "moment2_drift" not in metrics:
        return np.zeros(0, np.int64), np.zeros(0), ""
    drift_steps, drift = history.series("moment2_drift")
    if "moment2_norm" in metrics:
        norm_steps, norms = history.series("moment2_norm")
        how = "each drift weighted by ‖v‖ where it starts"
    else:
        norm_steps, norms = drift_steps, np.ones(len(drift_steps))
        how = "‖v‖ taken as constant: the run has no moment2_norm"
    if not len(drift_steps) or not len(norm_steps):
        return np.zeros(0, np.int64), np.zeros(0), how
    # p(i): the sample before drift sample i, which its drift is measured from.
    before = np.searchsorted(norm_steps, drift_steps) - 1
    has_prev = before >= 0
    prev_steps = norm_steps[before[has_prev]]
    moved = drift[has_prev] * norms[before[has_prev]]  # ≈ ‖v_i − v_p(i)‖
    moved = np.where(np.isfinite(moved), moved, np.inf)  # a NaN drift certifies nothing
    order = np.argsort(prev_steps, kind="stable")
    prev_steps, moved = prev_steps[order], moved[order]
    # after[k]: Σ moved over the drift intervals that start at or after candidate k.
    suffix = np.concatenate([np.cumsum(moved[::-1])[::-1], [0.0]])
    steps = np.union1d(prev_steps, drift_steps)
    after = suffix[np.searchsorted(prev_steps, steps, side="left")]
    at = np.minimum(np.searchsorted(norm_steps, steps), len(norm_steps) - 1)
    ref = np.where(norm_steps[at] == steps, norms[at], np.nan)  # ‖v_T‖
    with np.errstate(divide="ignore", invalid="ignore"):
        remaining = np.where(after == 0, 0.0, after / ref)
    return steps, np.where(np.isfinite(remaining), remaining, np.inf), how


@dataclass
class _Probe:
    step: int | None = None
    worst: float | None = None
    last: float | None = None
    last_step: int | None = None
    stable_step: int | None = None
    text: str = ""


def _probe(history: RunHistory, tol: float, min_tail: float) -> _Probe:
    """What the run's ``moment2_drift_since_freeze`` says, if it recorded one."""
    if "moment2_drift_since_freeze" not in history.metrics():
        return _Probe()
    steps, values = history.series("moment2_drift_since_freeze")
    t0 = history.meta.get("freeze_probe")
    if not len(steps) or t0 is None:
        return _Probe()
    t0 = int(t0)
    worst = float(np.max(values)) if np.isfinite(values).all() else math.inf
    tail_ok = int(steps[-1]) - t0 >= min_tail * int(steps[-1])
    stable = worst <= tol and tail_ok
    verdict = ("within" if worst <= tol else "beyond") + f" the tolerance {tol:g}"
    if worst <= tol and not tail_ok:
        verdict += f", but T₀ leaves less than {min_tail:.0%} of the run to tell"
    return _Probe(t0, worst, float(values[-1]), int(steps[-1]), t0 if stable else None,
                  f"Freeze probe: with v frozen at step {t0:,}, the real v moved by at most "
                  f"{format_number(worst)} of ‖v_T₀‖ up to step {int(steps[-1]):,} ({verdict}).")

