#!/usr/bin/env bash
# Train and evaluate DiffRecon on a Cloud TPU VM (single host or a pod slice).
#
#   gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command \
#     "cd diffrecon_jax && bash launch/tpu_vm.sh configs/nytaxi.py:gpu gs://BUCKET/runs/nytaxi"
#
# On a pod slice every worker runs the same command; `parallel.maybe_initialize_distributed`
# calls jax.distributed.initialize() when the TPU environment names several workers, and the
# batch is split over every chip of the slice. WORKDIR may be a gs:// path (Orbax writes there).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${1:?usage: launch/tpu_vm.sh CONFIG WORKDIR [flags]}"
WORKDIR="${2:?usage: launch/tpu_vm.sh CONFIG WORKDIR [flags]}"
shift 2
PY="${PYTHON:-python3}"
"$PY" -m pip install -q "jax[tpu]" -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
"$PY" -m pip install -q -e .
exec "$PY" -m diffrecon_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
