"""Tests of diffrecon_jax/diffrecon/model.py that need no trained model: the stage-2 base and its
consistency, the one x0 clipping rule, the sampler settings. (The losses are exercised by
test_train.py, the samplers by test_diffrecon_method.py and test_diffusion.py.)"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffrecon_jax.configs import default
from diffrecon_jax.diffrecon import model
from diffrecon_jax.diffrecon import settings as settings_lib
from diffrecon_jax.models import diffusion
from diffrecon_jax.data import coarsen, nyc_dsan, pipeline


def test_uniform_fine_base_plus_block_mean_zero_residual_pools_to_the_coarse_map():
  for agg in ("sum", "mean"):
    series = dataclasses.replace(nyc_dsan.load_nytaxi().slice_time(0, 80), aggregation=agg)
    task = pipeline.build_task(series, 2, 2)
    coarse = task.coarse[40:44]
    base = np.asarray(model.uniform_fine_base(coarse, stats=task.stats, scale=2,
                                                 aggregation=agg))
    # the base alone is the interp upsampling of the coarse map, in normalised fine units
    np.testing.assert_allclose(
        task.fine_norm.inverse(base),
        coarsen.upsample_uniform(task.coarse_phys[40:44], 2, agg), rtol=1e-4, atol=1e-3)
    r = np.asarray(model.block_mean_zero(
        np.random.default_rng(0).normal(size=base.shape).astype(np.float32), 2))
    fine_phys = task.fine_norm.inverse(base + r)
    np.testing.assert_allclose(coarsen.coarsen(fine_phys, 2, agg), task.coarse_phys[40:44],
                               rtol=1e-4, atol=1e-2)
    assert np.abs(r).max() > 0.1


def test_x0_clip_bound_is_a_factor_of_the_largest_train_value():
  values = np.array([[-3.0, 1.0], [2.5, 0.0]])
  assert model.x0_clip_bound(1.2, values) == pytest.approx(3.6)
  assert model.x0_clip_bound(0.0, values) is None


def test_sampling_settings_come_from_the_sampling_section_alone():
  config = default.get_config()
  s = settings_lib.SamplingSettings.from_config(config)
  assert (s.sampler, s.steps, s.eta, s.n_samples, s.consistent) == ("ddim", 4, 1.0, 4, True)
  assert s.describe() == {"name": "ddim", "steps": 4, "n_samples": 4, "eta": 1.0,
                          "point": "posterior_mean", "ensemble": "members"}
  config.sampling.sampler = "ddpm"
  s = settings_lib.SamplingSettings.from_config(config)
  assert s.steps == 50 and "eta" not in s.describe()  # DDPM always takes the T training steps
  config.sampling.sampler = "euler"
  with pytest.raises(ValueError, match="sampling.sampler"):
    settings_lib.SamplingSettings.from_config(config)
  config.sampling.sampler = "ddim"
  config.sampling.ensemble = "independent"
  with pytest.raises(ValueError, match="sampling.ensemble"):
    settings_lib.SamplingSettings.from_config(config)
  config.sampling.ensemble, config.sampling.n_samples = "members", 1
  with pytest.raises(ValueError, match="n_samples >= 2"):
    settings_lib.SamplingSettings.from_config(config)


# ---- x0 prediction: the sampler's noise derived from it, and the one-pass posterior mean -------

MU, SIGMA = 1.5, 0.5


class GaussianX0(nn.Module):
  """The exact x0-predictor for data x0 ~ N(MU, SIGMA^2) per cell:
  E[x0 | x_tau] = MU + sqrt(ab) SIGMA^2 (x_tau - sqrt(ab) MU) / (ab SIGMA^2 + 1 - ab)."""
  alpha_bars: tuple

  @nn.compact
  def __call__(self, x, tau, cond, deterministic=True, inter=None, inter_only=False):
    if inter_only:
      return None
    ab = jnp.asarray(self.alpha_bars, jnp.float32)[tau].reshape(-1, 1, 1, 1)
    return MU + jnp.sqrt(ab) * SIGMA ** 2 * (x - jnp.sqrt(ab) * MU) / (ab * SIGMA ** 2 + 1 - ab)


def test_x0_prediction_samples_the_data_and_its_posterior_mean_is_the_mean():
  """With an exact x0-predictor, the chain (noise derived from x0 by `diffrecon.denoise`)
  draws N(MU, SIGMA^2), and the one-pass posterior-mean estimate is MU: the deterministic
  point that minimises the squared error, with none of a sample's spread."""
  schedule = diffusion.make_schedule("cosine", 200)
  net = GaussianX0(tuple(np.asarray(schedule.alpha_bars).tolist()))
  models = model.Models(c=net, f=net, schedule=schedule, prediction="x0")
  shape = (500, 4, 4, 1)
  settings = dataclasses.replace(
      settings_lib.SamplingSettings.from_config(default.get_config()), steps=200, eta=1.0,
      n_samples=1, point="posterior_mean", ensemble="shared_completion")
  out = model._sample(models, net, {}, {}, shape, jax.random.PRNGKey(0), settings, None)
  x = np.asarray(out["samples"])
  assert abs(x.mean() - MU) < 0.02 and abs(x.std() - SIGMA) < 0.02, (x.mean(), x.std())
  mean = np.asarray(model.posterior_mean(models, net, {}, {}, shape))
  np.testing.assert_allclose(mean, MU, atol=2e-3)
  eps_models = dataclasses.replace(models, prediction="eps")
  with pytest.raises(ValueError, match="prediction='x0'"):
    model.posterior_mean(eps_models, net, {}, {}, shape)


