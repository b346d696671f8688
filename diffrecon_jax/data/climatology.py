"""The calendar climatology: per-cell, per-slot means of the training split rescaled to the
current level. The `climatology` reference (baselines/climatology.py) and DiffRecon's prior
(diffrecon/prior.py) are both made of these statistics.

The reference an analyst tries first on periodic urban data (docs/evaluation.md). Statistics come
from the training split only:
  - the slot of a slice is read from its TIMESTAMP (datetime64[m]), never from its index, so series
    with gaps get the right slot: slot_of_day = minutes since midnight // interval_minutes and
    slot_of_week = day_of_week * slots_per_day + slot_of_day (Monday = 0);
  - the calendar table (`TABLES`) is the slot of the day ("day": NaN-aware mean of a fine cell's
    training values at that time of day), the slot of the week ("week"), or a shrinkage blend
    ("blend:k"): the week-slot mean pulled towards the day-slot mean by a pseudo-count k,
        (sum of the n week-slot values + k * day-slot mean) / (n + k),
    so a week slot seen in few training weeks leans on the day's pattern (an empirical-Bayes
    estimate of the week-slot mean; k = 0 is "week", k -> infinity "day"). Which one is chosen
    on the validation split (`calendar_choice.choose_table`: lowest MAE under the evaluation
    patterns); "auto" without a validation split falls back to the calendar rule
    `choose_period` (the week when training spans two weeks, else the day). A week slot without
    data takes the day slot's mean; a day slot without data the cell's mean over all slots.

Completion of a slice: a hidden coarse cell takes the pooled climatology of its slot brought to the
level seen on the observed cells (`sum`: times observed total / climatology total of the observed
cells; `mean`: plus their mean offset) of the slice and, with weights halving per interval of age,
of the few slices before it; observed cells keep their values. Fine map: each completed coarse
value is split over its N x N cells by the climatology's shares of the block (`sum`) or by the
climatology's anomalies from the block mean (`mean`), so the fine map pools exactly to the
completed coarse map. Deterministic; reads coarse values only where observed and
fine values only from the training split.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from diffrecon_jax.data import coarsen as coarsen_lib
from diffrecon_jax.data import time_axis

# A climatology total (ratio denominator, block total) at or below this is treated as zero.
_EPS = 1e-6


# Calendar tables the choice is made among (`calendar_choice.choose_table`), simplest first (a
# tie keeps the simpler). The pseudo-counts span "about one training week" to "the day's pattern
# unless eight weeks say otherwise"; measured on the validation splits (nine patterns, mask seed
# 1): nytaxi (six training weeks per slot) best at k = 0.5 (mean MAE 3.384 against week 3.394,
# day 4.607), nybike at k = 2 (1.596 against week 1.620, day 1.738), the last 20 days of
# nybike (10 training days) at k = 2 (1.448 against day 1.499, week 1.635).
TABLES = ("day", "week", "blend:0.5", "blend:1", "blend:2", "blend:4", "blend:8")


def parse_table(spec: str) -> tuple:
  """"day" | "week" | "blend:k" -> (kind, k) with kind "day", "week" or "blend" and k >= 0 the
  blend's pseudo-count (0 for the other two)."""
  spec = str(spec).strip()
  if spec in ("day", "week"):
    return spec, 0.0
  if spec.startswith("blend:"):
    try:
      k = float(spec.split(":", 1)[1])
    except ValueError:
      k = -1.0
    if k >= 0 and np.isfinite(k):
      return "blend", k
  raise ValueError(f"climatology table must be 'day', 'week', 'blend:K' (K >= 0) or 'auto', "
                   f"got {spec!r}")


def choose_period(train_timestamps: np.ndarray, interval_minutes: int) -> int:
  """Number of climatology slots: the week (7 * slots per day) when the training timestamps span
  at least two weeks (last - first + one interval), the day (slots per day) otherwise."""
  ts = np.asarray(train_timestamps).astype("datetime64[m]")
  spd = time_axis.default_slots_per_day(interval_minutes)
  if ts.size == 0:
    raise ValueError("no training timestamps")
  span = int((ts.max() - ts.min()).astype(np.int64)) + int(interval_minutes)
  week = time_axis.DAYS_PER_WEEK * time_axis.MINUTES_PER_DAY
  return time_axis.DAYS_PER_WEEK * spd if span >= 2 * week else spd


