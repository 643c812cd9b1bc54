"""Compiles every Triton kernel variant the optimizers launch, for real GPU targets, without a GPU.

    python -m optiscope.kernels.inspect --arch 80,90 [--json FILE] [--only adam]

The variants are not declared here: `launches` calls the launchers themselves (``adam_step``,
``adafactor_step``, ``microadam_step``, ``pack_signs_triton``) on small CPU tensors, once per
configuration in `CASES`, with each kernel's ``run`` replaced by a recorder. What is compiled is
therefore exactly what those launchers would launch: the same constexprs, warps and argument
types, aligned or not (the misaligned cases pass views at an odd offset). A kernel that no case
reaches is an error, so a new kernel cannot go uninspected.

Each variant is compiled with ``triton.compile`` for ``GPUTarget("cuda", arch, 32)`` and its
cubin read with the ``cuobjdump`` that ships in Triton's wheel: registers, stack (local memory:
spills), shared memory, global loads and stores counted by width, and an occupancy estimate
(resident warps per SM from registers, shared memory and the arch's limits). ``--json`` also
writes the bytes each optimizer step moves per parameter against the algorithm's minimum, and
the time that projects at H100 and H200 bandwidth.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile

__all__ = ["ARCHS", "CASES", "Launch", "launches", "compile_launch", "occupancy", "sass_widths",
           "traffic", "main"]

# Per-SM limits: registers, resident warps, resident blocks, shared memory (bytes); the register
# file is allocated per warp in units of 256 registers; each block also reserves 1 KiB of shared
# memory for the system on sm_80 and later.
ARCHS = {
    80: dict(regs=65536, warps=64, blocks=32, smem=167936),
    86: dict(regs=65536, warps=48, blocks=16, smem=102400),
    89: dict(regs=65536, warps=48, blocks=24, smem=102400),
    90: dict(regs=65536, warps=64, blocks=32, smem=233472),
}
_RESERVED_SMEM = 1024
_REG_UNIT = 256

# HBM bandwidth of the GPUs the projections are for, bytes/s (vendor figures).
BANDWIDTH = {"H100 SXM (3.35 TB/s)": 3.35e12, "H200 (4.8 TB/s)": 4.8e12}


@dataclasses.dataclass
class Launch:
    """One compiled variant: a kernel and everything its launch fixes at compile time."""

    case: str
    kernel: object  # the JITFunction
    signature: dict  # parameter name -> Triton type ("*fp32", "i32", "fp32") or "constexpr"
    constexprs: dict  # parameter name -> value
    aligned: list  # names of pointer parameters whose tensors are 16-byte aligned
    num_warps: int
    num_stages: int | None

    @property
    def name(self) -> str:
        return self.kernel.__name__

    def key(self) -> tuple:
        return (self.name, tuple(sorted(self.signature.items())),
                tuple(sorted((k, str(v)) for k, v in self.constexprs.items())),
                tuple(sorted(self.aligned)), self.num_warps, self.num_stages)


_TORCH_TO_TRITON = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64",
                    "int64": "i64", "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8",
                    "bool": "i1"}


def _record(kernel, calls: list, case: str):
    def run(*args, grid, warmup, **kwargs):
        params = kernel.params
        values = dict(zip([p.name for p in params], args))
        num_warps = kwargs.pop("num_warps", 4)
        num_stages = kwargs.pop("num_stages", None)
        values.update(kwargs)
        signature, constexprs, aligned = {}, {}, []
        for p in params:
            value = values[p.name]
            if p.is_constexpr:
                signature[p.name] = "constexpr"
                constexprs[p.name] = value
            elif hasattr(value, "data_ptr"):
                signature[p.name] = "*" + _TORCH_TO_TRITON[str(value.dtype).replace("torch.", "")]
                if value.data_ptr() % 16 == 0:  # CUDA allocations always are; the JIT checks it
                    aligned.append(p.name)
            elif isinstance(value, bool):
                signature[p.name] = "i1"
            elif isinstance(value, int):
                signature[p.name] = "i32" if -2**31 <= value < 2**31 else "i64"
            elif isinstance(value, float):
                signature[p.name] = "fp32"
            else:
                raise TypeError(f"inspect: {kernel.__name__}({p.name}=...) got a "
                                f"{type(value).__name__}, which this tool does not map")
        calls.append(Launch(case, kernel, signature, constexprs, aligned, num_warps, num_stages))
    return run


def _cases():
    """(case name, thunk that calls a launcher) for every configuration the optimizers launch."""
    import torch

    from optiscope.kernels.adafactor import adafactor_step
    from optiscope.kernels.adam import adam_step
    from optiscope.kernels.microadam import microadam_step
    from optiscope.kernels.onebit import pack_signs_triton
    from optiscope.kernels.ranges import RANGE_BLOCK
    from optiscope.kernels.stats import NUM_STATS, StatsRows
    from optiscope.kernels.sums import tensor_sums
    from optiscope.kernels.gather import gather
    from optiscope.kernels.microadam import blocks  # the launcher's own layout

    def tensors(dtype, n=4096 + 7, misaligned=False):
        if misaligned:  # a view one element into a buffer: the scalar path
            return torch.zeros(n + 1, dtype=dtype)[1:]
        return torch.zeros(n, dtype=dtype)

    def rows(k, ranges=False):
        return StatsRows(torch.zeros(k, NUM_STATS), list(range(k)),
                         torch.zeros(k, 3, RANGE_BLOCK, dtype=torch.float64) if ranges else None)

    def adam(dtype, *, stats, wd=0.0, decoupled=False, amsgrad=False, maximize=False,
             misaligned=False, ranges=False):
        def thunk():
            p, g, m, v = (tensors(dtype, misaligned=misaligned) for _ in range(4))
            adam_step([p], [g], [m], [v], [tensors(dtype)] if amsgrad else None, step=1, lr=1e-3,
                      beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=wd,
                      decoupled_weight_decay=decoupled, maximize=maximize,
                      stats=rows(1, ranges) if stats else None)
        return thunk

    def adafactor(dtype, *, stats, beta1=None, wd=0.0, scale=True, misaligned=False,
                  ranges=False):
        def thunk():
            p = [tensors(dtype, misaligned=misaligned), torch.zeros(96, 80, dtype=dtype)]
            g = [tensors(dtype, misaligned=misaligned), torch.zeros(96, 80, dtype=dtype)]
            f32 = torch.float32
            adafactor_step(p, g, [None, torch.zeros(96, dtype=f32)], [None, torch.zeros(80, dtype=f32)],
                           [torch.zeros(p[0].numel(), dtype=f32), None],
                           [torch.zeros(x.shape, dtype=f32) for x in p] if beta1 else None,
                           rho=1e-2, beta2t=0.5, eps1=1e-30, eps2=1e-3, clip_threshold=1.0,
                           beta1=beta1, weight_decay=wd, scale_parameter=scale,
                           stats=rows(2, ranges) if stats else None)
        return thunk

    def microadam(dtype, *, stats, wd=0.0, window=10, block=4096, quant=4096, ranges=False):
        def thunk():
            n = 3 * block + 5
            layout = blocks(n, block, 0.01)
            p, g = tensors(dtype, n), tensors(dtype, n)
            microadam_step(
                [p], [g], [torch.zeros(-(-n // 2), dtype=torch.uint8)],
                [torch.zeros(-(-n // quant), dtype=torch.bfloat16)],
                [torch.zeros(-(-n // quant), dtype=torch.bfloat16)],
                [torch.zeros(window, layout.k, dtype=torch.int16)],
                [torch.zeros(window, layout.k, dtype=torch.bfloat16)], slot=0,
                w1=torch.ones(window), w2=torch.ones(window), c1=1.0, c2=1.0, lr=1e-3, eps=1e-8,
                weight_decay=wd, k_init=0.01, quant_block_size=quant, topk_block_size=block,
                stats=rows(1, ranges) if stats else None)
        return thunk

    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    out = []
    for stats in (False, True):
        s = "+stats" if stats else ""
        for amsgrad in (False, True):
            a = "+amsgrad" if amsgrad else ""
            out += [(f"adam-fp32{s}{a}", adam(f32, stats=stats, amsgrad=amsgrad)),
                    (f"adam-wd-fp32{s}{a}", adam(f32, stats=stats, wd=0.1, amsgrad=amsgrad)),
                    (f"adamw-fp32{s}{a}", adam(f32, stats=stats, wd=0.1, decoupled=True,
                                               amsgrad=amsgrad)),
                    (f"adamw-bf16{s}{a}", adam(bf16, stats=stats, wd=0.1, decoupled=True,
                                               amsgrad=amsgrad))]
        out += [(f"adamw-fp16{s}", adam(f16, stats=stats, wd=0.1, decoupled=True)),
                (f"adamw-fp32-maximize{s}", adam(f32, stats=stats, maximize=True)),
                (f"adamw-fp32-misaligned{s}", adam(f32, stats=stats, wd=0.1, decoupled=True,
                                                   misaligned=True)),
                (f"adamw-bf16-misaligned{s}", adam(bf16, stats=stats, wd=0.1, decoupled=True,
                                                   misaligned=True)),
                (f"adafactor-fp32{s}", adafactor(f32, stats=stats)),
                (f"adafactor-fp32-beta1-wd{s}", adafactor(f32, stats=stats, beta1=0.9, wd=0.1)),
                (f"adafactor-fp32-noscale{s}", adafactor(f32, stats=stats, scale=False)),
                (f"adafactor-bf16{s}", adafactor(bf16, stats=stats, beta1=0.9)),
                (f"adafactor-fp32-misaligned{s}", adafactor(f32, stats=stats, misaligned=True)),
                (f"microadam-fp32{s}", microadam(f32, stats=stats)),
                (f"microadam-fp32-wd{s}", microadam(f32, stats=stats, wd=0.1)),
                (f"microadam-bf16{s}", microadam(bf16, stats=stats, wd=0.1))]
    # range_probes="exact": the statistics variant that also counts every entry's range
    out += [("adamw-fp32+stats+ranges", adam(f32, stats=True, wd=0.1, decoupled=True,
                                             ranges=True)),
            ("adamw-bf16+stats+ranges", adam(bf16, stats=True, wd=0.1, decoupled=True,
                                             ranges=True)),
            ("adamw-fp32-misaligned+stats+ranges", adam(f32, stats=True, wd=0.1, decoupled=True,
                                                        misaligned=True, ranges=True)),
            ("adafactor-fp32-beta1-wd+stats+ranges", adafactor(f32, stats=True, beta1=0.9,
                                                               wd=0.1, ranges=True)),
            ("adafactor-bf16+stats+ranges", adafactor(bf16, stats=True, beta1=0.9, ranges=True)),
            ("adafactor-fp32-misaligned+stats+ranges", adafactor(f32, stats=True, misaligned=True,
                                                                 ranges=True)),
            ("microadam-fp32-wd+stats+ranges", microadam(f32, stats=True, wd=0.1, ranges=True)),
            ("microadam-bf16+stats+ranges", microadam(bf16, stats=True, wd=0.1, ranges=True))]
    out.append(("onebit-pack-fp32", lambda: pack_signs_triton(torch.zeros(8 * 1024 + 8))))
    # the monitor's sums of the tensors a foreign optimizer steps (kernels/sums.py)
    for name, dtype, misaligned in (("fp32", f32, False), ("bf16", bf16, False),
                                    ("fp32-misaligned", f32, True)):
        out.append((f"sums-{name}",
                    lambda d=dtype, m=misaligned: tensor_sums([tensors(d, misaligned=m)])))
    # the monitor's gathers of coordinate samples and of the top-k probe's blocks
    index32, index64 = torch.arange(64, dtype=torch.int32), torch.arange(64, dtype=torch.int64)
    out += [("gather-fp32", lambda: gather([tensors(f32)], [index32])),
            ("gather-bf16-int64", lambda: gather([tensors(bf16)], [index64])),
            ("gather-fp32-blocks", lambda: gather([tensors(f32, n=4096 * 4)], [index32[:2]],
                                                  row=4096))]
    return out


# The modules whose kernels the optimizers launch; every kernel they launch (`name[grid](...)`)
# must be reached by some case.
MODULES = ("optiscope.kernels.adam", "optiscope.kernels.adafactor", "optiscope.kernels.microadam",
           "optiscope.kernels.onebit", "optiscope.kernels.sums", "optiscope.kernels.gather")
CASES = None  # filled by `launches`: the case names, for --list


def _launched_kernels() -> dict:
    import importlib
    import inspect as pyinspect

    out = {}
    for name in MODULES:
        module = importlib.import_module(name)
        source = pyinspect.getsource(module)
        for kernel in set(re.findall(r"(\w+)\[[^\]\n]*\]\(", source)):  # name[grid](...)
            if kernel in vars(module):
                out[f"{name}.{kernel}"] = getattr(module, kernel)
    return out


def launches(only: str | None = None) -> list[Launch]:
    """Every distinct variant the launchers launch, recorded from the launchers themselves."""
    global CASES
    kernels = _launched_kernels()
    for name, kernel in kernels.items():
        if not hasattr(kernel, "params") or not hasattr(kernel, "run"):
            raise RuntimeError(f"inspect: {name} is not a compilable Triton kernel here (is "
                               "TRITON_INTERPRET set? run this tool without it)")
    cases = _cases()
    CASES = [c for c, _ in cases]
    calls: list[Launch] = []
    seen = set()
    for case, thunk in cases:
        if only and only not in case:
            continue
        for kernel in kernels.values():
            kernel.run = _record(kernel, calls, case)
        try:
            thunk()
        finally:
            for kernel in kernels.values():
                del kernel.run
    if not only:
        missing = sorted(n for n, k in kernels.items() if all(c.kernel is not k for c in calls))
        if missing:
            raise RuntimeError(f"inspect: no case launches {missing}; add one to _cases()")
    out = []
    for call in calls:
        if call.key() not in seen:
            seen.add(call.key())
            out.append(call)
    return out


def _source(launch: Launch):
    """The ASTSource of a launch, in the form this Triton's compiler takes."""
    import inspect as pyinspect

    from triton.compiler import ASTSource

    names = [p.name for p in launch.kernel.params]
    if "constexprs" in pyinspect.signature(ASTSource.__init__).parameters:  # Triton >= 3.3
        constexprs = {(names.index(k),): v for k, v in launch.constexprs.items()}
        attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in launch.aligned}
        return ASTSource(launch.kernel, dict(launch.signature), constexprs, attrs)
    try:  # Triton 3.0-3.1
        from triton.compiler import AttrsDescriptor
    except ImportError:  # 3.2
        from triton.backends.compiler import AttrsDescriptor

    signature = {k: v for k, v in launch.signature.items() if v != "constexpr"}
    divisible = tuple(names.index(k) for k in launch.aligned)
    try:
        attrs = AttrsDescriptor(divisible_by_16=divisible)
    except TypeError:  # 3.2 takes parameter numbers and their hints
        attrs = AttrsDescriptor.from_hints({i: 16 for i in divisible})
    return ASTSource(launch.kernel, signature, dict(launch.constexprs), attrs)


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def sass_widths(sass: str) -> dict:
    """Global loads and stores in SASS, counted by access width in bits: {"LDG": {128: 8, ...}}."""
    out = {"LDG": collections.Counter(), "STG": collections.Counter()}
    for op, mods in re.findall(r"\b(LDG|STG)((?:\.[A-Z0-9_]+)*)", sass):
        parts = mods.split(".")
        width = next((int(w) for w in ("128", "64") if w in parts), None)
        if width is None:
            width = 16 if {"U16", "S16"} & set(parts) else 8 if {"U8", "S8"} & set(parts) else 32
        out[op][width] += 1
    return {op: dict(sorted(c.items(), reverse=True)) for op, c in out.items()}


