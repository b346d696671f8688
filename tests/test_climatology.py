"""The `climatology` baseline: slots from timestamps, exact on synthetic periodic data, hidden
values never read, fine maps consistent with the completion."""
import datetime
import types

import numpy as np
import pytest

from diffrecon_jax import evaluate
from diffrecon_jax.baselines.climatology import ClimatologyBaseline
from diffrecon_jax.data import climatology as cl
from diffrecon_jax.data import coarsen, nyc_dsan, patterns, pipeline, time_axis

T0 = np.datetime64("2016-01-01T00:00", "m")  # a Friday


def make_view(coarse_obs, mask, timestamps, interval, scale, aggregation, train_fine, **extra):
  """The observed view a method receives (only the attributes the baseline may read)."""
  return types.SimpleNamespace(
      coarse_obs=coarse_obs, mask=mask, timestamps=timestamps, interval_minutes=interval,
      scale=scale, aggregation=aggregation, train_fine=train_fine,
      split=types.SimpleNamespace(val_start=train_fine.shape[0]), **extra)


@pytest.fixture(scope="module")
def nytaxi_task():
  return pipeline.build_task(nyc_dsan.load_nytaxi(), scale=2, history=6)


def task_view(task, mask):
  s = task.series
  hidden_nan = np.where(mask[..., None] > 0, task.coarse_phys, np.nan).astype(np.float32)
  return make_view(hidden_nan, mask, s.timestamps, s.interval_minutes, task.scale,
                   s.aggregation, task.fine_phys[:task.split.val_start])


# --- slots --------------------------------------------------------------------------------------

def test_slot_index_by_hand():
  ts = np.array(["1970-01-01T00:00", "2016-01-04T00:00", "2016-01-01T13:30", "2016-01-03T23:30"],
                "datetime64[m]")
  # Thursday 00:00; Monday 00:00; Friday 13:30; Sunday 23:30.
  assert cl.slot_index(ts, 30, 336).tolist() == [3 * 48, 0, 4 * 48 + 27, 6 * 48 + 47]
  assert cl.slot_index(ts, 30, 48).tolist() == [0, 0, 27, 47]
  with pytest.raises(ValueError):
    cl.slot_index(ts, 30, 100)


def test_slot_index_matches_the_calendar_and_ignores_gaps():
  rng = np.random.default_rng(0)
  ts = T0 + np.arange(2000) * np.timedelta64(30, "m")
  keep = np.sort(rng.choice(2000, 1300, replace=False))
  full = cl.slot_index(ts, 30, 336)
  np.testing.assert_array_equal(cl.slot_index(ts[keep], 30, 336), full[keep])
  for t, slot in zip(ts[keep][:200], full[keep][:200]):
    d = t.astype(datetime.datetime)
    assert slot == d.weekday() * 48 + (d.hour * 60 + d.minute) // 30


def test_period_week_day_and_daily_data():
  half_hour = T0 + np.arange(14 * 48) * np.timedelta64(30, "m")
  assert cl.choose_period(half_hour, 30) == 336  # exactly two weeks
  assert cl.choose_period(half_hour[:-1], 30) == 48  # one slot short of two weeks: slot of day
  days = np.datetime64("2016-01-01", "D") + np.arange(21)
  assert time_axis.default_slots_per_day(1440) == 1 and cl.choose_period(days, 1440) == 7
  weekday = np.array([d.astype(datetime.date).weekday() for d in days])
  np.testing.assert_array_equal(cl.slot_index(days, 1440, 7), weekday)
  hourly = T0 + np.arange(24 * 10) * np.timedelta64(60, "m")
  assert cl.choose_period(hourly, 60) == 24
  np.testing.assert_array_equal(cl.slot_index(hourly, 60, 24), np.arange(240) % 24)


