"""The UrbanSTA baseline (baselines/urbansta.py): completion from the window, the N^2 constraint,
the three training stages and reconstruction on the embedded nytaxi task."""
import functools

import jax
import numpy as np
import pytest

from diffrecon_jax import evaluate
from diffrecon_jax.baselines import urbansta
from diffrecon_jax.data import coarsen
from tests import _train_helpers as helpers
from tests import test_leakage


def tiny_config(steps: int = 30):
  """The tiny embedded nytaxi task (history 2) with the smallest UrbanSTA."""
  c = helpers.tiny_config()
  u = c.urbansta
  u.features, u.num_heads, u.num_layers, u.ff_dim = 8, 2, 1, 8
  u.fin_features, u.fin_blocks = 8, 1
  u.steps_sta = u.steps_fin = u.steps_joint = steps
  u.batch_size, u.lr, u.lr_joint, u.eval_batch, u.log_every = 8, 3e-3, 3e-3, 16, 0
  return c


def _view(task, ratio: float = 0.4, seed: int = 0):
  rng = np.random.default_rng(seed)
  return evaluate.observe(task, (rng.random(task.coarse_valid.shape) > ratio).astype(np.float32))


@functools.lru_cache(maxsize=None)
def fitted():
  """(task, view, method) with the tiny method trained once for the tests below."""
  task = helpers.tiny_task()
  view = _view(task)
  method = urbansta.build(tiny_config())
  method.fit(view)
  return task, view, method


def test_window_indices_repeat_the_first_map_before_the_start():
  np.testing.assert_array_equal(urbansta.window_indices(np.array([0, 1, 5]), 2),
                                [[0, 0, 0], [0, 0, 1], [3, 4, 5]])


def test_completion_reads_the_past_window():
  rs = np.random.RandomState(0)
  obs = rs.standard_normal((2, 3, 4, 3, 2)).astype(np.float32)
  mask = (rs.random_sample((2, 3, 4, 3)) > 0.4).astype(np.float32)
  ext = rs.random_sample((2, 3, 5)).astype(np.float32)
  net = urbansta.STA(2, 8, 2, 1, 8)
  params = jax.jit(net.init)(jax.random.PRNGKey(0), obs, mask, ext)
  apply = jax.jit(net.apply)  # one compilation for the three calls
  out = np.asarray(apply(params, obs, mask, ext))
  assert out.shape == (2, 4, 3, 2)
  past = obs.copy()
  past[:, 0] += 3.0 * mask[:, 0, ..., None]  # only the oldest slice's observed values change
  assert np.abs(np.asarray(apply(params, past, mask, ext)) - out).max() > 1e-3
  # Hidden cells are never read: changing them changes nothing.
  junk = np.where(mask[..., None] > 0, obs, 1e6).astype(np.float32)
  np.testing.assert_allclose(apply(params, junk, mask, ext), out, rtol=1e-5, atol=1e-5)


def test_each_stage_lowers_its_loss():
  _, _, method = fitted()
  for stage in ("sta", "fin", "joint"):
    losses = method.losses[stage]
    assert losses.shape == (30,) and np.isfinite(losses).all(), stage
    assert losses[-8:].mean() < losses[:4].mean(), (stage, losses[:4], losses[-8:])


def test_reconstruction_end_to_end_on_a_real_slice():
  task, view, method = fitted()
  # The series' first slices (windows before t = 0) and a run of the validation split.
  for slices in (np.arange(0, 3), np.arange(task.split.val_start, task.split.val_start + 20)):
    rec = method.reconstruct(view, slices)
    (i, j), (h, w), c = task.coarse_shape, task.fine_shape, task.channels
    n = len(slices)
    assert rec["coarse"].shape == (n, i, j, c) and rec["fine"].shape == (n, h, w, c)
    assert rec["samples"] is None and rec["fine"].dtype == np.float32
    assert np.isfinite(rec["coarse"]).all() and np.isfinite(rec["fine"]).all()
    obs = view.mask[slices] > 0
    np.testing.assert_array_equal(rec["coarse"][obs], view.coarse_obs[slices][obs])
    assert task.series.aggregation == "sum"
    # N^2 constraint: each N x N block sums to its completed coarse cell.
    np.testing.assert_allclose(coarsen.coarsen(rec["fine"], task.scale, "sum"), rec["coarse"],
                               rtol=1e-4, atol=1e-2)


def test_trains_once_per_train_split():
  _, view, method = fitted()
  params = method.params
  method.fit(_view(helpers.tiny_task(), ratio=0.6, seed=1))  # same train split, other mask
  assert method.params is params


@pytest.mark.parametrize("field, value, match", [
    ("num_heads", 3, "num_heads .* must divide features"),
    ("features", 0, "features must be positive"),
    ("steps_sta", -2, "steps_sta must be >= 0"),
])
def test_bad_config_values_are_refused(field, value, match):
  c = tiny_config()
  c.urbansta[field] = value
  with pytest.raises(ValueError, match=match):
    urbansta.build(c)


def test_minus_one_budgets_are_diffrecons():
  c = tiny_config()
  c.urbansta.steps_sta = c.urbansta.steps_fin = c.urbansta.steps_joint = -1
  c.urbansta.batch_size = -1
  c.train.steps_c, c.train.steps_f, c.train.steps_joint, c.train.batch_size = 5, 6, 7, 4
  method = urbansta.build(c)
  assert method.steps == {"sta": 5, "fin": 6, "joint": 7} and method.batch_size == 4


def test_training_masks_are_drawn_per_window_like_diffrecons():
  """Every window gets its own mask from the training patterns (a new layout per window for
  `fixed`, constant over the window), as Diffusion-C's training draws them."""
  task = helpers.tiny_task()
  c = tiny_config()
  c.patterns.train = ("fixed:0.5",)
  method = urbansta.build(c)
  data = method._train_arrays(_view(task))
  masks = [np.asarray(method._masked_batch(data, jax.random.PRNGKey(k), 2)["mask"])
           for k in range(2)]
  cells = task.coarse_shape[0] * task.coarse_shape[1]
  for m in masks:
    assert m.shape == (8, 3) + task.coarse_shape
    np.testing.assert_array_equal(m, np.broadcast_to(m[:, :1], m.shape))  # fixed over the window
    valid = np.asarray(data["valid"]).min() > 0
    if valid:
      np.testing.assert_array_equal(m[:, 0].reshape(8, -1).sum(-1), cells - round(0.5 * cells))
  layouts = {m[b, 0].tobytes() for m in masks for b in range(8)}
  assert len(layouts) > 8  # not a handful of fixed layouts reused


def test_never_reads_hidden_values():
  # One pattern: every build compiles the method anew, and one poisoned mask already checks it.
  test_leakage.assert_no_leakage([("urbansta", lambda task: urbansta.build(tiny_config(4)))],
                                 helpers.tiny_task(), patterns=("random:0.4",))
