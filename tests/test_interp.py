"""The `interp` baseline: nearest-neighbour completion in space and past time."""
import numpy as np

from diffrecon_jax import evaluate
from diffrecon_jax.baselines import interp
from diffrecon_jax.data import coarsen, pipeline
from tests.test_task import real_nytaxi


def test_nearest_fill_uses_the_nearest_observed_cell():
  v = np.zeros((1, 3, 3, 1), np.float32)
  v[0, 0, 0, 0] = 7.0
  v[0, 2, 2, 0] = 9.0
  mask = np.zeros((1, 3, 3), np.float32)
  mask[0, 0, 0] = mask[0, 2, 2] = 1
  out = interp.nearest_fill(v, mask, np.array([0]), history=0)[0, :, :, 0]
  assert out[0, 1] == 7 and out[1, 0] == 7 and out[2, 1] == 9 and out[1, 2] == 9
  assert out[0, 0] == 7 and out[2, 2] == 9


def test_nearest_fill_uses_the_past_but_never_the_future():
  v = np.arange(3 * 2 * 2, dtype=np.float32).reshape(3, 2, 2, 1)
  mask = np.ones((3, 2, 2), np.float32)
  mask[1] = 0  # slice 1 entirely missing
  out = interp.nearest_fill(v, mask, np.array([1]), history=1)
  np.testing.assert_array_equal(out[0], v[0])  # the previous slice, not slice 2
  out0 = interp.nearest_fill(v, mask, np.array([1]), history=0, fallback=np.array([-1.0]))
  assert (out0 == -1).all()


def test_observed_cells_are_kept_and_sum_is_consistent():
  task = pipeline.build_task(real_nytaxi(120), 2, 2)
  rng = np.random.default_rng(0)
  mask = (rng.random((120, 8, 6)) > 0.4).astype(np.float32)
  rec = interp.InterpBaseline().reconstruct(evaluate.observe(task, mask), np.arange(90, 120))
  obs = mask[90:120] > 0
  np.testing.assert_array_equal(rec["coarse"][obs], task.coarse_phys[90:120][obs])
  assert rec["fine"].shape == (30, 16, 12, 2) and rec["samples"] is None
  np.testing.assert_allclose(coarsen.coarsen(rec["fine"], 2, "sum"), rec["coarse"], rtol=1e-5)


def test_hidden_values_are_never_read():
  task = pipeline.build_task(real_nytaxi(120), 2, 2)
  mask = np.ones((120, 8, 6), np.float32)
  mask[:, 2:5, 1:4] = 0
  a = interp.InterpBaseline().reconstruct(evaluate.observe(task, mask), np.arange(90, 100))
  poisoned = task.coarse_phys.copy()
  poisoned[mask == 0] = 1e9
  b = interp.nearest_fill(poisoned, mask, np.arange(90, 100), 2)
  np.testing.assert_array_equal(a["coarse"], b)
