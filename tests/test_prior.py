"""The climatology prior (diffrecon_jax/diffrecon/prior.py): the jnp first guesses equal the `climatology`
baseline's numpy completion and split, pool exactly, never read hidden values; the denoisers'
first-guess and location inputs have the shapes they claim."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffrecon_jax.diffrecon import model
from diffrecon_jax import evaluate
from diffrecon_jax.diffrecon import prior as prior_lib
from diffrecon_jax.baselines.climatology import ClimatologyBaseline
from diffrecon_jax.data import climatology as cl
from diffrecon_jax.data import time_axis
from diffrecon_jax.data import coarsen, nyc_dsan, patterns, pipeline
from diffrecon_jax.diffrecon import denoisers

HISTORY = 3


@pytest.fixture(scope="module", params=["sum", "mean"])
def task(request):
  series = dataclasses.replace(nyc_dsan.load_nytaxi(), aggregation=request.param)
  return pipeline.build_task(series, scale=2, history=HISTORY)


def windows(task, mask, slices):
  view = evaluate.observe(task, mask)
  idx = slices[:, None] + np.arange(-HISTORY, 1)[None, :]
  return view, idx


def test_coarse_guess_is_the_climatology_baselines_completion(task):
  prior = prior_lib.fit_prior(task)
  mask, _ = evaluate.eval_mask(task, patterns.parse_pattern("random:0.6"), 0)
  lo, _ = task.split.range("val")
  slices = np.arange(lo + 10, lo + 60)
  view, idx = windows(task, mask, slices)
  slots = prior.slots(task.series.timestamps)
  guess = prior_lib.coarse_guess(prior, jnp.asarray(view.coarse_obs_norm[idx]),
                                 jnp.asarray(view.mask[idx]), jnp.asarray(slots[idx]))
  # The baseline with its level window equal to the model's history: the same statistic.
  base = ClimatologyBaseline(level_window=HISTORY).reconstruct(view, slices)
  np.testing.assert_allclose(task.coarse_norm.inverse(np.asarray(guess)), base["coarse"],
                             rtol=1e-4, atol=1e-2)
  # observed cells keep their values exactly (to float precision)
  m = mask[slices] > 0
  np.testing.assert_allclose(task.coarse_norm.inverse(np.asarray(guess))[m],
                             task.coarse_phys[slices][m], rtol=1e-5, atol=1e-3)


def test_coarse_guess_never_reads_hidden_values(task):
  prior = prior_lib.fit_prior(task)
  mask, _ = evaluate.eval_mask(task, patterns.parse_pattern("fixed:0.6"), 0)
  slices = np.arange(200, 230)
  view, idx = windows(task, mask, slices)
  obs, m = view.coarse_obs_norm[idx], view.mask[idx]
  junk = np.where(m[..., None] > 0, obs, 1e4).astype(np.float32)
  slots = jnp.asarray(prior.slots(task.series.timestamps)[idx])
  a = prior_lib.coarse_first_guess(prior, jnp.asarray(obs), jnp.asarray(m), slots)
  b = prior_lib.coarse_first_guess(prior, jnp.asarray(junk), jnp.asarray(m), slots)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # anomalies: 0 where hidden, observed minus the level-scaled climatology where observed
  anomaly = np.asarray(a[1])
  assert np.all(anomaly[m == 0] == 0) and np.abs(anomaly[m > 0]).max() > 0.01


def test_fine_base_is_the_climatology_split_and_pools_exactly(task):
  prior = prior_lib.fit_prior(task)
  s = np.arange(500, 540)
  slot = prior.slots(task.series.timestamps[s])
  base = np.asarray(prior_lib.fine_base(prior, jnp.asarray(task.coarse[s]), jnp.asarray(slot)))
  agg = task.series.aggregation
  want = cl.split_fine(task.coarse_phys[s], prior.fine[slot], 2, agg)
  got = task.fine_norm.inverse(base)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-2)
  np.testing.assert_allclose(coarsen.coarsen(got, 2, agg), task.coarse_phys[s], rtol=1e-4,
                             atol=1e-2)
  # not the even spread: the shares carry where in a block the flow goes
  even = coarsen.upsample_uniform(task.coarse_phys[s], 2, agg)
  assert np.abs(got - even).mean() > 1.0


def test_prior_round_trips_through_its_file(task, tmp_path):
  prior = prior_lib.fit_prior(task)
  prior.save(prior_lib.prior_path(tmp_path))
  back = prior_lib.Prior.load(prior_lib.prior_path(tmp_path), task.stats)
  for f in ("fine", "coarse"):
    np.testing.assert_array_equal(getattr(back, f), getattr(prior, f))
  assert (back.period, back.interval_minutes, back.aggregation, back.scale) == (
      prior.period, prior.interval_minutes, prior.aggregation, prior.scale)
  local = dataclasses.replace(prior, local=True, local_sigma=0.7, local_shrink=0.25)
  local.save(prior_lib.prior_path(tmp_path))
  back = prior_lib.Prior.load(prior_lib.prior_path(tmp_path), task.stats)
  assert (back.local, back.local_sigma, back.local_shrink) == (True, 0.7, 0.25)


def _local_guess_reference(prior, obs, m, clim):
  """Straight numpy of `prior.local_level` over a full (I, J, I, J) kernel, one window at a
  time: obs / clim (t, I, J, C) physical, m (t, I, J) observed."""
  t, i, j, _ = obs.shape
  w = prior.level_decay ** np.arange(t - 1, -1, -1)[:, None, None, None]
  mm = m[..., None] > 0
  if prior.aggregation == "sum":
    level = np.clip((w * np.where(mm, obs, 0)).sum((0, 1, 2)) /
                    (w * np.where(mm, clim, 0)).sum((0, 1, 2)), *prior.ratio_clip)
  else:
    level = (w * np.where(mm, obs - clim, 0)).sum((0, 1, 2)) / (w * mm).sum((0, 1, 2))
  out = np.zeros((i, j) + obs.shape[3:])
  for a in range(i):
    for b in range(j):
      d2 = (np.arange(i)[:, None] - a) ** 2 + (np.arange(j)[None] - b) ** 2
      k = (np.exp(-d2 / (2 * prior.local_sigma ** 2)) if prior.local_sigma > 0 else
           (d2 == 0).astype(float))[None, :, :, None]
      now, lam = clim[-1, a, b], prior.local_shrink
      if prior.aggregation == "sum":
        num = (k * w * np.where(mm, obs, 0)).sum((0, 1, 2)) + lam * level * now
        den = (k * w * np.where(mm, clim, 0)).sum((0, 1, 2)) + lam * now
        # an empty neighbourhood (no climatology at all) keeps the map's level
        out[a, b] = np.where(den > 1e-6, now * np.clip(num / np.where(den > 1e-6, den, 1),
                                                         *prior.ratio_clip), now * level)
      else:
        num = (k * w * np.where(mm, obs - clim, 0)).sum((0, 1, 2)) + lam * level
        den = (k * w * mm).sum((0, 1, 2)) + lam
        out[a, b] = now + num / den
  return np.where(mm[-1], obs[-1], out)


@pytest.mark.parametrize("sigma", [0.0, 0.8])
def test_local_first_guess_matches_its_definition_and_reads_only_observations(task, sigma):
  prior = dataclasses.replace(prior_lib.fit_prior(task), local=True, local_sigma=sigma,
                              local_shrink=0.5)
  mask, _ = evaluate.eval_mask(task, patterns.parse_pattern("random:0.6"), 0)
  slices = np.arange(300, 306)
  view, idx = windows(task, mask, slices)
  slots = prior.slots(task.series.timestamps)[idx]
  obs, m = view.coarse_obs_norm[idx], view.mask[idx]
  guess, _ = prior_lib.coarse_first_guess(prior, jnp.asarray(obs), jnp.asarray(m),
                                          jnp.asarray(slots))
  got = task.coarse_norm.inverse(np.asarray(guess))
  for k, s in enumerate(slices):
    want = _local_guess_reference(prior, np.nan_to_num(view.coarse_obs[idx[k]]), m[k],
                                  prior.coarse[slots[k]])
    np.testing.assert_allclose(got[k], want, rtol=1e-3, atol=1e-2)
  # Not the map's one level: a hidden cell follows its own and its neighbours' observations.
  flat = dataclasses.replace(prior, local=False)
  assert np.abs(got - task.coarse_norm.inverse(np.asarray(prior_lib.coarse_guess(
      flat, jnp.asarray(obs), jnp.asarray(m), jnp.asarray(slots))))).max() > 1.0
  junk = np.where(m[..., None] > 0, obs, 1e4).astype(np.float32)
  again, _ = prior_lib.coarse_first_guess(prior, jnp.asarray(junk), jnp.asarray(m),
                                          jnp.asarray(slots))
  np.testing.assert_array_equal(np.asarray(again), np.asarray(guess))


def test_own_cell_level_leaves_never_observed_cells_at_the_maps_level(task):
  """Under a fixed mask a hidden cell is hidden in the whole window: with the cell's own level
  (sigma 0) its guess is the baseline's."""
  prior = dataclasses.replace(prior_lib.fit_prior(task), local=True, local_sigma=0.0)
  mask, _ = evaluate.eval_mask(task, patterns.parse_pattern("fixed:0.6"), 0)
  slices = np.arange(300, 310)
  view, idx = windows(task, mask, slices)
  args = (jnp.asarray(view.coarse_obs_norm[idx]), jnp.asarray(view.mask[idx]),
          jnp.asarray(prior.slots(task.series.timestamps)[idx]))
  np.testing.assert_allclose(
      np.asarray(prior_lib.coarse_guess(prior, *args)),
      np.asarray(prior_lib.coarse_guess(dataclasses.replace(prior, local=False), *args)),
      rtol=1e-5, atol=1e-5)


