"""Monitor overhead: step time with an `OptimizerMonitor` attached, against the same optimizer
without one, side by side in one process (the acceptance figures of the monitor).

Each implementation (optiscope's AdamW on the torch backend, and on the Triton backend on CUDA;
``torch.optim.AdamW``, fused where the device has the kernel, else foreach) runs unmonitored and
monitored with ``OptimizerMonitor(opt, every=N)`` for N in 1, 10, 100 with its default metrics (the
top-k probe, the automatic coordinate sample), plus an ``every=1`` monitor that also writes a run
log into a temporary directory, and a second unmonitored instance, the A/A control, whose ratio
to the first is what the harness reads when nothing differs. Every variant has its own optimizer
object; all share the parameters and the gradients, which are set once, and the variants of one
implementation share its state tensors, so they differ by the monitor alone.

A sampled step costs far more than the others, so a variant is timed in blocks of consecutive steps
that cover whole sampling periods: a block of N steps for ``every=N`` (several periods when blocks
have a minimum length), or, when N steps would take too long (100 steps of GPT-2 small on a 2-core
CPU: about 5 s), N/d blocks of d steps, and a number of rounds that completes the periods. Any N
consecutive steps hold one sampled step and the step after it, where the monitor decodes the sample
(its copy is asynchronous), so the mean over whole periods is the mean step time of a training run;
the figure of a row is the median over its periods of that mean (robust to the other tenants of a
machine, as the step table's median). The unmonitored optimizer is timed in blocks of the same
lengths, grouped as each monitored row's. A row's ratio pairs each of its periods with the
reference's blocks of the same rounds (timed seconds apart) and takes the median of those
per-period ratios: a machine slower for a while slows both sides of a pair. The variants are interleaved round-robin, in a new (seeded) order each round; each monitored optimizer
first takes untimed steps (state creation, compilation, the monitor's first sample and its
decoding), then every variant an untimed block.
"""

from __future__ import annotations

import gc
import inspect
import math
import random
import statistics
import tempfile
from dataclasses import dataclass, field
from typing import Callable

import torch

from optiscope.bench.base import OverheadSettings, Settings, log
from optiscope.bench.cases import MODELS, WatchedOptimizer, Workload, watched_optimizers
from optiscope.bench.machine import available_bytes, git_commit, load_average, utc_now, versions
from optiscope.bench.timing import OOM, Clock, free, itemsize, make_tensors

__all__ = ["Target", "TARGETS", "MEMORY_TARGET_PCT", "MEMORY_TARGET_MIN_PARAMS", "WARMUP_STEPS",
           "block_steps", "whole_period_rounds", "add_overhead_ratios", "run_overhead"]


# ============================================================================ targets
@dataclass(frozen=True)
class Target:
    """An acceptance figure: monitored / unmonitored step time at most ``max_ratio``, for the
    bundled optimizer on ``backend`` on a ``device_type`` device at ``every``."""

    device_type: str
    backend: str
    every: int
    max_ratio: float
    text: str

    def applies(self, row: dict, device_type: str) -> bool:
        return (device_type == self.device_type and row["bundled"]
                and row["backend"] == self.backend and row["every"] == self.every)


# The monitor issue's figures. "Bundled optimizer on GPU" is the backend it runs there by default,
# Triton; the torch backend on a GPU is the reference implementation, reported without a target.
TARGETS = (
    Target("cuda", "triton", 1, 1.03, "≤ 3 %"),
    Target("cpu", "torch", 1, 1.5, "≤ 1.5×"),
    Target("cpu", "torch", 10, 1.05, "≤ 5 %"),
)
MEMORY_TARGET_PCT = 1.0          # of the parameter bytes,
MEMORY_TARGET_MIN_PARAMS = 10 ** 7  # for models above this many parameters
# Untimed steps of each monitored optimizer: the first sample (the coordinate draw, the layout
# lookup; on CUDA, compilation), the step that decodes it, and a regular sample.
WARMUP_STEPS = 3


