#!/usr/bin/env bash
# The whole GPU check in one command, for a CUDA machine whose python3 already has torch and
# Triton (no package registry needed: optiscope runs from the checkout, plotly is not used):
#   1. the CUDA tests (`-m gpu`: the compiled Triton kernels against torch.optim, the torch
#      backend and float64 brute force; the monitor on CUDA tensors);
#   2. `python -m benchmarks` on the GPU: the step table (every bundled optimizer's Triton and
#      torch backends against torch.optim's for-loop, foreach and fused, 10^6..10^9 parameters and
#      GPT-2 small), the monitor's overhead at every = 1, 10, 100, the roofline column.
# Everything it writes goes to $OUT (default /tmp/optiscope-gpu): env.txt, gpu-tests.log,
# bench.log and the results file cuda-<gpu>.json, which belongs in benchmarks/results/ (then
# `optiscope bench --render --readme README.md`). Each stage has a time limit, so a hang in one
# still returns the others' logs; it takes about 5 minutes on an H200.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh [--quick]     # --quick: a smoke run, no figures
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/optiscope-gpu}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OPTISCOPE_TEST_DEVICE=cuda
quick=0
[ "${1:-}" = "--quick" ] && quick=1

{
    date -u +%FT%TZ
    git rev-parse HEAD 2>/dev/null || echo "no git"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem \
        --format=csv 2>&1
    python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$out/env.txt"

status=0
# The files that hold CUDA tests; the others import plotly, which such a machine may lack.
timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu -o addopts="-ra" \
    tests/test_adam.py tests/test_adafactor.py tests/test_microadam.py tests/test_adadiag.py \
    tests/test_onebit.py 2>&1 | tee "$out/gpu-tests.log" || status=1

if [ "$quick" = 1 ]; then
    timeout 300 python3 -m benchmarks --device cuda --quick --output "$out" 2>&1 \
        | tee "$out/bench.log" || status=1
else
    # 15 s of timed steps per workload and 30 s of overhead rounds: the whole table in ~4 min.
    timeout 420 python3 -m benchmarks --device cuda --budget 15 --overhead-budget 30 \
        --output "$out" 2>&1 | tee "$out/bench.log" || status=1
fi
exit $status
