"""Compression readiness: for one run, what compressing the optimizer or its inputs would cost.

`readiness` reads the series a run recorded and answers, one `Verdict` each: is 8-bit optimizer
state safe, is 4-bit, would MicroAdam's top-k keep most of the gradient, from which step could
1-bit Adam freeze v (`freeze_verdict`), and would bf16, fp16, fp8 e4m3 or fp8 e5m2 hold the
gradients. Each verdict names its threshold and how it is applied, the series and figures it
rests on, the step range, and how far the sample it was measured on lets it be trusted. The
thresholds are heuristics; docs/readiness.md says what each rests on. A series the run lacks
gives the answer ``"no data"`` and the reason, never an error. This module knows no dashboard.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from optiscope.formatting import format_number
from optiscope.monitor.analysis import FreezeVerdict, freeze_verdict
from optiscope.monitor.history import RunHistory

__all__ = ["Verdict", "Evidence", "readiness", "READINESS_SERIES", "PER_TENSOR_SERIES", "YES",
           "NO", "UNCLEAR", "NO_DATA", "INT8_MAX_ERROR", "INT4_MAX_ERROR", "TOPK_MIN_COVERAGE", "FREEZE_TOL",
           "FREEZE_MIN_TAIL", "UNDERFLOW_MAX_SHARE", "Z", "MIN_SAMPLES", "FORMATS"]

YES, NO, UNCLEAR, NO_DATA = "yes", "no", "unclear", "no data"

# The thresholds (why each: docs/readiness.md). Relative L2 errors and shares, 0..1.
INT8_MAX_ERROR = 0.05      # p90 of the one-step quantization error of m and of v, 8-bit
INT4_MAX_ERROR = 0.20      # the same for 4-bit
TOPK_MIN_COVERAGE = 0.5    # median share of ‖g‖² the top-k keeps: "most of the gradient"
FREEZE_TOL = 0.1           # freeze_verdict's tolerance on ‖v_t − v_T‖/‖v_T‖
FREEZE_MIN_TAIL = 0.2      # the share of the run that must follow the freeze step
UNDERFLOW_MAX_SHARE = 0.01  # p90 share of gradient entries a cast flushes to zero
Z = 2.0                    # a verdict is yes or no only this many standard errors from the line
MIN_SAMPLES = 3            # sampled steps in the window below which no verdict is given
WINDOW = 0.5               # judged on the last half of the span each series covers

# Block sizes of the quantization schemes the probes imitate (bitsandbytes and torchao: 8-bit
# blocks of 256, 4-bit blocks of 128).
_QUANT_BLOCK = {"int8": 256, "int4": 128}
_PROBE_BLOCK = 256  # the probes read whole blocks of this many entries
FORMATS = ("bf16", "fp16", "fp8e4m3", "fp8e5m2")
_FORMAT_LABEL = {"bf16": "bf16", "fp16": "fp16", "fp8e4m3": "fp8 e4m3", "fp8e5m2": "fp8 e5m2"}
# bf16 has fp32's 8-bit exponent: a finite fp32 gradient cannot overflow it (the monitor may not
# record that always-zero share).
_CANNOT_OVERFLOW = {"bf16"}
_STATE_SERIES = {"int8": ("probe_int8_m", ("probe_int8_v",)),
                 "int4": ("probe_int4_m", ("probe_int4_v_rank1", "probe_int4_v"))}
_OWN_SERIES = ("moment1_quant_error", ("moment2_quant_error",))
# Every series a verdict reads: a live view needs to keep only these (their global scope).
READINESS_SERIES = frozenset(
    {"probe_int8_m", "probe_int8_v", "probe_int4_m", "probe_int4_v", "probe_int4_v_rank1",
     "moment1_quant_error", "moment2_quant_error", "topk_coverage", "moment2_drift",
     "moment2_norm", "moment2_drift_since_freeze"}
    | {f"grad_{fmt}_{kind}" for fmt in FORMATS for kind in ("underflow", "overflow")})
# Series whose per-tensor values (at the window's last sample) can change an answer: the spread
# of top-k coverage between tensors sets its standard error. A live view keeps these per tensor.
PER_TENSOR_SERIES = frozenset({"topk_coverage"})
_RANK = {YES: 0, UNCLEAR: 1, NO: 2}


@dataclass
class Evidence:
    """One figure a verdict read: ``statistic`` of ``series`` (scope ``scope``) is ``value``."""

    series: str
    statistic: str
    value: float | None
    scope: str = "global"


@dataclass
class Verdict:
    """One compression question answered for one run.

    Attributes:
        key: a stable identifier: ``"int8_state"``, ``"int4_state"``, ``"topk"``, ``"freeze"``,
            ``"format_bf16"``, ``"format_fp16"``, ``"format_fp8e4m3"``, ``"format_fp8e5m2"``.
        label: a few words for a compact view (``"8-bit state"``).
        question: the question, for people.
        answer: ``"yes"``, ``"no"``, ``"unclear"`` (the figure is within the sample's
            uncertainty of the threshold, too few samples, or the evidence is only a bound) or
            ``"no data"`` (``detail`` says why).
        threshold: the threshold and how it is applied.
        figure: the deciding figure against the threshold, in one line (empty without data).
        evidence: the figures read, series by series.
        confidence: what the sample size lets the figure claim.
        steps: the first and last step judged (None without data).
        detail: why this answer, in a sentence or two.
    """

    key: str
    label: str
    question: str
    answer: str
    threshold: str
    figure: str = ""
    evidence: list[Evidence] = field(default_factory=list)
    confidence: str = ""
    steps: tuple[int, int] | None = None
    detail: str = ""


def readiness(history: RunHistory, *, freeze: FreezeVerdict | None = None) -> list[Verdict]:
    """The compression-readiness verdicts of a run, in a fixed order: 8-bit state, 4-bit state,
    top-k, freezing v, then one per low-precision format of the gradients.

    Args:
        history: the run.
        freeze: the run's `freeze_verdict` at ``FREEZE_TOL`` and ``FREEZE_MIN_TAIL``, if the
            caller has it already (default None: computed here).
    """
    sample = _Sample(history.meta)
    verdicts = [_state(history, sample, "int8"), _state(history, sample, "int4"),
                _topk(history, sample), _freeze(history, sample, freeze)]
    verdicts += [_format(history, sample, fmt) for fmt in FORMATS]
    return verdicts


# ------------------------------------------------------------------------------ the sample
class _Sample:
    """How many entries the monitor's estimates rest on, from the run's meta."""

    def __init__(self, meta: dict):
        params = [p for p in meta.get("params") or () if isinstance(p, dict) and "numel" in p]
        self.numel = sum(int(p["numel"]) for p in params)
        self.coords = sum(int(p.get("sampled", p["numel"])) for p in params)
        self.known = bool(params)
        self.block = int(meta.get("topk_block") or 0) if meta.get("topk_density") else 0
        # The top-k probe's blocks (monitor/collect.py: ceil(sampled / B) random whole blocks of a
        # tensor with more whole blocks than that, else the whole tensor).
        self.blocks = self.block_entries = 0
        # The quantization probes' entries (monitor/compression.py): whole 256-entry blocks, those
        # inside the top-k probe's blocks, else ceil(sampled / 256) drawn blocks; a tensor with no
        # more blocks than that is probed on all of its whole 256-entry blocks.
        self.probe_entries = self.probe_all = 0
        for p in params:
            numel, sampled = int(p["numel"]), int(p.get("sampled", p["numel"]))
            whole = numel // _PROBE_BLOCK * _PROBE_BLOCK
            self.probe_all += whole
            if self.block:
                full, wanted = numel // self.block, math.ceil(sampled / self.block)
                if full > wanted:
                    self.blocks += wanted
                    self.block_entries += wanted * self.block
                else:
                    self.blocks += max(1, math.ceil(numel / self.block))
                    self.block_entries += numel
            if self.block and self.block % _PROBE_BLOCK == 0:
                taken = wanted * self.block if full > wanted else whole
            else:
                wanted = math.ceil(sampled / _PROBE_BLOCK) * _PROBE_BLOCK
                taken = whole if whole <= wanted else wanted
            self.probe_entries += taken

    def share(self, entries: int) -> str:
        return f"{entries / self.numel:.2%}" if self.numel else "an unknown share"


# ------------------------------------------------------------------------------ helpers
def _window(history: RunHistory, metric: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(steps, values) of a global series over the last `WINDOW` of the steps it covers."""
    if metric not in history.metrics() or "global" not in history.scopes(metric):
        return None
    steps, values = history.series(metric)
    if not len(steps):
        return None
    start = steps[0] + (1 - WINDOW) * (steps[-1] - steps[0])
    keep = steps >= start
    return steps[keep], values[keep]


