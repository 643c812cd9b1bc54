"""``python -m benchmarks.onebit``: 1-bit Adam against AdamW on the demo task, data-parallel over
gloo processes.

Each optimizer trains `optiscope.demo`'s model (the default `DemoConfig`) on ``--world`` CPU ranks
under ``DistributedDataParallel``, every rank drawing its own batches (global batch = world ×
batch), with the demo's AdamW hyperparameters and schedule (lr 3e-3, betas (0.9, 0.95), weight
decay 0.1, linear warm-up then cosine decay, gradient clipping at 1). `OneBitAdam` freezes v after
``--freeze`` of the steps and registers `onebit_ddp_hook`; AdamW keeps DDP's own all-reduce.
After the freeze the clipping sees each rank's local gradient, as it would in a real 1-bit run.

Prints, and writes to ``results/onebit-<device>.json``: the held-out loss of both runs and their
ratio, the 1-bit run's drift curve (``moment2_drift_since_freeze``: the frozen v against the v
it would have had, its largest value against the report's tolerance 0.1), its last
``quant_error``, and the bytes each rank sent
per compressed step against an fp32 ring all-reduce of the same parameters, and those the
monitor's drift probe added (the all-reduce of the sampled true gradients). The run directories
(run log, report.html) stay under ``--runs``.

``--probe-cost``: what the monitor's drift probe adds to a compressed step. On ``--world`` gloo
ranks, the demo model under DDP with `onebit_ddp_hook` and v frozen after step 1, the probe is
set on the monitor's automatic coordinate sample of every tensor, and compressed steps alternate
between tracking it and not; prints the median step time of each and the bytes per step of the
compressed all-reduce and of the probe; writes ``results/onebit-probe-<device>.json``.

``--world-of-one``: 1-bit Adam without a process group (a world of one still compresses) on
stationary gradients g = μ + N(0, 1), 4,096 entries, betas (0.9, 0.99), v frozen at step 600
of 850, against the exact momentum of the same gradients: ``quant_error`` and ‖m‖ / ‖m_exact‖
after the freeze; printed only.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import sys
import statistics
import tempfile
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from optiscope.bench.machine import describe_device
from optiscope.bench.results import script_command, write_script_results
from optiscope.demo import (CharGPT, DemoConfig, _Batches, _loss, schedule, stdlib_text,
                            train_step)

SCHEMA = "optiscope-bench-onebit/1"
RESULTS = Path(__file__).resolve().parent / "results"
LR, BETAS, WEIGHT_DECAY = 3e-3, (0.9, 0.95), 0.1
DRIFT_TOL = 0.1  # the report's freeze tolerance (`optiscope.monitor.analysis.freeze_verdict`)


def _rank(rank: int, world: int, root: str, name: str, config: dict, freeze_step: int) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from optiscope import OptimizerMonitor
    from optiscope.optimizers import AdamW, OneBitAdam, onebit_ddp_hook

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"file://{root}/store-{name}", rank=rank,
                            world_size=world, timeout=timedelta(minutes=10))
    try:
        cfg = DemoConfig(**config)
        torch.manual_seed(cfg.seed)  # the same initial model on every rank
        model = DistributedDataParallel(CharGPT(dim=cfg.dim, layers=cfg.layers, heads=cfg.heads,
                                                context=cfg.context))
        data = _Batches(stdlib_text(cfg.text_bytes), cfg.context, cfg.batch,
                        cfg.seed + 1000 * rank)
        if name == "onebit":
            opt = OneBitAdam(model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY,
                             freeze_step=freeze_step)
            model.register_comm_hook(opt, onebit_ddp_hook)
        else:
            opt = AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
        sched = schedule(opt, cfg.steps)
        sent = ring = probe = None
        with OptimizerMonitor(opt, model=model, every=cfg.every, log_dir=Path(root) / name,
                              console=False) as mon:
            for step in range(1, cfg.steps + 1):
                if step == cfg.steps:
                    mon.sample_next()
                loss = train_step(model, opt, sched, data)
                mon.log_scalar("loss", loss)
                report = getattr(opt, "last_compression", None)
                if report is not None:
                    sent, ring = report.bytes_sent, report.fp32_ring_bytes
                    probe = report.probe_bytes
            model.eval()
            with torch.no_grad():
                val = float(_loss(model, *data.validation()))
            mon.log_scalar("val_loss", val)
        if rank == 0:
            with open(Path(root) / f"{name}.pkl", "wb") as f:
                pickle.dump(dict(val_loss=val, final_loss=loss.item(), bytes_sent=sent,
                                 fp32_ring_bytes=ring, probe_bytes=probe), f)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's threads can abort an interpreter that finalizes after them


def run(config: DemoConfig, world: int, freeze: float, runs: Path) -> dict:
    from optiscope import load_run

    freeze_step = max(1, round(freeze * config.steps))
    out = {}
    for name in ("adamw", "onebit"):
        mp.start_processes(_rank, args=(world, str(runs), name, asdict(config), freeze_step),
                           nprocs=world, join=True, start_method="spawn")
        with open(runs / f"{name}.pkl", "rb") as f:
            out[name] = pickle.load(f)
    history = load_run(runs / "onebit")
    # The verdict reads the drift since the freeze (frozen v against the v without freezing);
    # the drift of v between samples says nothing here: v is frozen, so it is 0 by construction.
    _, drift = history.series("moment2_drift_since_freeze", "global")
    worst = float(max(drift)) if len(drift) else math.nan
    _, quant = history.series("quant_error", "global")
    one, adamw = out["onebit"], out["adamw"]
    return dict(
        world=world, freeze_step=freeze_step, steps=config.steps,
        adamw_val_loss=adamw["val_loss"], onebit_val_loss=one["val_loss"],
        val_loss_ratio=one["val_loss"] / adamw["val_loss"],
        within_10_percent=one["val_loss"] <= 1.1 * adamw["val_loss"],
        drift_since_freeze_max=worst, drift_since_freeze_last=float(drift[-1]),
        drift_within_tolerance=worst <= DRIFT_TOL,
        last_quant_error=float(quant[-1]) if len(quant) else None,
        bytes_sent_per_step=one["bytes_sent"], fp32_ring_bytes_per_step=one["fp32_ring_bytes"],
        probe_bytes_per_step=one["probe_bytes"],
        runs=str(runs))


def _probe_rank(rank: int, world: int, root: str, steps: int) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from optiscope.monitor.sampling import CoordinateSample, sample_count
    from optiscope.optimizers import OneBitAdam, onebit_ddp_hook

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"file://{root}/store-probe", rank=rank,
                            world_size=world, timeout=timedelta(minutes=10))
    try:
        cfg = DemoConfig()
        torch.manual_seed(cfg.seed)
        model = DistributedDataParallel(CharGPT(dim=cfg.dim, layers=cfg.layers, heads=cfg.heads,
                                                context=cfg.context))
        data = _Batches(stdlib_text(cfg.text_bytes), cfg.context, cfg.batch, cfg.seed + rank)
        opt = OneBitAdam(model.parameters(), lr=LR, betas=BETAS, freeze_step=1)
        model.register_comm_hook(opt, onebit_ddp_hook)
        gen = torch.Generator().manual_seed(0)  # the monitor's default seed: the same on all
        for p in model.parameters():
            sample = CoordinateSample.draw(p.numel(), sample_count(p.numel(), None), p.device, gen)
            opt.unfrozen_second_at(p, sample.index)
        probes, times = opt._unfrozen, {True: [], False: []}
        sampled = sum(p.numel() if x.index is None else x.index.numel() for p, x in probes.items())
        on_bytes = off_bytes = 0
        for step in range(1, steps + 1):
            tokens, targets = data.next()
            opt.zero_grad(set_to_none=True)
            _loss(model, tokens, targets).backward()
            tracked = step % 2 == 0
            opt._unfrozen = probes if tracked else {}
            dist.barrier()
            start = time.perf_counter()
            opt.step()
            elapsed = time.perf_counter() - start
            if step > 4:  # the first steps allocate the error buffers
                times[tracked].append(elapsed)
            report = opt.last_compression
            if report is not None:
                on_bytes, off_bytes = report.probe_bytes or on_bytes, report.bytes_sent
        if rank == 0:
            with open(Path(root) / "probe.pkl", "wb") as f:
                pickle.dump(dict(
                    world=world, steps=steps, sampled_entries=sampled,
                    parameters=sum(p.numel() for p in model.parameters()),
                    step_ms_with_probe=1e3 * statistics.median(times[True]),
                    step_ms_without_probe=1e3 * statistics.median(times[False]),
                    bytes_sent_per_step=off_bytes, probe_bytes_per_step=on_bytes), f)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def probe_cost(world: int, steps: int) -> dict:
    root = Path(tempfile.mkdtemp(prefix="optiscope-onebit-probe-"))
    mp.start_processes(_probe_rank, args=(world, str(root), steps), nprocs=world, join=True,
                       start_method="spawn")
    with open(root / "probe.pkl", "rb") as f:
        out = pickle.load(f)
    out["time_overhead"] = out["step_ms_with_probe"] / out["step_ms_without_probe"] - 1
    out["bytes_overhead"] = out["probe_bytes_per_step"] / out["bytes_sent_per_step"]
    return out


def world_of_one(n: int = 4096, freeze: int = 600, steps: int = 850) -> dict:
    """quant_error and ‖m‖ / ‖m_exact‖ of a OneBitAdam run without a process group."""
    from optiscope.optimizers import OneBitAdam

    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(n, generator=gen)
    p = torch.zeros(n, requires_grad=True)
    opt = OneBitAdam([p], lr=1e-3, betas=(0.9, 0.99), freeze_step=freeze)
    exact = torch.zeros(n, dtype=torch.float64)
    ratio, quant = [], []
    for step in range(1, steps + 1):
        p.grad = mu + torch.randn(n, generator=gen)
        exact.lerp_(p.grad.double(), 1 - opt.defaults["betas"][0])
        opt.request_stats()
        opt.step()
        if step > freeze:
            from optiscope.kernels.stats import Stat
            row = opt.last_stats.values[0]
            quant.append(math.sqrt(row[Stat.QUANT_ERROR_SQ] / row[Stat.QUANT_INPUT_SQ]))
            m = opt.state[p]["exp_avg"].double()
            ratio.append(float(m.norm() / exact.norm()))
    return dict(n=n, freeze_step=freeze, steps=steps, betas=opt.defaults["betas"],
                quant_error_median=statistics.median(quant), quant_error_last=quant[-1],
                m_norm_over_exact_median=statistics.median(ratio), m_norm_over_exact_max=max(ratio),
                m_norm_over_exact_last=ratio[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.onebit", description=__doc__)
    parser.add_argument("--steps", type=int, default=DemoConfig.steps)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--freeze", type=float, default=0.2,
                        help="share of the steps before v is frozen (default 0.2)")
    parser.add_argument("--text-bytes", type=int, default=DemoConfig.text_bytes)
    parser.add_argument("--runs", type=Path, help="where the run directories go (default: a "
                                                  "temporary directory)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--probe-cost", action="store_true",
                        help="measure what the drift probe adds to a compressed step")
    parser.add_argument("--world-of-one", action="store_true",
                        help="quant_error and |m| against the exact momentum in one process")
    args = parser.parse_args(argv)
    if args.world_of_one:
        for key, value in world_of_one().items():
            print(f"{key:>26}: {value}")
        return 0
    if args.probe_cost:
        device = describe_device(torch.device("cpu"))
        result = probe_cost(args.world, args.steps if args.steps != DemoConfig.steps else 60)
        for key, value in result.items():
            print(f"{key:>26}: {value}")
        write_script_results(args.output, f"onebit-probe-{device['slug']}.json",
                             schema=SCHEMA.replace("onebit", "onebit-probe"),
                             command=script_command("benchmarks.onebit", argv), device=device,
                             result=result)
        return 0
    if not 0 < args.freeze < 1:
        parser.error(f"--freeze must be in (0, 1), got {args.freeze}")
    runs = args.runs or Path(tempfile.mkdtemp(prefix="optiscope-onebit-"))
    runs.mkdir(parents=True, exist_ok=True)
    config = DemoConfig(steps=args.steps, text_bytes=args.text_bytes)
    result = run(config, args.world, args.freeze, runs)
    for key, value in result.items():
        print(f"{key:>26}: {value}")
    device = describe_device(torch.device("cpu"))
    write_script_results(args.output, f"onebit-{device['slug']}.json", schema=SCHEMA,
                         command=script_command("benchmarks.onebit", argv), device=device,
                         result=result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
