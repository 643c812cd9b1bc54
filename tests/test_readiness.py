"""Compression readiness (`optiscope.monitor.readiness`): each verdict on histories the test writes,
with values at, just below and just above its threshold, and with samples small enough that the
standard error decides. The oracles are the test's own inputs: the values it records, and the
sample sizes it puts in the meta (from which it computes the standard error the module should
use)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from optiscope.monitor.history import RunHistory
from optiscope.monitor.readiness import (FREEZE_TOL, INT4_MAX_ERROR, INT8_MAX_ERROR, NO, NO_DATA,
                                         TOPK_MIN_COVERAGE, UNCLEAR, UNDERFLOW_MAX_SHARE, YES, Z,
                                         readiness)

STEPS = 40        # sampled steps 1..40: the window (last half of the span) is steps 21..40
BLOCK = 4096
EXACT = dict(params=[dict(name="w", numel=1000, sampled=1000)], topk_block=BLOCK,
             topk_density=0.01)   # a tensor smaller than a block: every estimate is exact


def _meta(numel: int = 1000, sampled: int | None = None, **extra) -> dict:
    meta = dict(params=[dict(name="w", numel=numel, sampled=numel if sampled is None else sampled)],
                topk_block=BLOCK, topk_density=0.01)
    meta.update(extra)
    return meta


def _history(series: dict[str, object], meta: dict | None = None, steps: int = STEPS,
             tensors: dict[str, dict[str, object]] | None = None) -> RunHistory:
    """A run with ``series[name]`` as its global values at steps 1..steps (a number: constant; a
    function: of the step) and per-tensor values from ``tensors[name][scope]``."""
    history = RunHistory(meta=dict(EXACT if meta is None else meta))
    for step in range(1, steps + 1):
        for name, value in series.items():
            scopes, values = ["global"], [value(step) if callable(value) else value]
            for scope, v in (tensors or {}).get(name, {}).items():
                scopes.append(scope)
                values.append(v(step) if callable(v) else v)
            history.add(step, name, scopes, values)
    return history


def _verdict(history: RunHistory, key: str):
    verdicts = {v.key: v for v in readiness(history)}
    return verdicts[key]


# ------------------------------------------------------------------------------ 8-bit, 4-bit
@pytest.mark.parametrize("factor, answer", [(0.999, YES), (1.0, UNCLEAR), (1.001, NO)])
def test_int8_state_at_and_around_its_threshold(factor, answer):
    value = INT8_MAX_ERROR * factor
    verdict = _verdict(_history({"probe_int8_m": value, "probe_int8_v": value / 2}), "int8_state")
    assert verdict.answer == answer
    assert verdict.steps == (21, STEPS)
    figures = {(e.series, e.scope): e.value for e in verdict.evidence}
    assert figures[("probe_int8_m", "global")] == pytest.approx(value)
    assert figures[("probe_int8_v", "global")] == pytest.approx(value / 2)
    assert "exact" in verdict.confidence


def test_int8_state_is_judged_on_both_moments():
    ok, bad = INT8_MAX_ERROR / 2, INT8_MAX_ERROR * 2
    assert _verdict(_history({"probe_int8_m": ok, "probe_int8_v": bad}), "int8_state").answer == NO
    assert _verdict(_history({"probe_int8_m": bad, "probe_int8_v": ok}), "int8_state").answer == NO
    # SGD with momentum has no v: judged on m alone, and says so.
    verdict = _verdict(_history({"probe_int8_m": ok}), "int8_state")
    assert verdict.answer == YES and "No v recorded" in verdict.detail


def test_int8_state_standard_error_from_the_sampled_blocks():
    # One tensor of 2^20 entries, 2,048 sampled coordinates: the probe reads ceil(2048/4096) = 1
    # whole block of 4096 entries = 16 blocks of 256; standard error 1/√16 of the figure.
    meta = _meta(numel=2**20, sampled=2048)
    se = 1 / math.sqrt(4096 // 256)
    edge = INT8_MAX_ERROR / (1 + Z * se)          # the largest figure that is still a yes
    for value, answer in ((edge * 0.99, YES), (edge * 1.01, UNCLEAR),
                          (INT8_MAX_ERROR * 1.01, UNCLEAR),
                          (INT8_MAX_ERROR / (1 - Z * se) * 1.01, NO)):
        verdict = _verdict(_history({"probe_int8_m": value, "probe_int8_v": value}, meta),
                           "int8_state")
        assert verdict.answer == answer, (value, verdict)
    assert "4,096 entries" in verdict.confidence and "1/√16" in verdict.confidence


def test_int8_state_reads_the_p90_of_the_last_half():
    limit = INT8_MAX_ERROR
    # The first half (steps 1..20) is far above the limit and does not count.
    early = {"probe_int8_m": lambda s: 10 * limit if s <= 20 else limit / 2}
    assert _verdict(_history(early), "int8_state").answer == YES
    # One spike among the window's 20 samples stays above the 90th percentile; three do not.
    for spikes, answer in ((1, YES), (3, NO)):
        spiky = {"probe_int8_m": lambda s: 10 * limit if s > STEPS - spikes else limit / 2}
        verdict = _verdict(_history(spiky), "int8_state")
        window = np.array([10 * limit if s > STEPS - spikes else limit / 2
                           for s in range(21, STEPS + 1)])
        assert verdict.evidence[0].value == pytest.approx(np.percentile(window, 90))
        assert verdict.answer == answer


def test_int8_state_names_the_worst_tensor():
    history = _history({"probe_int8_m": INT8_MAX_ERROR / 2},
                       tensors={"probe_int8_m": {"a": 0.01, "b": 0.3}})
    worst = [e for e in _verdict(history, "int8_state").evidence if e.scope != "global"]
    assert [(e.scope, e.value) for e in worst] == [("b", pytest.approx(0.3))]


def test_int4_state_judges_v_by_the_rank1_scheme():
    ok, bad = INT4_MAX_ERROR / 2, INT4_MAX_ERROR * 2
    # The plain 4-bit v fails (the zero point); rank-1 normalisation fixes it: 4-bit is safe.
    fixed = _history({"probe_int4_m": ok, "probe_int4_v": bad, "probe_int4_v_rank1": ok})
    verdict = _verdict(fixed, "int4_state")
    assert verdict.answer == YES and "probe_int4_v_rank1" in verdict.detail
    assert {e.series for e in verdict.evidence} == {"probe_int4_m", "probe_int4_v",
                                                    "probe_int4_v_rank1"}
    # A small L2 error of the plain code does not count: its zeros are what breaks 1/√v.
    plain_small = _history({"probe_int4_m": ok, "probe_int4_v": ok, "probe_int4_v_rank1": bad})
    assert _verdict(plain_small, "int4_state").answer == NO
    # Without the rank-1 probe the plain one is all there is.
    plain = _history({"probe_int4_m": ok, "probe_int4_v": ok})
    assert _verdict(plain, "int4_state").answer == YES
    for factor, answer in ((0.999, YES), (1.0, UNCLEAR), (1.001, NO)):
        at = _history({"probe_int4_m": INT4_MAX_ERROR * factor, "probe_int4_v_rank1": ok})
        assert _verdict(at, "int4_state").answer == answer


def test_a_low_bit_optimizer_is_judged_by_its_own_requantization():
    meta = dict(EXACT, optimizer_name="AdamW8bit")
    history = _history({"moment1_quant_error": INT8_MAX_ERROR * 1.5,
                        "moment2_quant_error": INT8_MAX_ERROR / 2}, meta)
    verdict = _verdict(history, "int8_state")
    assert verdict.answer == NO and "own requantization" in verdict.detail
    assert _verdict(history, "int4_state").answer == NO_DATA
    # A bundled Adam's bf16 rounding is not an 8-bit verdict.
    plain = _history({"moment1_quant_error": 0.5}, dict(EXACT, optimizer_name="AdamW"))
    assert _verdict(plain, "int8_state").answer == NO_DATA


def test_missing_series_are_no_data_with_the_reason():
    skipped = {"probe_int8_m": "off: the optimizer keeps no m"}
    verdicts = {v.key: v for v in readiness(RunHistory(meta=dict(EXACT, skipped_metrics=skipped)))}
    assert all(v.answer == NO_DATA and v.detail for v in verdicts.values())
    assert "off: the optimizer keeps no m" in verdicts["int8_state"].detail
    assert "probe_int4_m" in verdicts["int4_state"].detail
    assert "topk_coverage" in verdicts["topk"].detail
    assert list(verdicts) == ["int8_state", "int4_state", "topk", "freeze", "format_bf16",
                              "format_fp16", "format_fp8e4m3", "format_fp8e5m2"]
    # An empty meta (no parameter list) is no crash either.
    assert readiness(RunHistory())[0].answer == NO_DATA


def test_too_few_samples_give_no_verdict():
    history = _history({"probe_int8_m": 0.001, "topk_coverage": 0.9,
                        "grad_fp16_underflow": 0.0, "grad_fp16_overflow": 0.0}, steps=3)
    for key in ("int8_state", "topk", "format_fp16"):
        verdict = _verdict(history, key)  # steps 2..3 make the window: two samples
        assert verdict.answer == UNCLEAR and "Only 2 sampled steps" in verdict.detail


# ------------------------------------------------------------------------------ top-k
@pytest.mark.parametrize("factor, answer", [(1.001, YES), (1.0, UNCLEAR), (0.999, NO)])
def test_topk_at_and_around_its_threshold(factor, answer):
    verdict = _verdict(_history({"topk_coverage": TOPK_MIN_COVERAGE * factor}), "topk")
    assert verdict.answer == answer
    assert "k = 1 %" in verdict.question
    assert verdict.evidence[0].value == pytest.approx(TOPK_MIN_COVERAGE * factor)


def test_topk_asks_about_the_density_the_run_recorded():
    history = _history({"topk_coverage": 0.9}, _meta(topk_density=0.005))
    assert "k = 0.5 %" in _verdict(history, "topk").question
    micro = _meta(produced_by_optimizer=["topk_kept_sq", "topk_total_sq"],
                  hyperparameters=[dict(k_init=0.02, topk_block_size=1024)])
    verdict = _verdict(_history({"topk_coverage": 0.9}, micro), "topk")
    assert "k = 2 %" in verdict.question and "every block of 1024" in verdict.confidence


def test_topk_standard_error_from_the_probed_blocks():
    # Two tensors of 2^20 entries with 2,048 sampled coordinates: one probed block each.
    meta = dict(params=[dict(name=n, numel=2**20, sampled=2048) for n in ("a", "b")],
                topk_block=BLOCK, topk_density=0.01)
    bound = 0.5 / math.sqrt(2)  # no spread between tensors known: the bound of a share
    for value, answer in ((TOPK_MIN_COVERAGE + Z * bound + 0.01, YES),
                          (TOPK_MIN_COVERAGE + Z * bound - 0.01, UNCLEAR)):
        assert _verdict(_history({"topk_coverage": value}, meta), "topk").answer == answer
    # With per-tensor values the spread between them is the estimate (capped at 1/2).
    meta["params"].append(dict(name="c", numel=2**20, sampled=2048))
    per_tensor = {"a": 0.80, "b": 0.85, "c": 0.90}
    se = np.std(list(per_tensor.values()), ddof=1) / math.sqrt(3)
    for value, answer in ((TOPK_MIN_COVERAGE + Z * se + 0.001, YES),
                          (TOPK_MIN_COVERAGE + Z * se - 0.001, UNCLEAR)):
        history = _history({"topk_coverage": value}, meta, tensors={"topk_coverage": per_tensor})
        assert _verdict(history, "topk").answer == answer


# ------------------------------------------------------------------------------ freezing v
def _drift_history(drift_after: float, quiet_from: int, probe: float | None = None):
    """v moves 50 % between samples until ``quiet_from``, then ``drift_after`` per sample."""
    meta = dict(EXACT, freeze_probe=10 if probe is not None else None)
    series = {"moment2_norm": 1.0,
              "moment2_drift": lambda s: 0.5 if s <= quiet_from else drift_after}
    if probe is not None:
        series["moment2_drift_since_freeze"] = lambda s: probe if s > 10 else 0.0
    return _history(series, meta)


def test_freeze_from_the_step_the_drift_stops():
    # After step 12 v moves 0.1 % per sample: the bound from 12 is 28 × 0.001 < FREEZE_TOL.
    verdict = _verdict(_drift_history(0.001, 12), "freeze")
    assert verdict.answer == YES and verdict.figure.startswith("from step 12 ")
    assert verdict.steps == (1, STEPS)


def test_freeze_no_when_the_probe_measured_v_moving():
    verdict = _verdict(_drift_history(0.5, STEPS, probe=FREEZE_TOL * 2), "freeze")
    assert verdict.answer == NO
    probe = [e for e in verdict.evidence if e.series == "moment2_drift_since_freeze"]
    assert probe[0].value == pytest.approx(FREEZE_TOL * 2)


def test_freeze_unclear_when_only_the_conservative_bound_fails():
    # 0.02 per sample adds up past 0.1 from any step that leaves a fifth of the run (the last,
    # step 32, has 8 samples after it: 0.16).
    verdict = _verdict(_drift_history(0.02, 0), "freeze")
    assert verdict.answer == UNCLEAR and "freeze_probe" in verdict.figure


# ------------------------------------------------------------------------------ formats
@pytest.mark.parametrize("factor, answer", [(0.999, YES), (1.0, UNCLEAR), (1.001, NO)])
def test_fp16_underflow_at_and_around_its_threshold(factor, answer):
    history = _history({"grad_fp16_underflow": UNDERFLOW_MAX_SHARE * factor,
                        "grad_fp16_overflow": 0.0})
    assert _verdict(history, "format_fp16").answer == answer


def test_any_overflow_is_a_no():
    history = _history({"grad_fp8e4m3_underflow": 0.0,
                        "grad_fp8e4m3_overflow": lambda s: 1e-6 if s == STEPS else 0.0})
    verdict = _verdict(history, "format_fp8e4m3")
    assert verdict.answer == NO and "overflow" in verdict.figure


def test_overflow_not_recorded_is_judged_only_where_it_cannot_happen():
    history = _history({"grad_bf16_underflow": 0.0, "grad_fp16_underflow": 0.0})
    assert _verdict(history, "format_bf16").answer == YES     # fp32's exponent range
    fp16 = _verdict(history, "format_fp16")
    assert fp16.answer == UNCLEAR and "grad_fp16_overflow" in fp16.detail


def test_format_shares_carry_a_binomial_standard_error():
    n = 10_000
    meta = _meta(numel=10**7, sampled=n)
    p = UNDERFLOW_MAX_SHARE
    se = math.sqrt(p * (1 - p) / n)
    for value, answer in ((p - 2.5 * se, YES), (p - 1.5 * se, UNCLEAR), (p + 2.5 * se, NO)):
        history = _history({"grad_fp16_underflow": value, "grad_fp16_overflow": 0.0}, meta)
        assert _verdict(history, "format_fp16").answer == answer, value


def test_non_finite_values_are_left_out_and_counted():
    history = _history({"probe_int8_m": lambda s: math.nan if s == STEPS else INT8_MAX_ERROR / 2})
    verdict = _verdict(history, "int8_state")
    assert verdict.answer == YES
    assert verdict.evidence[0].statistic == "p90 over 20 samples (1 non-finite left out)"


def test_probe_blocks_of_large_and_small_tensors():
    # a: 2^20 entries, 2,048 sampled: one probed top-k block of 4096 = 16 blocks of 256. b: 5,000
    # entries, one whole top-k block, so probed whole: its 19 whole 256-blocks (4,864 entries).
    meta = dict(params=[dict(name="a", numel=2**20, sampled=2048),
                        dict(name="b", numel=5000, sampled=16)], topk_block=BLOCK,
                topk_density=0.01)
    units = (4096 + 19 * 256) // 256
    se = 1 / math.sqrt(units)
    edge = INT8_MAX_ERROR / (1 + Z * se)
    for value, answer in ((edge * 0.99, YES), (edge * 1.01, UNCLEAR)):
        history = _history({"probe_int8_m": value, "probe_int8_v": value}, meta)
        verdict = _verdict(history, "int8_state")
        assert verdict.answer == answer
    assert f"{4096 + 4864:,} entries" in verdict.confidence and f"1/√{units}" in verdict.confidence
    # 4-bit blocks are 128 entries: twice as many units.
    history = _history({"probe_int4_m": 0.01, "probe_int4_v_rank1": 0.01}, meta)
    assert f"1/√{2 * units}" in _verdict(history, "int4_state").confidence


def test_an_own_requantization_error_counts_sampled_entries():
    meta = _meta(numel=10**6, sampled=2500, optimizer_name="AdamW8bit")
    edge = INT8_MAX_ERROR / (1 + Z / math.sqrt(2500))
    for value, answer in ((edge * 0.99, YES), (edge * 1.01, UNCLEAR)):
        history = _history({"moment1_quant_error": value, "moment2_quant_error": value}, meta)
        assert _verdict(history, "int8_state").answer == answer
