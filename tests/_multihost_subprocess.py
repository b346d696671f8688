"""One process of a (multi-process) run of the real entry point (used by test_multihost.py).

  python -m tests._multihost_subprocess OUT_DIR [--standins] [--kill-phase P --kill-step K
      --kill-process I] [--term-phase P --term-step K --term-process I] -- MAIN_FLAGS...

Runs `diffrecon_jax.main` with MAIN_FLAGS (--config, --workdir, --mode and, for one of several
processes, --coordinator_address / --num_processes / --process_id) and writes, for this
process i = jax.process_index():
  OUT_DIR/process_<i>.npz   "params..." / "ema...": the final training state as this process
                            holds it (flattened); "batch/<key>": this process's shard of one
                            training batch (`pipeline.sample_train_batch` of a fixed key, split
                            over the 'data' axis as in the train step);
  OUT_DIR/process_<i>.json  process and device counts, the global sum of a batch-sharded
                            array (a cross-process collective), and how many methods this
                            process evaluated (`evaluate.evaluate_method` calls).
With --kill-phase the process with id I SIGKILLs itself just before phase P saves step K (the
earlier saves finished): a host lost mid-phase. With --term-phase it sends itself SIGTERM just
after saving step K of phase P: a preemption notice. With --standins the stand-in denoisers of
_train_helpers replace the real ones (the multi-process logic is model-agnostic). Logs at INFO
level to stderr (the tests read "resuming from step").
"""
import argparse
import json
import os
import pathlib
import signal
import sys

import numpy as np

BATCH_KEY = 1234  # the key of the recorded batch (any fixed key; the same in every run)


def _flatten(prefix: str, tree) -> dict:
  import jax
  return {prefix + jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _install_kill(phase: str, step: int, process: int) -> None:
  import jax
  import orbax.checkpoint as ocp
  original_save = ocp.CheckpointManager.save

  def save(self, s, *a, **kw):
    if (jax.process_index() == process and os.path.basename(str(self.directory)) == phase
        and s == step):
      self.wait_until_finished()  # the earlier checkpoints are committed, as after a crash.
      os.kill(os.getpid(), signal.SIGKILL)
    return original_save(self, s, *a, **kw)

  ocp.CheckpointManager.save = save


def _install_term(phase: str, step: int, process: int) -> None:
  """Process `process` sends itself SIGTERM (a spot VM's preemption notice) right after saving
  phase `phase`'s step `step`; JAX's preemption service tells the other process."""
  import jax
  import orbax.checkpoint as ocp
  original_save = ocp.CheckpointManager.save

  def save(self, s, *a, **kw):
    out = original_save(self, s, *a, **kw)
    if (jax.process_index() == process and os.path.basename(str(self.directory)) == phase
        and s == step):
      os.kill(os.getpid(), signal.SIGTERM)
    return out

  ocp.CheckpointManager.save = save


def _local_batch(config, task, models) -> tuple:
  """({"batch/<key>": this process's rows of one training batch, drawn as the train step draws
  it}, the sum of the whole batch's mask computed across processes)."""
  import jax
  from diffrecon_jax import parallel
  from diffrecon_jax.diffrecon import train
  from diffrecon_jax.data import pipeline
  mesh = parallel.make_mesh()
  spec = train.BatchSpec.from_task(config, task)
  arrays = parallel.put_replicated(train.training_arrays(task, models), mesh)
  patterns = (np.asarray(spec.patterns[0], np.int32), np.asarray(spec.patterns[1], np.float32))
  draw = jax.jit(lambda a, k: pipeline.sample_train_batch(
      a, k, batch_size=spec.batch_size, history=spec.history, index_range=spec.index_range,
      patterns=patterns), out_shardings=parallel.batch_sharding(mesh))
  key = parallel.put_replicated(jax.random.PRNGKey(BATCH_KEY), mesh)
  batch = draw(arrays, key)
  local = {}
  for name, value in batch.items():
    shards = sorted(value.addressable_shards, key=lambda s: s.index[0].start or 0)
    local[f"batch/{name}"] = np.concatenate([np.asarray(s.data) for s in shards])
  # A cross-process collective: the sum of the whole batch's masks, computed from every shard.
  total = jax.jit(lambda m: m.sum(), out_shardings=parallel.replicated(mesh))(batch["mask"])
  return local, float(parallel.to_host(total))


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("out_dir")
  parser.add_argument("--standins", action="store_true")
  parser.add_argument("--kill-phase", default="")
  parser.add_argument("--kill-step", type=int, default=-1)
  parser.add_argument("--kill-process", type=int, default=1)
  parser.add_argument("--term-phase", default="")
  parser.add_argument("--term-step", type=int, default=-1)
  parser.add_argument("--term-process", type=int, default=1)
  argv = sys.argv[1:]
  if "--" not in argv:
    parser.error("give the entry point's flags after --")
  cut = argv.index("--")
  args, main_flags = parser.parse_args(argv[:cut]), argv[cut + 1:]
  out_dir = pathlib.Path(args.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)

  from diffrecon_jax.diffrecon import model
  from tests import _train_helpers as helpers
  if args.standins:
    # Before `train` is imported: its load_for_sampling takes model.build_models as default.
    model.build_models = helpers.standin_models

  import jax
  from absl import app, logging
  from diffrecon_jax import evaluate, main as main_lib
  from diffrecon_jax.diffrecon import train

  if args.kill_phase:
    _install_kill(args.kill_phase, args.kill_step, args.kill_process)
  if args.term_phase:
    _install_term(args.term_phase, args.term_step, args.term_process)
  record = {"evaluated": 0}
  flat = {}

  original_train = train.train

  def recording_train(config, workdir, task=None, mesh=None, models=None):
    local, record["global_mask_sum"] = _local_batch(config, task, models)
    flat.update(local)
    out = original_train(config, workdir, task=task, mesh=mesh, models=models)
    flat.update(_flatten("params", out["state"].params))
    flat.update(_flatten("ema", out["state"].ema_params))
    return out

  original_evaluate = evaluate.evaluate_method

  def counting_evaluate(*a, **kw):
    record["evaluated"] += 1
    return original_evaluate(*a, **kw)

  train.train = recording_train
  evaluate.evaluate_method = counting_evaluate

  def run(argv):
    logging.set_verbosity(logging.INFO)
    main_lib.main(argv)
    i = jax.process_index()
    record.update(process_index=i, process_count=jax.process_count(),
                  device_count=jax.device_count(), local_device_count=jax.local_device_count())
    np.savez(out_dir / f"process_{i}.npz", **flat)
    (out_dir / f"process_{i}.json").write_text(json.dumps(record))

  app.run(run, argv=[sys.argv[0]] + main_flags)


if __name__ == "__main__":
  main()
