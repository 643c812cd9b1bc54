"""The alert rules keep their running averages in lists by position and judge a sample in one
loop; the rules as they were, with dicts and one `observe` call per value, written out here
plainly, are the oracle: same alerts, same messages, same order."""

import math

import numpy as np
import pytest

from optiscope.monitor.alerts import AlertRules, _listing
from optiscope.monitor.history import Alert


class ScalarRules:
    """The alert rules one value at a time, with dicts (the rules' reference)."""

    def __init__(self, spike_factor=10.0, ratio_band=10.0, warmup=5, decay=0.9, persist=3):
        self.spike_factor, self.log_band = spike_factor, math.log(ratio_band)
        self.warmup, self.decay, self.persist = warmup, decay, persist
        self.grad = ({}, {}, {})  # mean, count, outside
        self.ratio = ({}, {}, {})

    def observe(self, base, scope, value, out):
        mean_of, count, outside = base
        mean = mean_of.get(scope)
        if mean is not None and count[scope] >= self.warmup and out(value, mean):
            run = outside[scope] = outside.get(scope, 0) + 1
            if run >= self.persist:
                mean_of[scope], count[scope], outside[scope] = value, 1, 0
            return mean if run == 1 else None
        outside[scope] = 0
        mean_of[scope] = value if mean is None else self.decay * mean + (1 - self.decay) * value
        count[scope] = count.get(scope, 0) + 1
        return None

    def check(self, step, values, skipped_new=0):
        alerts = []
        lr = 1.0
        if "lr" in values:
            lrs = [float(x) for x in values["lr"][1]]
            lr = 0.0 if lrs and lrs[0] == 0 else next(
                (x for x in lrs if math.isfinite(x) and x > 0), 1.0)
        if "nonfinite_grads" in values:
            scopes, bad = values["nonfinite_grads"]
            named = [s for s, v in zip(scopes[1:], bad[1:]) if v > 0]
            if named:
                alerts.append(Alert(step, "nonfinite_grads", "nonfinite_grads", named,
                                    f"step {step}: non-finite gradient entries in "
                                    f"{len(named)} tensor(s): " + _listing(
                                        [f"{s} ({int(v)})" for s, v in zip(scopes[1:], bad[1:])
                                         if v > 0]), float(bad[0])))
        if "grad_norm" in values:
            scopes, norms = values["grad_norm"]
            spiking = []
            for scope, v in zip(scopes, norms):
                if not math.isfinite(v):
                    continue
                avg = self.observe(self.grad, scope, v,
                                   lambda x, m: m > 0 and x > self.spike_factor * m)
                if avg is not None:
                    spiking.append((scope, v, avg))
            if spiking:
                alerts.append(Alert(step, "grad_spike", "grad_norm", [s for s, _, _ in spiking],
                                    f"step {step}: gradient-norm spike in " + _listing(
                                        [f"{s} ({v:.3g} = {v / a:.1f}x its average)"
                                         for s, v, a in spiking]), float(spiking[0][1])))
        if "update_ratio" in values and lr != 0:
            scopes, ratios = values["update_ratio"]
            out = []
            for scope, r in zip(scopes, ratios):
                if not (math.isfinite(r) and r > 0):
                    continue
                avg = self.observe(self.ratio, scope, math.log(r / lr),
                                   lambda x, m: abs(x - m) > self.log_band)
                if avg is not None:
                    out.append((scope, r, math.exp(avg) * lr))
            if out:
                at = "" if lr == 1.0 else " at this lr"
                alerts.append(Alert(step, "update_ratio_band", "update_ratio",
                                    [s for s, _, _ in out],
                                    f"step {step}: update ratio out of its usual band in "
                                    + _listing([f"{s} ({r:.3g}, usually {a:.3g}{at})"
                                                for s, r, a in out]), float(out[0][1])))
        if skipped_new > 0:
            alerts.append(Alert(step, "skipped_steps", "skipped_steps", ["global"],
                                f"step {step}: the GradScaler skipped {skipped_new} step(s) "
                                "since the last sample (inf/NaN gradients; the loss scale was "
                                "lowered)", float(skipped_new)))
        return alerts


