#!/usr/bin/env bash
# Train and evaluate DiffRecon on one or more GPUs of one machine (the `:gpu` config variant).
#
#   bash launch/gpu_train.sh CONFIG WORKDIR [extra absl flags...]
#   bash launch/gpu_train.sh configs/nytaxi.py:gpu runs/nytaxi_gpu
#
# Every visible GPU joins the 'data' mesh axis (the global batch must divide by their number).
# Rerunning the same command after a crash resumes from the latest checkpoint in WORKDIR.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${1:?usage: launch/gpu_train.sh CONFIG WORKDIR [flags]}"
WORKDIR="${2:?usage: launch/gpu_train.sh CONFIG WORKDIR [flags]}"
shift 2
PY="${PYTHON:-python3}"
"$PY" -m pip install -q "jax[cuda12]" || echo "jax[cuda12] install failed; using the installed jax"
"$PY" -m pip install -q -e .
"$PY" -c "import jax; assert jax.default_backend() == 'gpu', 'JAX does not see a GPU'; print(jax.devices())"
exec "$PY" -m diffrecon_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
