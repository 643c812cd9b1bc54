"""The run log's numbers as text: ns per value of the C formatter (`optiscope.kernels.cpu_format`,
run on the writer's thread without the GIL) and of the Python one (`values_json`, json's repr of
each float), on a sample's worth of values (16 metrics at 148 tensors, 2,089 values) and on
random doubles of every magnitude; and what `RunLogWriter.write_sample` costs the calling
thread at 148 tensors (its CPU time: the copy of the numbers and a queue append).

    python -m benchmarks.runlog_format
"""

from __future__ import annotations

import tempfile
import time

import numpy as np

from optiscope.kernels.cpu_format import formatter
from optiscope.monitor.runlog import RunLogWriter
from optiscope.monitor.runlog_writer import values_json


def best_ns_per_value(fn, values: np.ndarray, rounds: int = 30) -> float:
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        fn(values)
        best = min(best, time.perf_counter() - t)
    return best / values.size * 1e9


def a_sample(rng) -> dict:
    """What the monitor writes at 148 tensors: 13 float64 metrics per tensor and global, the
    state bytes (whole numbers), the learning rate, a user scalar."""
    scopes = ["global", *(f"h.{i}.weight" for i in range(148))]
    values = {f"metric{i}": (scopes, np.sqrt(rng.random(149)) * 10.0 ** rng.integers(-6, 3))
              for i in range(13)}
    values["state_bytes"] = (["global", *scopes[1:], "key/exp_avg"],
                             [int(x) for x in rng.integers(0, 2**30, 150)])
    values["lr"] = (["group0"], [3e-4])
    values["loss"] = (["global"], [float(rng.random())])
    return values


def main() -> None:
    rng = np.random.default_rng(0)
    text = formatter()
    sample = a_sample(rng)
    numbers = np.concatenate([np.asarray(v, dtype=np.float64) for _, v in sample.values()])
    cases = {"a sample at 148 tensors": numbers,
             "random doubles, every magnitude": rng.standard_normal(100_000)
             * 10.0 ** rng.uniform(-300, 300, 100_000)}
    for what, values in cases.items():
        python = best_ns_per_value(values_json, values)
        line = f"{what} ({values.size:,} values): Python {python:.0f} ns/value"
        if text is not None:
            c = best_ns_per_value(text.array, values)
            line += f", C {c:.0f} ns/value ({python / c:.1f}x)"
        print(line)

    with tempfile.TemporaryDirectory() as run:
        writer = RunLogWriter(run)
        spent = []
        for step in range(300):
            t = time.thread_time()
            writer.write_sample(step, time.time(), sample)
            spent.append(time.thread_time() - t)
            time.sleep(0.002)  # a step's worth of other work between samples
        writer.close()
    print(f"write_sample at 148 tensors, the calling thread's CPU time: median "
          f"{np.median(spent[20:]) * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
