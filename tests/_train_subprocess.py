"""Runs `train.train` on the tiny test config in its own process (used by test_resume.py).

  python -m tests._train_subprocess WORKDIR OUT_NPZ --steps C,F,J
      [--kill-phase P --kill-step K [--kill-at before_save|writing|finalizing]] [--standins]

With --kill-phase/--kill-step the process SIGKILLs itself in phase P around the checkpoint of
step K, at one of three moments (`--kill-at`):
  before_save  the steps since the previous checkpoint are computed, their save not started (the
               pending saves are finished first): a crash between saves;
  writing      inside the save, in Orbax's background writer as it starts writing the items:
               the step's temporary directory and its items' temporary directories exist,
               nothing is committed;
  finalizing   inside the save, everything written into the temporary directory, which is not
               yet committed (renamed to the step directory).
Otherwise it writes the final params and EMA params (flattened) to OUT_NPZ and the run summary
to OUT_NPZ + ".json". Logs at INFO level to stderr (the resume tests read "resuming from step").
"""
import argparse
import json
import os
import signal

import numpy as np

KILL_AT = ("before_save", "writing", "finalizing")


def _die() -> None:
  os.kill(os.getpid(), signal.SIGKILL)


def install_kill(phase: str, step: int, at: str) -> None:
  """Patches Orbax so the process dies at `at` (KILL_AT) of phase `phase`'s save of `step`.

  The hooks use Orbax internals (the JSON writer, the temporary path's finalize); if Orbax
  renames them the kill never happens and the caller's exit-code check fails loudly.
  """
  import orbax.checkpoint as ocp
  from etils import epath
  from orbax.checkpoint._src.handlers import json_checkpoint_handler
  from orbax.checkpoint._src.path import atomicity

  if at == "before_save":
    original_save = ocp.CheckpointManager.save

    def save(self, s, *a, **kw):
      if os.path.basename(str(self.directory)) == phase and s == step:
        self.wait_until_finished()  # earlier checkpoints are complete on disk, as after a crash.
        _die()
      return original_save(self, s, *a, **kw)

    ocp.CheckpointManager.save = save
  elif at == "writing":
    original_write = json_checkpoint_handler.JsonCheckpointHandler._save_fn

    async def write(self, item, directory):
      step_dir = epath.Path(directory).parent  # <phase>/<step>.orbax-checkpoint-tmp/meta...
      if (step_dir.parent.name == phase
          and step_dir.name.startswith(f"{step}{atomicity.TMP_DIR_SUFFIX}")):
        _die()
      return await original_write(self, item, directory)

    json_checkpoint_handler.JsonCheckpointHandler._save_fn = write
  elif at == "finalizing":
    for cls in (atomicity.AtomicRenameTemporaryPath, atomicity.CommitFileTemporaryPath):
      async def finalize(self, *a, _original=cls.finalize, **kw):
        final = epath.Path(self.get_final())  # the step directory, not an item inside it
        if final.parent.name == phase and final.name == str(step):
          _die()
        return await _original(self, *a, **kw)

      cls.finalize = finalize
  else:
    raise ValueError(f"--kill-at must be one of {KILL_AT}, got {at!r}")


def install_sigterm(phase: str, step: int) -> None:
  """Sends this process SIGTERM (as a spot VM's shutdown does) right after the compiled call
  that ends at `step` of `phase` has been dispatched: `train.check_finite` runs once per call
  with the step the call started from, so the signal arrives while training is mid-phase."""
  from diffrecon_jax.diffrecon import train
  original = train.check_finite

  def check_finite(p, first_step, metrics):
    original(p, first_step, metrics)
    n = len(next(iter(metrics.values())))  # steps in this call
    if p == phase and first_step + n == step:
      os.kill(os.getpid(), signal.SIGTERM)

  train.check_finite = check_finite


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("workdir")
  parser.add_argument("out")
  parser.add_argument("--steps", default="2,2,4")
  parser.add_argument("--kill-phase", default="")
  parser.add_argument("--kill-step", type=int, default=-1)
  parser.add_argument("--kill-at", default="before_save", choices=KILL_AT)
  parser.add_argument("--standins", action="store_true", help="stand-in denoisers")
  parser.add_argument("--sigterm-phase", default="",
                      help="send this process SIGTERM in this phase (with --sigterm-step)")
  parser.add_argument("--sigterm-step", type=int, default=-1,
                      help="... while the compiled call that reaches this step runs")
  parser.add_argument("--checkpoint-every", type=int, default=2)
  parser.add_argument("--steps-per-call", type=int, default=2)
  args = parser.parse_args()

  import jax
  from absl import logging
  from diffrecon_jax.diffrecon import train
  from tests import _train_helpers as helpers

  logging.set_verbosity(logging.INFO)
  if args.kill_phase:
    install_kill(args.kill_phase, args.kill_step, args.kill_at)
  if args.sigterm_phase:
    install_sigterm(args.sigterm_phase, args.sigterm_step)

  config = helpers.tiny_config(steps=tuple(int(s) for s in args.steps.split(",")),
                               steps_per_call=args.steps_per_call,
                               checkpoint_every=args.checkpoint_every)
  task = helpers.tiny_task()
  models = (helpers.standin_models(config, task.scale) if args.standins else None)
  from diffrecon_jax import preemption
  try:
    out = train.train(config, args.workdir, task=task, models=models)
  except preemption.Preempted as e:
    logging.warning("%s", e)
    raise SystemExit(preemption.EXIT_CODE) from None
  state = out["state"]
  flat = {}
  for prefix, tree in (("params", state.params), ("ema", state.ema_params)):
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      flat[prefix + jax.tree_util.keystr(path)] = np.asarray(leaf)
  np.savez(args.out, **flat)
  summary = {p: {k: v for k, v in s.items() if k != "last"} for p, s in out["phases"].items()}
  with open(args.out + ".json", "w") as f:
    json.dump(summary, f)


if __name__ == "__main__":
  main()
