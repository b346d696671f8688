"""Metrics of the evaluation contract (docs/evaluation.md; paper eqs. 35-36).

All metrics are pooled over every cell of every channel of every slice (not a mean of per-batch
means), in physical units, and skip cells whose truth is not finite. `PooledMetrics` accumulates
running sums batch by batch, so a split of any length is scored in constant memory: nothing per
cell is kept across updates.

CRPS of a sample set {x_1..x_S} against truth y, per cell, with the *fair* ensemble estimator

  mean_i |x_i - y|  -  sum_{i != j} |x_i - x_j| / (2 S (S - 1)),

which is unbiased for the CRPS of the distribution the samples are drawn from (scoringrules'
`crps_ensemble(..., estimator="fair")`). The plain empirical ("nrg") estimator divides by 2 S^2
instead and scores the S-point empirical distribution: it penalises small ensembles for their
size (a calibrated 2-member Gaussian ensemble scores 1.5x its distribution's CRPS). One sample
(S = 1) is a point forecast whose CRPS is its absolute error; a deterministic method's `crps` is
its `mae`.

Quantiles of an ensemble use Weibull plotting positions: the k-th smallest of S samples stands
at probability k / (S + 1) (numpy's `method="weibull"`), linear in between. For S exchangeable
members of a calibrated ensemble the truth falls below the k-th member with probability exactly
k / (S + 1), so the central interval at level (S - 1) / (S + 1) is exactly [min, max] and holds
the truth with that probability (S = 19: 90%). A wider level than (S - 1) / (S + 1) cannot be
had from S samples: its interval is clamped to [min, max] (and under-covers by construction).

Calibration (sampling methods): coverage of the central intervals at the levels `LEVELS`, over
all scored cells and split into fine cells under hidden / observed coarse cells; spread-skill;
the rank histogram of the truth among the samples. See `PooledMetrics`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Optional

import numpy as np

# Nominal levels of the central intervals whose coverage is scored (the reliability curve).
LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
CELL_GROUPS = ("all", "hidden", "observed")


def _level_key(level: float) -> float:
  """Levels as dict keys: 0.9 and 0.9000000001 are the same level."""
  return round(float(level), 6)


def pair_abs_sum(sorted_s: np.ndarray) -> np.ndarray:
  """sum_{i,j} |x_i - x_j| over the members of samples sorted along axis 0: (S, ...) -> (...).

  = 2 * sum_k (2k - S + 1) x_(k) over the sorted samples (k = 0..S-1): O(S log S) with the
  sort instead of the S^2 pairs."""
  s = sorted_s.shape[0]
  coef = (2 * np.arange(s) - s + 1).reshape((s,) + (1,) * (sorted_s.ndim - 1))
  return 2.0 * np.sum(coef * sorted_s, axis=0)


def _sorted_crps(sorted_s: np.ndarray, truth: np.ndarray, estimator: str) -> np.ndarray:
  """CRPS from samples sorted along axis 0: (S, ...) and truth (...) -> (...)."""
  s = sorted_s.shape[0]
  term1 = np.mean(np.abs(sorted_s - truth[None]), axis=0)
  if s == 1:
    return term1  # a point forecast: its absolute error (the fair estimator is 0 / 0 there)
  pair_sum = pair_abs_sum(sorted_s)
  if estimator == "fair":
    return term1 - pair_sum / (2.0 * s * (s - 1))
  if estimator == "nrg":
    return term1 - pair_sum / (2.0 * s * s)
  raise ValueError(f"unknown CRPS estimator {estimator!r}; use 'fair' or 'nrg'")


def crps_per_cell(samples: np.ndarray, truth: np.ndarray, estimator: str = "fair") -> np.ndarray:
  """Ensemble CRPS per cell. samples (S, ...), truth (...) -> (...) float64.

  estimator: "fair" (unbiased for the samples' distribution; the contract's) or "nrg" (the CRPS
  of the S-point empirical distribution). S == 1 gives the absolute error with either.
  """
  samples = np.asarray(samples, np.float64)
  truth = np.asarray(truth, np.float64)
  if samples.shape[1:] != truth.shape:
    raise ValueError(f"samples shape {samples.shape} is not (S, *{truth.shape})")
  return _sorted_crps(np.sort(samples, axis=0), truth, estimator)


def _weibull_from_sorted(sorted_s: np.ndarray, qs) -> np.ndarray:
  """Weibull quantiles of samples sorted along axis 0: (S, ...) -> (len(qs), ...)."""
  s = sorted_s.shape[0]
  qs = np.asarray(qs, np.float64).reshape(-1)
  if np.any((qs < 0) | (qs > 1)):
    raise ValueError(f"quantile levels must lie in [0, 1], got {qs}")
  # 0-based position of probability q: q (S + 1) - 1, clamped to the extreme members; snapped to
  # 1e-9 so that 0.05 * 20 - 1 hits the order statistic itself, not a hair beside it.
  pos = np.clip(np.round(qs * (s + 1) - 1.0, 9), 0.0, s - 1.0)
  below = np.floor(pos).astype(np.int64)
  above = np.minimum(below + 1, s - 1)
  frac = (pos - below).reshape((-1,) + (1,) * (sorted_s.ndim - 1))
  return sorted_s[below] + frac * (sorted_s[above] - sorted_s[below])


def ensemble_quantile(samples: np.ndarray, q) -> np.ndarray:
  """Per-cell quantile(s) of an ensemble with Weibull plotting positions (numpy's "weibull").

  samples (S, ...); q a float or a sequence of floats in [0, 1] -> (...) or (len(q), ...).
  The k-th smallest sample is the k / (S + 1) quantile; below 1 / (S + 1) and above S / (S + 1)
  the quantile is clamped to the smallest / largest sample.
  """
  out = _weibull_from_sorted(np.sort(np.asarray(samples, np.float64), axis=0), q)
  return out[0] if np.ndim(q) == 0 else out


def ensemble_interval(samples: np.ndarray, level: float) -> tuple:
  """The per-cell central interval at `level` of an ensemble: (lo, hi), each (...).

  samples (S, ...). lo / hi are the (1 -+ level) / 2 Weibull quantiles (`ensemble_quantile`):
  at level (S - 1) / (S + 1) exactly [min, max] (S = 19: the 90% interval); above it clamped to
  [min, max].
  """
  if not 0.0 <= level <= 1.0:
    raise ValueError(f"interval level must lie in [0, 1], got {level}")
  lo, hi = ensemble_quantile(samples, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
  return lo, hi


def hidden_fine_cells(mask: np.ndarray, scale: int) -> np.ndarray:
  """Fine cells lying under hidden coarse cells.

  mask (..., I, J): 1 = coarse cell observed; scale: N -> bool (..., N*I, N*J, 1), True where the
  coarse cell above is hidden (broadcasts over the channel axis of fine maps (..., NI, NJ, C)).
  """
  hidden = np.asarray(mask) == 0
  hidden = np.repeat(np.repeat(hidden, scale, axis=-2), scale, axis=-1)
  return hidden[..., None]


@dataclasses.dataclass
class PooledMetrics:
  """Running sums for MAE / RMSE / CRPS and calibration over finite truth cells.

  Calibration needs samples (or explicit intervals) and is None without them:
  - coverage(level, cells): share of scored truth values inside the central interval at `level`
    (closed: a truth equal to an end is inside, as a zero truth inside an interval [0, 0] of a
    flow), over "all" cells or only the fine cells under "hidden" / "observed" coarse cells
    (`update`'s `hidden`); intervals are the samples' Weibull intervals (`ensemble_interval`)
    unless the method gave its own (`update`'s `intervals`).
  - spread_skill: sqrt(mean_cells var_s * (1 + 1/S)) / RMSE of the ensemble mean, with var_s the
    per-cell ensemble variance (ddof=1). For a calibrated ensemble the squared error of the
    ensemble mean has expectation var * (1 + 1/S), so the ratio is 1 (< 1: over-confident,
    > 1: under-confident). The spread is the root of the mean variance, not the mean of the
    per-cell standard deviations: the latter is biased low for small S (0.80 at S = 2) and by
    Jensen's inequality wherever the spread varies over cells (flows: zero cells beside hot spots),
    so a calibrated ensemble would read as over-confident. Needs S >= 2.
  - rank_histogram: counts of the truth's rank among the S samples, S + 1 bins (rank 0 = below
    every sample). Ties (exact zeros of flows) take a rank uniformly at random among the tied
    positions, from a generator seeded with `tie_seed`, so the result is deterministic for a
    given sequence of updates. Flat = calibrated, U = over-confident, dome = under-confident.
  """
  abs_sum: float = 0.0
  sq_sum: float = 0.0
  crps_sum: float = 0.0
  count: int = 0
  crps_count: int = 0
  n_members: Optional[int] = None  # S of the samples seen (one S per accumulator)
  spread_var_sum: float = 0.0      # sum over cells of var_s * (1 + 1/S)
  mean_sq_sum: float = 0.0         # sum over cells of (ensemble mean - truth)^2
  spread_count: int = 0
  rank_counts: Optional[np.ndarray] = None  # (S + 1,) int64
  # (level, cells) -> [covered, scored]
  coverage_counts: dict = dataclasses.field(default_factory=dict)
  tie_seed: int = 0

  def __post_init__(self):
    self._rng = np.random.default_rng(self.tie_seed)

  def update(self, pred: np.ndarray, truth: np.ndarray, where: Optional[np.ndarray] = None,
             samples: Optional[np.ndarray] = None,
             intervals: Optional[Mapping[float, tuple]] = None,
             hidden: Optional[np.ndarray] = None) -> None:
    """Adds one batch.

    Args:
      pred, truth: same shape (...); the point prediction and the truth (NaN = not scored).
      where: bool broadcastable to truth.shape: the cells to score (default all).
      samples: (S, *truth.shape) the method's ensemble: CRPS (fair), spread-skill, rank
        histogram and, at the levels `intervals` does not give, coverage of its intervals.
      intervals: {level: (lo, hi)}, lo / hi broadcastable to truth.shape: the method's own
        central intervals (for example recalibrated on the validation split); coverage at these
        levels is scored on them as given, not on the samples'.
      hidden: bool broadcastable to truth.shape, True at fine cells under hidden coarse cells
        (`hidden_fine_cells`): coverage is also pooled over hidden and observed cells apart.
    """
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
    y = truth[keep]  # (K,): from here on only the scored cells, flattened
    groups = {"all": np.ones(y.shape, bool)}
    if hidden is not None:
      h = np.broadcast_to(np.asarray(hidden, bool), truth.shape)[keep]
      groups.update(hidden=h, observed=~h)
    given = {}
    for level, (lo, hi) in (intervals or {}).items():
      lo = np.broadcast_to(np.asarray(lo, np.float64), truth.shape)[keep]
      hi = np.broadcast_to(np.asarray(hi, np.float64), truth.shape)[keep]
      if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise FloatingPointError(f"interval at level {level} contains NaN/Inf at scored cells")
      given[_level_key(level)] = (lo, hi)
    if samples is not None:
      samples = np.asarray(samples, np.float64)
      if samples.shape[1:] != truth.shape:
        raise ValueError(f"samples shape {samples.shape} is not (S, *{truth.shape})")
      s = samples.shape[0]
      if self.n_members is not None and s != self.n_members:
        raise ValueError(f"{s} samples per cell after {self.n_members}: one S per accumulator")
      self.n_members = s
      x = samples[:, keep]  # (S, K)
      if not np.all(np.isfinite(x)):
        raise FloatingPointError("samples contain NaN/Inf at scored cells")
      xs = np.sort(x, axis=0)
      self.crps_sum += float(_sorted_crps(xs, y, "fair").sum())
      self.crps_count += int(y.size)
      if s >= 2:
        self.spread_var_sum += float(np.var(x, axis=0, ddof=1).sum()) * (1.0 + 1.0 / s)
        self.mean_sq_sum += float(((x.mean(axis=0) - y) ** 2).sum())
        self.spread_count += int(y.size)
      self._add_ranks(x, y)
      missing = [lv for lv in LEVELS if _level_key(lv) not in given]
      if missing:
        qs = [q for lv in missing for q in ((1.0 - lv) / 2.0, (1.0 + lv) / 2.0)]
        bounds = _weibull_from_sorted(xs, qs)
        for k, lv in enumerate(missing):
          given[_level_key(lv)] = (bounds[2 * k], bounds[2 * k + 1])
    for level, (lo, hi) in given.items():
      inside = (y >= lo) & (y <= hi)
      for name, sel in groups.items():
        c = self.coverage_counts.setdefault((level, name), [0, 0])
        c[0] += int(inside[sel].sum())
        c[1] += int(sel.sum())

  def _add_ranks(self, x: np.ndarray, y: np.ndarray) -> None:
    """Rank of each truth among its samples, x (S, K), y (K,); ties broken at random."""
    below = np.sum(x < y, axis=0)
    ties = np.sum(x == y, axis=0)
    # uniform over the ties + 1 positions the truth could take among equal members
    rank = below + np.floor(self._rng.random(y.shape) * (ties + 1)).astype(np.int64)
    counts = np.bincount(np.minimum(rank, x.shape[0]), minlength=x.shape[0] + 1)
    self.rank_counts = counts if self.rank_counts is None else self.rank_counts + counts

  @property
  def mae(self) -> Optional[float]:
    return self.abs_sum / self.count if self.count else None

  @property
  def rmse(self) -> Optional[float]:
    return math.sqrt(self.sq_sum / self.count) if self.count else None

  @property
  def crps(self) -> Optional[float]:
    """Fair CRPS of the sample sets; for a method that gave no samples, its MAE (a point
    forecast)."""
    if self.crps_count:
      return self.crps_sum / self.crps_count
    return self.mae

  def coverage(self, level: float, cells: str = "all") -> Optional[float]:
    """Share of scored truth values inside the central interval at `level`, over "all" cells or
    the fine cells under "hidden" / "observed" coarse cells; None when no interval at that level
    (no samples, no intervals) or no such cell was scored (no `hidden` given)."""
    if cells not in CELL_GROUPS:
      raise ValueError(f"cells must be one of {CELL_GROUPS}, got {cells!r}")
    covered, n = self.coverage_counts.get((_level_key(level), cells), (0, 0))
    return covered / n if n else None

  @property
  def coverage_50(self) -> Optional[float]:
    return self.coverage(0.5)

  @property
  def coverage_90(self) -> Optional[float]:
    return self.coverage(0.9)

  @property
  def coverage_90_hidden(self) -> Optional[float]:
    return self.coverage(0.9, "hidden")

  @property
  def coverage_90_observed(self) -> Optional[float]:
    return self.coverage(0.9, "observed")

  @property
  def spread(self) -> Optional[float]:
    """sqrt(mean over cells of the ensemble variance (ddof=1) * (1 + 1/S)); None if S < 2."""
    return math.sqrt(self.spread_var_sum / self.spread_count) if self.spread_count else None

  @property
  def ensemble_mean_rmse(self) -> Optional[float]:
    """RMSE of the per-cell mean of the samples (S >= 2)."""
    return math.sqrt(self.mean_sq_sum / self.spread_count) if self.spread_count else None

  @property
  def spread_skill(self) -> Optional[float]:
    """`spread` / `ensemble_mean_rmse` (1 = calibrated); None without S >= 2 samples or when the
    ensemble mean is exact everywhere (the ratio is undefined)."""
    if not self.spread_count or self.mean_sq_sum == 0.0:
      return None
    return math.sqrt(self.spread_var_sum / self.mean_sq_sum)

  @property
  def rank_histogram(self) -> Optional[list]:
    """Counts of the truth's rank among the S samples (S + 1 ints), or None without samples."""
    return None if self.rank_counts is None else [int(c) for c in self.rank_counts]

  def reliability(self, cells: str = "all") -> Optional[dict]:
    """{"nominal": [levels], "observed": [coverage]} at every level scored, ascending; None
    when no level was."""
    levels = sorted({lv for lv, g in self.coverage_counts if g == cells
                     and self.coverage(lv, cells) is not None})
    if not levels:
      return None
    return {"nominal": levels, "observed": [self.coverage(lv, cells) for lv in levels]}

  def calibration_entry(self, suffix: str = "") -> dict:
    """The calibration keys of a results entry, each name + `suffix` ("_raw" for the raw
    ensemble beside recalibrated intervals): crps, coverage_50, coverage_90, coverage_90_hidden,
    coverage_90_observed, spread_skill, rank_histogram, reliability. A deterministic method gets
    crps == its MAE and None for the rest."""
    entry = {"crps": self.crps, "coverage_50": self.coverage_50, "coverage_90": self.coverage_90,
             "coverage_90_hidden": self.coverage_90_hidden,
             "coverage_90_observed": self.coverage_90_observed,
             "spread_skill": self.spread_skill, "rank_histogram": self.rank_histogram,
             "reliability": self.reliability()}
    return {k + suffix: v for k, v in entry.items()}


def mae(pred, truth) -> float:
  m = PooledMetrics()
  m.update(pred, truth)
  return m.mae


def rmse(pred, truth) -> float:
  m = PooledMetrics()
  m.update(pred, truth)
  return m.rmse
