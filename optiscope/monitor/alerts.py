"""Alert rules: each looks at one sampled step's values and its own running history.

* non-finite gradients: any tensor with ``nonfinite_grads > 0`` (every affected tensor named);
* gradient-norm spike: ``grad_norm`` above ``spike_factor`` × its running average (per tensor and
  global), after a few samples of warm-up; a spike does not enter the average;
* update ratio out of band: ``update_ratio`` per unit of learning rate more than ``ratio_band`` ×
  away (either way, on a log scale) from its running geometric average. Dividing by the lr (of the
  first param group, as recorded) keeps a schedule's warm-up and decay from raising alerts: Adam's
  update is proportional to its lr, so a 100× smaller lr is not a stalled layer;
* steps skipped by a GradScaler (the gradients had inf/NaN).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from optiscope.monitor.history import Alert

__all__ = ["AlertRules", "NAMED_IN_MESSAGE"]

NAMED_IN_MESSAGE = 4  # tensors a message names before "and N more" (``Alert.tensors`` has all)


def _listing(items: list[str]) -> str:
    """The first few of ``items``, then how many more."""
    shown = ", ".join(items[:NAMED_IN_MESSAGE])
    rest = len(items) - NAMED_IN_MESSAGE
    return shown + (f" and {rest} more" if rest > 0 else "")


class _Baseline:
    """Per-scope running average over sampled steps, and excursions away from it.

    A value outside the band (after ``warmup`` samples) starts an excursion: it is reported once
    and kept out of the average, so a spike does not raise the bar for the next one. An excursion
    that lasts ``persist`` samples is a new level, not an event (a LayerNorm bias settling, a new
    phase of training): the average restarts from there, and nothing more is reported.

    The state is kept in arrays, one position per scope, and a sample's scopes are judged at
    once (`observe_all`); `observe` is the same rule for one value.
    """

    def __init__(self, decay: float, warmup: int, persist: int):
        self.decay, self.warmup, self.persist = decay, warmup, persist
        self.position: dict[str, int] = {}
        self.mean = np.zeros(0)                  # NaN: never seen
        self.count = np.zeros(0, dtype=np.int64)
        self.outside = np.zeros(0, dtype=np.int64)  # length of the current excursion
        self._last: tuple = ([], np.zeros(0, np.intp), slice(0, 0), False)

    def positions(self, scopes: list[str]) -> tuple[np.ndarray, object, bool]:
        """The positions of ``scopes`` (new ones added): an index array, the same as a slice
        when they follow each other, and whether a scope repeats (then the values are taken
        one after the other). Cached for the last list of scopes."""
        last, where, fast, repeats = self._last
        if scopes == last:
            return where, fast, repeats
        for s in scopes:
            if s not in self.position:
                self.position[s] = len(self.position)
        grow = len(self.position) - len(self.mean)
        if grow > 0:
            self.mean = np.concatenate([self.mean, np.full(grow, np.nan)])
            self.count = np.concatenate([self.count, np.zeros(grow, np.int64)])
            self.outside = np.concatenate([self.outside, np.zeros(grow, np.int64)])
        where = np.array([self.position[s] for s in scopes], dtype=np.intp)
        fast = where
        if len(where) and np.array_equal(where, np.arange(where[0], where[0] + len(where))):
            fast = slice(int(where[0]), int(where[0]) + len(where))
        repeats = len(set(scopes)) < len(scopes)
        self._last = (list(scopes), where, fast, repeats)
        return where, fast, repeats

    def observe(self, k: int, value: float, out: Callable[[float, float], bool]) -> float | None:
        """Takes a value of the scope at position ``k``; returns the baseline when ``value``
        starts an excursion, else None.

        ``out(value, mean)`` says whether a value is outside the band around the average.
        """
        mean = float(self.mean[k]) if self.count[k] else None
        if mean is not None and self.count[k] >= self.warmup and out(value, mean):
            run = self.outside[k] = self.outside[k] + 1
            if run >= self.persist:
                self.mean[k], self.count[k], self.outside[k] = value, 1, 0
            return mean if run == 1 else None
        self.outside[k] = 0
        self.mean[k] = value if mean is None else self.decay * mean + (1 - self.decay) * value
        self.count[k] += 1
        return None

    def observe_all(self, where, values: np.ndarray,
                    out: Callable[[np.ndarray, np.ndarray], np.ndarray]
                    ) -> tuple[np.ndarray, np.ndarray]:
        """`observe` of ``values[i]`` at positions ``where[i]`` (an index array or a slice; no
        position twice), at once.

        Returns:
            (indices into ``values`` that start an excursion, their baselines).
        """
        mean, count = self.mean[where], self.count[where]  # views when ``where`` is a slice
        seen = count > 0
        updated = np.where(seen, self.decay * mean + (1 - self.decay) * values, values)
        outside = (count >= max(self.warmup, 1)) & out(values, mean)  # seen and warm
        if not outside.any():  # the usual sample: every value enters its average
            self.mean[where], self.count[where], self.outside[where] = updated, count + 1, 0
            return _NONE, _NONE
        run = np.where(outside, self.outside[where] + 1, 0)
        restart = outside & (run >= self.persist)
        starts = np.flatnonzero(outside & (run == 1))
        baselines = mean[starts]  # before the writes below (``mean`` may be a view)
        self.mean[where] = np.where(outside, np.where(restart, values, mean), updated)
        self.count[where] = np.where(outside, np.where(restart, 1, count), count + 1)
        self.outside[where] = np.where(restart, 0, run)
        return starts, baselines


_NONE = np.zeros(0, dtype=np.intp)


class AlertRules:
    """The monitor's alert rules.

    Args:
        spike_factor: a grad norm above this multiple of its running average is a spike
            (default 10).
        ratio_band: an update ratio this many times above or below its running geometric average
            is out of band (default 10).
        warmup: samples of a scope before spikes and bands are judged (default 5).
        decay: decay of the running averages per sample (default 0.9).
        persist: samples out of band after which the new level becomes the baseline
            (default 3). An alert is raised when a value first leaves its band, not at every
            sample it stays out.
    """

    def __init__(self, spike_factor: float = 10.0, ratio_band: float = 10.0, warmup: int = 5,
                 decay: float = 0.9, persist: int = 3):
        self.spike_factor = spike_factor
        self.log_band = math.log(ratio_band)
        self._grad = _Baseline(decay, warmup, persist)
        self._ratio = _Baseline(decay, warmup, persist)  # of log(update_ratio / lr)

    def check(self, step: int, values: dict[str, tuple[list[str], np.ndarray]],
              skipped_new: int = 0) -> list[Alert]:
        """Alerts of one sampled step.

        Args:
            step: the step.
            values: ``metric -> (scopes, values)``, ``"global"`` first, as recorded; reads
                ``nonfinite_grads``, ``grad_norm`` and ``update_ratio``.
            skipped_new: steps a GradScaler skipped since the last sample.
        """
        with np.errstate(invalid="ignore", over="ignore"):
            return self._check(step, values, skipped_new)

    def _check(self, step: int, values: dict, skipped_new: int) -> list[Alert]:
        alerts = []
        lr = _lr(values)
        if "nonfinite_grads" in values:
            scopes, bad = values["nonfinite_grads"]
            bad = np.asarray(bad, dtype=np.float64)
            positive = bad[1:] > 0
            hit = (np.flatnonzero(positive) + 1).tolist() if positive.any() else []
            if hit:
                named = [scopes[i] for i in hit]
                alerts.append(Alert(step, "nonfinite_grads", "nonfinite_grads", named,
                                    f"step {step}: non-finite gradient entries in "
                                    f"{len(named)} tensor(s): " + _listing(
                                        [f"{scopes[i]} ({int(bad[i])})" for i in hit]),
                                    float(bad[0])))
        if "grad_norm" in values:
            scopes, norms = values["grad_norm"]
            spike = self.spike_factor
            spiking = _observe(self._grad, scopes, norms, lambda v: np.isfinite(v), lambda v: v,
                               lambda x, m: (m > 0) & (x > spike * m),
                               lambda x, m: m > 0 and x > spike * m)
            if spiking:
                alerts.append(Alert(step, "grad_spike", "grad_norm", [s for s, _, _ in spiking],
                                    f"step {step}: gradient-norm spike in " + _listing(
                                        [f"{s} ({v:.3g} = {v / a:.1f}x its average)"
                                         for s, v, a in spiking]), float(spiking[0][1])))
        if "update_ratio" in values and lr != 0:
            scopes, ratios = values["update_ratio"]
            band = self.log_band
            out = [(scope, r, math.exp(avg) * lr) for scope, r, avg in _observe(
                self._ratio, scopes, ratios, lambda r: np.isfinite(r) & (r > 0),
                # math.log, as the rule for one value: numpy's log may round otherwise
                lambda r: np.fromiter(map(math.log, (r / lr).tolist()), np.float64, len(r)),
                lambda x, m: np.abs(x - m) > band, lambda x, m: abs(x - m) > band)]
            if out:
                at = "" if lr == 1.0 else " at this lr"
                alerts.append(Alert(step, "update_ratio_band", "update_ratio", [s for s, _, _ in out],
                                    f"step {step}: update ratio out of its usual band in " + _listing(
                                        [f"{s} ({r:.3g}, usually {a:.3g}{at})" for s, r, a in out]),
                                    float(out[0][1])))
        if skipped_new > 0:
            alerts.append(Alert(step, "skipped_steps", "skipped_steps", ["global"],
                                f"step {step}: the GradScaler skipped {skipped_new} step(s) since "
                                "the last sample (inf/NaN gradients; the loss scale was lowered)",
                                float(skipped_new)))
        return alerts


def _observe(baseline: _Baseline, scopes: list[str], values, judged, of, out, out_one
             ) -> list[tuple[str, float, float]]:
    """(scope, value, baseline) of the values that start an excursion, in ``scopes``' order:
    the values where ``judged`` holds, taken as ``of(values)``; ``out`` (arrays) and
    ``out_one`` (one value) say what is outside the band."""
    values = np.asarray(values, dtype=np.float64)
    where, fast, repeats = baseline.positions(scopes)
    ok = judged(values)
    if ok.all():  # the usual sample: no index arrays
        pick, at = slice(None), fast
    else:
        pick = np.flatnonzero(ok)
        at = where[pick]
    x = of(values[pick])
    if repeats:  # a scope twice in one sample: one value after the other
        found = []
        for i, (k, v) in enumerate(zip(where[pick].tolist(), x.tolist())):
            avg = baseline.observe(k, v, out_one)
            if avg is not None:
                found.append((i, avg))
    else:
        starts, avgs = baseline.observe_all(at, x, out)
        found = list(zip(starts.tolist(), avgs.tolist()))
    if isinstance(pick, np.ndarray):
        found = [(int(pick[i]), avg) for i, avg in found]
    return [(scopes[i], float(values[i]), avg) for i, avg in found]


def _lr(values: dict) -> float:
    """The first param group's lr, if recorded and positive and finite; 0 when it is 0 (nothing
    moves: no band to judge); else 1 (ratios judged as they are)."""
    if "lr" not in values:
        return 1.0
    lrs = [float(x) for x in values["lr"][1]]
    if lrs and lrs[0] == 0:
        return 0.0
    return next((x for x in lrs if math.isfinite(x) and x > 0), 1.0)