def test_build_models_asks_for_the_prior_when_the_config_uses_it():
  from diffrecon_jax.configs import default
  config = default.get_config()
  assert model.uses_prior(config)
  with pytest.raises(ValueError, match="climatology prior"):
    model.build_models(config, 2, {"fine": {}, "coarse": {}})
  paper = default.get_config("paper")
  assert not model.uses_prior(paper)
  assert paper.model_c.location_dim == 0 and paper.diffusion.fine_base == "uniform"


@pytest.mark.parametrize("net", ["c", "f"])
def test_first_guess_and_location_inputs_shapes(net):
  b, t, i, j, c, n, loc = 2, 3, 4, 6, 2, 2, 3
  small = dict(base_channels=8, channel_mults=(1,), emb_dim=8, inter_dim=8, location_dim=loc)
  if net == "c":
    model = denoisers.DiffusionCNet(d_model=8, num_heads=2, ff_dim=8, num_layers=1, **small)
    cond = {"obs": jnp.zeros((b, t, i, j, c)), "mask": jnp.ones((b, t, i, j)),
            "external": jnp.zeros((b, t, 5))}
    h, w = i, j
  else:
    model = denoisers.DiffusionFNet(scale=n, d_model=8, d_ff=8, top_k=1, num_blocks=1,
                                    num_kernels=1, encoder_channels=2, **small)
    cond = {"coarse": jnp.zeros((b, t, i, j, c)), "external": jnp.zeros((b, t, 5))}
    h, w = n * i, n * j
  x = jax.random.normal(jax.random.PRNGKey(0), (b, h, w, c))
  tau = jnp.array([1, 4])
  cond["prior"] = jnp.ones((b, h, w, c))
  params = model.init(jax.random.PRNGKey(1), x, tau, cond)["params"]
  assert params["location"].shape == (h, w, loc)
  out = model.apply({"params": params}, x, tau, cond)
  assert out.shape == (b, h, w, c)
  # the first guess is an input: changing it changes the prediction
  other = dict(cond, prior=jnp.full((b, h, w, c), -1.0))
  assert not np.allclose(model.apply({"params": params}, x, tau, other), out)
  # so is the location: the same input at two places gives two predictions after the embedding
  # is moved
  moved = jax.tree_util.tree_map(lambda p: p, params)
  moved = dict(moved, location=params["location"] + 1.0)
  assert not np.allclose(model.apply({"params": moved}, x, tau, cond), out)
  with pytest.raises(ValueError, match="prior"):
    model.apply({"params": params}, x, tau, dict(cond, prior=jnp.ones((b, h + 1, w, c))))