def _pct(values: np.ndarray, q: float) -> float:
    finite = values[np.isfinite(values)]
    return float(np.percentile(finite, q)) if len(finite) else math.nan


def _over(values: np.ndarray) -> str:
    """"over N samples", and how many non-finite ones the percentiles left out."""
    bad = int((~np.isfinite(values)).sum())
    return f"over {len(values)} samples" + (f" ({bad} non-finite left out)" if bad else "")


def _percent(x: float) -> str:
    return "NaN" if not math.isfinite(x) else f"{100 * x:.3g} %"


def _missing(history: RunHistory, names: tuple[str, ...], what: str) -> str:
    skipped = history.meta.get("skipped_metrics") or {}
    reasons = [f"{n}: {skipped[n]}" for n in names if n in skipped]
    return "; ".join(reasons) if reasons else f"the run recorded no {what} ({', '.join(names)})"


def _judge(value: float, se: float, limit: float, below: bool) -> str:
    """yes/no when ``value`` is more than `Z` standard errors on one side of ``limit``."""
    if not math.isfinite(value):
        return UNCLEAR
    good = limit - value if below else value - limit
    if good > Z * se:
        return YES
    if good < -Z * se:
        return NO
    return UNCLEAR


def _worst(answers) -> str:
    return max(answers, key=lambda a: _RANK[a])


