"""Metrics of the evaluation contract (docs/evaluation.md; paper eqs. 35-36).

All metrics are pooled over every cell of every channel of every slice (not a mean of per-batch
means), in physical units, and skip cells whose truth is not finite. `PooledMetrics` accumulates
sums batch by batch so a split of any length is scored in constant memory.

CRPS of a sample set {x_s} against truth y, per cell, is the CRPS of the empirical distribution of
the samples: mean_s |x_s - y| - 1/(2 S^2) sum_{s,s'} |x_s - x_s'|; then pooled like MAE. A
deterministic method's prediction is a point forecast, whose CRPS is its absolute error: `crps`
then equals `mae`, so every method can be ranked on it.

Coverage of the 90% interval: the share of finite truth cells inside the per-cell [5%, 95%]
quantiles of the samples (linear interpolation between order statistics, numpy's default).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np


def crps_per_cell(samples: np.ndarray, truth: np.ndarray) -> np.ndarray:
  """Empirical CRPS. samples (S, ...), truth (...) -> (...)."""
  samples = np.asarray(samples, np.float64)
  truth = np.asarray(truth, np.float64)
  term1 = np.mean(np.abs(samples - truth[None]), axis=0)
  # sum_{s,s'} |x_s - x_s'| = 2 * sum_k (2k - S + 1) x_(k) over sorted samples (k = 0..S-1).
  s = samples.shape[0]
  sorted_s = np.sort(samples, axis=0)
  coef = (2 * np.arange(s) - s + 1).reshape((s,) + (1,) * truth.ndim)
  term2 = np.sum(coef * sorted_s, axis=0) / (s * s)
  return term1 - term2


@dataclasses.dataclass
class PooledMetrics:
  """Running sums for MAE / RMSE / CRPS over finite truth cells (optionally only masked cells)."""
  abs_sum: float = 0.0
  sq_sum: float = 0.0
  crps_sum: float = 0.0
  count: int = 0
  crps_count: int = 0
  covered: int = 0
  coverage_count: int = 0

  def update(self, pred: np.ndarray, truth: np.ndarray, where: Optional[np.ndarray] = None,
             samples: Optional[np.ndarray] = None) -> None:
    """pred, truth: same shape; where: broadcastable bool (cells to score); samples: (S, *shape)."""
    pred = np.asarray(pred, np.float64)
    truth = np.asarray(truth, np.float64)
    if pred.shape != truth.shape:
      raise ValueError(f"prediction shape {pred.shape} != truth shape {truth.shape}")
    keep = np.isfinite(truth)
    if where is not None:
      keep = keep & np.broadcast_to(np.asarray(where, bool), truth.shape)
    if not np.all(np.isfinite(pred[keep])):
      raise FloatingPointError("prediction contains NaN/Inf at scored cells")
    err = (pred - truth)[keep]
    self.abs_sum += float(np.abs(err).sum())
    self.sq_sum += float((err ** 2).sum())
    self.count += int(keep.sum())
    if samples is not None:
      c = crps_per_cell(samples, np.where(keep, truth, 0.0))
      self.crps_sum += float(c[keep].sum())
      self.crps_count += int(keep.sum())
      lo, hi = np.quantile(np.asarray(samples, np.float64), [0.05, 0.95], axis=0)
      inside = (truth >= lo) & (truth <= hi)
      self.covered += int(inside[keep].sum())
      self.coverage_count += int(keep.sum())

  @property
  def mae(self) -> Optional[float]:
    return self.abs_sum / self.count if self.count else None

  @property
  def rmse(self) -> Optional[float]:
    return math.sqrt(self.sq_sum / self.count) if self.count else None

  @property
  def crps(self) -> Optional[float]:
    """CRPS of the sample sets; for a method that gave no samples, its MAE (a point forecast)."""
    if self.crps_count:
      return self.crps_sum / self.crps_count
    return self.mae

  @property
  def coverage_90(self) -> Optional[float]:
    """Share of truth cells inside the samples' 5-95% interval; None without samples."""
    return self.covered / self.coverage_count if self.coverage_count else None


def mae(pred, truth) -> float:
  m = PooledMetrics()
  m.update(pred, truth)
  return m.mae


def rmse(pred, truth) -> float:
  m = PooledMetrics()
  m.update(pred, truth)
  return m.rmse
