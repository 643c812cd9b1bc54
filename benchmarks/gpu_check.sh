#!/usr/bin/env bash
# The whole GPU check in one command, for a CUDA machine whose python3 already has torch and
# Triton (no package registry needed: optiscope runs from the checkout, plotly is not used):
#   1. env.txt: the commit, the GPU, torch, CUDA and Triton versions;
#   2. gpu-tests.log: the CUDA tests (`-m gpu`: the compiled Triton kernels against torch.optim,
#      the torch backend and float64 brute force; the monitor on CUDA tensors);
#   3. kernels-sm<CC>.json / kernels.log: `python -m optiscope.kernels.inspect` for this GPU's
#      compute capability (registers, spills, load widths, occupancy of every launched variant);
#   4. bench.log and the results file cuda-<gpu>.json: `python -m benchmarks` on the GPU (the
#      step table of every bundled optimizer's backends against torch.optim's, the monitor's
#      overhead, the roofline column); the results file belongs in benchmarks/results/ (then
#      `optiscope bench --render --readme README.md`).
# Everything goes to $OUT (default /tmp/optiscope-gpu), with summary.txt: each stage's exit
# status and seconds. The stages share a 6-minute deadline (each also has its own limit), so a
# hang in one still leaves the others' logs; the exit status is 0 only when every stage passed.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh [--quick | --dry-run]
#     --quick    the benchmark at tiny sizes (a smoke run, no figures)
#     --dry-run  no GPU needed: every stage on the CPU at tiny sizes, the CUDA tests collected
#                and skipped; tests/test_gpu_check.py runs it so that the script's first GPU
#                run is not its first run
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/optiscope-gpu}
python=${PYTHON:-python3}
mode=full
case "${1:-}" in
    "") ;;
    --quick) mode=quick ;;
    --dry-run) mode=dry ;;
    *) echo "usage: OUT=DIR bash benchmarks/gpu_check.sh [--quick | --dry-run]" >&2; exit 2 ;;
esac
mkdir -p "$out"
: > "$out/summary.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "$mode" = dry ]; then
    export OPTISCOPE_TEST_DEVICE=cpu
else
    export OPTISCOPE_TEST_DEVICE=cuda
    unset TRITON_INTERPRET
fi
deadline=$((SECONDS + ${GPU_CHECK_SECONDS:-360}))
status=0

# stage NAME LIMIT CMD...: runs CMD for at most min(LIMIT, seconds left), output to NAME.log
stage() {
    local name=$1 limit=$2 left t0 rc
    shift 2
    left=$((deadline - SECONDS))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 5 ]; then
        echo "$name: not run, the deadline has passed" | tee -a "$out/summary.txt"
        status=1
        return
    fi
    t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    rc=${PIPESTATUS[0]}
    echo "$name: exit $rc after $((SECONDS - t0)) s (limit $limit s)" | tee -a "$out/summary.txt"
    [ "$rc" = 0 ] || status=1
}

{
    date -u +%FT%TZ
    echo "mode $mode"
    git rev-parse HEAD 2>/dev/null || echo "no git"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem \
        --format=csv 2>&1 || echo "no nvidia-smi"
    "$python" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
} 2>&1 | tee "$out/env.txt"

# The files that hold CUDA tests; the others import plotly, which such a machine may lack.
stage gpu-tests 150 "$python" -m pytest -q -p no:cacheprovider -m gpu -o addopts="-ra" \
    tests/test_adam.py tests/test_adafactor.py tests/test_microadam.py tests/test_adadiag.py \
    tests/test_onebit.py tests/test_kernel_sums.py tests/test_kernel_gather.py

if [ "$mode" = dry ]; then
    arch=90
    only=(--only onebit --jobs 1)  # one variant: the stage runs, quickly
else
    arch=$("$python" -c "import torch; m, n = torch.cuda.get_device_capability(); print(10 * m + n)")
    only=(--jobs 8)
fi
stage kernels 60 "$python" -m optiscope.kernels.inspect --arch "$arch" "${only[@]}" \
    --json "$out/kernels-sm$arch.json"

case "$mode" in
    # Timed steps per workload sized so that the whole table fits what is left of the deadline
    # (about 2.5 minutes) on an H100/H200; one overhead round (on the first H200 run a round of
    # GPT-2 small's 18 variants took 48 s, and --overhead-budget 10 still planned five)
    full) stage bench 240 "$python" -m benchmarks --device cuda --budget 5 --overhead-rounds 1 \
              --output "$out" ;;
    quick) stage bench 240 "$python" -m benchmarks --device cuda --quick --output "$out" ;;
    dry) stage bench 240 "$python" -m benchmarks --device cpu --quick --sizes 1000 --models \
             --output "$out" ;;
esac
echo "everything is in $out" | tee -a "$out/summary.txt"
exit $status