def slot_index(timestamps: np.ndarray, interval_minutes: int, period: int) -> np.ndarray:
  """The climatology slot of every timestamp, from the calendar alone (`data.time_axis`).

  Args:
    timestamps: (T,) datetime64 (any unit; read as datetime64[m]).
    interval_minutes: time between consecutive slices of the series.
    period: slots per day (slot of the day) or 7 * slots per day (slot of the week).
  Returns:
    (T,) int64 in [0, period).
  """
  if int(interval_minutes) < 1:
    raise ValueError(f"interval_minutes must be a positive integer, got {interval_minutes!r}")
  spd = time_axis.default_slots_per_day(interval_minutes)
  if period == spd:
    return time_axis.slot_of_day(timestamps, spd)
  if period == time_axis.DAYS_PER_WEEK * spd:
    return time_axis.slot_of_week(timestamps, spd)
  raise ValueError(f"period {period} is neither a day ({spd} slots) nor a week "
                   f"({time_axis.DAYS_PER_WEEK * spd} slots) of {interval_minutes}-minute slices")


def _slot_sums(train_fine: np.ndarray, slots: np.ndarray, period: int) -> tuple:
  """(T, H, W, C) maps, (T,) slots -> (sums, counts) (P, H, W, C) of the finite values per slot."""
  shape = train_fine.shape[1:]
  sums = np.zeros((period,) + shape, np.float64)
  counts = np.zeros((period,) + shape, np.int64)
  for p in np.unique(slots):
    x = train_fine[slots == p]
    finite = np.isfinite(x)
    sums[p] = np.where(finite, x, 0.0).sum(axis=0, dtype=np.float64)
    counts[p] = finite.sum(axis=0)
  return sums, counts


def fit_climatology(train_fine: np.ndarray, train_timestamps: np.ndarray,
                    interval_minutes: int, table: str = "auto") -> tuple:
  """Per-cell, per-slot NaN-aware means of the training split.

  Args:
    train_fine: (T, H, W, C) physical fine maps of the training split, NaN = unobserved.
    train_timestamps: (T,) datetime64 of those maps.
    interval_minutes: time between consecutive slices.
    table: "day", "week", "blend:k" (module docstring) or "auto" (`choose_period`'s rule).
  Returns:
    (clim (P, H, W, C) float64, P): P slots of the day ("day") or of the week (the others). A
    week slot with no finite value of a cell takes the cell's day-slot mean, a day slot the
    cell's mean over all slots; a cell never observed in training takes its channel's training
    mean (0 for a channel with no finite value), so the climatology is finite everywhere.
  """
  train_fine = np.asarray(train_fine)
  if train_fine.ndim != 4 or train_fine.shape[0] != len(train_timestamps):
    raise ValueError(f"train_fine {train_fine.shape} must be (T, H, W, C) with T = "
                     f"{len(train_timestamps)} timestamps")
  spd = time_axis.default_slots_per_day(interval_minutes)
  if table == "auto":
    table = "week" if choose_period(train_timestamps, interval_minutes) != spd else "day"
  kind, shrink = parse_table(table)
  day_sums, day_counts = _slot_sums(train_fine, slot_index(train_timestamps, interval_minutes,
                                                           spd), spd)
  cell_sum, cell_count = day_sums.sum(axis=0), day_counts.sum(axis=0)
  chan_count = cell_count.sum(axis=(0, 1))
  chan_mean = np.where(chan_count > 0, cell_sum.sum(axis=(0, 1)) / np.maximum(chan_count, 1), 0.0)
  cell_mean = np.where(cell_count > 0, cell_sum / np.maximum(cell_count, 1), chan_mean)
  day = np.where(day_counts > 0, day_sums / np.maximum(day_counts, 1), cell_mean)
  if kind == "day":
    return day, spd
  period = time_axis.DAYS_PER_WEEK * spd
  sums, counts = _slot_sums(train_fine, slot_index(train_timestamps, interval_minutes, period),
                            period)
  day_of_slot = np.tile(day, (time_axis.DAYS_PER_WEEK, 1, 1, 1))  # week slot w -> day slot w % spd
  if kind == "week" or shrink == 0.0:
    return np.where(counts > 0, sums / np.maximum(counts, 1), day_of_slot), period
  return (sums + shrink * day_of_slot) / (counts + shrink), period