def _span(steps: np.ndarray) -> tuple[int, int]:
    return int(steps[0]), int(steps[-1])


def _few(verdict: Verdict, n: int) -> Verdict:
    verdict.answer = UNCLEAR
    verdict.detail = (f"Only {n} sampled step{'s' if n != 1 else ''} in the window; "
                      f"{MIN_SAMPLES} are needed for a verdict.")
    return verdict


def _last_per_tensor(history: RunHistory, metric: str, step: int) -> np.ndarray:
    """The finite per-tensor values of ``metric`` at ``step``."""
    values = []
    for scope in history.scopes(metric):
        steps, series = history.series(metric, scope)
        if scope != "global" and len(steps) and steps[-1] == step and math.isfinite(series[-1]):
            values.append(float(series[-1]))
    return np.array(values)


def _worst_tensor(history: RunHistory, metric: str, start: int) -> Evidence | None:
    """The tensor whose p90 of ``metric`` from ``start`` on is the largest."""
    worst = None
    for scope in history.scopes(metric):
        if scope == "global":
            continue
        steps, values = history.series(metric, scope)
        p90 = _pct(values[steps >= start], 90)
        if math.isfinite(p90) and (worst is None or p90 > worst.value):
            worst = Evidence(metric, "p90, the largest of any tensor", p90, scope)
    return worst


