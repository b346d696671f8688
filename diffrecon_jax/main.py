"""Command line entry point: flags only; the work lives in `diffrecon_jax.run`.

  python -m diffrecon_jax.main --config=configs/nytaxi.py --workdir=runs/nytaxi
  python -m diffrecon_jax.main --config=configs/nytaxi.py:cpu --workdir=DIR --mode=evaluate
  python -m diffrecon_jax.main --config=configs/nytaxi.py --workdir=DIR --config.method=interp

Several hosts without a cluster manager: the same command on every host, plus
  --coordinator_address=HOST0:PORT --num_processes=N --process_id=I   (I = 0 .. N-1)
(or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID); Cloud TPU pod slices, SLURM
and Open MPI jobs are detected without them.
"""
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from diffrecon_jax import console
from diffrecon_jax import parallel
from diffrecon_jax import preemption
from diffrecon_jax import run
from diffrecon_jax.data.series import DataError
from diffrecon_jax.diffrecon.checkpoints import CheckpointError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file "
                                          "(optionally with ':variant').", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_MODE = flags.DEFINE_enum("mode", "train_and_evaluate", run.MODES,
                          "What to do: train, evaluate, train_and_evaluate or reconstruct.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-host: HOST:PORT of process 0, the same on every host "
    "(default: JAX_COORDINATOR_ADDRESS, or detected on TPU pod slices / SLURM / Open MPI).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Multi-host: how many processes (hosts) run this command "
    "(default: JAX_NUM_PROCESSES, or detected).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "Multi-host: this process's id, 0 .. num_processes - 1; process 0 "
    "writes the results (default: JAX_PROCESS_ID, or detected).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Multi-host (TPU pod slice, several GPU hosts): join the job before any device is touched.
  try:
    parallel.maybe_initialize_distributed(coordinator_address=_COORDINATOR.value,
                                          num_processes=_NUM_PROCESSES.value,
                                          process_id=_PROCESS_ID.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  try:
    workdir = run.resolve_workdir(_WORKDIR.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  # Library chatter (Orbax, absl, JAX) to workdir/log.txt; the project's lines on the console.
  log_path = console.setup(workdir, parallel.process_index_for_logs())
  try:
    run.run(_CONFIG.value, workdir, _MODE.value)
  except preemption.Preempted as e:
    # Not an error: the machine is being taken back. The checkpoint is written; a scheduler (or
    # the user) reruns the same command, which resumes from it.
    logging.warning("diffrecon_jax: %s", e)
    sys.exit(preemption.EXIT_CODE)
  except (ValueError, FileNotFoundError, CheckpointError) as e:
    # Bad data, a bad setting or a damaged workdir is the user's to fix: one line saying what
    # and how on the console; the traceback goes to the log file for whoever debugs it.
    logging.info("stopped by %s", type(e).__name__, exc_info=True, extra=console.FILE_ONLY)
    kind = "data error" if isinstance(e, DataError) else "error"
    raise SystemExit(f"diffrecon_jax: {kind}: {e}  (traceback in {log_path})") from None


if __name__ == "__main__":
  app.run(main)
