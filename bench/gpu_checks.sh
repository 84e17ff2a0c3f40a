#!/usr/bin/env bash
# On the GPU machine, after the benchmark matrix: the default job and the optimizers through the real
# command line, one line each (final eval loss, sample). Usage: bash bench/gpu_checks.sh OUT_DIR
set -uo pipefail
out=${1:-bench-out}
mkdir -p "$out"
cli="python -m lora_launch.cli"
row() {  # name, then overrides
  local name=$1; shift
  local t0=$SECONDS
  $cli run.dir="$out/runs/$name" logging.progress_bar=false "$@" > "$out/$name.log" 2>&1
  local rc=$?
  local evals sample
  evals=$(grep -o 'eval loss [0-9.]*' "$out/$name.log" | awk '{print $3}' | tr '\n' ' ')
  sample=$(grep -o "sample: .*" "$out/$name.log" | tail -1)
  printf '%-22s rc=%s %4ss  eval %s %s\n' "$name" "$rc" "$((SECONDS - t0))" "$evals" "$sample"
}
row default_job
row adamw_torch_fused train.max_steps=120 optim.name=adamw_torch_fused
row adamw_bnb_8bit train.max_steps=120 optim.name=adamw_bnb_8bit lora.r=64
row paged_adamw_8bit train.max_steps=120 optim.name=paged_adamw_8bit lora.r=64
