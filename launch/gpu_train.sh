#!/usr/bin/env bash
# Train and evaluate DiffRecon on one or more GPUs of this machine (the `:gpu` config variant).
#
#   bash launch/gpu_train.sh [--dry-run] CONFIG WORKDIR [extra absl flags...]
#   bash launch/gpu_train.sh configs/nytaxi.py:gpu runs/nytaxi_gpu
#
# Installs this checkout with its `cuda12` extra (jax[cuda12]: the CUDA 12 / cuDNN wheels, so only
# the NVIDIA driver is needed) into the virtual environment $VENV (default .venv, reused by later
# runs), checks that JAX sees a GPU, then runs the entry point. Every visible GPU joins the 'data'
# mesh axis (the global batch must divide by their number). Rerunning the same command after a
# crash resumes from the latest checkpoint in WORKDIR. With --dry-run the commands are printed.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/lib.sh
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY_RUN=1
  shift
fi
CONFIG="${1:?usage: launch/gpu_train.sh [--dry-run] CONFIG WORKDIR [flags]}"
WORKDIR="${2:?usage: launch/gpu_train.sh [--dry-run] CONFIG WORKDIR [flags]}"
shift 2
VENV="${VENV:-.venv}"

install_into_venv "$VENV" cuda12
run "$VENV/bin/python" -c "import jax; assert jax.default_backend() == 'gpu', 'JAX does not see a GPU'; print(jax.devices())"
run_last "$VENV/bin/python" -m diffrecon_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