def test_residual_stats_per_channel_and_per_cell(task):
  """The scales the residual targets are divided by: per channel (C,), or per cell (H, W, C)
  with a floor at a tenth of the channel's; the fine residual over the share split, divided by
  its per-cell scale, has unit root mean square in every cell that is above the floor."""
  channel = prior_lib.fit_prior(task)
  cell = prior_lib.fit_prior(task, per_cell=True)
  c = task.channels
  assert channel.residual_std_c.shape == (c,) and channel.residual_std_f.shape == (c,)
  assert cell.residual_std_c.shape == task.coarse_shape + (c,)
  assert cell.residual_std_f.shape == task.fine_shape + (c,)
  assert np.all(cell.residual_std_f >= 0.1 * channel.residual_std_f - 1e-7)
  lo, hi = task.split.range("train")
  slots = jnp.asarray(cell.slots(task.series.timestamps[lo:hi]))
  r = task.fine[lo:hi] - np.asarray(prior_lib.fine_base(cell, jnp.asarray(task.coarse[lo:hi]),
                                                         slots))
  rms = np.sqrt(np.mean(np.square(r / cell.residual_std_f), axis=0))
  above = cell.residual_std_f > 0.1 * channel.residual_std_f + 1e-6
  np.testing.assert_allclose(rms[above], 1.0, rtol=1e-3)
  # heteroscedastic data: the busiest cell's scale is many times the quietest's
  assert cell.residual_std_f.max() > 5 * cell.residual_std_f.min()


