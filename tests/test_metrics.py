"""Metrics checked against hand-computed cases (docs/evaluation.md)."""
import math

import numpy as np
import pytest

from diffrecon_jax import metrics


def test_mae_rmse_by_hand():
  pred = np.array([[1.0, 2.0], [3.0, 5.0]])
  truth = np.array([[1.0, 4.0], [0.0, 5.0]])
  assert metrics.mae(pred, truth) == pytest.approx((0 + 2 + 3 + 0) / 4)
  assert metrics.rmse(pred, truth) == pytest.approx(math.sqrt((0 + 4 + 9 + 0) / 4))


def test_pooled_over_cells_not_mean_of_batch_means():
  m = metrics.PooledMetrics()
  m.update(np.zeros(1), np.ones(1))          # one cell, error 1
  m.update(np.zeros(3), np.full(3, 3.0))     # three cells, error 3
  assert m.mae == pytest.approx((1 + 9) / 4)  # a mean of batch means would give 2
  assert m.rmse == pytest.approx(math.sqrt((1 + 27) / 4))


def test_where_and_nan_truth_are_skipped():
  m = metrics.PooledMetrics()
  truth = np.array([1.0, np.nan, 3.0, 10.0])
  m.update(np.array([2.0, 100.0, 3.0, 0.0]), truth, where=np.array([True, True, True, False]))
  assert m.count == 2 and m.mae == pytest.approx(0.5)
  empty = metrics.PooledMetrics()
  assert empty.mae is None and empty.rmse is None and empty.crps is None


def test_nan_prediction_at_a_scored_cell_raises():
  with pytest.raises(FloatingPointError, match="NaN"):
    metrics.mae(np.array([np.nan, 1.0]), np.array([0.0, 1.0]))


def test_crps_by_hand():
  # one sample: CRPS = |x - y|
  assert metrics.crps_per_cell(np.array([[3.0]]), np.array([1.0]))[0] == pytest.approx(2.0)
  # samples {0, 2}, y = 1: E|X-y| = 1, sum_{i!=j}|x_i - x_j| = 4 -> fair 1 - 4/(2*2*1) = 0,
  # empirical (nrg) 1 - 4/(2*2*2) = 0.5
  two = np.array([[0.0], [2.0]])
  assert metrics.crps_per_cell(two, np.array([1.0]))[0] == pytest.approx(0.0)
  assert metrics.crps_per_cell(two, np.array([1.0]), "nrg")[0] == pytest.approx(0.5)
  # equals the brute-force double sums on random data
  rng = np.random.default_rng(0)
  s, y = rng.normal(size=(6, 4, 3)), rng.normal(size=(4, 3))
  pairs = np.abs(s[:, None] - s[None]).sum((0, 1))
  np.testing.assert_allclose(metrics.crps_per_cell(s, y),
                             np.abs(s - y).mean(0) - pairs / (2 * 6 * 5), rtol=1e-10)
  np.testing.assert_allclose(metrics.crps_per_cell(s, y, "nrg"),
                             np.abs(s - y).mean(0) - pairs / (2 * 6 * 6), rtol=1e-10)


def test_crps_pooled():
  m = metrics.PooledMetrics()
  # cell 1: samples {0, 2}, y = 3: (3 + 1)/2 - 4/(2*2*1) = 1; cell 2: all 5, y = 5: 0
  samples = np.array([[0.0, 5.0], [2.0, 5.0]])
  m.update(np.median(samples, 0), np.array([3.0, 5.0]), samples=samples)
  assert m.crps == pytest.approx((1.0 + 0.0) / 2)


def test_a_point_forecast_has_crps_equal_to_its_mae_and_no_coverage():
  m = metrics.PooledMetrics()
  m.update(np.array([2.0, 0.0, 3.0]), np.array([1.0, 1.0, 5.0]))
  assert m.crps == m.mae == pytest.approx(4.0 / 3) and m.coverage_90 is None


def test_coverage_90_by_hand():
  # 19 samples 1..19 per cell: with Weibull positions k/20 the 90% interval is exactly [1, 19].
  samples = np.repeat(np.arange(1.0, 20.0)[:, None], 4, axis=1)
  truth = np.array([0.5, 1.0, 19.0, 19.5])  # outside, on the edge, on the edge, outside
  m = metrics.PooledMetrics()
  m.update(np.median(samples, 0), truth, samples=samples)
  assert m.coverage_90 == pytest.approx(0.5)
  m.update(np.median(samples, 0), np.array([10.0, 10.0, np.nan, 10.0]), samples=samples)
  assert m.coverage_90 == pytest.approx(5 / 7)  # NaN truth is not scored
