#!/usr/bin/env bash
# Train and evaluate DiffRecon on a Cloud TPU VM (one host or a pod slice), from your laptop.
#
#   bash launch/tpu_vm.sh [--dry-run] --tpu=NAME --zone=ZONE [--project=PROJECT] \
#       CONFIG WORKDIR [extra absl flags...]
#   bash launch/tpu_vm.sh --tpu=my-v5e --zone=us-west4-a configs/nytaxi.py:tpu runs/nytaxi_tpu
#
# What it runs, each a gcloud command (--dry-run prints them and runs nothing):
#   1. packs this checkout (tracked and untracked files that git does not ignore: your edits
#      travel, runs/ and virtual environments do not) into one archive;
#   2. copies it to every worker of the TPU VM (`tpu-vm scp --worker=all`);
#   3. on every worker: unpacks it into ~/diffrecon_jax (replacing an older copy), makes the
#      virtual environment ~/diffrecon_venv and installs the package with its `tpu` extra
#      (libtpu from the package index), so every worker runs the same code;
#   4. on every worker at once: the entry point with CONFIG, WORKDIR and the flags. On a pod
#      slice `parallel.maybe_initialize_distributed` joins the workers and the batch is split
#      over every chip; process 0 evaluates and writes the results.
# Rerunning the same command resumes training from the checkpoints in WORKDIR.
# WORKDIR: a bucket, gs://BUCKET/runs/NAME (every file of the run goes through etils.epath;
# needed on multi-host slices, whose workers share no disk), or on a one-host slice a path on
# its disk (relative to ~/diffrecon_jax), fetched with
#   gcloud compute tpus tpu-vm scp --recurse --zone=ZONE NAME:diffrecon_jax/WORKDIR .
# The `:tpu` config variant sets the batch per chip for an 8-chip slice; `:tpu,chips=N` another.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/lib.sh
USAGE="usage: launch/tpu_vm.sh [--dry-run] --tpu=NAME --zone=ZONE [--project=PROJECT] CONFIG WORKDIR [flags]"
TPU="" ZONE="" PROJECT=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --tpu=*) TPU="${1#--tpu=}" ;;
    --zone=*) ZONE="${1#--zone=}" ;;
    --project=*) PROJECT="${1#--project=}" ;;
    *) break ;;
  esac
  shift
done
if [[ -z "$TPU" || -z "$ZONE" || $# -lt 2 ]]; then
  echo "$USAGE" >&2
  exit 2
fi
CONFIG="$1"
WORKDIR="$2"
shift 2

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE" --worker=all)
if [[ -n "$PROJECT" ]]; then
  WHERE+=(--project="$PROJECT")
fi
ARCHIVE="${TMPDIR:-/tmp}/diffrecon_jax_code.tgz"
REMOTE_DIR='~/diffrecon_jax'
VENV_DIR='~/diffrecon_venv'

# 1. The checkout as one archive (git decides what belongs to it).
if ((DRY_RUN)); then
  echo "git ls-files -z --cached --others --exclude-standard | tar czf $(printf '%q' "$ARCHIVE") --null -T -"
else
  git ls-files -z --cached --others --exclude-standard | tar czf "$ARCHIVE" --null -T -
fi
# 2. To every worker.
run "${GCLOUD[@]}" scp "$ARCHIVE" "$TPU:diffrecon_jax_code.tgz" "${WHERE[@]}"
# 3. Unpack, make the virtual environment, install with the TPU runtime.
SETUP="rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar xzf ~/diffrecon_jax_code.tgz -C $REMOTE_DIR"
SETUP+=" && python3 -m venv $VENV_DIR && $VENV_DIR/bin/python -m pip install -q --upgrade pip"
SETUP+=" && cd $REMOTE_DIR && $VENV_DIR/bin/python -m pip install -q -e '.[tpu]'"
run "${GCLOUD[@]}" ssh "$TPU" "${WHERE[@]}" --command="$SETUP"
# 4. The job, on every worker at once; each argument quoted for the workers' shell.
JOB="cd $REMOTE_DIR && $VENV_DIR/bin/python -m diffrecon_jax.main"
for arg in --config="$CONFIG" --workdir="$WORKDIR" ${@+"$@"}; do
  JOB+=" $(printf '%q' "$arg")"
done
run_last "${GCLOUD[@]}" ssh "$TPU" "${WHERE[@]}" --command="$JOB"
