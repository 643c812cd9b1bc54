"""A synthetic run: every metric of a long AdamW run on a many-tensor model, without training one.

The dashboards must stay small and fast on long runs of large models (the HTML report of a
10,000-step run of 100 tensors: under 10 MB, open in under 5 s), and training such a run takes
hours. `synthetic_run` builds the `RunHistory` such a run would leave, in seconds: noisy,
trending values of the right orders of magnitude, with what a dashboard must not lose — gradient
spikes in a few layers, a NaN gradient, alerts — at known steps.
"""

from __future__ import annotations

import math

import numpy as np

from optiscope.monitor.history import Alert, RunHistory

__all__ = ["synthetic_run"]


def _tensors(layers: int, dim: int) -> list[tuple[str, list[int]]]:
    """Names and shapes of a ``layers``-tensor transformer: embedding, blocks, final norm."""
    block = [("ln1.weight", [dim]), ("attn.qkv.weight", [3 * dim, dim]),
             ("attn.proj.weight", [dim, dim]), ("ln2.weight", [dim]),
             ("mlp.fc.weight", [4 * dim, dim]), ("mlp.proj.weight", [dim, 4 * dim])]
    out = [("embed.weight", [8192, dim])]
    i = 0
    while len(out) < layers - 1:
        out += [(f"blocks.{i}.{name}", shape) for name, shape in block][: layers - 1 - len(out)]
        i += 1
    return (out + [("norm.weight", [dim])])[:layers]