def test_fit_uses_timestamp_slots_nan_aware_with_fallback():
  # Ten days of hourly data (slot of day), with gaps, NaN and a slot never seen.
  rng = np.random.default_rng(1)
  ts = T0 + np.arange(240) * np.timedelta64(60, "m")
  keep = np.sort(rng.choice(240, 180, replace=False))
  hour = np.arange(240) % 24
  keep = keep[hour[keep] != 5]  # no training value at 05:00
  ts, hour = ts[keep], hour[keep]
  x = rng.random((len(ts), 2, 2, 1))
  x[3, 0, 0, 0] = np.nan
  clim, period = cl.fit_climatology(x, ts, 60)
  assert period == 24 and clim.shape == (24, 2, 2, 1)
  for h in (0, 7, 23):
    np.testing.assert_allclose(clim[h], np.nanmean(x[hour == h], axis=0))
  np.testing.assert_allclose(clim[5], np.nanmean(x, axis=0))  # all-slot mean of each cell
  never = np.full((len(ts), 2, 2, 1), np.nan)
  never[:, 1:] = 2.0
  clim, _ = cl.fit_climatology(never, ts, 60)
  assert np.isfinite(clim).all() and (clim == 2.0).all()  # channel mean for a cell never seen


# --- hand-checked pieces ------------------------------------------------------------------------

def test_level_and_completion_by_hand():
  clim = np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 2, 1)
  obs = np.array([[2.0, 6.0], [np.nan, np.nan]]).reshape(1, 2, 2, 1)
  mask = np.array([[[1.0, 1.0], [0.0, 0.0]]])
  num, den = cl.level_sums(obs, mask, clim, "sum")
  assert (num, den) == (8.0, 3.0)
  ratio = cl.level_factors(num, den, "sum")
  np.testing.assert_allclose(ratio, [[8 / 3]])
  out = cl.complete_coarse(obs, mask, clim, ratio, "sum")[0, :, :, 0]
  np.testing.assert_allclose(out, [[2.0, 6.0], [8.0, 32 / 3]])
  num, den = cl.level_sums(obs, mask, clim, "mean")
  assert (num, den) == (5.0, 2.0)  # (2 - 1) + (6 - 2) over 2 cells
  offset = cl.level_factors(num, den, "mean")
  out = cl.complete_coarse(obs, mask, clim, offset, "mean")[0, :, :, 0]
  np.testing.assert_allclose(out, [[2.0, 6.0], [5.5, 6.5]])
  # Clipped ratio, ~0 denominator, nothing observed.
  np.testing.assert_allclose(cl.level_factors(np.array([[100.0]]), np.array([[3.0]]), "sum"), 10.0)
  np.testing.assert_allclose(cl.level_factors(np.array([[0.0]]), np.array([[3.0]]), "sum"), 0.1)
  np.testing.assert_allclose(
      cl.level_factors(np.array([[100.0]]), np.array([[3.0]]), "sum", ratio_clip=(0.2, 5.0)), 5.0)
  np.testing.assert_allclose(cl.level_factors(np.array([[4.0]]), np.array([[0.0]]), "sum"), 1.0)
  np.testing.assert_allclose(cl.level_factors(np.array([[0.0]]), np.array([[0.0]]), "mean"), 0.0)


def test_window_sums_by_hand():
  ts = np.array(["2016-01-01T00:00", "2016-01-01T00:30", "2016-01-01T01:00", "2016-01-01T05:00"],
                "datetime64[m]")
  num = np.array([[1.0], [2.0], [4.0], [8.0]])
  den = np.ones((4, 1))
  n, d = cl.window_sums(num, den, ts, 30, window=2, decay=0.5)
  # The slice after the 4-hour gap is further back than 2 intervals from everything before it.
  np.testing.assert_allclose(n[:, 0], [1.0, 2.0 + 0.5, 4.0 + 0.5 * 2 + 0.25 * 1, 8.0])
  np.testing.assert_allclose(d[:, 0], [1.0, 1.5, 1.75, 1.0])
  n0, d0 = cl.window_sums(num, den, ts, 30, window=0, decay=0.5)
  np.testing.assert_array_equal(n0, num)


def test_split_fine_by_hand():
  clim = np.array([[1.0, 3.0], [0.0, 0.0]]).reshape(1, 2, 2, 1)
  out = cl.split_fine(np.array([8.0]).reshape(1, 1, 1, 1), clim, 2, "sum")[0, :, :, 0]
  np.testing.assert_allclose(out, [[2.0, 6.0], [0.0, 0.0]])
  out = cl.split_fine(np.array([8.0]).reshape(1, 1, 1, 1), np.zeros((1, 2, 2, 1)), 2, "sum")
  np.testing.assert_allclose(out, 2.0)  # no climatology in the block: an even split
  out = cl.split_fine(np.array([10.0]).reshape(1, 1, 1, 1), clim, 2, "mean")[0, :, :, 0]
  np.testing.assert_allclose(out, [[10.0, 12.0], [9.0, 9.0]])  # anomalies from the mean 1


