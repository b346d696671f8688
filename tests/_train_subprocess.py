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


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("workdir")
  parser.add_argument("out")
  parser.add_argument("--steps", default="2,2,4")
  parser.add_argument("--kill-phase", default="")
  parser.add_argument("--kill-step", type=int, default=-1)
  parser.add_argument("--kill-at", default="before_save", choices=KILL_AT)
  parser.add_argument("--standins", action="store_true", help="stand-in denoisers")
  args = parser.parse_args()

  import jax
  from absl import logging
  from diffrecon_jax import train
  from tests import _train_helpers as helpers

  logging.set_verbosity(logging.INFO)
  if args.kill_phase:
    install_kill(args.kill_phase, args.kill_step, args.kill_at)

  config = helpers.tiny_config(steps=tuple(int(s) for s in args.steps.split(",")))
  task = helpers.tiny_task()
  models = (helpers.standin_models(config, task.scale) if args.standins else None)
  out = train.train(config, args.workdir, task=task, models=models)
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