def level_sums(coarse_obs: np.ndarray, mask: np.ndarray, clim_coarse: np.ndarray,
               aggregation: str) -> tuple:
  """Per-slice, per-channel sums over the observed coarse cells that the level is made of.

  Args:
    coarse_obs: (n, I, J, C) observed coarse maps; read only where `mask` is 1 and finite.
    mask: (n, I, J) 1 = observed.
    clim_coarse: (n, I, J, C) pooled climatology of each slice's slot.
    aggregation: "sum" -> (sum of observed values, sum of their climatology); "mean" -> (sum of
      observed - climatology, number of observed cells).
  Returns:
    (num (n, C), den (n, C)) float64; the level of a slice is num / den (`level_factors`).
  """
  observed = (np.asarray(mask)[..., None] > 0) & np.isfinite(coarse_obs)
  obs = np.where(observed, coarse_obs, 0.0).astype(np.float64)
  clim = np.where(observed, clim_coarse, 0.0)
  if aggregation == "sum":
    return obs.sum(axis=(1, 2)), clim.sum(axis=(1, 2))
  if aggregation == "mean":
    return (obs - clim).sum(axis=(1, 2)), observed.sum(axis=(1, 2)).astype(np.float64)
  raise ValueError(f"aggregation must be 'sum' or 'mean', got {aggregation!r}")


def window_sums(num: np.ndarray, den: np.ndarray, timestamps: np.ndarray, interval_minutes: int,
                window: int, decay: float) -> tuple:
  """Adds to each slice's level sums those of the slices just before it, down-weighted with age.

  Slice t gets sum over k = 0..window of decay ** (age / interval) * sums[t - k], where age is the
  time from slice t - k to slice t read from the timestamps; earlier slices further back than
  `window` intervals (after a gap) get weight 0. Never a later slice.

  Args:
    num, den: (n, C) `level_sums` of n consecutive slices of a series.
    timestamps: (n,) their datetime64 timestamps, increasing.
    interval_minutes: time between consecutive slices.
    window: how many earlier slices may contribute (0: the slice alone).
    decay: weight of a slice one interval old.
  Returns:
    (num (n, C), den (n, C)).
  """
  ts = np.asarray(timestamps).astype("datetime64[m]").astype(np.int64)
  num_w, den_w = num.astype(np.float64), den.astype(np.float64)
  for k in range(1, int(window) + 1):
    if k >= len(ts):
      break
    age = (ts[k:] - ts[:-k]) / float(interval_minutes)
    w = np.where(age <= window, float(decay) ** age, 0.0)[:, None]
    num_w[k:] += w * num[:-k]
    den_w[k:] += w * den[:-k]
  return num_w, den_w


def level_factors(num: np.ndarray, den: np.ndarray, aggregation: str,
                  ratio_clip: tuple = (0.1, 10.0)) -> np.ndarray:
  """How far each slice sits from its climatology: (n, C) sums -> (n, C) levels.

  "sum": the ratio num / den (observed total over climatology total), 1 where den is ~0 (nothing
  observed, or a climatology of zeros), clipped to `ratio_clip`; "mean": the mean offset
  num / den, 0 where nothing is observed.
  """
  if aggregation == "sum":
    ok = np.abs(den) > _EPS
    ratio = np.where(ok, num / np.where(ok, den, 1.0), 1.0)
    # A guard, not a tuning knob. The ratio may rest on a few observed cells (about ten at 80%
    # missing) with a small climatology total, where one unusual count would scale every hidden
    # cell absurdly: the ratios of single coarse cells of nytaxi / nybike leave [0.2, 5] in 30%
    # of the validation and test cell-slices. The level of a whole map stays within 0.07-2.6
    # there (0.12-2.2 for 99.8% of the slices), so [0.1, 10] keeps real level shifts. On the
    # validation splits the bounds change no MAE at three decimals.
    return np.clip(ratio, *ratio_clip)
  if aggregation == "mean":
    return np.where(den > 0, num / np.maximum(den, 1.0), 0.0)
  raise ValueError(f"aggregation must be 'sum' or 'mean', got {aggregation!r}")


