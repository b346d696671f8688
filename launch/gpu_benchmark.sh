#!/usr/bin/env bash
# The benchmark suite on one GPU in one go: install, run, write the table.
#
#   bash launch/gpu_benchmark.sh [OUT_DIR]        (default OUT_DIR: benchmarks/results_gpu)
#
# Needs a CUDA 12 machine with Python >= 3.10. Installs this checkout with its `bench` (PyTorch)
# and `cuda12` (jax[cuda12]) extras into the virtual environment $VENV (default .venv), then runs
# the suite twice on the :gpu config (peer-sized models):
# once with XLA attention, once with the fused cuDNN attention (bf16 q/k/v) in ST-PointFormer,
# and prints both markdown tables. Skips the 9-pattern split timing (a CPU target); the scaling
# section runs paper scale (8x8 -> 32x32) and UrbanFM scale (32x32 -> 128x128) at batch 16.
# Set BENCH_QUICK=1 for the joint step + DDIM sampling only (about two minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/lib.sh
OUT="${1:-benchmarks/results_gpu}"
VENV="${VENV:-.venv}"

install_into_venv "$VENV" bench,cuda12
PY="$VENV/bin/python"
"$PY" - <<'EOF'
import jax
print("jax", jax.__version__, jax.devices())
assert jax.default_backend() == "gpu", "JAX does not see a GPU"
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true

QUICK=()
if [[ "${BENCH_QUICK:-0}" == "1" ]]; then QUICK=(--quick); fi
# XLA preallocates 75% of GPU memory by default; let PyTorch share the card in the same run.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
"$PY" -m benchmarks.run --out "$OUT/xla_attention" --device gpu --split-patterns 0 "${QUICK[@]}"
"$PY" -m benchmarks.run --out "$OUT/cudnn_attention" --device gpu --split-patterns 0 \
  --cudnn-attention --skip scaling "${QUICK[@]}"
echo
echo "== tables: $OUT/xla_attention/results.md, $OUT/cudnn_attention/results.md =="
cat "$OUT/xla_attention/results.md" "$OUT/cudnn_attention/results.md"
