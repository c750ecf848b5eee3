#!/usr/bin/env bash
# Run every benchmark on one GPU machine in under 10 minutes and collect the results.
#
# Usage, from the repository root: bash benchmarks/run_all.sh
#
# Environment: uses .venv/bin/python when it imports jax, else runs `make setup`. When an NVIDIA
# GPU is present but JAX's default backend is not "gpu", it runs
# `pip install "jax[cuda12]==0.10.2"`, which needs the package registry. Nothing else is
# downloaded. Fashion-MNIST must be in /usr/share/datasets/fashion-mnist or
# $PPDS_FASHION_MNIST_DIR (`make data`). Without it the Fashion-MNIST benchmarks fail and the
# script goes on with the others.
#
# Output: each benchmark prints its table and writes JSON to benchmarks/results/. When $OUT is
# set (the device tool sets it), the JSON files and one log per benchmark are copied there.
# Each benchmark runs under its own time limit, so one that hangs cannot use up the others'
# time. The limits add up to 570 s; setup and installation come on top of that.

set -u
cd "$(dirname "$0")/.."
started=$(date +%s)
mkdir -p benchmarks/results
logs=benchmarks/results/logs
mkdir -p "$logs"

python_bin=.venv/bin/python
if ! "$python_bin" -c "import jax" >/dev/null 2>&1; then
  echo "== make setup"
  make setup || { echo "make setup failed; cannot run the benchmarks"; exit 1; }
fi

if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  backend=$("$python_bin" -c "import jax; print(jax.default_backend())" 2>/dev/null)
  if [ "$backend" != "gpu" ]; then
    echo "== JAX backend is '$backend'; installing jax[cuda12]==0.10.2 (needs the package registry)"
    "$python_bin" -m pip install --quiet "jax[cuda12]==0.10.2" \
      || echo "warning: CUDA JAX could not be installed; the benchmarks will run on the CPU"
  fi
fi
"$python_bin" -c "import jax; print('JAX', jax.__version__, jax.default_backend(), jax.devices())"

# run NAME LIMIT_SECONDS ARGS...: one benchmark under `timeout`, its output in logs/NAME.log.
run() {
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit} s): $*"
  local begin
  begin=$(date +%s)
  timeout --signal=INT --kill-after=10 "$limit" "$python_bin" "$@" 2>&1 | tee "$logs/$name.log"
  local status=${PIPESTATUS[0]}
  echo "== $name: exit status $status after $(($(date +%s) - begin)) s"
}

run shadow_throughput 200 -m benchmarks.shadow_throughput --fit-loop-max-models 4
run shadow_throughput_dp 80 -m benchmarks.shadow_throughput --dp --models 1,16 --fit-loop-max-models 1
if [ -f benchmarks/dpsgd_throughput.py ]; then
  run dpsgd_throughput 80 -m benchmarks.dpsgd_throughput
else
  echo "== dpsgd_throughput: benchmarks/dpsgd_throughput.py not found, skipped"
fi
if [ -f benchmarks/diffusion_sampling.py ]; then
  run diffusion_sampling 90 -m benchmarks.diffusion_sampling --num-images 2000
else
  echo "== diffusion_sampling: benchmarks/diffusion_sampling.py not found, skipped"
fi
run end_to_end 120 -m benchmarks.end_to_end

echo "== all benchmarks finished after $(($(date +%s) - started)) s"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/results"
  cp benchmarks/results/*.json "$OUT/results/" 2>/dev/null
  cp -r "$logs" "$OUT/results/"
fi