# ------------------------------------------------------------------------------ the verdicts
def _state(history: RunHistory, sample: _Sample, bits: str) -> Verdict:
    """Is 8-bit (4-bit) optimizer state safe: the probes' error, or the optimizer's own."""
    width = bits[3:]
    limit = INT8_MAX_ERROR if bits == "int8" else INT4_MAX_ERROR
    verdict = Verdict(
        f"{bits}_state", f"{width}-bit state", f"Is {width}-bit optimizer state safe for this run?",
        UNCLEAR, f"yes when the p90 of the one-step relative quantization error of m and of v, over "
                 f"the last half of the run, is below {_percent(limit)} by more than {Z:g} "
                 f"standard errors; no when above by as much")
    m_name, v_names = _STATE_SERIES[bits]
    source = "probe"
    if _window(history, m_name) is None and all(_window(history, v) is None for v in v_names):
        name = str(history.meta.get("optimizer_name") or "")
        if re.search(rf"{width}bit", name, re.IGNORECASE):  # torchao AdamW8bit / AdamW4bit
            m_name, v_names, source = _OWN_SERIES[0], _OWN_SERIES[1], "own"
    found = {n: w for n in (m_name, *v_names) if (w := _window(history, n)) is not None}
    if not found:
        verdict.answer = NO_DATA
        verdict.detail = _missing(history, (m_name, *v_names), f"{width}-bit probe")
        return verdict
    judged: dict[str, tuple[str, float, str]] = {}  # moment -> (series, p90, answer)
    n_steps = min(len(s) for s, _ in found.values())
    se_rel, confidence = _state_confidence(sample, bits, source)
    for moment, names in (("m", (m_name,)), ("v", v_names)):
        options = []
        for name in names:
            if name not in found:
                continue
            steps, values = found[name]
            p90 = _pct(values, 90)
            verdict.evidence.append(Evidence(name, f"p90 {_over(values)}", p90))
            worst = _worst_tensor(history, name, int(steps[0]))
            if worst is not None:
                verdict.evidence.append(worst)
            options.append((name, p90, _judge(p90, se_rel * abs(p90), limit, below=True)))
        if options:  # v: the first recorded of `names`: rank-1 4-bit, the scheme a 4-bit
            # optimizer would use (the plain code's L2 error hides what its zeros do to 1/√v)
            judged[moment] = options[0]
    steps = np.concatenate([s for s, _ in found.values()])
    verdict.steps = (int(steps.min()), int(steps.max()))
    verdict.confidence = confidence
    if n_steps < MIN_SAMPLES:
        return _few(verdict, n_steps)
    verdict.answer = _worst([a for _, _, a in judged.values()])
    verdict.figure = ", ".join(f"{moment} {_percent(p90)}" for moment, (_, p90, _) in
                               judged.items()) + f" (limit {_percent(limit)})"
    what = "the optimizer's own requantization" if source == "own" else "the probe"
    parts = [f"{moment}: {name} p90 {_percent(p90)}" for moment, (name, p90, _) in judged.items()]
    missing = [m for m in ("m", "v") if m not in judged]
    verdict.detail = (f"From {what}: " + "; ".join(parts) + "."
                      + (f" No {' or '.join(missing)} recorded: judged on the rest." if missing
                         else ""))
    return verdict