def occupancy(regs: int, smem: int, warps: int, arch: int) -> dict:
    """Resident blocks and warps per SM for a kernel's registers per thread and shared memory
    per block (bytes), and what limits them."""
    lim = ARCHS[arch]
    regs_per_warp = -(-max(regs, 1) * 32 // _REG_UNIT) * _REG_UNIT
    # (on a tie the hardware's own maxima are named first)
    limits = {"warps": lim["warps"] // warps, "blocks": lim["blocks"],
              "registers": (lim["regs"] // regs_per_warp) // warps,
              "shared memory": lim["smem"] // (smem + _RESERVED_SMEM)}
    blocks = min(limits.values())
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * warps,
            "limited_by": min(limits, key=limits.get)}


def compile_launch(launch: Launch, arch: int) -> dict:
    """Compiles one variant for ``sm_<arch>`` and reads its resource use from the cubin."""
    import triton
    from triton.backends.compiler import GPUTarget

    options = {"num_warps": launch.num_warps}
    if launch.num_stages is not None:
        options["num_stages"] = launch.num_stages
    try:
        compiled = triton.compile(_source(launch), target=GPUTarget("cuda", arch, 32),
                                  options=options)
    except Exception as exc:  # a compile error is a finding, reported per variant
        return {"error": f"{type(exc).__name__}: {str(exc)[:2000]}"}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True,
                              text=True, check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    regs, stack, static_smem, local = (int(x) for x in match.groups())
    smem = static_smem + int(getattr(compiled.metadata, "shared", 0) or 0)
    spill_ops = len(re.findall(r"\b(?:STL|LDL)\b", sass))
    return {"registers": regs, "stack_bytes": stack, "local_bytes": local,
            "spill_instructions": spill_ops, "spills": stack + local > 0 or spill_ops > 0,
            "shared_bytes": smem, "global": sass_widths(sass),
            **occupancy(regs, smem, launch.num_warps, arch)}


def traffic() -> list[dict]:
    """Bytes each optimizer step moves per parameter in HBM (reads + writes) against the least any
    implementation must move (every input read once, every output written once), and the time per
    10^9 parameters that the kernels' bytes project at H100 and H200 bandwidth.

    Per-tensor tables, partial rows and the row/column factors are O(tensors + rows + columns),
    not O(parameters), and left out. s is the parameter's (and gradient's) bytes; optimizer
    state is in the parameter's dtype for Adam, float32 for Adafactor.
    """
    rows = []

    def row(step, dtype, moved, minimum, note):
        rows.append({"step": step, "dtype": dtype, "bytes_per_param": moved,
                     "minimum_bytes_per_param": minimum, "note": note,
                     "projected_ms_per_1e9_params": {
                         gpu: round(moved * 1e9 / bw * 1e3, 3) for gpu, bw in BANDWIDTH.items()}})

    for dt, s in (("fp32", 4), ("bf16", 2)):
        row("adam/adamw", dt, 7 * s, 7 * s, "one pass: read θ, g, m, v; write θ, m, v")
        row("adam/adamw amsgrad", dt, 9 * s, 9 * s, "one pass; v̄ read and written too")
        row("adafactor factored", dt, 6 * s, 3 * s,
            "pass 1 reads g (row/column sums), pass 3 reads g and θ (Σ U², Σ θ²), pass 4 reads "
            "g and θ and writes θ: the clip and the relative step need whole-tensor sums first")
        row("adafactor not factored", dt, 5 * s + 12, 3 * s + 8,
            "pass 3 reads g, θ, v and writes v; pass 4 reads g, θ, v and writes θ (v fp32)")
        row("adafactor factored +beta1", dt, 6 * s + 8, 3 * s + 8,
            "as factored, plus the fp32 first moment read and written in pass 4")
        # MicroAdam, m = 10 rows, k = 1 % of each 4096-entry block kept: reads g, θ, the 4-bit
        # codes (0.5 B) and the block's m window rows (int16 index + bf16 value per kept entry);
        # writes θ, the codes and this step's row. The per-program scatter scratch (two blocks of
        # float32) stays in L2 at one resident program per SM, so it is not counted.
        moved = 3 * s + 2 * 0.5 + 10 * 0.01 * 4 + 0.01 * 4
        row("microadam (m=10, k=1%)", dt, round(moved, 3), round(moved, 3),
            "one pass; window rows read once per block; scatter scratch in L2 not counted")
    rows.append({"step": "onebit pack_signs", "dtype": "fp32", "bytes_per_param": 4.125,
                 "minimum_bytes_per_param": 4.125, "note": "read 4 B, write 1 bit",
                 "projected_ms_per_1e9_params": {gpu: round(4.125e9 / bw * 1e3, 3)
                                                 for gpu, bw in BANDWIDTH.items()}})
    return rows


_WORKER: dict = {}


def _compile_in_worker(job: tuple) -> dict:
    """`compile_launch` of the i-th launch, in a worker process that records the launches once."""
    only, index, arch = job
    if "launches" not in _WORKER:
        _WORKER["launches"] = launches(only)
    return compile_launch(_WORKER["launches"][index], arch)


def _format(results: list[dict]) -> str:
    lines = [f"{'kernel':<22} {'case':<34} {'sm':>3} {'warps':>5} {'regs':>4} {'spill':>5} "
             f"{'smem':>6} {'warps/SM':>8}  loads (bits:n) / stores"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['kernel']:<22} {r['case']:<34} {r['arch']:>3} COMPILE ERROR "
                         f"{r['error'][:200]}")
            continue
        ld = " ".join(f"{w}:{n}" for w, n in r["global"]["LDG"].items())
        st = " ".join(f"{w}:{n}" for w, n in r["global"]["STG"].items())
        lines.append(f"{r['kernel']:<22} {r['case']:<34} {r['arch']:>3} {r['num_warps']:>5} "
                     f"{r['registers']:>4} {r['stack_bytes'] + r['local_bytes']:>5} "
                     f"{r['shared_bytes']:>6} {r['warps_per_sm']:>8}  {ld} / {st}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m optiscope.kernels.inspect",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="80,90",
                        help=f"comma-separated compute capabilities, of {sorted(ARCHS)}")
    parser.add_argument("--json", help="also write the results (and the traffic table) here")
    parser.add_argument("--only", help="only the cases whose name contains this")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                        help="compiler processes (default: min(4, CPUs))")
    args = parser.parse_args(argv)
    try:
        archs = [int(a) for a in args.arch.split(",")]
    except ValueError:
        parser.error(f"--arch takes numbers such as 80,90, got {args.arch!r}")
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        parser.error(f"--arch {unknown}: this tool knows the limits of {sorted(ARCHS)}")
    if "triton" not in sys.modules:  # the interpreter would replace the kernels being compiled
        os.environ.pop("TRITON_INTERPRET", None)
    import triton

    found = launches(args.only)
    jobs = [(args.only, i, arch) for i in range(len(found)) for arch in archs]
    if args.jobs > 1:
        import concurrent.futures
        import multiprocessing

        # spawn, not fork: the workers record the launches afresh, with nothing patched
        with concurrent.futures.ProcessPoolExecutor(
                args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            reports = list(pool.map(_compile_in_worker, jobs))
    else:
        reports = [compile_launch(found[i], arch) for _, i, arch in jobs]
    results = []
    for (_, i, arch), report in zip(jobs, reports):
        launch = found[i]
        results.append({"kernel": launch.name, "case": launch.case, "arch": arch,
                        "num_warps": launch.num_warps,
                        "constexprs": {k: str(v) for k, v in launch.constexprs.items()},
                        "aligned_pointers": launch.aligned, **report})
    print(_format(results), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"schema": "optiscope-bench-kernels/1", "triton": triton.__version__,
                       "command": "python -m optiscope.kernels.inspect "
                                  + " ".join(argv if argv is not None else sys.argv[1:]),
                       "archs": archs, "kernels": results, "traffic": traffic()}, f, indent=1)
            f.write("\n")
    failed = [r for r in results if "error" in r or r.get("spills")]
    if failed:
        print(f"{len(failed)} variant(s) failed to compile or spill", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
