"""Command line entry point: flags only; the work lives in `diffrecon_jax.run`.

  python -m diffrecon_jax.main --config=configs/nytaxi.py --workdir=runs/nytaxi
  python -m diffrecon_jax.main --config=configs/nytaxi.py:cpu --workdir=DIR --mode=evaluate
  python -m diffrecon_jax.main --config=configs/nytaxi.py --workdir=DIR --config.method=interp
"""
from absl import app
from absl import flags
from ml_collections import config_flags

from diffrecon_jax import parallel
from diffrecon_jax import run
from diffrecon_jax.data.series import DataError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file "
                                          "(optionally with ':variant').", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_MODE = flags.DEFINE_enum("mode", "train_and_evaluate", run.MODES,
                          "What to do: train, evaluate, train_and_evaluate or reconstruct.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Multi-host (TPU pod slice, several GPU hosts): join the job before any device is touched.
  parallel.maybe_initialize_distributed()
  try:
    run.run(_CONFIG.value, run.resolve_workdir(_WORKDIR.value), _MODE.value)
  except DataError as e:
    # Bad or missing data is the user's to fix: the message says what and how, no traceback.
    raise SystemExit(f"diffrecon_jax: data error: {e}") from None


if __name__ == "__main__":
  app.run(main)
