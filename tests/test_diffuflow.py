"""The DiffUFlow baseline: a conditional diffusion model of the fine map (baselines/diffuflow.py)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffrecon_jax import evaluate
from diffrecon_jax.baselines import diffuflow
from diffrecon_jax.data import coarsen
from tests import _train_helpers as helpers
from tests import test_leakage


def tiny_config(steps: int = 40, seed: int = 0):
  """The tiny embedded nytaxi task (history 2) with the smallest DiffUFlow and a few steps."""
  c = helpers.tiny_config()
  c.seed = seed
  d = c.diffuflow
  d.features, d.base_channels, d.channel_mults, d.emb_dim = 4, 4, (1,), 8
  d.num_train_steps, d.sampling_steps, d.n_samples = 10, 3, 3
  d.steps, d.batch_size, d.eval_batch, d.log_every = steps, 8, 4, 0
  return c


def _view(task, ratio: float = 0.4, seed: int = 0):
  rng = np.random.default_rng(seed)
  mask = (rng.random(task.coarse_valid.shape) > ratio).astype(np.float32)
  return evaluate.observe(task, mask)


@functools.lru_cache(maxsize=None)
def _fitted():
  """(method, view) trained once for the module."""
  view = _view(helpers.tiny_task())
  method = diffuflow.build(tiny_config())
  method.fit(view)
  return method, view


def _slices(view, n: int = 6):
  return np.arange(view.split.val_start, view.split.val_start + n)


def test_reconstruct_end_to_end_shapes_and_consistency():
  method, view = _fitted()
  slices = _slices(view)
  rec = method.reconstruct(view, slices)
  (i, j), (h, w), c = view.coarse_shape, view.fine_shape, view.channels
  assert rec["coarse"].shape == (6, i, j, c) and rec["fine"].shape == (6, h, w, c)
  assert rec["samples"].shape == (3, 6, h, w, c)
  assert rec["fine"].dtype == np.float32 and np.isfinite(rec["samples"]).all()
  # The point is the median of the samples (`point`, the default).
  np.testing.assert_allclose(rec["fine"], np.median(rec["samples"], 0), rtol=1e-6)
  obs = view.mask[slices] > 0
  np.testing.assert_array_equal(rec["coarse"][obs], view.coarse_obs[slices][obs])
  # n2_normalize (on by default): every sample pools exactly to the completed coarse map.
  pooled = coarsen.coarsen(rec["samples"], view.scale, view.aggregation)
  np.testing.assert_allclose(pooled, np.broadcast_to(rec["coarse"], pooled.shape),
                             rtol=1e-4, atol=1e-3)
  assert np.ptp(rec["samples"], axis=0).max() > 0  # the samples spread


def test_training_lowers_the_loss():
  method, _ = _fitted()
  assert method.losses.shape == (40,)
  assert method.losses[-10:].mean() < 0.8 * method.losses[:5].mean(), method.losses


def test_the_seed_fixes_the_samples():
  method, view = _fitted()
  slices = _slices(view, 3)
  again = diffuflow.build(tiny_config())
  a = method.reconstruct(view, slices)["samples"]
  np.testing.assert_array_equal(a, again.reconstruct(view, slices)["samples"])
  other = diffuflow.build(tiny_config(seed=1))
  assert np.abs(a - other.reconstruct(view, slices)["samples"]).max() > 1e-3


def test_the_condition_matters():
  """The denoiser's output moves with the current coarse map, its history and the external
  features (not only through the residual base)."""
  method, view = _fitted()
  rs = np.random.RandomState(0)
  (i, j), (h, w), c = view.coarse_shape, view.fine_shape, view.channels
  t = view.history + 1
  cond = {"window": jnp.asarray(rs.randn(2, t, i, j, c), jnp.float32),
          "external": jnp.asarray(view.external[:2], jnp.float32),
          "mask": jnp.asarray(rs.rand(2, t, i, j) > 0.4, jnp.float32)}
  x = jnp.asarray(rs.randn(2, h, w, c), jnp.float32)
  tau = jnp.asarray([3, 7], jnp.int32)
  eps = lambda cd: np.asarray(method.net.apply(method.params, x, tau, cd))
  base = eps(cond)
  for name, edit in [("current", lambda a: a.at[:, -1].add(1.0)),
                     ("history", lambda a: a.at[:, 0].add(1.0))]:
    moved = eps(dict(cond, window=edit(cond["window"])))
    assert np.abs(moved - base).max() > 1e-4, name
  moved = eps(dict(cond, external=cond["external"] + 1.0))
  assert np.abs(moved - base).max() > 1e-4, "external"
  # The missing-data path: which coarse values are observed moves it too.
  moved = eps(dict(cond, mask=1.0 - cond["mask"]))
  assert np.abs(moved - base).max() > 1e-4, "mask"


def test_mean_point_and_no_mask_path_are_switches():
  """`point="mean"` returns the samples' mean; `use_mask=False` builds a denoiser without the
  mask inputs (fewer parameters) that still trains and samples."""
  c = tiny_config(steps=2)
  c.diffuflow.point, c.diffuflow.use_mask = "mean", False
  method = diffuflow.build(c)
  view = _view(helpers.tiny_task())
  rec = method.reconstruct(view, _slices(view, 2))
  np.testing.assert_allclose(rec["fine"], rec["samples"].mean(0), rtol=1e-6)
  size = lambda p: sum(a.size for a in jax.tree_util.tree_leaves(p))
  assert size(method.params) < size(_fitted()[0].params)


def test_minus_one_steps_take_diffusion_f_steps():
  c = tiny_config()
  c.diffuflow.steps, c.train.steps_f = -1, 7
  assert diffuflow.build(c).steps == 7


@pytest.mark.parametrize("aggregation", ["sum", "mean"])
def test_block_rescale_pools_to_the_coarse_cells(aggregation):
  rs = np.random.RandomState(1)
  fine = jnp.asarray(rs.randn(2, 4, 6, 2), jnp.float32)
  coarse = jnp.asarray(rs.rand(2, 2, 3, 2) * 10, jnp.float32)
  out = np.asarray(diffuflow.block_rescale(fine, coarse, 2, aggregation))
  np.testing.assert_allclose(coarsen.coarsen(out, 2, aggregation), coarse, rtol=1e-5)
  # A block with nothing positive is split evenly.
  flat = np.asarray(diffuflow.block_rescale(-jnp.ones_like(fine), coarse, 2, "sum"))
  np.testing.assert_allclose(flat[0, :2, :2, 0], np.full((2, 2), coarse[0, 0, 0, 0] / 4),
                             rtol=1e-6)


def test_n2_switch_off_leaves_blocks_free():
  method, view = _fitted()
  t = view.history + 1
  win = np.asarray(view.coarse_obs_norm[:t][None].repeat(2, 0))
  ext = np.asarray(view.external[:2], np.float32)
  try:
    method.n2_normalize = False
    mask = np.ones(win.shape[:-1], np.float32)
    raw = np.asarray(jax.jit(method._sample_batch)(method.params, win, ext, mask,
                                                   jax.random.PRNGKey(0)))
  finally:
    method.n2_normalize = True
  coarse = view.coarse_norm.inverse(win[:, -1])
  pooled = coarsen.coarsen(raw, view.scale, view.aggregation)
  assert np.abs(pooled - coarse[None]).max() > 1e-2


@pytest.mark.parametrize("field,value", [("sampling_steps", 0), ("sampling_steps", 11),
                                         ("n_samples", 0), ("lr", -1.0),
                                         ("point", "mode")])
def test_bad_config_is_refused(field, value):
  c = tiny_config()
  c.diffuflow[field] = value
  with pytest.raises(ValueError, match="diffuflow"):
    diffuflow.build(c)


def test_never_reads_hidden_values():
  # One pattern: every build compiles the method anew, and one poisoned mask already checks it.
  test_leakage.assert_no_leakage([("diffuflow", lambda task: diffuflow.build(tiny_config(4)))],
                                 helpers.tiny_task(), patterns=("random:0.4",))