# --- exact on synthetic periodic data -----------------------------------------------------------

def synthetic(aggregation, varying_level, weekly_shares=False, seed=0):
  """Four weeks of 30-minute maps with about 10% of the slices dropped, then a further week.

  sum: truth = level[slot] * g[slice] * share[cell]; mean: level[slot] + 10 (g[slice] - 1) +
  anomaly[cell].
  varying_level: g random per slice everywhere; otherwise neutral in training and one constant
  afterwards. weekly_shares: the shares (anomalies) differ from slot to slot of the week, so that
  a wrong slot cannot be absorbed by the level.
  Returns (fine (T, 4, 6, 2), timestamps, number of training slices).
  """
  rng = np.random.default_rng(seed)
  n_all = 35 * 48
  ts = T0 + np.arange(n_all) * np.timedelta64(30, "m")
  keep = np.sort(rng.choice(n_all, int(0.9 * n_all), replace=False))
  ts = ts[keep]
  n_train = int(np.searchsorted(ts, T0 + np.timedelta64(28, "D")))
  slot = np.array([d.weekday() * 48 + (d.hour * 60 + d.minute) // 30
                   for d in ts.astype(datetime.datetime)])
  assert len(np.unique(slot[:n_train])) == 336  # every slot has training data
  level = rng.uniform(1.0, 50.0, (336, 1, 1, 2))[slot]
  if varying_level:
    g = rng.uniform(0.5, 2.0, (len(ts), 1, 1, 1))
  else:
    g = np.where(np.arange(len(ts)) < n_train, 1.0, 1.7)[:, None, None, None]
  pattern = (336, 4, 6, 2) if weekly_shares else (1, 4, 6, 2)
  if aggregation == "sum":
    share = rng.uniform(0.0, 1.0, pattern)
    fine = level * g * (share[slot] if weekly_shares else share)
  else:
    anomaly = rng.normal(0.0, 5.0, pattern)
    fine = level + 10 * (g - 1) + (anomaly[slot] if weekly_shares else anomaly)
  return fine.astype(np.float64), ts, n_train


