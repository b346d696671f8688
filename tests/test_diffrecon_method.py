"""Tests for diffrecon_jax.diffrecon_method: batching and concurrency of the two sampling stages."""
import jax
import numpy as np
import pytest

from diffrecon_jax import diffrecon_method, train
from tests import _train_helpers as helpers


def _method(workers: int, batch: int = 8):
  config = helpers.tiny_config()
  config.eval.batch_size = batch
  config.eval.concurrent_batches = workers
  config.diffusion.sampler_steps = 3
  task = helpers.tiny_task()
  models = helpers.standin_models(config, task.scale)
  params = train.init_params(models, task.shapes, jax.random.key(0))
  return diffrecon_method.DiffReconMethod(config, params, models), task


def test_concurrent_batches_give_the_same_reconstruction():
  """Batches run two at a time (the CPU default) or one by one give identical outputs: each batch
  k draws from fold_in(rng, k), whatever order the threads finish in."""
  serial, task = _method(workers=1)
  pooled, _ = _method(workers=2)
  assert (serial.workers, pooled.workers) == (1, 2)
  lo, _ = task.split.range("test")
  slices = np.arange(lo, lo + 21)            # 3 batches of 8, the last one padded
  mask = (np.random.RandomState(0).rand(*task.coarse.shape[:3]) < 0.6).astype(np.float32)
  a = serial.reconstruct(task, mask, slices)
  b = pooled.reconstruct(task, mask, slices)
  b_again = pooled.reconstruct(task, mask, slices)  # second call: every batch in the pool
  for key in ("coarse", "fine", "samples"):
    np.testing.assert_array_equal(a[key], b[key])
    np.testing.assert_array_equal(a[key], b_again[key])
  assert a["fine"].shape[0] == len(slices)
  # Observed coarse cells are returned exactly (stage 1 imposes them), hidden ones are filled.
  obs = mask[slices] > 0.5
  np.testing.assert_allclose(a["coarse"][obs], task.coarse_norm.inverse(task.coarse)[slices][obs],
                             rtol=1e-5, atol=1e-4)
  assert np.all(np.isfinite(a["coarse"]))


def test_concurrent_batches_setting():
  config = helpers.tiny_config()
  config.eval.concurrent_batches = 0
  assert diffrecon_method.concurrent_batches(config) == (
      2 if jax.default_backend() == "cpu" else 1)
  config.eval.concurrent_batches = 3
  assert diffrecon_method.concurrent_batches(config) == 3
  config.eval.concurrent_batches = -1
  with pytest.raises(ValueError, match="concurrent_batches"):
    diffrecon_method.concurrent_batches(config)


@pytest.mark.parametrize("n,max_batch,workers,want", [
    (1080, 128, 2, 112),   # 10 batches in 5 pairs instead of 9 (the last alone, mostly padding)
    (1086, 128, 2, 112),   # stage 1's slices: the same compiled shape as stage 2's
    (1080, 128, 1, 120),   # 9 batches of 120 instead of 8 x 128 + 56
    (1080, 64, 2, 60),     # 18 batches of 60 (64 would give 17: the last one alone)
    (5, 128, 2, 3),        # tiny splits: still one batch per worker
    (100, 4, 2, 4),        # never above the configured maximum
])
def test_balanced_batch_size(n, max_batch, workers, want):
  size = diffrecon_method.balanced_batch_size(n, max_batch, workers)
  assert size == want
  assert size <= max_batch
  with pytest.raises(ValueError):
    diffrecon_method.balanced_batch_size(0, max_batch, workers)