def complete_coarse(coarse_obs: np.ndarray, mask: np.ndarray, clim_coarse: np.ndarray,
                    level: np.ndarray, aggregation: str) -> np.ndarray:
  """Fills the hidden coarse cells with the climatology brought to the slice's level.

  Args:
    coarse_obs: (n, I, J, C) observed coarse maps (values where `mask` is 0 are never read).
    mask: (n, I, J) 1 = observed.
    clim_coarse: (n, I, J, C) pooled climatology of each slice's slot.
    level: (n, C) `level_factors`: ratios (sum) or offsets (mean).
    aggregation: "sum" (climatology times the ratio) or "mean" (climatology plus the offset).
  Returns:
    (n, I, J, C) float64; observed (finite) cells keep their observed values exactly.
  """
  level = np.asarray(level, np.float64)[:, None, None, :]
  if aggregation == "sum":
    fill = clim_coarse * level
  elif aggregation == "mean":
    fill = clim_coarse + level
  else:
    raise ValueError(f"aggregation must be 'sum' or 'mean', got {aggregation!r}")
  observed = (np.asarray(mask)[..., None] > 0) & np.isfinite(coarse_obs)
  return np.where(observed, coarse_obs, fill)


def split_fine(coarse: np.ndarray, clim_fine: np.ndarray, scale: int,
               aggregation: str) -> np.ndarray:
  """Spreads coarse maps over their N x N blocks in the climatology's own spatial pattern.

  Args:
    coarse: (n, I, J, C) completed coarse maps.
    clim_fine: (n, N*I, N*J, C) fine climatology of each slice's slot.
    scale: N.
    aggregation: "sum": each fine cell gets the coarse value times its share of the block's
      climatology total (an even 1/N^2 where that total is ~0); "mean": the coarse value plus the
      fine climatology's anomaly from its block mean.
  Returns:
    (n, N*I, N*J, C) float64 that pools (`coarsen.coarsen`) to `coarse`.
  """
  up = coarsen_lib.upsample_uniform(np.asarray(coarse, np.float64), scale, "mean")
  if aggregation == "sum":
    total = coarsen_lib.upsample_uniform(coarsen_lib.coarsen(clim_fine, scale, "sum"), scale,
                                         "mean")
    ok = np.abs(total) > _EPS
    share = np.where(ok, clim_fine / np.where(ok, total, 1.0), 1.0 / (scale * scale))
    return up * share
  if aggregation == "mean":
    block = coarsen_lib.upsample_uniform(coarsen_lib.coarsen(clim_fine, scale, "mean"), scale,
                                         "mean")
    return up + (clim_fine - block)
  raise ValueError(f"aggregation must be 'sum' or 'mean', got {aggregation!r}")


@dataclasses.dataclass(frozen=True)
class Climatology:
  """Fitted statistics. fine: (P, H, W, C) and coarse: (P, I, J, C) float64 (coarse = fine pooled
  by the dataset's aggregation); period P; interval_minutes of the series they were fitted on."""
  fine: np.ndarray
  coarse: np.ndarray
  period: int
  interval_minutes: int

  def slots(self, timestamps: np.ndarray) -> np.ndarray:
    return slot_index(timestamps, self.interval_minutes, self.period)


