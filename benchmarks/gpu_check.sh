#!/usr/bin/env bash
# The prepared check for a GPU machine: build fastnn in place against the machine's own torch
# (no build isolation, no package index needed: pybind11, cmake and ninja must be installed),
# run the GPU test tier, one compute-sanitizer memcheck pass over the CUDA kernels, and the
# benchmark's GPU set. Everything lands in the output folder:
#   build.log info.txt tests.log sanitizer.log bench.log gpu_bench.json gpu_bench.png summary.txt
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default: $OUT, else ./gpu_check_out)
#
# Environment: FASTNN_CUDA_ARCHS (default 90, the H100/H200; e.g. "80;90"), CHECK_JOBS (pytest
# workers, default 8), BENCH_SECONDS (time allowed to the benchmark, default 240). Each stage has
# its own time limit and the script stops at the first failing stage, saying which in summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
summary="$out/summary.txt"
: >"$summary"
python="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 FASTNN_CUDA=1 FASTNN_CUDA_ARCHS="${FASTNN_CUDA_ARCHS:-90}"
unset TRITON_INTERPRET

stage() {  # stage NAME SECONDS LOG COMMAND...
  local name=$1 secs=$2 log=$3
  shift 3
  local t0=$SECONDS
  echo "== $name (limit ${secs}s) $(date -u +%H:%M:%S)" | tee -a "$summary"
  timeout --signal=INT --kill-after=20 "$secs" "$@" >"$log" 2>&1
  local rc=$?
  echo "   $name: exit $rc after $((SECONDS - t0))s (log: $(basename "$log"))" | tee -a "$summary"
  if [ $rc -ne 0 ]; then
    echo "--- last lines of $(basename "$log"):" | tee -a "$summary"
    tail -n 40 "$log" | tee -a "$summary"
  fi
  return $rc
}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  "$python" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__)"
  nvcc --version | tail -1
} >"$out/env.txt" 2>&1
cat "$out/env.txt" >>"$summary"

stage build 420 "$out/build.log" "$python" setup.py build_ext --inplace || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
stage info 60 "$out/info.txt" "$python" -m fastnn.info || exit 1

# Tier 4 (and the rest of the suite, which the GPU machine runs too). Triton autotuning is off in
# tests: one config per kernel keeps compilation to a few minutes.
workers="${CHECK_JOBS:-8}"
xdist=""
"$python" -c "import xdist" 2>/dev/null && xdist="-n $workers"
stage tests 420 "$out/tests.log" env FASTNN_TRITON_AUTOTUNE=0 "$python" -m pytest -q $xdist -p no:cacheprovider \
  tests/test_cuda.py tests/test_triton.py tests/test_linear_act.py tests/test_linear_glu.py tests/test_compile.py \
  tests/test_errors.py || exit 1

# One compute-sanitizer memcheck pass over the CUDA backend's kernels and cuBLASLt calls.
if command -v compute-sanitizer >/dev/null; then
  stage sanitizer 240 "$out/sanitizer.log" compute-sanitizer --tool memcheck --error-exitcode 1 \
    "$python" benchmarks/sanitize_cuda.py || exit 1
else
  echo "   sanitizer: compute-sanitizer not found, skipped" | tee -a "$summary"
fi

stage bench "${BENCH_SECONDS:-240}" "$out/bench.log" "$python" benchmarks/fused_linear.py --device cuda \
  --shapes bert-base llama-7b 16x4096x11008 --dtype bfloat16 --activation gelu relu --mode fwd fwd+bwd \
  --compile-modes default --out "$out/gpu_bench.json" --plot "$out/gpu_bench.png"
rc=$?
echo "gpu_check finished (benchmark exit $rc); results in $out" | tee -a "$summary"
exit $rc
