"""Tests for diffrecon_jax.diffrecon_method: batching and concurrency of the two sampling stages,
the fine maps' exact pooling on the real sampling path, and stage 1's use of the observed cells."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffrecon_jax import batching, evaluate
from diffrecon_jax.diffrecon import model
from diffrecon_jax.diffrecon import method as diffrecon_method
from diffrecon_jax.data import coarsen, pipeline
from tests import _train_helpers as helpers


def _method(workers: int, batch: int = 8):
  config = helpers.tiny_config()
  config.eval.batch_size = batch
  config.eval.concurrent_batches = workers
  config.sampling.steps = 3
  task = helpers.tiny_task()
  models = helpers.standin_models(config, task.scale)
  params = model.init_params(models, task.shapes, jax.random.key(0))
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
  view = evaluate.observe(task, mask)
  a = serial.reconstruct(view, slices)
  b = pooled.reconstruct(view, slices)
  b_again = pooled.reconstruct(view, slices)  # second call: every batch in the pool
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
  assert batching.concurrent_batches(config) == (
      2 if jax.default_backend() == "cpu" else 1)
  config.eval.concurrent_batches = 3
  assert batching.concurrent_batches(config) == 3
  config.eval.concurrent_batches = -1
  with pytest.raises(ValueError, match="concurrent_batches"):
    batching.concurrent_batches(config)


@pytest.mark.parametrize("n,max_batch,workers,want", [
    (1080, 128, 2, 112),   # 10 batches in 5 pairs instead of 9 (the last alone, mostly padding)
    (1086, 128, 2, 112),   # stage 1's slices: the same compiled shape as stage 2's
    (1080, 128, 1, 120),   # 9 batches of 120 instead of 8 x 128 + 56
    (1080, 64, 2, 60),     # 18 batches of 60 (64 would give 17: the last one alone)
    (5, 128, 2, 3),        # tiny splits: still one batch per worker
    (100, 4, 2, 4),        # never above the configured maximum
])
def test_balanced_batch_size(n, max_batch, workers, want):
  size = batching.balanced_batch_size(n, max_batch, workers)
  assert size == want
  assert size <= max_batch
  with pytest.raises(ValueError):
    batching.balanced_batch_size(0, max_batch, workers)


# ---- exact pooling on the real sampling path ---------------------------------------------------

@pytest.mark.parametrize("aggregation,n_samples,point", [
    ("sum", 3, "median"), ("mean", 4, "median"), ("sum", 3, "posterior_mean"),
    ("mean", 2, "posterior_mean")])
def test_fine_maps_pool_exactly_to_the_completed_coarse_map(aggregation, n_samples, point):
  """Real (tiny, untrained) denoisers, `sampling.consistent` on: every sample and the point estimate
  pool (sum or mean over each N x N block) to the completed coarse map, whatever the number of
  samples and the point estimate. The per-cell median of 3+ samples does not pool by itself;
  the point estimate is its L2 projection onto the block constraint. The posterior-mean point
  is a separate one-pass estimate, projected the same way."""
  config = helpers.tiny_config()
  config.sampling.steps = 3
  config.sampling.n_samples = n_samples
  config.sampling.point = point
  config.sampling.ensemble = "shared_completion"  # members: tests/test_ensemble.py
  config.eval.batch_size = 8
  assert config.diffusion.fine_residual and config.sampling.consistent
  task = helpers.tiny_task()
  if aggregation != task.series.aggregation:
    task = pipeline.build_task(dataclasses.replace(task.series, aggregation=aggregation),
                               task.scale, task.history)
  method = helpers.tiny_diffrecon(config, task)
  n = task.scale
  lo, _ = task.split.range("test")
  slices = np.arange(lo, lo + 10)
  mask, _ = evaluate.eval_mask(task, evaluate.patterns_lib.parse_pattern("random:0.4"), 0)
  rec = method.reconstruct(evaluate.observe(task, mask), slices)
  coarse, fine, samples = rec["coarse"], rec["fine"], rec["samples"]
  assert samples.shape == (n_samples, len(slices)) + task.fine_shape + (task.channels,)
  # float32 rounding of values up to ~1e3 (sums of flows) after de-normalisation
  tol = dict(rtol=1e-5, atol=1e-5 * float(np.abs(coarse).max()))
  for s in range(n_samples):
    np.testing.assert_allclose(coarsen.coarsen(samples[s], n, aggregation), coarse,
                               err_msg=f"sample {s}", **tol)
  np.testing.assert_allclose(coarsen.coarsen(fine, n, aggregation), coarse, **tol)
  if n_samples > 1:  # the samples really differ (the pooling is not trivially shared)
    assert np.abs(samples[1] - samples[0]).max() > 100 * tol["atol"]
  if point == "posterior_mean":  # not derived from the samples
    assert np.abs(fine - np.median(samples, axis=0)).max() > 100 * tol["atol"]
    return
  # The point estimate is the per-cell median moved by each block's pooling gap, spread evenly.
  median = np.median(samples, axis=0)
  gap = coarse - coarsen.coarsen(median, n, aggregation)
  np.testing.assert_allclose(fine, median + coarsen.upsample_uniform(gap, n, aggregation), **tol)
  if n_samples > 2:  # the projection matters here: the plain median is off the constraint
    assert np.abs(gap).max() > 100 * tol["atol"], np.abs(gap).max()


# ---- stage 1: observed cells inform the hidden ones through the whole reverse chain ------------

class TiedCellsC(nn.Module):
  """A Diffusion-C that knows the data: the exact noise predictor for maps whose d = I*J cells
  all hold one value v ~ N(0, 1) per channel. x = sqrt(ab) v 1 + sqrt(1 - ab) eps gives
  E[eps | x] = (x - k sum(x) 1) / sqrt(1 - ab) with k = ab / (1 - ab + d ab) (as
  test_diffusion.tied_eps_fn): it mixes cells (a spatial sum), so the observed cells reach the
  hidden ones only if they are imposed during the chain, not just at the end. No parameters."""
  alpha_bars: tuple

  @nn.compact
  def __call__(self, x, tau, cond, deterministic=True, inter=None, inter_only=False):
    if inter_only:
      return None
    ab = jnp.asarray(self.alpha_bars, jnp.float32)[tau].reshape(-1, 1, 1, 1)
    d = x.shape[1] * x.shape[2]
    k = ab / (1.0 - ab + d * ab)
    return (x - k * x.sum(axis=(1, 2), keepdims=True)) / jnp.sqrt(1.0 - ab)


def test_stage_one_completes_hidden_cells_from_the_observed_ones():
  """Each slice's observed cells all hold v_t (a different value per slice); under the tied-cells
  model the hidden cells must come out near v_t (measured mean error 0.02). Imposing the observed
  cells only at the end of the chain leaves the hidden ones unconditional draws (measured 1.1;
  0.6 when they are imposed on the starting noise and at the end only)."""
  config = helpers.tiny_config()
  config.sampling.steps = 10
  config.sampling.point = "median"  # the chain is what is tested (an eps-predictor)
  config.eval.batch_size = 8
  task = helpers.tiny_task()
  standins = helpers.standin_models(config, task.scale)
  models = model.Models(
      c=TiedCellsC(tuple(np.asarray(standins.schedule.alpha_bars).tolist())), f=standins.f,
      schedule=standins.schedule)
  params = {"c": {}, "f": model.init_params(standins, task.shapes,
                                                jax.random.PRNGKey(0))["f"]}
  method = diffrecon_method.DiffReconMethod(config, params, models)
  t, (i, j), c = 24, task.coarse_shape, task.channels
  rs = np.random.RandomState(0)
  v = rs.uniform(-2, 2, size=(t, 1, 1, c)).astype(np.float32)
  mask = (rs.rand(t, i, j) < 0.5).astype(np.float32)
  unit = pipeline.Normalizer(np.zeros(c, np.float32), np.ones(c, np.float32))
  view = evaluate.ObservedTask(
      name="tied", coarse_obs=np.where(mask[..., None] > 0, np.broadcast_to(v, (t, i, j, c)),
                                       np.nan).astype(np.float32),
      mask=mask, external=task.external[:t], timestamps=task.series.timestamps[:t],
      interval_minutes=30, scale=task.scale, aggregation="sum", history=task.history,
      split=pipeline.Split.chronological(t), coarse_norm=unit, fine_norm=unit,
      train_fine=np.zeros((0,) + task.fine_shape + (c,), np.float32),
      train_coarse=np.zeros((0, i, j, c), np.float32))
  slices = np.arange(2 * task.history, t)
  coarse = method.reconstruct(view, slices)["coarse"]
  hidden = np.broadcast_to((mask[slices] == 0)[..., None], coarse.shape)
  observed = ~hidden
  truth = np.broadcast_to(v[slices], coarse.shape)
  np.testing.assert_array_equal(coarse[observed], truth[observed])
  err = np.abs(coarse - truth)[hidden]
  assert err.mean() < 0.25, err.mean()