def _series(rng, n_scopes, steps):
    """Per step: a metric's values for a random subset of scopes (in order, "global" first),
    with level changes, spikes, NaN, inf, zeros and negative values."""
    level = 10.0 ** rng.uniform(-4, 2, n_scopes)
    names = [f"t{i}" for i in range(n_scopes)]
    for step in range(1, steps + 1):
        if rng.random() < 0.1:  # a lasting change of level for some scopes
            level[rng.random(n_scopes) < 0.3] *= 10.0 ** rng.uniform(-3, 3)
        x = level * rng.lognormal(0.0, 0.3, n_scopes)
        x[rng.random(n_scopes) < 0.05] *= 10.0 ** rng.choice([-4.0, -2.0, 2.0, 4.0])
        special = rng.random(n_scopes)
        x[special < 0.02] = np.nan
        x[(special >= 0.02) & (special < 0.03)] = np.inf
        x[(special >= 0.03) & (special < 0.04)] = 0.0
        x[(special >= 0.04) & (special < 0.05)] *= -1
        keep = rng.random(n_scopes) < (0.7 if rng.random() < 0.2 else 1.0)
        scopes = ["global"] + [s for s, k in zip(names, keep) if k]
        values = np.concatenate([[np.nansum(np.abs(x[keep]))], x[keep]])
        yield step, scopes, values


@pytest.mark.parametrize("seed", range(6))
def test_alerts_of_the_vectorised_rules_are_those_of_the_rule_for_one_value(seed):
    rng = np.random.default_rng(seed)
    kwargs = [{}, dict(spike_factor=3.0, ratio_band=4.0, warmup=2, persist=2),
              dict(warmup=0, persist=1, decay=0.5)][seed % 3]
    rules, oracle = AlertRules(**kwargs), ScalarRules(**kwargs)
    grads = _series(rng, 40, 120)
    ratios = _series(rng, 40, 120)
    seen = 0
    for (step, g_scopes, g), (_, r_scopes, r) in zip(grads, ratios):
        bad = np.where(rng.random(len(g_scopes)) < 0.03, rng.integers(1, 5, len(g_scopes)), 0.0)
        lr = [rng.choice([1e-3, 0.0, 2e-3, np.nan, -1.0]) if rng.random() < 0.1 else 1e-3]
        values = {"grad_norm": (g_scopes, g), "update_ratio": (r_scopes, r),
                  "nonfinite_grads": (g_scopes, bad), "lr": (["group0"], lr)}
        if step % 17 == 0:
            values["lr"] = (["group0", "group1"], [lr[0], 5e-4])
        skipped = int(rng.integers(0, 2))
        # the oracle reads plain Python floats, the rules numpy arrays
        plain = {k: (list(s), [float(x) for x in v]) for k, (s, v) in values.items()}
        got, want = rules.check(step, values, skipped), oracle.check(step, plain, skipped)
        assert [a.to_json() for a in got] == [a.to_json() for a in want], step
        seen += sum(a.kind in ("grad_spike", "update_ratio_band") for a in want)
    assert seen > 10, "the series raise alerts to compare"


def test_a_scope_named_twice_in_one_sample_is_taken_twice_in_order():
    rules, oracle = AlertRules(warmup=1), ScalarRules(warmup=1)
    for step, x in enumerate([1.0, 1.0, 50.0, 1.0, 1.0, 80.0], start=1):
        values = {"grad_norm": (["global", "a", "a"], np.array([x, x, 2 * x]))}
        plain = {"grad_norm": (["global", "a", "a"], [x, x, 2 * x])}
        assert ([a.to_json() for a in rules.check(step, values)]
                == [a.to_json() for a in oracle.check(step, plain)])
