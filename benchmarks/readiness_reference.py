"""``python -m benchmarks.readiness_reference``: what torchao's low-bit AdamW adds to m and v per step.

The reference figures behind the 8-bit and 4-bit thresholds of `optiscope.monitor.readiness`
(docs/readiness.md): torchao's ``AdamW8bit`` and ``AdamW4bit`` train a 256×256 linear layer on a
random regression (batch 64, lr 1e-3, betas (0.9, 0.999), seeded), and at every step the
one-step requantization error is measured from the optimizer's own dequantized state,

    ‖deq(m_t) − (β1·deq(m_{t−1}) + (1 − β1)·g_t)‖ / ‖β1·deq(m_{t−1}) + (1 − β1)·g_t‖

(v likewise with g²), in float64 on whole tensors. Writes ``results/readiness-reference.json``:
the median and 90th percentile over the steps. Runs eagerly (``TORCHDYNAMO_DISABLE=1``: torchao
compiles its step otherwise, 30-60 s per optimizer on 2 CPU cores; the state is the same).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from optiscope.bench.machine import describe_device  # noqa: E402
from optiscope.bench.results import write_script_results  # noqa: E402
from optiscope.cmdline import OneLineParser, positive_int  # noqa: E402

SCHEMA = "optiscope-bench-readiness-reference/1"
RESULTS = Path(__file__).resolve().parent / "results"
BETAS = (0.9, 0.999)


def run(name: str, steps: int, n: int = 256, seed: int = 0) -> dict:
    """One optimizer's one-step requantization errors of m and v over ``steps`` steps."""
    import torchao.optim

    torch.manual_seed(seed)
    layer = torch.nn.Linear(n, n, bias=False)
    target = torch.randn(n, n) / math.sqrt(n)
    opt = getattr(torchao.optim, name)(layer.parameters(), lr=1e-3, betas=BETAS,
                                       weight_decay=0.0)
    b1, b2 = BETAS
    errors, previous = [], None
    for _ in range(steps):
        x = torch.randn(64, n)
        loss = (layer(x) - x @ target.T).square().mean()
        opt.zero_grad()
        loss.backward()
        g = layer.weight.grad.detach().double()
        opt.step()
        state = opt.state[layer.weight]
        m, v = (state[k].dequantize().double() for k in ("exp_avg", "exp_avg_sq"))
        if previous is not None:
            m_exact = b1 * previous[0] + (1 - b1) * g
            v_exact = b2 * previous[1] + (1 - b2) * g * g
            errors.append((float((m - m_exact).norm() / m_exact.norm()),
                           float((v - v_exact).norm() / v_exact.norm())))
        previous = (m, v)
    e = np.array(errors)
    return dict(optimizer=f"torchao.optim.{name}", steps=steps, shape=[n, n],
                m_median=float(np.median(e[:, 0])), m_p90=float(np.percentile(e[:, 0], 90)),
                v_median=float(np.median(e[:, 1])), v_p90=float(np.percentile(e[:, 1], 90)))


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m benchmarks.readiness_reference",
                           description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=positive_int, default=60, metavar="N",
                        help="training steps, the first unmeasured (default 60)")
    parser.add_argument("--output", type=Path, default=RESULTS, metavar="DIR",
                        help="where readiness-reference.json goes (default benchmarks/results)")
    args = parser.parse_args(argv)
    setup = dict(model="a 256×256 linear layer on a random regression, batch 64, seed 0",
                 optimizer="lr 1e-3, betas (0.9, 0.999), no weight decay",
                 device=describe_device(torch.device("cpu")))
    setup["rows"] = [run(name, args.steps) for name in ("AdamW8bit", "AdamW4bit")]
    print(json.dumps(setup["rows"], indent=1))
    command = "python -m benchmarks.readiness_reference " + " ".join(argv or sys.argv[1:])
    write_script_results(args.output, "readiness-reference.json", schema=SCHEMA,
                         command=command.strip(), **setup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
