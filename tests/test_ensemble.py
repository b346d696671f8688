"""Ensemble members that carry the completion's uncertainty (`sampling.ensemble="members"`) and
their recalibration on the validation split (`calibration.py`): on the real sampling path with
tiny untrained denoisers, and on synthetic scores with a known answer."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffrecon_jax import evaluate, metrics
from diffrecon_jax.diffrecon import calibration
from diffrecon_jax.models import diffusion
from diffrecon_jax.data import coarsen
from tests import _train_helpers as helpers


def _members_config(n_samples=3, point="posterior_mean", ensemble="members"):
  config = helpers.tiny_config()
  config.sampling.steps = 3
  config.sampling.n_samples = n_samples
  config.sampling.point = point
  config.sampling.ensemble = ensemble
  config.eval.batch_size = 8
  return config


def _reconstruct(config, pattern="random:0.4", n=10):
  task = helpers.tiny_task()
  method = helpers.tiny_diffrecon(config, task)
  lo, _ = task.split.range("test")
  slices = np.arange(lo, lo + n)
  mask, _ = evaluate.eval_mask(task, evaluate.patterns_lib.parse_pattern(pattern), 0)
  return task, method, mask, slices, method.reconstruct(evaluate.observe(task, mask), slices)


@pytest.mark.parametrize("point", ["posterior_mean", "median"])
def test_members_complete_hidden_cells_differently_and_pool_to_their_own_completion(point):
  task, _, mask, slices, rec = _reconstruct(_members_config(point=point))
  n = task.scale
  members_c, members_f = rec["coarse_samples"], rec["samples"]
  assert members_c.shape == (3, len(slices)) + task.coarse_shape + (task.channels,)
  assert members_f.shape == (3, len(slices)) + task.fine_shape + (task.channels,)
  observed = np.broadcast_to((mask[slices] > 0.5)[..., None], rec["coarse"].shape)
  truth_c = task.coarse_phys[slices]
  tol = dict(rtol=1e-5, atol=1e-5 * float(np.abs(truth_c).max()))
  for s in range(3):
    # Observed coarse cells exact in every member; the fine member pools to its own completion.
    np.testing.assert_allclose(members_c[s][observed], truth_c[observed], **tol)
    np.testing.assert_allclose(coarsen.coarsen(members_f[s], n, "sum"), members_c[s],
                               err_msg=f"member {s}", **tol)
  # Members differ at hidden coarse cells (the completion's uncertainty reaches the members).
  spread = np.abs(members_c[1] - members_c[0])[~observed]
  assert spread.mean() > 10 * tol["atol"], spread.mean()
  # The point estimate pools to the point completion, which keeps the observed cells.
  np.testing.assert_allclose(coarsen.coarsen(rec["fine"], n, "sum"), rec["coarse"], **tol)
  np.testing.assert_allclose(rec["coarse"][observed], truth_c[observed], **tol)


def test_members_keep_the_point_estimate_of_the_shared_completion_sampler():
  """The one-pass posterior point (completion and fine map) does not depend on how the members
  are drawn: switching to members cannot make the point estimate worse."""
  *_, shared = _reconstruct(_members_config(ensemble="shared_completion"))
  *_, members = _reconstruct(_members_config(ensemble="members"))
  for key in ("coarse", "fine"):
    np.testing.assert_allclose(members[key], shared[key], rtol=1e-5,
                               atol=1e-5 * float(np.abs(shared[key]).max()))


def test_a_members_noise_is_shared_by_every_slice_of_the_batch():
  """share_noise_over_batch: sample s of every input draws the same noise, so with a denoiser
  that ignores its input each sample is one map repeated over the batch, and samples differ."""
  sched = diffusion.make_schedule("quad", 10)
  denoise = lambda x, t, c: jnp.zeros_like(x) + 0.1 * x
  out = diffusion.sample_many(denoise, None, sched, (5, 4, 3), jax.random.key(0), n_samples=3,
                              method="ddim", num_steps=4, eta=1.0, return_samples=True,
                              share_noise_over_batch=True)["samples"]
  np.testing.assert_array_equal(out, np.broadcast_to(out[:, :1], out.shape))
  assert np.abs(out[1] - out[0]).max() > 1e-3
  independent = diffusion.sample_many(denoise, None, sched, (5, 4, 3), jax.random.key(0),
                                      n_samples=3, method="ddim", num_steps=4, eta=1.0,
                                      return_samples=True)["samples"]
  assert np.abs(independent[:, 1] - independent[:, 0]).max() > 1e-3


# ---- recalibration -----------------------------------------------------------------------------

def test_fit_from_scores_recovers_a_known_under_dispersion():
  """Errors ~ N(0, (2 sd)^2) where the members' std is sd: the spread scale is 2 (spread-skill
  1 after it, with S -> large) and the 90% interval scale is 2 x 1.645."""
  rng = np.random.default_rng(0)
  sd = rng.uniform(0.5, 3.0, 200_000)
  err = rng.normal(0.0, 2.0 * sd)
  scores = {g: (np.abs(err), sd) for g in ("fine_hidden", "fine_observed")}
  spread, interval, floor = calibration.fit_from_scores(scores, n_samples=10 ** 6)
  rmse_over_mean_sd = np.sqrt(np.mean(err ** 2)) / np.sqrt(np.mean(sd ** 2))
  assert spread["fine_hidden"] == pytest.approx(rmse_over_mean_sd, rel=1e-6)
  assert spread["fine_hidden"] == pytest.approx(2.0, rel=0.01)
  assert interval["fine_hidden"][-1] == pytest.approx(2 * 1.6449, rel=0.02)
  assert interval["fine_hidden"][4] == pytest.approx(2 * 0.6745, rel=0.02)  # 50%
  assert "coarse_hidden" not in interval  # no member completions given: left out
  with pytest.raises(ValueError, match="no validation cells"):
    calibration.fit_from_scores({"fine_observed": (np.abs(err), sd),
                                 "fine_hidden": (np.zeros(0), np.zeros(0))}, 8)


def test_conformal_quantile_covers_at_least_the_level():
  scores = np.arange(1, 101, dtype=float)
  assert calibration.conformal_quantile(scores, 0.9) == 91.0  # ceil(101 * 0.9) = 91st
  assert calibration.conformal_quantile(scores, 0.999) == 100.0


def _toy_calibration(k_hidden=2.0, k_observed=0.5):
  levels = calibration.LEVELS
  return calibration.Calibration(
      spread_scale={"fine_hidden": k_hidden, "fine_observed": k_observed},
      interval_scale={"fine_hidden": [1.0] * len(levels), "fine_observed": [2.0] * len(levels),
                      "coarse_hidden": [3.0] * len(levels)},
      std_floor={"fine_hidden": 1e-3, "fine_observed": 1e-3, "coarse_hidden": 1e-3},
      lower_bound=0.0, coarse_lower_bound=0.0)


def test_apply_scales_spread_per_group_and_keeps_exact_pooling():
  task, _, mask, slices, rec = _reconstruct(_members_config(n_samples=4))
  cal = _toy_calibration()
  out = cal.apply(rec, mask[slices], task.scale, "sum")
  raw, members = rec["samples"], out["samples"]
  np.testing.assert_array_equal(out["samples_raw"], raw)
  hidden = np.broadcast_to(metrics.hidden_fine_cells(mask[slices], task.scale),
                           rec["fine"].shape)
  ratio = members.std(axis=0) / np.maximum(raw.std(axis=0), 1e-9)
  big = raw.std(axis=0) > 1e-2
  np.testing.assert_allclose(ratio[hidden & big], 2.0, rtol=1e-3)
  np.testing.assert_allclose(ratio[~hidden & big], 0.5, rtol=1e-3)
  # Centred on the point estimate; member s pools to its calibrated completion, observed exact.
  np.testing.assert_allclose(members.mean(axis=0), rec["fine"], rtol=1e-4, atol=1e-3)
  tol = dict(rtol=1e-4, atol=1e-4 * float(np.abs(rec["coarse"]).max()))
  observed = np.broadcast_to((mask[slices] > 0.5)[..., None], rec["coarse"].shape)
  for s in range(4):
    np.testing.assert_allclose(coarsen.coarsen(members[s], task.scale, "sum"),
                               out["coarse_samples"][s], **tol)
    np.testing.assert_allclose(out["coarse_samples"][s][observed], rec["coarse"][observed], **tol)
  # Intervals: point -/+ q std, never below the lower bound; exact at observed coarse cells.
  lo, hi = out["intervals"][0.9]
  std = raw.astype(np.float64).std(axis=0, ddof=1)
  want = np.where(hidden, 1.0, 2.0) * np.maximum(std, 1e-3)
  np.testing.assert_allclose(hi, np.maximum(rec["fine"] + want, 0.0), rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(lo, np.maximum(rec["fine"] - want, 0.0), rtol=1e-4, atol=1e-3)
  c_lo, c_hi = out["coarse_intervals"][0.9]
  np.testing.assert_array_equal(c_lo[observed], c_hi[observed])
  assert np.all(c_hi[~observed] >= c_lo[~observed])
  assert np.mean(c_hi[~observed] > c_lo[~observed]) > 0.5


def test_a_pattern_gets_its_own_scales_and_others_the_pooled_ones():
  task, _, mask, slices, rec = _reconstruct(_members_config(n_samples=4))
  cal = _toy_calibration()
  cal.by_pattern = {"fixed:0.8": {"spread_scale": {"fine_hidden": 4.0},
                                  "interval_scale": {}, "std_floor": {}}}
  own = cal.for_pattern("fixed:0.8")
  assert own.spread_scale == {"fine_hidden": 4.0, "fine_observed": 0.5}  # observed: pooled
  assert cal.for_pattern("random:0.8") is cal and cal.for_pattern("") is cal
  hidden = np.broadcast_to(metrics.hidden_fine_cells(mask[slices], task.scale),
                           rec["fine"].shape)
  raw = rec["samples"]
  big = raw.std(axis=0) > 1e-2
  for pattern, k in (("fixed:0.8", 4.0), ("random:0.8", 2.0), (None, 2.0)):
    members = cal.apply(rec, mask[slices], task.scale, "sum", pattern=pattern)["samples"]
    ratio = members.std(axis=0) / np.maximum(raw.std(axis=0), 1e-9)
    np.testing.assert_allclose(ratio[hidden & big], k, rtol=1e-3)
    np.testing.assert_allclose(ratio[~hidden & big], 0.5, rtol=1e-3)


def _test_values_changed(task):
  """A copy of `task` whose test split (fine and coarse truth) holds other values."""
  lo, hi = task.split.range("test")
  changed = {}
  for name in ("fine_phys", "coarse_phys", "fine", "coarse"):
    a = np.array(getattr(task, name), copy=True)
    a[lo:hi] = a[lo:hi] * 3.0 + 7.0
    changed[name] = a
  return dataclasses.replace(task, **changed)


def test_calibration_is_fitted_on_the_validation_split_only():
  """Fitting reads the validation split: changing every test-split value changes nothing,
  and asking for the test split is refused."""
  task = helpers.tiny_task()
  method = helpers.tiny_diffrecon(_members_config(n_samples=2), task)
  specs = ("random:0.4", "fixed:0.4")
  a = calibration.fit(method, task, specs, seed=1, max_slices=6)
  b = calibration.fit(method, _test_values_changed(task), specs, seed=1, max_slices=6)
  a_json, b_json = a.to_json(), b.to_json()
  for d in (a_json, b_json):
    d["fitted_on"].pop("seconds")
  assert a_json == b_json
  assert {"fine_observed", "fine_hidden", "coarse_hidden"} <= set(a.spread_scale) <= set(
      calibration.GROUPS)
  assert all(v > 0 for v in a.spread_scale.values())
  assert a.fitted_on["cells"]["fine_hidden"] > 0
  assert set(a.by_pattern) == set(specs)  # and each pattern alone, on the same cells
  assert a.by_pattern["fixed:0.4"]["spread_scale"]["fine_observed"] > 0
  assert a.by_pattern["random:0.4"]["spread_scale"] != a.by_pattern["fixed:0.4"]["spread_scale"]
  with pytest.raises(ValueError, match="validation split only"):
    calibration.fit(method, task, specs, seed=1, split="test", max_slices=6)


def test_attach_saves_reloads_and_refits_for_another_sampler(tmp_path):
  config = _members_config(n_samples=2)
  config.calibration.val_slices = 4
  config.patterns.eval = ("random:0.4",)
  task = helpers.tiny_task()
  method = helpers.tiny_diffrecon(config, task)
  calibration.attach(method, config, tmp_path, task)
  assert (tmp_path / calibration.FILE_NAME).exists()
  first = method.calibration
  again = helpers.tiny_diffrecon(config, task)
  calibration.attach(again, config, tmp_path, lambda: pytest.fail("refitted needlessly"))
  assert again.calibration.to_json() == first.to_json()
  assert calibration.load(tmp_path, dict(method.sampler, steps=99)) is None
  config.calibration.enabled = False
  off = helpers.tiny_diffrecon(config, task)
  calibration.attach(off, config, tmp_path, task)
  assert off.calibration is None


def test_a_stride_fits_on_day_blocks_spread_over_the_split_and_refits_when_changed(tmp_path):
  task = helpers.tiny_task()
  every = calibration.validation_slices(task)
  third = calibration.validation_slices(task, stride=3)
  block = calibration.STRIDE_BLOCK
  # Whole blocks 0, 3, 6, ... of the scored validation slices: a third of them, over the split.
  expected = every[((every - every[0]) // block) % 3 == 0]
  np.testing.assert_array_equal(third, expected)
  assert len(evaluate.contiguous_pieces(third)) == -(-len(every) // (3 * block))
  assert third[-1] - third[0] > 0.6 * (every[-1] - every[0])
  np.testing.assert_array_equal(calibration.validation_slices(task, stride=1), every)
  # A stride never keeps fewer than MIN_STRIDE_BLOCKS blocks: a short split is used whole,
  # a longer one at the largest stride (up to the asked one) that keeps them.
  short = calibration.MIN_STRIDE_BLOCKS * block
  np.testing.assert_array_equal(calibration.validation_slices(task, max_slices=short, stride=3),
                                every[:short])
  two_weeks = 14 * block
  np.testing.assert_array_equal(
      calibration.validation_slices(task, max_slices=two_weeks, stride=3),
      every[:two_weeks][((every[:two_weeks] - every[0]) // block) % 2 == 0])
  fifteen = 15 * block
  np.testing.assert_array_equal(
      calibration.validation_slices(task, max_slices=fifteen, stride=3),
      every[:fifteen][((every[:fifteen] - every[0]) // block) % 3 == 0])
  # The stride is part of what a saved calibration was fitted on.
  config = _members_config(n_samples=2)
  config.calibration.val_slices = 4
  config.calibration.val_stride = 1
  config.patterns.eval = ("random:0.4",)
  method = helpers.tiny_diffrecon(config, task)
  calibration.attach(method, config, tmp_path, task)
  assert method.calibration.fitted_on["val_stride"] == 1
  assert calibration.load(tmp_path, method.sampler, 4, stride=1) is not None
  assert calibration.load(tmp_path, method.sampler, 4, stride=2) is None


def test_recentred_crps_sums_equal_the_fair_crps_of_the_scaled_members():
  rng = np.random.default_rng(0)
  point, truth = rng.normal(size=50), rng.normal(size=50)
  members = rng.normal(size=(5, 50))
  dev = members - members.mean(axis=0)
  sums = calibration.recentred_crps_sums(point - truth, dev, grid=(0.5, 1.0, 3.0))
  for k, got in zip((0.5, 1.0, 3.0), sums):
    want = metrics.crps_per_cell(point[None] + k * dev, truth, estimator="fair").sum()
    assert got == pytest.approx(want, rel=1e-9)


def test_the_crps_rule_minimises_the_validation_crps():
  """Members whose spread is 0.5x the error's: the CRPS-optimal scale is about 2 (a bit more:
  re-centred members lose the spread of their own mean, S/(S-1) in variance, and the fair
  estimator's spread term assumes independent members), and it is the minimum of the CRPS
  curve over the grid."""
  rng = np.random.default_rng(1)
  n, s = 20_000, 8
  err = rng.normal(0.0, 1.0, n)
  members = rng.normal(0.0, 0.5, (s, n))
  group = calibration._GroupScores()
  group.add(err, *calibration.member_stats(members), np.ones(n, bool))
  spread, _, _ = calibration.fit_from_scores(
      {"fine_hidden": group.arrays(), "fine_observed": group.arrays()}, s, rule="crps")
  assert 1.8 < spread["fine_hidden"] < 2.8, spread
  assert spread["fine_hidden"] == calibration.SPREAD_GRID[int(np.argmin(group.crps))]


def test_unseen_cells_are_hidden_through_the_whole_window_and_get_their_own_group():
  mask = np.ones((6, 2, 2), np.float32)
  mask[:, 0, 0] = 0            # a fixed sensor's gap: hidden in every slice
  mask[5, 1, 1] = 0            # hidden now, observed before
  unseen = calibration.unseen_cells(mask, np.array([4, 5]), history=2)
  np.testing.assert_array_equal(unseen[1], [[True, False], [False, False]])
  labels = calibration.fine_groups(mask[[4, 5]], unseen, 2, (2, 4, 4, 1))
  assert labels[1, 0, 0, 0] == 2 and labels[1, 3, 3, 0] == 1 and labels[1, 0, 3, 0] == 0
  assert labels[0, 3, 3, 0] == 0  # slice 4: (1, 1) observed
  # Without validation cells of its own, the unseen group is served by the hidden group.
  cal = _toy_calibration()
  assert cal.group("fine_unseen") == "fine_hidden" and cal.group("fine_observed") == "fine_observed"
  # ... and the other way round: fixed patterns alone hide every cell through its window.
  del cal.spread_scale["fine_hidden"]
  cal.spread_scale["fine_unseen"] = 3.0
  assert cal.group("fine_hidden") == "fine_unseen"
