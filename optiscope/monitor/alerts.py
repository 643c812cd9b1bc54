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

    The state is kept in lists, one position per scope (the positions of a scope list cached
    while the same list comes back), and `observe` runs one loop over a sample's values: on a
    sampled step this code meets cold caches (the training step ran in between), where a loop of
    plain float arithmetic costs less than the two dozen numpy calls of the same rule.
    """

    def __init__(self, decay: float, warmup: int, persist: int):
        self.decay, self.warmup, self.persist = decay, warmup, persist
        self.position: dict[str, int] = {}
        self.mean: list[float] = []
        self.count: list[int] = []      # 0: never seen
        self.outside: list[int] = []    # length of the current excursion
        self._last: tuple[list[str], list[int]] = ([], [])

    def positions(self, scopes: list[str]) -> list[int]:
        """The positions of ``scopes`` (new ones added); cached for the last list of scopes."""
        last, where = self._last
        if scopes == last:  # C-level: the same str objects compare by identity first
            return where
        for s in scopes:
            if s not in self.position:
                self.position[s] = len(self.position)
                self.mean.append(0.0)
                self.count.append(0)
                self.outside.append(0)
        where = [self.position[s] for s in scopes]
        self._last = (list(scopes), where)
        return where

    def observe(self, scopes: list[str], values: list[float], spike: float | None = None,
                band: float | None = None, lr: float = 1.0) -> list[tuple[int, float]]:
        """Takes a sample's values; returns (index, baseline) of those that start an
        excursion, in order. ``values`` are judged against ``spike`` × the average (a value
        above it, the average positive); or, with ``band``, the positive ones are taken as
        log(value / lr) and judged against ``band`` around the average (further either way).
        NaN and ±inf are left out."""
        mean, count, outside = self.mean, self.count, self.outside
        warmup, persist, decay = self.warmup, self.persist, self.decay
        keep, log = 1 - decay, math.log
        found = []
        for i, (k, x) in enumerate(zip(self.positions(scopes), values)):
            if x - x != 0:  # NaN or ±inf
                continue
            if band is not None:
                if not x > 0:
                    continue
                x = log(x / lr)  # per value: numpy's log may round otherwise
            c = count[k]
            if c:
                m = mean[k]
                if c >= warmup and (m > 0 and x > spike * m if band is None
                                    else abs(x - m) > band):
                    run = outside[k] = outside[k] + 1
                    if run >= persist:
                        mean[k], count[k], outside[k] = x, 1, 0
                    if run == 1:
                        found.append((i, m))
                    continue
                mean[k] = decay * m + keep * x
            else:
                mean[k] = x
            outside[k] = 0
            count[k] = c + 1
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
