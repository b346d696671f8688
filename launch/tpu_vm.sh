#!/usr/bin/env bash
# Train and evaluate DiffRecon on a Cloud TPU VM (single host or a pod slice).
#
#   gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command \
#     "cd diffrecon_jax && bash launch/tpu_vm.sh configs/nytaxi.py:gpu gs://BUCKET/runs/nytaxi"
#   bash launch/tpu_vm.sh --dry-run CONFIG WORKDIR [flags]   # print what every worker runs
#
# On a pod slice every worker runs the same command; `parallel.maybe_initialize_distributed`
# calls jax.distributed.initialize() when the TPU environment names several workers, and the
# batch is split over every chip of the slice. Process 0 (worker 0) evaluates and writes the
# results once training is done; the other workers wait for it. WORKDIR may be a gs:// path
# (Orbax writes there). With --dry-run nothing is installed or run: the commands are printed.
set -euo pipefail
DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY_RUN=1
  shift
fi
cd "$(dirname "$0")/.."
CONFIG="${1:?usage: launch/tpu_vm.sh [--dry-run] CONFIG WORKDIR [flags]}"
WORKDIR="${2:?usage: launch/tpu_vm.sh [--dry-run] CONFIG WORKDIR [flags]}"
shift 2
PY="${PYTHON:-python3}"

run() {  # runs its arguments, or with --dry-run prints them as one shell-quoted line
  if ((DRY_RUN)); then
    printf '%q ' "$@" | sed 's/ $//'
    echo
  else
    "$@"
  fi
}

if ((DRY_RUN)); then
  echo "# every worker of the slice runs, from $(pwd):"
fi
run "$PY" -m pip install -q "jax[tpu]" -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
run "$PY" -m pip install -q -e .
if ((DRY_RUN)); then
  run "$PY" -m diffrecon_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
  exit 0
fi
exec "$PY" -m diffrecon_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
