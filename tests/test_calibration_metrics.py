"""CRPS (fair estimator), Weibull intervals and the calibration metrics of `PooledMetrics`
(docs/evaluation.md, "Metrics" and "Calibration"): against scoringrules, closed forms and
ensembles whose calibration is known by construction."""
import json
import math

import numpy as np
import pytest

from diffrecon_jax import metrics


def _gaussian_ensemble(seed, n_cells, n_members, width=1.0):
  """Truth and members drawn from the same per-cell Gaussian (heteroscedastic over cells); the
  members' spread multiplied by `width` (1 = calibrated). -> (samples (S, n), truth (n,))."""
  rng = np.random.default_rng(seed)
  mu = rng.normal(0.0, 5.0, n_cells)
  sigma = rng.lognormal(0.0, 0.5, n_cells)  # spreads differ over cells, as in flows
  truth = mu + sigma * rng.standard_normal(n_cells)
  samples = mu + width * sigma * rng.standard_normal((n_members, n_cells))
  return samples, truth


def _pooled(samples, truth, **kw):
  m = metrics.PooledMetrics()
  m.update(np.median(samples, 0), truth, samples=samples, **kw)
  return m


# --- CRPS ------------------------------------------------------------------------------------

@pytest.mark.parametrize("estimator", ["fair", "nrg"])
def test_crps_equals_scoringrules(estimator):
  import scoringrules as sr  # pylint: disable=import-outside-toplevel  # the "test" extra
  rng = np.random.default_rng(1)
  samples, truth = rng.gamma(0.7, 3.0, (7, 5, 4)), rng.gamma(0.7, 3.0, (5, 4))
  samples[:3, 0, 0] = truth[0, 0] = 0.0  # exact ties, as flows have
  # scoringrules: observation first, ensemble on the last axis unless m_axis says otherwise
  ref = sr.crps_ensemble(truth, samples, m_axis=0, estimator=estimator, backend="numpy")
  np.testing.assert_allclose(metrics.crps_per_cell(samples, truth, estimator), ref, rtol=1e-10,
                             atol=1e-12)
  ref_last = sr.crps_ensemble(truth, np.moveaxis(samples, 0, -1), estimator=estimator,
                              backend="numpy")
  np.testing.assert_allclose(metrics.crps_per_cell(samples, truth, estimator), ref_last,
                             rtol=1e-10, atol=1e-12)


def test_crps_fair_by_hand_and_one_sample_is_the_absolute_error():
  # samples {0, 2}, y = 1: mean|x - y| = 1, sum_{i!=j}|x_i - x_j| = 4, / (2*2*1) -> 1 - 1 = 0
  assert metrics.crps_per_cell(np.array([[0.0], [2.0]]), np.array([1.0]))[0] == pytest.approx(0)
  # the empirical (nrg) estimator: 1 - 4 / (2*4) = 0.5
  assert metrics.crps_per_cell(np.array([[0.0], [2.0]]), np.array([1.0]), "nrg")[0] == (
      pytest.approx(0.5))
  for est in ("fair", "nrg"):
    assert metrics.crps_per_cell(np.array([[3.0, -1.0]]), np.array([1.0, 1.0]), est).tolist() == (
        [2.0, 2.0])
  with pytest.raises(ValueError, match="estimator"):
    metrics.crps_per_cell(np.zeros((2, 1)), np.zeros(1), "pwm")


def test_fair_crps_of_a_large_gaussian_ensemble_approaches_the_closed_form():
  rng = np.random.default_rng(2)
  sigma = 2.5
  truth = np.linspace(-3.0, 3.0, 13) * sigma  # |z| from 0 to 3
  eps = rng.standard_normal(20_000)
  eps = (eps - eps.mean()) / eps.std()  # the sampling noise of the mean and spread removed
  samples = sigma * np.repeat(eps[:, None], truth.size, axis=1)
  z = truth / sigma
  phi = np.exp(-z ** 2 / 2) / math.sqrt(2 * math.pi)
  cdf = 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))
  exact = sigma * (z * (2 * cdf - 1) + 2 * phi - 1 / math.sqrt(math.pi))
  np.testing.assert_allclose(metrics.crps_per_cell(samples, truth), exact, rtol=0.01)


def test_nrg_is_biased_up_for_two_members_while_fair_is_not():
  # truth and 2 members from N(0, 1): the expected CRPS of N(0, 1) at such a truth is 1/sqrt(pi)
  rng = np.random.default_rng(3)
  samples, truth = rng.standard_normal((2, 200_000)), rng.standard_normal(200_000)
  expected = 1 / math.sqrt(math.pi)
  fair = metrics.crps_per_cell(samples, truth, "fair").mean()
  nrg = metrics.crps_per_cell(samples, truth, "nrg").mean()
  assert fair == pytest.approx(expected, rel=0.01)
  assert nrg == pytest.approx(1.5 * expected, rel=0.01)  # E|X-y| - E|X-X'|/4: 50% too high
  m = _pooled(samples, truth)
  assert m.crps == pytest.approx(fair)  # the pooled score is the fair one


