"""Runs `train.train` on the tiny test config in its own process (used by test_resume.py).

  python -m tests._train_subprocess WORKDIR OUT_NPZ --steps C,F,J [--kill-phase P --kill-step K] [--standins]

With --kill-phase/--kill-step the process SIGKILLs itself when phase P is about to save the
checkpoint after step K, i.e. after the steps since the previous checkpoint were computed but
before they were saved: the state a crash leaves behind. Otherwise it writes the final params
and EMA params (flattened) to OUT_NPZ and the run summary to OUT_NPZ + ".json".
"""
import argparse
import json
import os
import signal

import numpy as np


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("workdir")
  parser.add_argument("out")
  parser.add_argument("--steps", default="2,2,4")
  parser.add_argument("--kill-phase", default="")
  parser.add_argument("--kill-step", type=int, default=-1)
  parser.add_argument("--standins", action="store_true", help="stand-in denoisers")
  args = parser.parse_args()

  import jax
  import orbax.checkpoint as ocp
  from diffrecon_jax import train
  from tests import _train_helpers as helpers

  if args.standins:
    helpers.use_standins()
  if args.kill_phase:
    original_save = ocp.CheckpointManager.save

    def save(self, step, *a, **kw):
      if os.path.basename(str(self.directory)) == args.kill_phase and step == args.kill_step:
        self.wait_until_finished()  # earlier checkpoints are complete on disk, as after a crash.
        os.kill(os.getpid(), signal.SIGKILL)
      return original_save(self, step, *a, **kw)

    ocp.CheckpointManager.save = save

  config = helpers.tiny_config(steps=tuple(int(s) for s in args.steps.split(",")))
  out = train.train(config, args.workdir, task=helpers.tiny_task())
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