@pytest.mark.parametrize("aggregation", ["sum", "mean"])
@pytest.mark.parametrize("varying_level", [True, False])
@pytest.mark.parametrize("weekly_shares", [False, True])
def test_exact_on_synthetic_periodic_series(aggregation, varying_level, weekly_shares):
  fine, ts, n_train = synthetic(aggregation, varying_level, weekly_shares)
  coarse = coarsen.coarsen(fine, 2, aggregation)
  rng = np.random.default_rng(3)
  mask = (rng.random(coarse.shape[:3]) > 0.5).astype(np.float32)
  mask[:, 0, 0] = 1  # every slice sees at least one cell
  obs = np.where(mask[..., None] > 0, coarse, np.nan)
  view = make_view(obs, mask, ts, 30, 2, aggregation, fine[:n_train])
  # A level that changes every slice is exact from the slice alone; a steady one also through
  # the window of earlier slices.
  method = ClimatologyBaseline(level_window=0 if varying_level else 6)
  sl = np.arange(n_train + 10, len(ts))
  rec = method.reconstruct(view, sl)
  assert rec["samples"] is None and rec["coarse"].dtype == rec["fine"].dtype == np.float32
  np.testing.assert_allclose(rec["coarse"], coarse[sl], rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(rec["fine"], fine[sl], rtol=1e-5, atol=1e-4)


def test_gaps_do_not_move_slots():
  # Dropping evaluated slices changes their indices, not their slots: each kept slice is
  # reconstructed exactly as in the full series (same training split, level from the slice alone).
  fine, ts, n_train = synthetic("sum", True, weekly_shares=True)
  rng = np.random.default_rng(4)
  fine = fine * rng.uniform(0.5, 1.5, fine.shape)  # no longer exactly periodic
  coarse = coarsen.coarsen(fine, 2, "sum")
  mask = (rng.random(coarse.shape[:3]) > 0.4).astype(np.float32)
  obs = np.where(mask[..., None] > 0, coarse, np.nan)
  after = np.arange(n_train, len(ts))
  kept = np.sort(rng.choice(after, len(after) // 2, replace=False))
  keep = np.concatenate([np.arange(n_train), kept])
  full = make_view(obs, mask, ts, 30, 2, "sum", fine[:n_train])
  gapped = make_view(obs[keep], mask[keep], ts[keep], 30, 2, "sum", fine[:n_train])
  a = ClimatologyBaseline(level_window=0).reconstruct(full, kept)
  b = ClimatologyBaseline(level_window=0).reconstruct(gapped, np.arange(n_train, len(keep)))
  np.testing.assert_array_equal(a["coarse"], b["coarse"])
  np.testing.assert_array_equal(a["fine"], b["fine"])
  # Index arithmetic would have put these slices in other slots.
  assert (cl.slot_index(ts[keep], 30, 336) != np.arange(len(keep)) % 336).any()


# --- real data: hidden values, consistency, caching ---------------------------------------------

@pytest.mark.parametrize("junk", ["big", "nan", "random"])
def test_never_reads_hidden_values(nytaxi_task, junk):
  task = nytaxi_task
  mask, _ = evaluate.eval_mask(task, patterns.parse_pattern("random:0.6"), base_seed=0)
  lo = task.split.val_start
  sl = np.arange(lo, lo + 200)  # the window of the first slices reaches into train
  clean = ClimatologyBaseline().reconstruct(task_view(task, mask), sl)
  rng = np.random.default_rng(5)
  value = {"big": lambda shape: np.full(shape, 1e6, np.float32),
           "nan": lambda shape: np.full(shape, np.nan, np.float32),
           "random": lambda shape: rng.normal(0, 1e4, shape).astype(np.float32)}[junk]
  coarse_obs = task.coarse_phys.copy()
  hidden = mask == 0
  coarse_obs[hidden] = value(coarse_obs[hidden].shape)
  fine = task.fine_phys.copy()
  fine[lo:] = value(fine[lo:].shape)  # every fine value outside the train split
  s = task.series
  view = make_view(coarse_obs, mask, s.timestamps, s.interval_minutes, task.scale, s.aggregation,
                   fine[:lo], fine=fine)
  dirty = ClimatologyBaseline().reconstruct(view, sl)
  np.testing.assert_array_equal(dirty["coarse"], clean["coarse"])
  np.testing.assert_array_equal(dirty["fine"], clean["fine"])


@pytest.mark.parametrize("aggregation", ["sum", "mean"])
def test_fine_pools_to_coarse_and_observed_cells_are_kept(nytaxi_task, aggregation):
  task = nytaxi_task
  s = task.series
  mask, _ = evaluate.eval_mask(task, patterns.parse_pattern("fixed:0.6"), base_seed=0)
  coarse = coarsen.coarsen(task.fine_phys, task.scale, aggregation)
  obs = np.where(mask[..., None] > 0, coarse, np.nan).astype(np.float32)
  view = make_view(obs, mask, s.timestamps, s.interval_minutes, task.scale, aggregation,
                   task.fine_phys[:task.split.val_start])
  sl = np.arange(task.split.test_start, task.split.test_start + 300)
  rec = ClimatologyBaseline().reconstruct(view, sl)
  assert rec["coarse"].shape == (300, 8, 6, 2) and rec["fine"].shape == (300, 16, 12, 2)
  assert np.isfinite(rec["fine"]).all()
  seen = np.broadcast_to(mask[sl][..., None] > 0, rec["coarse"].shape)
  np.testing.assert_array_equal(rec["coarse"][seen], obs[sl][seen])
  np.testing.assert_allclose(coarsen.coarsen(rec["fine"].astype(np.float64), task.scale,
                                             aggregation),
                             rec["coarse"], rtol=1e-5, atol=1e-4)


def test_climatology_is_fitted_once_per_training_split(nytaxi_task):
  task = nytaxi_task
  mask, _ = evaluate.eval_mask(task, patterns.parse_pattern("fixed:0.2"), base_seed=0)
  method = ClimatologyBaseline()
  view = task_view(task, mask)
  first = method.fit(view)
  assert method.fit(view) is first
  mask2, _ = evaluate.eval_mask(task, patterns.parse_pattern("random:0.4"), base_seed=0)
  other_mask = task_view(task, mask2)
  other_mask.train_fine = view.train_fine  # the same training arrays under another pattern
  assert method.fit(other_mask) is first
  half = view.train_fine * 0.5
  refit = method.fit(make_view(view.coarse_obs, mask, view.timestamps, 30, 2, "sum", half))
  assert refit is not first and refit.period == 336
  np.testing.assert_allclose(refit.fine, first.fine * 0.5)
