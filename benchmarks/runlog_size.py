"""``python -m benchmarks.runlog_size``: what writing floats exactly costs the run log.

The run log writes each float64 as the shortest text that reads back as the same value (Python's
``repr``), so `load_run` returns `monitor.history` bit for bit. This trains a small MLP (8 linear
layers, 7 LayerNorms: 30 tensors) with AdamW under the monitor, sampling every step for 100
steps, once with that writer and once with the 7-significant-digit one it replaced, and prints
both files' sizes, and the first one's bytes by record kind (the log2 histograms, and the
dynamic-range shares within the samples). CPU, deterministic; a few seconds.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile

import numpy as np
import torch
from torch import nn

from optiscope import OptimizerMonitor
import optiscope.kernels.cpu_format as cpu_format
from optiscope.monitor import runlog, runlog_writer
from optiscope.monitor.metrics import RANGE_SHARES
from optiscope.optimizers import AdamW


def _seven_digits(x: float) -> str:
    """The writer before: 7 significant digits (float32's precision)."""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    if x.is_integer() and abs(x) < 2**53:
        return str(int(x))
    return format(x, ".7g")


def log_bytes(steps: int = 100) -> int:
    return sum(v for k, v in bytes_by_kind(steps).items() if not k.startswith("sample: "))


def bytes_by_kind(steps: int = 100, range_probes: bool = False) -> dict[str, int]:
    """The run log's bytes per record kind (``sample``, ``histograms``, ``scopes``, ...), with
    the dynamic-range shares' part of the samples as ``sample: range shares``."""
    torch.manual_seed(0)
    layers = []
    for _ in range(8):
        layers += [nn.Linear(64, 64), nn.LayerNorm(64), nn.GELU()]
    model = nn.Sequential(*layers[:-2])  # ends with a linear layer
    opt = AdamW(model.parameters(), lr=1e-3, backend="torch")
    x, y = torch.randn(32, 64), torch.randn(32, 64)
    with tempfile.TemporaryDirectory() as run:
        with OptimizerMonitor(opt, model=model, every=1, log_dir=run, console=False,
                              range_probes=range_probes) as mon:
            for _ in range(steps):
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                opt.step()
                mon.log_scalar("loss", loss)
        sizes: dict[str, int] = {}
        shares = tuple(f"_{fmt}_{what}" for fmt, what in RANGE_SHARES)
        with open(os.path.join(run, runlog.RUNLOG), "rb") as f:
            for line in f:
                kind = json.loads(line).get("type", "?")
                sizes[kind] = sizes.get(kind, 0) + len(line)
                if kind == "sample":  # the shares' "name":[k,[...]] entries
                    for part in re.findall(rb'"[a-z0-9_]+":\[\d+,\[[^\]]*\]\]', line):
                        if part.split(b'"')[1].decode().endswith(shares):
                            sizes["sample: range shares"] = (
                                sizes.get("sample: range shares", 0) + len(part) + 1)
        return sizes


def main() -> None:
    sizes = bytes_by_kind()
    exact = sum(v for k, v in sizes.items() if not k.startswith("sample: "))
    print("run log, 100 samples of 30 tensors, by record kind: " + ", ".join(
        f"{kind} {n / 1e3:.0f} kB" for kind, n in sorted(sizes.items())))
    # The writer's Python formatting (the C one, byte-identical, off), with 7 digits
    writer, text = runlog_writer.values_json, cpu_format.formatter
    runlog_writer.values_json = lambda values: "[" + ",".join(
        _seven_digits(float(x)) for x in np.asarray(values, dtype=np.float64).ravel()) + "]"
    cpu_format.formatter = lambda: None
    try:
        seven = log_bytes()
    finally:
        runlog_writer.values_json, cpu_format.formatter = writer, text
    print(f"run log, 100 samples of 30 tensors: exact floats {exact / 1e3:.0f} kB, "
          f"7 digits {seven / 1e3:.0f} kB ({exact / seven:.2f}x)")
    ranged = bytes_by_kind(range_probes=True)
    hists = ranged.get("histograms", 0)
    print(f"with range_probes=True: {sum(v for k, v in ranged.items() if ':' not in k) / 1e3:.0f}"
          f" kB, of which histograms {hists / 1e3:.0f} kB ({hists / (100 * 30 * 3):.0f} B per "
          f"tensor and quantity per sample) and the shares "
          f"{ranged.get('sample: range shares', 0) / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