class CalendarClimatology:
  """The deterministic calendar reconstruction; `reconstruct(view, slices)` reads only the observed view.

  The view needs: coarse_obs (T, I, J, C) physical, NaN where hidden; mask (T, I, J); timestamps
  (T,) datetime64[m]; interval_minutes; scale; aggregation; train_fine (split.val_start, N*I, N*J,
  C) physical fine truth of the training split; split.val_start. The climatology is fitted on the
  first call and reused while the same training arrays are passed; other arrays trigger a refit
  (cheap: about 6 ms for the nytaxi training split, 50 ms for 80 MB of fine maps).

  Args:
    ratio_clip: bounds of the `sum` level ratio.
    level_window: earlier slices (at most this many intervals back) whose observed cells also
      count towards a slice's level, with weight level_decay ** age; 0 uses the slice alone.
    level_decay: weight of a slice one interval old.
    table: the calendar table ("day", "week", "blend:k"; "auto": `choose_period`'s rule).
  """

  # level_window 6 / level_decay 0.5, measured on the validation splits (scale 2, the nine
  # patterns, mask seed 0; mean over the patterns) against the slice alone: fine MAE 3.724 ->
  # 3.612 and hidden-cell completion MAE 13.26 -> 12.49 on nytaxi, 1.614 -> 1.603 and 4.09 ->
  # 3.99 on nybike; most at fixed:0.8 (nytaxi fine MAE 6.48 -> 6.07). The level of a city moves
  # smoothly from one half hour to the next, so recent slices steady a level seen through few
  # cells. Decay 0.5 beat 0.3 and 0.7; an undecayed window (3 or 6 slices, decay 1) gained less
  # (nytaxi 3.636, 3.689). Shrinking the ratio towards 1 as well (ratio ** 0.9: nytaxi 3.556,
  # nybike 1.601) gains only on fixed:0.6 / 0.8, i.e. on one draw of which cells are seen, and
  # loses on fixed:0.2 and random:0.2, so it is not used.
  def __init__(self, ratio_clip: tuple = (0.1, 10.0), level_window: int = 6,
               level_decay: float = 0.5, table: str = "auto"):
    self.ratio_clip = tuple(ratio_clip)
    self.level_window = int(level_window)
    self.level_decay = float(level_decay)
    if table != "auto":
      parse_table(table)
    self.table = table
    self._key = None
    self._clim = None

  def fit(self, view) -> Climatology:
    """The climatology of `view`'s training split (cached on the identity of its arrays)."""
    n_train = int(view.split.val_start)
    key = (view.train_fine, view.timestamps, int(view.interval_minutes), int(view.scale),
           view.aggregation, n_train, self.table)
    if self._key is not None and all(
        a is b if isinstance(a, np.ndarray) else a == b for a, b in zip(self._key, key)):
      return self._clim
    if view.train_fine.shape[0] != n_train:
      raise ValueError(f"train_fine has {view.train_fine.shape[0]} slices, the training split "
                       f"{n_train}")
    fine, period = fit_climatology(view.train_fine, view.timestamps[:n_train],
                                   view.interval_minutes, self.table)
    coarse = coarsen_lib.coarsen(fine, int(view.scale), view.aggregation)
    self._clim = Climatology(fine, coarse, period, int(view.interval_minutes))
    self._key = key
    return self._clim

  def reconstruct(self, view, slices: np.ndarray) -> dict:
    """slices (n,) -> dict(coarse (n, I, J, C), fine (n, N*I, N*J, C) float32 physical,
    samples None)."""
    clim = self.fit(view)
    slices = np.asarray(slices, np.int64)
    if slices.size == 0:
      i, j = clim.coarse.shape[1:3]
      h, w, c = clim.fine.shape[1:]
      return {"coarse": np.zeros((0, i, j, c), np.float32),
              "fine": np.zeros((0, h, w, c), np.float32), "samples": None}
    ts = np.asarray(view.timestamps)
    agg = view.aggregation
    # Level sums over the slices asked for and the window before the first of them.
    lo, hi = max(0, int(slices.min()) - self.level_window), int(slices.max()) + 1
    num, den = level_sums(view.coarse_obs[lo:hi], view.mask[lo:hi],
                          clim.coarse[clim.slots(ts[lo:hi])], agg)
    num, den = window_sums(num, den, ts[lo:hi], clim.interval_minutes, self.level_window,
                           self.level_decay)
    level = level_factors(num, den, agg, self.ratio_clip)[slices - lo]
    slot = clim.slots(ts[slices])
    coarse = complete_coarse(view.coarse_obs[slices], view.mask[slices], clim.coarse[slot],
                             level, agg)
    fine = split_fine(coarse, clim.fine[slot], int(view.scale), agg)
    return {"coarse": coarse.astype(np.float32), "fine": fine.astype(np.float32),
            "samples": None}
