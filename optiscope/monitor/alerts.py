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

    The state is kept in arrays, one position per scope (the positions of a scope list cached
    while the same list comes back), and `observe` judges a sample's values at once: the same
    float operations per value as a loop, in about a dozen numpy calls (samples are decoded in
    batches, where these calls run warm; a loop over a model's 149 scopes cost ~100 us).
    """

    def __init__(self, decay: float, warmup: int, persist: int):
        self.decay, self.warmup, self.persist = decay, warmup, persist
        self.position: dict[str, int] = {}
        self.mean = np.zeros(0)
        self.count = np.zeros(0, dtype=np.int64)    # 0: never seen
        self.outside = np.zeros(0, dtype=np.int64)  # length of the current excursion
        self._last: tuple[list[str], np.ndarray] = ([], np.zeros(0, dtype=np.int64))
        self._rounds: np.ndarray | None = None  # each value's occurrence of its scope

    def positions(self, scopes: list[str]) -> np.ndarray:
        """The positions of ``scopes`` (new ones added); cached for the last list of scopes."""
        last, where = self._last
        if scopes == last:  # C-level: the same str objects compare by identity first
            return where
        for s in scopes:
            if s not in self.position:
                self.position[s] = len(self.position)
        grow = len(self.position) - len(self.mean)
        if grow:
            self.mean = np.concatenate([self.mean, np.zeros(grow)])
            self.count = np.concatenate([self.count, np.zeros(grow, dtype=np.int64)])
            self.outside = np.concatenate([self.outside, np.zeros(grow, dtype=np.int64)])
        where = np.array([self.position[s] for s in scopes], dtype=np.int64)
        # a scope named twice in one sample is taken twice, in order: rounds of distinct scopes
        seen: dict[str, int] = {}
        occurrence = []
        for s in scopes:
            occurrence.append(seen.get(s, 0))
            seen[s] = occurrence[-1] + 1
        self._rounds = None if len(seen) == len(scopes) else np.array(occurrence)
        self._last = (list(scopes), where)
        return where

    def observe(self, scopes: list[str], values: list[float], spike: float | None = None,
                band: float | None = None, lr: float = 1.0) -> list[tuple[int, float]]:
        """Takes a sample's values; returns (index, baseline) of those that start an
        excursion, in order. ``values`` are judged against ``spike`` × the average (a value
        above it, the average positive); or, with ``band``, the positive ones are taken as
        log(value / lr) and judged against ``band`` around the average (further either way).
        NaN and ±inf are left out."""
        where = self.positions(scopes)
        x = np.asarray(values, dtype=np.float64)[:len(where)]
        at = np.flatnonzero(np.isfinite(x) & (x > 0) if band is not None else np.isfinite(x))
        if not len(at):
            return []
        x = x[at]
        if band is not None:  # math.log per value: numpy's log may round otherwise
            x = np.fromiter(map(math.log, (x / lr).tolist()), dtype=np.float64, count=len(x))
        if self._rounds is None:
            return self._judge(at, where[at], x, spike, band)
        found, rounds = [], self._rounds[at]
        for r in range(int(rounds.max()) + 1):
            this = rounds == r
            found += self._judge(at[this], where[at[this]], x[this], spike, band)
        return sorted(found)

    def _judge(self, at: np.ndarray, k: np.ndarray, x: np.ndarray, spike, band
               ) -> list[tuple[int, float]]:
        """`observe` of finite values ``x`` at distinct positions ``k`` (``at``: their indices
        in the sample)."""
        c, m = self.count[k], self.mean[k]
        judged = (c > 0) & (c >= self.warmup)
        if band is None:
            out = judged & (m > 0) & (x > spike * m)
        else:
            out = judged & (np.abs(x - m) > band)
        found = []
        if out.any():
            run = self.outside[k] + 1
            self.outside[k[out]] = run[out]
            new_level = out & (run >= self.persist)
            kn = k[new_level]
            self.mean[kn], self.count[kn], self.outside[kn] = x[new_level], 1, 0
            first = np.flatnonzero(out & (run == 1))
            found = list(zip(at[first].tolist(), m[first].tolist()))
            keep = ~out
            k, c, m, x = k[keep], c[keep], m[keep], x[keep]
        self.mean[k] = np.where(c > 0, self.decay * m + (1 - self.decay) * x, x)
        self.outside[k] = 0
        self.count[k] = c + 1
        return found


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
        alerts = []
        lr = _lr(values)
        if "nonfinite_grads" in values:
            scopes, bad = values["nonfinite_grads"]
            bad = _floats(bad)
            hit = [i for i, v in enumerate(bad) if v > 0 and i] if any(bad[1:]) else []
            if hit:
                named = [scopes[i] for i in hit]
                alerts.append(Alert(step, "nonfinite_grads", "nonfinite_grads", named,
                                    f"step {step}: non-finite gradient entries in "
                                    f"{len(named)} tensor(s): " + _listing(
                                        [f"{scopes[i]} ({int(bad[i])})" for i in hit]),
                                    float(bad[0])))
        if "grad_norm" in values:
            scopes, norms = values["grad_norm"]
            norms = _floats(norms)
            spiking = [(scopes[i], norms[i], avg) for i, avg in
                       self._grad.observe(scopes, norms, spike=self.spike_factor)]
            if spiking:
                alerts.append(Alert(step, "grad_spike", "grad_norm", [s for s, _, _ in spiking],
                                    f"step {step}: gradient-norm spike in " + _listing(
                                        [f"{s} ({v:.3g} = {v / a:.1f}x its average)"
                                         for s, v, a in spiking]), float(spiking[0][1])))
        if "update_ratio" in values and lr != 0:
            scopes, ratios = values["update_ratio"]
            ratios = _floats(ratios)
            out = [(scopes[i], ratios[i], math.exp(avg) * lr)
                   for i, avg in self._ratio.observe(scopes, ratios, band=self.log_band, lr=lr)]
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


def _floats(values) -> list[float]:
    """A recorded metric's numbers (a numpy row or a list) as Python floats."""
    return values.tolist() if isinstance(values, np.ndarray) else [float(v) for v in values]


def _lr(values: dict) -> float:
    """The first param group's lr, if recorded and positive and finite; 0 when it is 0 (nothing
    moves: no band to judge); else 1 (ratios judged as they are)."""
    if "lr" not in values:
        return 1.0
    lrs = [float(x) for x in values["lr"][1]]
    if lrs and lrs[0] == 0:
        return 0.0
    return next((x for x in lrs if math.isfinite(x) and x > 0), 1.0)