# --- Weibull quantiles and intervals ----------------------------------------------------------

def test_weibull_quantiles_match_numpy_and_s19_gives_min_max_at_90():
  rng = np.random.default_rng(4)
  samples = rng.normal(size=(19, 6, 3))
  qs = [0.0, 0.01, 0.05, 0.25, 0.5, 0.77, 0.95, 0.99, 1.0]
  np.testing.assert_allclose(metrics.ensemble_quantile(samples, qs),
                             np.quantile(samples, qs, axis=0, method="weibull"), rtol=1e-12)
  lo, hi = metrics.ensemble_interval(samples, 0.9)
  np.testing.assert_array_equal(lo, samples.min(0))
  np.testing.assert_array_equal(hi, samples.max(0))
  # 50% with S = 19: the 5th and 15th members (positions 5/20 and 15/20)
  lo, hi = metrics.ensemble_interval(samples, 0.5)
  srt = np.sort(samples, 0)
  np.testing.assert_array_equal(lo, srt[4])
  np.testing.assert_array_equal(hi, srt[14])
  assert metrics.ensemble_quantile(samples, 0.5).shape == (6, 3)


def test_levels_wider_than_s_allows_are_clamped_to_min_max():
  samples = np.arange(5.0)[:, None]  # S = 5: [min, max] is the (5-1)/(5+1) = 67% interval
  for level in (4 / 6, 0.9, 1.0):
    lo, hi = metrics.ensemble_interval(samples, level)
    assert (lo[0], hi[0]) == (0.0, 4.0)
  lo, hi = metrics.ensemble_interval(samples, 0.5)  # positions 1.5 and 4.5 of 6 -> 0.5, 3.5
  assert (lo[0], hi[0]) == pytest.approx((0.5, 3.5))


# --- calibration of known ensembles -----------------------------------------------------------

def test_a_calibrated_ensemble_is_scored_calibrated():
  samples, truth = _gaussian_ensemble(5, 20_000, 19)
  m = metrics.PooledMetrics()
  for part in np.array_split(np.arange(truth.size), 3):  # pooled over batches
    m.update(np.median(samples[:, part], 0), truth[part], samples=samples[:, part])
  assert m.coverage_90 == pytest.approx(0.9, abs=0.01)
  assert m.coverage_50 == pytest.approx(0.5, abs=0.015)
  rel = m.reliability()
  assert rel["nominal"] == list(metrics.LEVELS)
  np.testing.assert_allclose(rel["observed"], rel["nominal"], atol=0.02)
  assert m.spread_skill == pytest.approx(1.0, abs=0.03)
  hist = np.asarray(m.rank_histogram)
  assert hist.shape == (20,) and hist.sum() == truth.size
  np.testing.assert_allclose(hist / hist.mean(), 1.0, atol=0.15)  # flat: ~1000 per bin


def test_spread_skill_is_one_for_a_calibrated_two_member_ensemble():
  # root-mean variance: unbiased at any S; a mean of per-cell std devs would read ~0.8 here and
  # lower still with spreads that vary over cells
  samples, truth = _gaussian_ensemble(6, 100_000, 2)
  assert _pooled(samples, truth).spread_skill == pytest.approx(1.0, abs=0.03)


def test_an_over_confident_ensemble_is_scored_low():
  samples, truth = _gaussian_ensemble(7, 20_000, 19, width=0.3)
  m = _pooled(samples, truth)
  assert m.coverage_90 < 0.5 and m.coverage_50 < 0.25
  assert m.spread_skill == pytest.approx(0.3, abs=0.03)
  hist = np.asarray(m.rank_histogram) / truth.size
  assert hist[0] + hist[-1] > 0.5  # U-shaped: the truth is beyond every member most of the time


def test_ties_at_zero_spread_over_the_tied_ranks_deterministically():
  samples, truth = np.zeros((8, 9000)), np.zeros(9000)  # every member and the truth 0
  samples[:, :1000] = 1.0  # and some cells where the truth is below every member
  m, again = _pooled(samples, truth), _pooled(samples, truth)
  hist = np.asarray(m.rank_histogram)
  assert m.rank_histogram == again.rank_histogram  # a fixed-seed tie break
  assert hist[0] == pytest.approx(1000 + 8000 / 9, rel=0.1)
  np.testing.assert_allclose(hist[1:], 8000 / 9, rtol=0.12)
  assert m.coverage_90 == 8 / 9  # the [0, 0] intervals hold the zero truth; [1, 1] does not