def test_smoothing_over_slots_wraps_keeps_mass_and_leaves_coarse_data_alone():
  table = np.zeros((48, 2, 3, 1))
  table[0] = 1.0
  out = prior_lib.smooth_over_slots(table, 30, 20.0)
  np.testing.assert_allclose(out.sum(axis=0), table.sum(axis=0))         # mass kept
  assert out[1, 0, 0, 0] == pytest.approx(out[47, 0, 0, 0])            # the cycle wraps
  assert out[1, 0, 0, 0] > 0.1
  assert out[0, 0, 0, 0] < 0.7 and out[24].max() == 0.0
  np.testing.assert_array_equal(prior_lib.smooth_over_slots(table, 30, 0.0), table)
  # hourly slots are three sigmas of 20 min apart: barely mixed
  assert prior_lib.smooth_over_slots(table, 60, 20.0)[0, 0, 0, 0] > 0.97
  const = np.full((48, 2, 3, 1), 5.0)
  np.testing.assert_allclose(prior_lib.smooth_over_slots(const, 30, 20.0), const)


def test_fit_prior_smooths_the_baselines_table(task):
  raw = prior_lib.fit_prior(task)
  smooth = prior_lib.fit_prior(task, slot_sigma_minutes=20.0)
  np.testing.assert_allclose(
      smooth.fine, prior_lib.smooth_over_slots(raw.fine.astype(np.float64), 30, 20.0),
      rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(smooth.coarse, coarsen.coarsen(smooth.fine, 2,
                                                            task.series.aggregation), rtol=1e-5,
                             atol=1e-3)
  assert np.abs(smooth.fine - raw.fine).max() > 1.0


def test_clip_bounds_from_the_prior_equal_the_train_splits_largest_residual(task):
  """The default model's sampler bounds come from what `residual_stats` measured, without the
  train split; they must be what reading the train split again gives."""
  prior = prior_lib.fit_prior(task, per_cell=True)
  from diffrecon_jax.configs import default
  config = default.get_config()
  models = model.build_models(config, task.scale, task.stats, task.series.aggregation, prior)
  assert not model.clip_bounds_need_train_split(models)
  coarse_bound, fine_bound = model.x0_clip_bounds(1.0, models)
  lo, hi = task.split.range("train")
  slots = jnp.asarray(prior.slots(task.series.timestamps[lo:hi]))
  residual = (task.fine[lo:hi] - np.asarray(prior_lib.fine_base(
      prior, jnp.asarray(task.coarse[lo:hi]), slots))) / prior.residual_std_f
  assert fine_bound == pytest.approx(float(np.abs(residual).max()), rel=1e-4)
  assert coarse_bound == pytest.approx(prior.residual_absmax_c)
  paper = default.get_config("paper")
  models = model.build_models(paper, task.scale, task.stats, task.series.aggregation)
  assert model.clip_bounds_need_train_split(models)
  with pytest.raises(ValueError, match="train split"):
    model.x0_clip_bounds(1.0, models)
  coarse_bound, _ = model.x0_clip_bounds(1.0, models, task)
  assert coarse_bound == pytest.approx(float(np.abs(task.coarse[lo:hi]).max()))


def test_fold_of_days_interleaves_days_so_each_fold_holds_every_weekday():
  first = np.datetime64("2016-01-01", "D")
  times = first + np.arange(56 * 48).astype("timedelta64[m]") * 30     # 56 days at 30 min
  fold = prior_lib.fold_of_days(times, 8)
  day = np.arange(56 * 48) // 48
  np.testing.assert_array_equal(fold, day % 8)
  weekday = (day + 4) % 7                                           # 2016-01-01 was a Friday
  for k in range(8):
    assert sorted(set(weekday[fold == k])) == list(range(7))
  assert time_axis.number_of_days(times) == 56


def test_cross_fitted_tables_leave_out_each_training_days_fold(task, tmp_path):
  """Block 0 is the one table; block 1 + k the table fitted without fold k's training days;
  training slices read the block that never saw their day, other slices block 0; the file
  keeps block 0, so evaluation reads exactly the one table."""
  one = prior_lib.fit_prior(task, slot_sigma_minutes=20.0)
  cross = prior_lib.fit_prior(task, slot_sigma_minutes=20.0, cross_fit_folds=4)
  p, n_train = one.period, int(task.split.val_start)
  assert cross.folds == 4 and cross.fine.shape == (5 * p,) + one.fine.shape[1:]
  np.testing.assert_array_equal(cross.fine[:p], one.fine)
  np.testing.assert_array_equal(cross.coarse[:p], one.coarse)
  times = task.series.timestamps
  fold = prior_lib.fold_of_days(times, 4)
  train_fine = task.fine_phys[:n_train]
  for k in (0, 3):
    held_out = np.where((fold[:n_train] == k)[:, None, None, None], np.nan, train_fine)
    table, _ = cl.fit_climatology(held_out, times[:n_train], 30, "auto")
    np.testing.assert_allclose(cross.fine[(1 + k) * p:(2 + k) * p],
                               prior_lib.smooth_over_slots(table, 30, 20.0), rtol=1e-5,
                               atol=1e-4)
  # The held-out tables differ from the one table: training sees out-of-sample errors.
  assert np.abs(cross.fine[p:] - np.tile(one.fine, (4, 1, 1, 1))).max() > 1.0
  rows = cross.training_slots(times, n_train)
  slots = one.slots(times)
  np.testing.assert_array_equal(rows[n_train:], slots[n_train:])
  np.testing.assert_array_equal(rows[:n_train], slots[:n_train] + p * (1 + fold[:n_train]))
  np.testing.assert_array_equal(one.training_slots(times, n_train), slots)
  # Its residuals are measured out of sample, so they are larger than the one table's.
  assert np.all(cross.residual_std_f > one.residual_std_f)
  cross.save(prior_lib.prior_path(tmp_path))
  back = prior_lib.Prior.load(prior_lib.prior_path(tmp_path), task.stats)
  np.testing.assert_array_equal(back.fine, one.fine)
  assert back.folds == 0
  np.testing.assert_array_equal(back.residual_std_f, cross.residual_std_f)