def _state_confidence(sample: _Sample, bits: str, source: str) -> tuple[float, str]:
    """(relative standard error, statement) of a quantization error estimate."""
    if not sample.known:
        return 0.0, "The run's meta has no parameter list: the sample size is unknown."
    if source == "own":  # scattered coordinates: each entry its own unit
        entries, every = sample.coords, sample.numel
        units, where = entries, f"the coordinate sample, {entries:,} independent entries"
    else:  # whole blocks: a block's entries share its scale, so the block is the unit
        entries, every = sample.probe_entries, sample.probe_all
        units = max(1, entries // _QUANT_BLOCK[bits])
        where = ("whole blocks inside the top-k probe's blocks"
                 if sample.block and sample.block % _PROBE_BLOCK == 0 else "drawn whole blocks")
        where += f", {units:,} quantization blocks of {_QUANT_BLOCK[bits]}"
    if entries >= every:
        return 0.0, (f"Measured on every entry it applies to ({every:,}): exact for the steps "
                     f"sampled.")
    se = 1 / math.sqrt(units)
    return se, (f"Measured on {entries:,} entries ({sample.share(entries)} of {sample.numel:,}) "
                f"in {where}; taking their squared errors as independent with a spread like "
                f"their mean, the relative standard error is about 1/√{units:,} = {se:.1%} of "
                f"the figure.")


def _topk(history: RunHistory, sample: _Sample) -> Verdict:
    meta = history.meta
    own = "topk_kept_sq" in (meta.get("produced_by_optimizer") or ())
    groups = meta.get("hyperparameters") or [{}]
    density = groups[0].get("k_init") if own else meta.get("topk_density")
    block = groups[0].get("topk_block_size") if own else meta.get("topk_block")
    k = f"k = {100 * density:.3g} %" if isinstance(density, (int, float)) else "its k"
    verdict = Verdict(
        "topk", f"top-k ({k})", f"Would MicroAdam at {k} keep most of the gradient?", UNCLEAR,
        f"yes when the median share of ‖g‖² that a top-k per block keeps, over the last half of "
        f"the run, is above {_percent(TOPK_MIN_COVERAGE)} by more than {Z:g} standard errors; "
        f"no when below by as much")
    found = _window(history, "topk_coverage")
    if found is None:
        verdict.answer = NO_DATA
        verdict.detail = _missing(history, ("topk_coverage",), "top-k probe")
        return verdict
    steps, values = found
    median = _pct(values, 50)
    verdict.steps = _span(steps)
    verdict.evidence = [Evidence("topk_coverage", f"median {_over(values)}", median),
                        Evidence("topk_coverage", "p10", _pct(values, 10))]
    if own:
        se, verdict.confidence = 0.0, (f"MicroAdam's own accumulator (the error-corrected "
                                       f"gradient), every block of {block}: exact.")
    elif not sample.known or not sample.blocks:
        se, verdict.confidence = 0.0, "The run's meta does not say which blocks were probed."
    elif sample.block_entries >= sample.numel:
        se, verdict.confidence = 0.0, f"Every block of {block}: exact for the steps sampled."
    else:
        # A share in [0, 1] has a standard deviation of at most 1/2 (Popoviciu's inequality);
        # the spread between tensors (each probed on a block or a few) estimates it when known.
        spread, how = 0.5, "a share varies by at most 1/2 between blocks"
        tensors = _last_per_tensor(history, "topk_coverage", int(steps[-1]))
        if len(tensors) >= MIN_SAMPLES:
            spread = min(spread, float(np.std(tensors, ddof=1)))
            how = (f"taking the spread between {len(tensors)} tensors' coverage at step "
                   f"{int(steps[-1]):,} ({spread:.3f}) as the spread between blocks")
        se = spread / math.sqrt(sample.blocks)
        verdict.confidence = (
            f"Probed on {sample.blocks:,} blocks of {block} ({sample.block_entries:,} entries, "
            f"{sample.share(sample.block_entries)} of the gradient); {how}, the standard error "
            f"is about {spread:.3g}/√{sample.blocks:,} = {se:.3f}. The probe reads the gradient; "
            f"MicroAdam sparsifies the gradient plus its error feedback.")
    if len(steps) < MIN_SAMPLES:
        return _few(verdict, len(steps))
    verdict.answer = _judge(median, se, TOPK_MIN_COVERAGE, below=False)
    verdict.figure = f"median {_percent(median)} of ‖g‖² (limit {_percent(TOPK_MIN_COVERAGE)})"
    verdict.detail = (f"The kept entries carry {_percent(median)} of the gradient's squared mass "
                      f"at the median sample, {_percent(_pct(values, 10))} at the 10th "
                      f"percentile.")
    return verdict


def _freeze(history: RunHistory, sample: _Sample, freeze: FreezeVerdict | None) -> Verdict:
    if freeze is None:
        freeze = freeze_verdict(history, FREEZE_TOL, min_tail=FREEZE_MIN_TAIL)
    verdict = Verdict(
        "freeze", "freeze v (1-bit)", "From which step could 1-bit Adam freeze v?", UNCLEAR,
        f"the earliest sampled step T after which ‖v_t − v_T‖/‖v_T‖ stays within {freeze.tol:g} "
        f"with at least {FREEZE_MIN_TAIL:.0%} of the run after T, shown by the summed drift "
        f"(an upper bound) or measured by the freeze probe", detail=freeze.message)
    if not freeze.available:
        verdict.answer = NO_DATA
        return verdict
    if len(freeze.steps):
        verdict.evidence.append(Evidence("moment2_drift", "least summed-drift bound",
                                         freeze.bound))
    if freeze.probe_step is not None:
        verdict.evidence.append(Evidence("moment2_drift_since_freeze",
                                         f"largest after T₀ = {freeze.probe_step:,}",
                                         freeze.probe_max))
    first = [int(freeze.steps[0])] if len(freeze.steps) else [freeze.probe_step]
    last = [int(freeze.steps[-1])] if len(freeze.steps) else []
    verdict.steps = (min(first), max(last + [freeze.probe_last_step or first[0]]))
    if freeze.stable:
        verdict.answer = YES
        verdict.figure = f"from step {freeze.freeze_step:,} ({freeze.evidence})"
    elif freeze.probe_max is not None and freeze.probe_max > freeze.tol:
        verdict.answer = NO
        verdict.figure = (f"v moved {format_number(freeze.probe_max)} from step "
                          f"{freeze.probe_step:,} (tolerance {freeze.tol:g})")
    else:  # only the bound spoke, and it is conservative
        verdict.figure = ("bound " + (format_number(freeze.bound) if freeze.bound is not None
                                      else "not finite") + f" (tolerance {freeze.tol:g}); "
                          "run with freeze_probe=T to measure")
    if sample.known and sample.coords < sample.numel:
        se = 1 / math.sqrt(max(1, sample.coords))
        verdict.confidence = (f"Drift is measured on {sample.coords:,} sampled coordinates "
                              f"({sample.share(sample.coords)} of {sample.numel:,}); taking "
                              f"entries as independent, its relative standard error is about "
                              f"1/√{sample.coords:,} = {se:.1%}.")
    elif sample.known:
        verdict.confidence = "Drift is measured on every coordinate: exact for the steps sampled."
    return verdict


def _format(history: RunHistory, sample: _Sample, fmt: str) -> Verdict:
    label = _FORMAT_LABEL[fmt]
    under, over = f"grad_{fmt}_underflow", f"grad_{fmt}_overflow"
    verdict = Verdict(
        f"format_{fmt}", f"{label} gradients", f"Would {label} hold this run's gradients?",
        UNCLEAR, f"yes when, over the last half of the run, the p90 share of gradient entries a "
                 f"cast to {label} flushes to zero is below {_percent(UNDERFLOW_MAX_SHARE)} by "
                 f"more than {Z:g} standard errors and no entry overflows; no when the share is "
                 f"above by as much or any entry overflows (without loss scaling)")
    found_under, found_over = _window(history, under), _window(history, over)
    if found_under is None:
        verdict.answer = NO_DATA
        verdict.detail = _missing(history, (under, over), f"{label} range shares")
        return verdict
    steps, shares = found_under
    p90 = _pct(shares, 90)
    verdict.steps = _span(steps)
    verdict.evidence.append(Evidence(under, f"p90 {_over(shares)}", p90))
    n = sample.coords if sample.known else 0
    exact = sample.known and n >= sample.numel
    se = 0.0 if exact or not n else math.sqrt(max(p90, 1 / n) * max(1 - p90, 0.0) / n)
    answers = [_judge(p90, se, UNDERFLOW_MAX_SHARE, below=True)]
    figure = [f"{_percent(p90)} flushed (limit {_percent(UNDERFLOW_MAX_SHARE)})"]
    notes = []
    if found_over is not None:
        worst = float(np.max(found_over[1])) if len(found_over[1]) else 0.0
        verdict.evidence.append(Evidence(over, "largest", worst))
        answers.append(NO if not worst <= 0 else YES)
        figure.append(f"{_percent(worst)} overflow" if worst > 0 or math.isnan(worst)
                      else "no overflow")
    elif fmt not in _CANNOT_OVERFLOW:
        answers.append(UNCLEAR)
        notes.append(f"No {over} was recorded, so overflow is not judged.")
    if not sample.known:
        verdict.confidence = "The run's meta has no parameter list: the sample size is unknown."
    elif exact:
        verdict.confidence = "Shares over every entry: exact for the steps sampled."
    else:
        verdict.confidence = (f"Shares on {n:,} sampled entries ({sample.share(n)} of "
                              f"{sample.numel:,}): binomial standard error "
                              f"{_percent(se)}; no overflow among them bounds the share below "
                              f"3/{n:,} (95 %), not at zero.")
    if len(steps) < MIN_SAMPLES:
        return _few(verdict, len(steps))
    verdict.answer = _worst(answers)
    verdict.figure = ", ".join(figure)
    verdict.detail = " ".join([f"p90 share flushed to zero: {_percent(p90)}.", *notes])
    return verdict