def test_hidden_and_observed_cells_are_scored_apart():
  samples = np.broadcast_to(np.arange(1.0, 20.0)[:, None, None], (19, 2, 3))  # 90%: [1, 19]
  truth = np.array([[0.0, 5.0, 10.0], [25.0, 5.0, np.nan]])  # out, in, in / out, in, not scored
  hidden = np.array([[True], [False]])  # first row under hidden coarse cells
  m = metrics.PooledMetrics()
  m.update(np.full((2, 3), 10.0), truth, samples=samples, hidden=hidden)
  assert m.coverage_90 == pytest.approx(3 / 5)
  assert m.coverage_90_hidden == pytest.approx(2 / 3)
  assert m.coverage_90_observed == pytest.approx(1 / 2)
  assert m.coverage_counts[(0.9, "observed")] == [1, 2]
  # `where` removes a hidden cell from every group
  m.update(np.full((2, 3), 10.0), truth, samples=samples, hidden=hidden,
           where=np.array([[False, True, True], [True, True, True]]))
  assert m.coverage_counts[(0.9, "hidden")] == [4, 5]
  assert m.coverage_counts[(0.9, "all")] == [6, 9]
  # without `hidden` the split is unknown
  plain = _pooled(samples, np.full((2, 3), 5.0))
  assert plain.coverage_90 == 1.0 and plain.coverage_90_hidden is None
  assert plain.coverage_90_observed is None


def test_hidden_fine_cells_follow_the_coarse_mask():
  mask = np.array([[[1, 0], [0, 1]]])  # (T=1, I=2, J=2), 1 = observed
  fine = metrics.hidden_fine_cells(mask, 2)
  assert fine.shape == (1, 4, 4, 1) and fine.dtype == bool
  np.testing.assert_array_equal(fine[0, :, :, 0], [[0, 0, 1, 1], [0, 0, 1, 1],
                                                   [1, 1, 0, 0], [1, 1, 0, 0]])


def test_given_intervals_override_the_samples_at_their_levels():
  samples, truth = _gaussian_ensemble(8, 2000, 19)
  m = metrics.PooledMetrics()
  # recalibrated 90% interval that misses every truth; the other levels still from the samples
  m.update(np.median(samples, 0), truth, samples=samples,
           intervals={0.9: (truth + 1.0, truth + 2.0), 0.95: (truth - 1.0, truth + 1.0)})
  raw = _pooled(samples, truth)
  assert m.coverage_90 == 0.0 and raw.coverage_90 > 0.85
  assert m.coverage(0.95) == 1.0 and raw.coverage(0.95) is None
  assert m.coverage_50 == raw.coverage_50
  assert m.reliability()["nominal"] == list(metrics.LEVELS) + [0.95]
  # intervals alone (no samples): coverage at their levels only, crps stays the MAE
  only = metrics.PooledMetrics()
  only.update(truth, truth, intervals={0.9: (truth - 1.0, truth + 1.0)})
  assert only.coverage_90 == 1.0 and only.coverage_50 is None and only.crps == 0.0
  assert only.rank_histogram is None and only.spread_skill is None


def test_a_deterministic_method_has_crps_equal_to_mae_and_no_calibration():
  m = metrics.PooledMetrics()
  m.update(np.array([2.0, 0.0, 3.0]), np.array([1.0, 1.0, 5.0]), hidden=np.array([1, 0, 1]))
  entry = m.calibration_entry()
  assert entry["crps"] == m.mae == pytest.approx(4.0 / 3)
  assert set(entry) == {"crps", "coverage_50", "coverage_90", "coverage_90_hidden",
                        "coverage_90_observed", "spread_skill", "rank_histogram", "reliability"}
  assert all(entry[k] is None for k in entry if k != "crps")
  assert m.coverage(0.3) is None and m.reliability() is None


def test_calibration_entry_of_an_ensemble_and_the_raw_suffix():
  samples, truth = _gaussian_ensemble(9, 500, 4)
  m = _pooled(samples, truth, hidden=np.arange(500) % 2 == 0)
  entry = m.calibration_entry()
  assert all(v is not None for v in entry.values())
  assert len(entry["rank_histogram"]) == 5 and len(entry["reliability"]["observed"]) == 9
  json.dumps(entry, allow_nan=False)  # plain Python numbers and lists: results.json as it is
  raw = m.calibration_entry(suffix="_raw")
  assert sorted(raw) == sorted(k + "_raw" for k in entry)
  assert raw["coverage_90_raw"] == entry["coverage_90"]


def test_one_sample_gives_crps_and_coverage_but_no_spread():
  truth = np.array([1.0, 2.0, 3.0])
  m = metrics.PooledMetrics()
  m.update(truth, truth, samples=np.array([[1.5, 2.0, 0.0]]))
  assert m.crps == pytest.approx((0.5 + 0 + 3) / 3)  # the point forecast's absolute error
  assert m.spread_skill is None and m.rank_histogram is not None


def test_inconsistent_samples_are_refused():
  m = metrics.PooledMetrics()
  m.update(np.zeros(3), np.zeros(3), samples=np.zeros((4, 3)))
  with pytest.raises(ValueError, match="one S per accumulator"):
    m.update(np.zeros(3), np.zeros(3), samples=np.zeros((5, 3)))
  with pytest.raises(ValueError, match="samples shape"):
    m.update(np.zeros(3), np.zeros(3), samples=np.zeros((4, 2)))
  with pytest.raises(FloatingPointError, match="samples"):
    m.update(np.zeros(3), np.zeros(3), samples=np.full((4, 3), np.nan))
