"""The sharded train step on 1 and on 8 simulated CPU devices (used by test_parallel.py).

  python -m tests._parallel_subprocess OUT_NPZ [--models standins,real]

XLA_FLAGS must give 8 host devices before JAX starts, hence a separate process. Writes, per
model set ("standins": the stand-in denoisers of _train_helpers; "real": the real denoisers of
`tiny_config`) and layout ("one", "eight"), under "<models>/<layout>/": the per-step losses and
gradient norms of 3 calls of 2 fused joint steps, the final params (flattened; the initial ones
under "<models>/init"), how many backend compilations the 2nd and 3rd calls triggered, the
jitted function's cache size and whether its compiled HLO all-reduces.

The real denoisers train with Adam's eps at 1e-3 (`train.adam_eps`; 1e-8 by default). They have
parameters the loss is invariant to (attention key biases; conv biases before a GroupNorm with
one channel per group) whose gradients are pure rounding noise, different for each reduction
order; Adam divides a gradient by its own RMS, so with eps = 1e-8 that noise becomes a full
+-lr step and those parameters end up anywhere within a few lr of each other on 1 and 8 devices.
With eps = 1e-3 a noise gradient moves its parameter by ~lr * 1e-5 while the real gradients
(measured: median |g| ~1e-2) still take near-lr steps, so every parameter can be compared.
"""
import argparse
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

REAL_ADAM_EPS = 1e-3


def run_layouts(name: str, models, config, task, compiles: list, out: dict) -> None:
  from diffrecon_jax import parallel
  from diffrecon_jax.diffrecon import model
  from diffrecon_jax.diffrecon import settings
  from diffrecon_jax.diffrecon import train
  params = jax.device_get(jax.jit(lambda k: model.init_params(models, task.shapes, k))(
      jax.random.PRNGKey(0)))
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    out[f"{name}/init" + jax.tree_util.keystr(path)] = np.asarray(leaf)
  spec = train.BatchSpec.from_task(config, task)
  tc = settings.TrainSettings.from_config(config)
  opt = train.make_optimizer("joint", tc)
  for layout, devices in (("one", jax.devices()[:1]), ("eight", jax.devices())):
    key = f"{name}/{layout}"
    mesh = parallel.make_mesh(devices)
    arrays = parallel.put_replicated(train.training_arrays(task, models), mesh)
    state = parallel.put_replicated(
        train.phase_start_state(opt, params, params, jax.random.PRNGKey(1)), mesh)
    step_fn = train.make_train_step("joint", models, opt, tc, spec, mesh, 2,
                                    train.joint_settings(tc, task))
    losses, norms = [], []
    for call in range(3):
      if call == 1:
        before = len(compiles)
      state, metrics = step_fn(state, arrays)
      losses.append(np.asarray(metrics["loss"]))
      norms.append(np.asarray(metrics["grad_norm"]))
    out[f"{key}/recompiles"] = np.asarray(len(compiles) - before)
    out[f"{key}/cache_size"] = np.asarray(step_fn._cache_size())  # pylint: disable=protected-access
    out[f"{key}/losses"] = np.stack(losses)
    out[f"{key}/grad_norms"] = np.stack(norms)
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.params):
      out[f"{key}/params" + jax.tree_util.keystr(path)] = np.asarray(leaf)
    out[f"{key}/metric_replicas"] = np.asarray(len(metrics["loss"].addressable_shards))
    # Data parallel for real: the compiled step all-reduces the gradients across devices.
    hlo = step_fn.lower(state, arrays).compile().as_text()
    out[f"{key}/all_reduce"] = np.asarray("all-reduce" in hlo)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("out")
  parser.add_argument("--models", default="standins,real")
  args = parser.parse_args()

  from diffrecon_jax.diffrecon import model
  from tests import _train_helpers as helpers

  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda name, *a, **kw: compiles.append(name)
      if name == "/jax/core/compile/backend_compile_duration" else None)

  assert jax.device_count() == 8, jax.devices()
  task = helpers.tiny_task()
  out = {}
  for name in args.models.split(","):
    config = helpers.tiny_config(batch_size=8)
    if name == "standins":
      models = helpers.standin_models(config, task.scale)
    elif name == "real":
      config.train.adam_eps = REAL_ADAM_EPS
      models = model.build_models_for_task(config, task)
    else:
      raise ValueError(f"--models: unknown set {name!r}")
    run_layouts(name, models, config, task, compiles, out)
  np.savez(args.out, **out)


if __name__ == "__main__":
  main()
