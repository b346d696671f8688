"""Tests of diffrecon_jax/diffrecon.py that need no trained model: the stage-2 base and its
consistency, the one x0 clipping rule, the sampler settings. (The losses are exercised by
test_train.py, the samplers by test_diffrecon_method.py and test_diffusion.py.)"""
import dataclasses

import numpy as np
import pytest

from configs import default
from diffrecon_jax import diffrecon
from diffrecon_jax.data import coarsen, nyc_dsan, pipeline


def test_fine_base_plus_block_mean_zero_residual_pools_to_the_coarse_map():
  for agg in ("sum", "mean"):
    series = dataclasses.replace(nyc_dsan.load_nytaxi().slice_time(0, 80), aggregation=agg)
    task = pipeline.build_task(series, 2, 2)
    coarse = task.coarse[40:44]
    base = np.asarray(diffrecon.fine_base(coarse, task.stats, 2, agg))
    # the base alone is the interp upsampling of the coarse map, in normalised fine units
    np.testing.assert_allclose(
        task.fine_norm.inverse(base),
        coarsen.upsample_uniform(task.coarse_phys[40:44], 2, agg), rtol=1e-4, atol=1e-3)
    r = np.asarray(diffrecon.block_mean_zero(
        np.random.default_rng(0).normal(size=base.shape).astype(np.float32), 2))
    fine_phys = task.fine_norm.inverse(base + r)
    np.testing.assert_allclose(coarsen.coarsen(fine_phys, 2, agg), task.coarse_phys[40:44],
                               rtol=1e-4, atol=1e-2)
    assert np.abs(r).max() > 0.1


def test_x0_clip_bound_is_a_factor_of_the_largest_train_value():
  values = np.array([[-3.0, 1.0], [2.5, 0.0]])
  assert diffrecon.x0_clip_bound(1.2, values) == pytest.approx(3.6)
  assert diffrecon.x0_clip_bound(0.0, values) is None


def test_sampling_settings_come_from_the_sampling_section_alone():
  config = default.get_config()
  s = diffrecon.SamplingSettings.from_config(config.sampling, config.diffusion.num_steps)
  assert (s.sampler, s.steps, s.eta, s.n_samples, s.consistent) == ("ddim", 10, 1.0, 2, True)
  assert s.describe() == {"name": "ddim", "steps": 10, "n_samples": 2, "eta": 1.0}
  config.sampling.sampler = "ddpm"
  s = diffrecon.SamplingSettings.from_config(config.sampling, 50)
  assert s.steps == 50 and "eta" not in s.describe()  # DDPM always takes the T training steps
  config.sampling.sampler = "euler"
  with pytest.raises(ValueError, match="sampling.sampler"):
    diffrecon.SamplingSettings.from_config(config.sampling, 50)
