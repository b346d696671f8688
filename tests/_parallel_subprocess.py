"""The sharded train step on 1 and on 8 simulated CPU devices (used by test_parallel.py).

  python -m tests._parallel_subprocess OUT_NPZ [--standins]

XLA_FLAGS must give 8 host devices before JAX starts, hence a separate process. Writes, per
layout ("one", "eight"): the per-step losses and gradient norms of 3 calls, the final params (flattened), how many
backend compilations the 2nd and 3rd calls triggered, the jitted function's cache size and\nwhether its HLO all-reduces.
"""
import argparse
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("out")
  parser.add_argument("--standins", action="store_true")
  args = parser.parse_args()

  from diffrecon_jax import parallel, train
  from tests import _train_helpers as helpers

  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda name, *a, **kw: compiles.append(name)
      if name == "/jax/core/compile/backend_compile_duration" else None)

  assert jax.device_count() == 8, jax.devices()
  config = helpers.tiny_config(batch_size=8)
  task = helpers.tiny_task()
  build = helpers.standin_models if args.standins else train.build_models
  models = build(config, task.scale, task.stats, task.series.aggregation)
  params = jax.device_get(jax.jit(lambda k: train.init_params(models, task.shapes, k))(
      jax.random.PRNGKey(0)))
  spec = train.BatchSpec.from_task(config, task)
  opt = train.make_optimizer("joint", config.train)
  out = {}
  for name, devices in (("one", jax.devices()[:1]), ("eight", jax.devices())):
    mesh = parallel.make_mesh(devices)
    arrays = parallel.put_replicated(task.device_arrays(), mesh)
    state = parallel.put_replicated(
        train.phase_start_state(opt, params, params, jax.random.PRNGKey(1)), mesh)
    step_fn = train.make_train_step("joint", models, opt, config.train, spec, mesh, 2)
    losses, norms = [], []
    for call in range(3):
      if call == 1:
        before = len(compiles)
      state, metrics = step_fn(state, arrays)
      losses.append(np.asarray(metrics["loss"]))
      norms.append(np.asarray(metrics["grad_norm"]))
    out[f"{name}/recompiles"] = np.asarray(len(compiles) - before)
    out[f"{name}/cache_size"] = np.asarray(step_fn._cache_size())  # pylint: disable=protected-access
    out[f"{name}/losses"] = np.stack(losses)
    out[f"{name}/grad_norms"] = np.stack(norms)
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.params):
      out[f"{name}/params" + jax.tree_util.keystr(path)] = np.asarray(leaf)
    out[f"{name}/metric_replicas"] = np.asarray(len(metrics["loss"].addressable_shards))
    # Data parallel for real: the compiled step all-reduces the gradients across devices.
    hlo = step_fn.lower(state, arrays).compile().as_text()
    out[f"{name}/all_reduce"] = np.asarray("all-reduce" in hlo)
  np.savez(args.out, **out)


if __name__ == "__main__":
  main()