def synthetic_run(steps: int = 10_000, layers: int = 100, *, every: int = 1,
                  freeze_probe: int | None = 2_000, dim: int = 256, seed: int = 0) -> RunHistory:
    """The history of an imaginary AdamW run with every metric the monitor records.

    Per tensor: gradient norms decaying with log-normal noise, a ×30 spike in three layers at
    known steps (``meta["synthetic_spikes"]``), one NaN gradient (``meta["synthetic_nan"]``),
    weights growing slowly, update ratios near 1e-3, second-moment drift decaying from ~0.5 to
    ~0.005, quantization error near 5 %, top-k coverage near 40 %, AdamW's state bytes (two fp32
    moments and a step counter per tensor). Global values follow the monitor's aggregation. Also
    ``lr`` (two groups, warm-up then cosine), ``loss``, ``skipped_steps`` and the alerts the
    spikes and the NaN raise.

    Args:
        steps: optimizer steps in the run (default 10,000).
        layers: parameter tensors (default 100).
        every: sampling period, as `OptimizerMonitor`'s (default 1).
        freeze_probe: the step T of ``moment2_drift_since_freeze`` (default 2,000; None: not
            recorded, and the metric is listed in ``meta["skipped_metrics"]``).
        dim: model width, which sets the tensors' sizes (default 256).
        seed: seed of the noise (default 0).

    Returns:
        A `RunHistory`, as `load_run` would return for the run.
    """
    if steps < 1 or layers < 2 or every < 1:
        raise ValueError(f"synthetic_run needs steps >= 1, layers >= 2 and every >= 1, got "
                         f"steps={steps}, layers={layers}, every={every}")
    rng = np.random.default_rng(seed)
    tensors = _tensors(layers, dim)
    names = [name for name, _ in tensors]
    numel = np.array([math.prod(shape) for _, shape in tensors], dtype=np.float64)
    sampled = np.arange(1, steps + 1, every, dtype=np.int64)
    if freeze_probe is not None and freeze_probe <= steps:
        sampled = np.union1d(sampled, [freeze_probe])
    n = len(sampled)
    t = sampled[:, None].astype(np.float64)

    def noise(scale: float) -> np.ndarray:
        return np.exp(rng.normal(0.0, scale, (n, layers)))

    scale = np.exp(rng.normal(0.0, 0.8, layers)) * np.sqrt(numel) * 1e-3
    grad = scale * (0.2 + np.exp(-t / (0.3 * steps))) * noise(0.25)
    spikes = [(int(sampled[int(n * f)]), int(layers * g)) for f, g in ((0.31, 0.12), (0.55, 0.5),
                                                                         (0.8, 0.93))]
    row = {int(s): i for i, s in enumerate(sampled)}
    for step, layer in spikes:
        grad[row[step], layer] *= 30.0
    nan_step, nan_layer = int(sampled[int(n * 0.67)]), layers // 3
    grad[row[nan_step], nan_layer] = np.nan
    nonfinite = np.zeros((n, layers))
    nonfinite[row[nan_step], nan_layer] = 7

    weight = np.sqrt(numel) * 0.02 * (1.0 + 0.5 * t / steps) * noise(0.002)
    update_ratio = 1e-3 * np.exp(rng.normal(0.0, 0.5, layers)) * (0.3 + np.exp(-t / (0.5 * steps)))
    update_ratio = update_ratio * noise(0.15)
    update = update_ratio * weight
    moment1 = 0.3 * grad * noise(0.1)
    moment2 = np.square(scale) * (0.05 + np.exp(-t / (0.2 * steps))) * noise(0.05)
    drift = 0.005 + 0.5 * np.exp(-t / (0.08 * steps)) * noise(0.4)
    quant = 0.05 * noise(0.2)
    coverage = np.clip(0.4 * noise(0.15), 0.0, 1.0)

    def total(x: np.ndarray) -> np.ndarray:  # √Σx², NaN when any is NaN, as the monitor does
        return np.sqrt(np.square(x).sum(axis=1))

    per_tensor = {
        "grad_norm": (grad, total(grad)),
        "grad_max": (grad / np.sqrt(numel) * 8.0, np.max(grad / np.sqrt(numel) * 8.0, axis=1)),
        "nonfinite_grads": (nonfinite, nonfinite.sum(axis=1)),
        "weight_norm": (weight, total(weight)),
        "update_norm": (update, total(update)),
        "update_ratio": (update_ratio, total(update) / total(weight)),
        "moment1_norm": (moment1, total(moment1)),
        "moment2_norm": (moment2, total(moment2)),
        "moment2_drift": (drift, np.average(drift, axis=1, weights=np.square(scale))),
        "quant_error": (quant, np.average(quant, axis=1, weights=numel)),
        "topk_coverage": (coverage, np.average(coverage, axis=1, weights=numel)),
    }
    if freeze_probe is not None:
        since = 0.08 * np.clip((t - freeze_probe) / steps, 0.0, None) ** 0.5 * noise(0.1)
        per_tensor["moment2_drift_since_freeze"] = (since, np.average(since, axis=1, weights=numel))

    state = 8.0 * numel + 4.0
    state_scopes = ["global", *names, "key/exp_avg", "key/exp_avg_sq", "key/step"]
    state_values = [state.sum(), *state, 4.0 * numel.sum(), 4.0 * numel.sum(), 4.0 * layers]
    warmup = min(500, steps // 10 + 1)
    lr = 3e-4 * np.minimum(1.0, sampled / warmup) * 0.5 * (1 + np.cos(np.pi * sampled / steps))
    loss = 2.0 + 8.0 * np.exp(-sampled / (0.15 * steps)) + 0.15 * rng.standard_normal(n)

    history = RunHistory(meta=_meta(tensors, numel, steps, every, freeze_probe))
    scopes = ["global", *names]
    for i, step in enumerate(sampled.tolist()):
        for metric, (values, glob) in per_tensor.items():
            if metric in ("moment2_drift", "moment2_drift_since_freeze") and i == 0:
                continue  # no previous sample (no v_T) at the first sample
            history.add(step, metric, scopes, np.concatenate([[glob[i]], values[i]]))
        history.add(step, "state_bytes", state_scopes, state_values)
        history.add(step, "lr", ["group0", "group1"], [lr[i], 3 * lr[i]])
        history.add(step, "skipped_steps", ["global"], [0])
        history.add(step, "loss", ["global"], [loss[i]])
    for step, layer in spikes:
        history.alerts.append(Alert(step, "grad_spike", "grad_norm", [names[layer]],
                                    f"grad_norm of {names[layer]} spiked ×30 at step {step}",
                                    float(grad[row[step], layer])))
    history.alerts.append(Alert(nan_step, "nonfinite_grads", "nonfinite_grads", [names[nan_layer]],
                                f"7 non-finite gradient entries in {names[nan_layer]} at step "
                                f"{nan_step}", 7.0))
    history.meta["synthetic_spikes"] = [[step, names[layer]] for step, layer in spikes]
    history.meta["synthetic_nan"] = [nan_step, names[nan_layer]]
    return history


def _meta(tensors, numel, steps: int, every: int, freeze_probe: int | None) -> dict:
    skipped = {} if freeze_probe is not None else {
        "moment2_drift_since_freeze": "off: pass freeze_probe=T to compare v with v_T"}
    return dict(
        optimizer="optiscope.optimizers.adam.AdamW", optimizer_name="AdamW", backend="torch",
        hyperparameters=[dict(lr=3e-4, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.1),
                         dict(lr=9e-4, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.0)],
        params=[dict(name=name, shape=shape, dtype="float32", numel=int(k), device="cpu",
                     sampled=int(min(k, 4096))) for (name, shape), k in zip(tensors, numel)],
        n_params=int(numel.sum()), param_bytes=int(4 * numel.sum()), every=every,
        freeze_probe=freeze_probe, topk_density=0.01, topk_block=4096, skipped_metrics=skipped,
        versions={"optiscope": "synthetic"}, host="synthetic", command="synthetic_run()",
        start_time=0.0, steps_taken=steps)