# ============================================================================ blocks and rounds
def block_steps(every: int, step_ms: float, settings: OverheadSettings) -> int:
    """Steps per timed block for ``every=N``, given the unmonitored step time.

    A whole period, N steps, or several (the fewest with ``min_block_steps`` steps, as far as
    ``max_block_s`` allows). When N steps would take longer than ``max_block_s``, the largest
    divisor d of N whose d steps fit, but no less than N / ``max_blocks_per_period``: a period is
    then N/d consecutive blocks, and the number of rounds completes the periods.
    """
    limit_ms = settings.max_block_s * 1e3
    if every * step_ms > limit_ms:
        least = -(-every // settings.max_blocks_per_period)
        divisors = [d for d in range(least, every + 1) if every % d == 0]
        return max((d for d in divisors if d * step_ms <= limit_ms), default=divisors[0])
    periods = min(-(-settings.min_block_steps // every), int(limit_ms // (every * step_ms)))
    return every * max(periods, 1)


def whole_period_rounds(rounds: float, blocks_per_period: int) -> int:
    """``rounds`` rounded to the nearest whole number of periods (at least one period)."""
    return blocks_per_period * max(1, round(rounds / blocks_per_period))


# ============================================================================ derived columns
def _per_step(times: list[float], block_steps: int, blocks_per_period: int) -> float:
    """Median over whole periods (runs of ``blocks_per_period`` consecutive blocks) of the mean
    step time in each: robust to the other tenants of a machine, as the step table's median."""
    g = min(blocks_per_period, len(times))
    means = [sum(times[i:i + g]) / (g * block_steps) for i in range(0, len(times) - g + 1, g)]
    return statistics.median(means)


def _paired_ratios(times: list[float], reference: list[float], blocks_per_period: int
                   ) -> list[float]:
    """Per whole period: the row's time over the reference's in the same rounds.

    Both rows ran one block per round, so block i of one and block i of the other were timed
    seconds apart, in a random order; a slower machine for a while (other tenants) slows both.
    """
    if len(times) != len(reference):
        raise ValueError(f"paired rows need one block per round each: {len(times)} blocks "
                         f"against {len(reference)}")
    g = blocks_per_period
    return [sum(times[i:i + g]) / sum(reference[i:i + g])
            for i in range(0, len(times) - g + 1, g)]


def _quartiles(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [values[0], values[0]] if values else []
    q = statistics.quantiles(values, n=4, method="inclusive")
    return [q[0], q[2]]


def add_overhead_ratios(rows: list[dict], device_type: str) -> None:
    """Fills the derived columns of overhead rows, in place, from their timings.

    ``ms_per_step``: the median over whole periods of the mean step time in each (a monitored
    row's period is ``blocks_per_period`` consecutive blocks; an unmonitored row's, one block),
    and ``ms_per_step_mean`` = Σ block times / steps timed. For a monitored row, and for the
    unmonitored control (a second instance of the same optimizer: an A/A comparison whose ratio
    shows what the harness can resolve): ``unmonitored_ms_per_step`` from the reference row (the
    unmonitored optimizer timed in blocks of the same length), its blocks grouped as the row's;
    ``ratio``, the median over periods of the row's time over the reference's in the same
    rounds, with ``ratio_quartiles`` of those per-period ratios; ``overhead_pct``. For monitored
    rows also ``memory_pct`` (the monitor's bytes / the parameter bytes), and ``target`` /
    ``memory_target`` with ``pass`` (None where none applies).
    """
    for row in rows:
        row["ms_per_step"] = _per_step(row["times_ms"], row["block_steps"],
                                       row.get("blocks_per_period") or 1)
        row["ms_per_step_mean"] = sum(row["times_ms"]) / row["steps"]
    reference = {(r["workload"], r["implementation"], r["block_steps"]): r
                 for r in rows if r["every"] is None and not r.get("control")}
    for row in rows:
        if row["every"] is None and not row.get("control"):
            continue
        ref = reference.get((row["workload"], row["implementation"], row["block_steps"]))
        per_period = row.get("blocks_per_period") or 1
        ratios = (_paired_ratios(row["times_ms"], ref["times_ms"], per_period)
                  if ref else [])
        row["unmonitored_ms_per_step"] = (_per_step(ref["times_ms"], ref["block_steps"],
                                                    per_period) if ref else None)
        row["ratio"] = statistics.median(ratios) if ratios else None
        row["ratio_quartiles"] = _quartiles(ratios) if ratios else None
        row["overhead_pct"] = 100 * (row["ratio"] - 1) if ratios else None
        if row["every"] is None:  # the control
            continue
        row["memory_pct"] = 100 * row["memory_bytes"] / row["param_bytes"]
        target = next((t for t in TARGETS if t.applies(row, device_type)), None)
        row["target"] = None if target is None or not ratios else {
            "text": target.text, "max_ratio": target.max_ratio,
            "pass": row["ratio"] <= target.max_ratio}
        row["memory_target"] = None if row["params"] <= MEMORY_TARGET_MIN_PARAMS else {
            "max_pct": MEMORY_TARGET_PCT, "pass": row["memory_pct"] < MEMORY_TARGET_PCT}


# ============================================================================ the run
@dataclass(eq=False)
class _Variant:
    """One timed thing: an optimizer, with or without a monitor, stepped in blocks."""

    impl: WatchedOptimizer
    every: int | None
    log_dir: bool
    block: int
    optimizer: torch.optim.Optimizer
    monitor: object = None                  # OptimizerMonitor
    tmp: tempfile.TemporaryDirectory | None = None
    times: list[float] = field(default_factory=list)
    first_step: int = 0                     # the monitor's step count when timing began
    control: bool = False                   # a second unmonitored instance: the A/A control

    @property
    def name(self) -> str:
        if self.every is None:
            twin = " (control)" if self.control else ""
            return f"{self.impl.name} unmonitored{twin}, blocks of {self.block}"
        return f"{self.impl.name} every={self.every}{' + log_dir' if self.log_dir else ''}"

    def run_block(self) -> None:
        step = self.optimizer.step
        for _ in range(self.block):
            step()

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()  # decodes the last sample; untimed
            self.monitor = None
        if self.tmp is not None:
            self.tmp.cleanup()
            self.tmp = None


def _sharing(optimizer: torch.optim.Optimizer, owner: torch.optim.Optimizer
             ) -> torch.optim.Optimizer:
    """``optimizer`` stepping ``owner``'s state tensors (same class, same parameters).

    Every variant of an implementation then reads and writes the same memory, and the rows
    differ by the monitor alone. With a state of its own, each instance had its own pages: two
    unmonitored instances of optiscope's AdamW differed by up to 2 % (GPT-2 small, 2 cores).
    """
    optimizer.state = owner.state
    return optimizer


def _memory_plan(workload: Workload, n_optimizers: int, settings: Settings) -> int:
    """θ and g (shared), AdamW's m and v per implementation (its variants share them), scratch
    for a foreach step's temporaries (about three tensors of the workload's size) and the cache
    flush."""
    size = itemsize(settings.dtype)
    return (2 + 3 + 2 * n_optimizers) * workload.params * size + settings.flush_bytes


def _run_workload(workload: Workload, impls: list[WatchedOptimizer], settings: Settings,
                  clock: Clock, skipped: list[dict], errors: list[dict]) -> list[dict]:
    from optiscope import OptimizerMonitor

    oh, device, size = settings.overhead, settings.device, itemsize(settings.dtype)
    monitored = sorted([(n, False) for n in oh.everies]
                       + ([(oh.log_every, True)] if oh.log_every else []))

    def skip(impl: WatchedOptimizer, reason: str, error: bool = False) -> None:
        (errors if error else skipped).append(
            {"workload": workload.name, "implementation": impl.name, "reason": reason})
        log(f"  {'ERROR' if error else 'skip'} {impl.name}: {reason}")

    need = _memory_plan(workload, len(impls), settings)
    avail = available_bytes(device)
    if avail is not None and need > 0.9 * avail:
        for impl in impls:
            skip(impl, f"the workload needs about {need / 2**30:.1f} GiB, "
                       f"{avail / 2**30:.1f} GiB are free on {device.type}")
        return []

    params = make_tensors(workload, device, settings.dtype)
    variants: list[_Variant] = []
    for impl in impls:
        group: list[_Variant] = []
        try:
            plain = impl.build(params)
            for _ in range(3):  # state, compilation; then the step time that sizes the blocks
                plain.step()
            step_ms = sorted(clock.measure_ms(plain.step) for _ in range(3))[1]
            blocks = {n: block_steps(n, step_ms, oh) for n, _ in monitored}
            group += [_Variant(impl, None, False, b, plain) for b in sorted(set(blocks.values()))]
            control = blocks.get(10, max(blocks.values()))  # the strictest CPU target's blocks
            group.append(_Variant(impl, None, False, control,
                                  _sharing(impl.build(params), plain), control=True))
            for every, with_log in monitored:
                group.append(_Variant(impl, every, with_log, blocks[every],
                                      _sharing(impl.build(params), plain)))
        except OOM:
            skip(impl, "out of memory while building the optimizers")
            continue
        except Exception as exc:  # e.g. a backend that cannot run here
            skip(impl, f"{type(exc).__name__}: {exc}")
            continue
        try:
            for v in group[-len(monitored):]:
                v.tmp = (tempfile.TemporaryDirectory(prefix="optiscope-bench-")
                         if v.log_dir else None)
                v.monitor = OptimizerMonitor(  # strict: a failing monitor is an error, not a row
                    v.optimizer, every=v.every, log_dir=v.tmp.name if v.tmp else None,
                    strict=True, console=False, report=False)  # report: written at close, untimed
        except Exception as exc:
            for v in group:
                v.close()
            skip(impl, f"OptimizerMonitor raised {type(exc).__name__}: {exc}", error=True)
            continue
        variants += group
    if not variants:
        return []

    def drop(impl: WatchedOptimizer, reason: str) -> None:
        for v in [v for v in variants if v.impl is impl]:
            variants.remove(v)
            try:
                v.close()
            except Exception:
                pass
        skip(impl, reason, error=True)
        free(device)

    def guarded(v: _Variant, fn: Callable[[], float]) -> float | None:
        try:
            return fn()
        except Exception as exc:  # one monitor failing takes its implementation out
            drop(v.impl, f"{v.name}: step raised {type(exc).__name__}: {exc}")
            return None

    def warm_up(v: _Variant) -> float:
        for _ in range(WARMUP_STEPS):
            v.optimizer.step()
        return 0.0

    def one_round(order: list[_Variant], record: bool = True) -> float:
        total = 0.0
        for v in order:
            took = guarded(v, lambda: clock.measure_ms(v.run_block)) if v in variants else None
            if took is not None and record:
                v.times.append(took)
            total += took or 0.0
        return total

    gc.collect()
    gc.disable()  # a collection inside one timed block would charge it to that variant
    try:
        for v in list(variants):  # the first sample (setup, compilation), its decoding, ...
            if v in variants and v.monitor is not None:
                guarded(v, lambda: warm_up(v))
        # A round of untimed blocks (the first rounds after the warm-up steps run slower for
        # every variant alike) sizes the others.
        order = list(variants)
        per_round = one_round(order, record=False)
        for v in variants:
            if v.monitor is not None:
                v.first_step = v.monitor.step
        # Split periods need whole multiples of their blocks per period.
        span = math.lcm(*(v.every // v.block for v in variants if v.every and v.every > v.block))
        if oh.rounds is not None:
            rounds = -(-oh.rounds // span) * span
        else:
            fitted = oh.budget_s * 1e3 / per_round if per_round > 0 else oh.max_rounds
            rounds = whole_period_rounds(min(max(fitted, oh.min_rounds), oh.max_rounds), span)
        log(f"  {rounds} rounds of {len(variants)} variants ({per_round / 1e3:.1f} s each)")
        # A new order each round. Rotating one order keeps every variant behind the same
        # neighbour, and a variant behind one with the same allocations finds the allocator's
        # pages mapped: the run-log row, always behind the plain every=1 row, came out 8-12 %
        # faster than it on GPT-2 small on 2 cores.
        shuffle = random.Random(0).shuffle
        for _ in range(rounds):
            shuffle(order)
            one_round(order)
    finally:
        gc.enable()

    rows = []
    for v in variants:
        row = {
            "workload": workload.name, "params": workload.params, "tensors": len(workload.shapes),
            "param_bytes": workload.params * size, "implementation": v.impl.name,
            "label": v.impl.label, "bundled": v.impl.bundled, "backend": v.impl.backend,
            "every": v.every, "log_dir": v.log_dir, "control": v.control,
            "block_steps": v.block,
            "blocks": len(v.times), "steps": len(v.times) * v.block,
            "times_ms": [float(f"{x:.6g}") for x in v.times],
        }
        if v.monitor is not None:
            last = v.monitor.step
            row["periods"] = row["steps"] // v.every  # whole periods: see the rounds
            row["blocks_per_period"] = max(1, v.every // v.block)
            row["sampled_steps"] = sum(v.monitor.is_sampled(s) for s in range(v.first_step + 1,
                                                                             last + 1))
            row["memory_bytes"] = v.monitor.memory_bytes()
        rows.append(row)
    for v in variants:
        try:
            v.close()
        except Exception as exc:
            skip(v.impl, f"{v.name}: close() raised {type(exc).__name__}: {exc}", error=True)
    variants.clear()
    del params
    free(device)
    add_overhead_ratios(rows, device.type)
    return rows


def _monitor_defaults() -> dict:
    from optiscope import OptimizerMonitor

    signature = inspect.signature(OptimizerMonitor)
    return {name: p.default for name, p in signature.parameters.items()
            if name in ("sample_size", "topk_density", "topk_block", "freeze_probe")}


def run_overhead(settings: Settings, clock: Clock) -> dict:
    """Times the monitor's overhead on every model of ``settings``: the ``overhead`` section of a
    results document, with its own provenance (a run may replace this section only)."""
    oh, device = settings.overhead, settings.device
    load_before = load_average()
    log("monitor overhead")
    skipped: list[dict] = []
    errors: list[dict] = []
    impls, known = [], watched_optimizers(device)
    for impl in known:
        reason = impl.requires(device)
        if reason is None:
            impls.append(impl)
        else:
            skipped.append({"workload": None, "implementation": impl.name, "reason": reason})
            log(f"skip {impl.name}: {reason}")
    workloads = [MODELS[m] for m in settings.models]
    rows: list[dict] = []
    for workload in workloads:
        log(f"{workload.name} ({workload.params:,} parameters), monitored and not")
        rows += _run_workload(workload, impls, settings, clock, skipped, errors)
    return {
        "date_utc": utc_now(),
        "command": settings.command,
        "git": git_commit(),
        "versions": versions(),
        "load_average": {"start": load_before, "end": load_average()},
        "settings": {
            "everies": list(oh.everies), "log_every": oh.log_every, "rounds": oh.rounds,
            "budget_s": oh.budget_s, "min_rounds": oh.min_rounds, "max_rounds": oh.max_rounds,
            "max_block_s": oh.max_block_s, "max_blocks_per_period": oh.max_blocks_per_period,
            "min_block_steps": oh.min_block_steps,
            "warmup_steps": WARMUP_STEPS, "monitor_defaults": _monitor_defaults(),
            "quick": settings.quick,
        },
        "implementations": [{"implementation": i.name, "label": i.label, "bundled": i.bundled,
                             "backend": i.backend} for i in known],
        "workloads": [{"name": w.name, "tensors": len(w.shapes), "params": w.params}
                      for w in workloads],
        "targets": [{"device_type": t.device_type, "backend": t.backend, "every": t.every,
                     "max_ratio": t.max_ratio, "text": t.text} for t in TARGETS]
                   + [{"memory_pct_below": MEMORY_TARGET_PCT,
                       "for_params_above": MEMORY_TARGET_MIN_PARAMS}],
        "rows": rows,
        "skipped": skipped,
        "errors": errors,
    }