def test_point_loss_is_absolute_at_the_last_step_only():
  """x0-predictor with point_loss "l1": the row at tau = T - 1 counts |err|, the others err^2
  (hand-computed); "l2" and eps-predictors keep the squared error everywhere."""
  schedule = diffusion.make_schedule("quad", 10)
  models = model.Models(c=None, f=None, schedule=schedule, prediction="x0", point_loss="l1")
  out = jnp.array([[3.0, -1.0], [3.0, -1.0]])
  x0 = jnp.zeros((2, 2))
  tau = jnp.array([9, 4])
  got = float(model.stage_loss(models, out, x0, x0, tau))
  assert got == pytest.approx(((3 + 1) + (9 + 1)) / 4)
  # hidden-cell weights: only the second column counts
  w = jnp.array([[0.0, 1.0], [0.0, 1.0]])
  assert float(model.stage_loss(models, out, x0, x0, tau, w)) == pytest.approx((1 + 1) / 2)
  l2 = dataclasses.replace(models, point_loss="l2")
  assert float(model.stage_loss(l2, out, x0, x0, tau)) == pytest.approx((9 + 1) * 2 / 4)
  eps = dataclasses.replace(models, prediction="eps")
  assert float(model.stage_loss(eps, out, x0, jnp.ones((2, 2)), tau)) == pytest.approx(
      (4 + 4 + 4 + 4) / 4)


def test_physical_point_loss_weights_each_cell_by_its_scale_in_data_units():
  """point_loss "l1_physical": the last step's |err| times each cell's residual scale times
  its channel's std, normalised to mean 1 (hand-computed); "l1" and a model without the
  prior's residual scaling keep weight 1."""
  import types
  schedule = diffusion.make_schedule("quad", 10)
  prior = types.SimpleNamespace(residual_std_f=np.array([[[1.0, 2.0]], [[3.0, 4.0]]], np.float32),
                                stats={"fine": {"std": np.array([10.0, 1.0], np.float32)}})
  models = model.Models(c=None, f=None, schedule=schedule, prediction="x0", prior=prior,
                        feed_prior_f=True, residual_scaling=True, point_loss="l1_physical")
  w = np.asarray(models.point_scale("f"))                         # (2, 1, 2): cells x channels
  raw = np.array([[[10.0, 2.0]], [[30.0, 4.0]]])
  np.testing.assert_allclose(w, raw / raw.mean(), rtol=1e-6)
  out = jnp.ones((2, 2, 1, 2))
  x0 = jnp.zeros((2, 2, 1, 2))
  tau = jnp.array([9, 9])                                          # every row at the last step
  got = float(model.stage_loss(models, out, x0, x0, tau, point_scale=models.point_scale("f")))
  assert got == pytest.approx(float(np.mean(w)))                   # |err| = 1 everywhere
  err = np.zeros((2, 2, 1, 2), np.float32)
  err[:, 1, 0, 0] = 2.0                                            # the busiest cell's channel 0
  got = float(model.stage_loss(models, jnp.asarray(err), x0, x0, tau,
                               point_scale=models.point_scale("f")))
  assert got == pytest.approx(2.0 * w[1, 0, 0] * 2 / err.size)
  assert dataclasses.replace(models, point_loss="l1").point_scale("f") == 1.0
  assert dataclasses.replace(models, residual_scaling=False).point_scale("f") == 1.0
