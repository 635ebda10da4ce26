#!/usr/bin/env bash
# GPU session script for issue 8: kernel parity on CUDA, then every benchmark at full size (~8 min on an
# H100/H200). Logs and JSON go to $OUT (the device tool's output folder; ./bench_out when unset).
#   device tool:  run  command="bash eval/bench/run_gpu.sh"  timeout_s=540
# Needs only python + torch + triton (+ numpy); no pip installs, no network. Each step has its own time
# limit so one slow step cannot eat the others; a failing step is logged and the script goes on.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
status=0

step() {  # step NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s): $*" | tee -a "$OUT/summary.log"
  timeout --signal=INT --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 30 "$OUT/$name.log"
  echo "=== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$OUT/summary.log"
  [ $rc -eq 0 ] || status=1
}

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null || true
  $PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  $PY -c "import triton; print('triton', triton.__version__)" || echo "triton missing: the fused kernel cannot run"
} 2>&1 | tee "$OUT/env.log"

# 1. Parity of the fused kernel vs the reference on CUDA (forward + all gradients), and the router end to end.
if $PY -c "import pytest" 2>/dev/null; then
  step parity_tests 120 $PY -m pytest -q -x tests/test_kernels.py -p no:cacheprovider
else
  step parity_tests 120 $PY eval/bench/kernel_parity.py --device cuda
fi

# 2. Benchmarks at full size (SiT-XL/2 shapes, B=32, bf16).
step bench_aggregate 75 $PY eval/bench/bench_aggregate.py --json "$OUT/bench_aggregate.json"
step bench_train_step 140 $PY eval/bench/bench_train_step.py --warmup 2 --iters 6 --json "$OUT/bench_train_step.json"
step bench_dmd_step 80 $PY eval/bench/bench_dmd_step.py --warmup 2 --iters 5 --json "$OUT/bench_dmd_step.json"
step bench_sampling 80 $PY eval/bench/bench_sampling.py --warmup 2 --iters 10 --json "$OUT/bench_sampling.json"

echo "done: status $status (0 = every step passed); logs in $OUT" | tee -a "$OUT/summary.log"
exit $status
