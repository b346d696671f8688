"""Run with 8 fake CPU devices (tests/test_sharded_sampling.py): DiffRecon's sampler batches
spread over every device give exactly what one device gives."""
import json
import sys

import jax
import numpy as np

from diffrecon_jax import batching, evaluate
from diffrecon_jax.data import patterns
from tests import _train_helpers as helpers


def main(out_path: str) -> None:
  assert jax.device_count() == 8, jax.devices()
  # Which device each batch of `run_batched` ran on: batch k on device k mod 8.
  seen = []
  record = lambda x, key: seen.append((int(x[0]) // 2, next(iter(x.devices())).id)) or x
  batching.run_batched(record, [np.arange(20.0)], 2, rng=jax.random.key(0),
                       devices=jax.devices())
  config = helpers.tiny_config()
  config.sampling.steps, config.eval.batch_size = 2, 4
  task = helpers.tiny_task()
  mask, _ = evaluate.eval_mask(task, patterns.parse_pattern("random:0.4"), 0)
  view = evaluate.observe(task, mask)
  slices, _ = evaluate.evaluation_slices(task, "test", 32)
  outs = {}
  for label, devices in (("one", jax.devices()[:1]), ("eight", jax.devices())):
    method = helpers.tiny_diffrecon(config, task, devices=devices)
    outs[label] = method.reconstruct(view, slices)
  same = {k: bool(np.array_equal(outs["one"][k], outs["eight"][k]))
          for k, v in outs["one"].items() if isinstance(v, np.ndarray)}
  with open(out_path, "w") as f:
    json.dump({"batch_devices": sorted(seen), "same": same, "n_slices": int(len(slices)),
               "finite": bool(np.isfinite(outs["eight"]["fine"]).all())}, f)


if __name__ == "__main__":
  main(sys.argv[1])
