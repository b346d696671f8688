"""The time axis of a series: which slices exist, which windows are whole, where each slice sits
in the calendar. The one place that turns timestamps into positions.

Real series have holes (TaxiBJ misses 30-min slots and whole parts of days; users' grids drop
records when a sensor is offline), so slice index k and timestamp t0 + k * interval are not the
same thing. Everything that needs "the previous slice", "the same slot yesterday" or "the slot of
the week" asks a `TimeAxis` built from the timestamps, never index arithmetic:

  whole_windows(w)      (T,) bool: slices s-w+1..s all present, each one interval after the last
  periodic_index(offs)  (T, K) int: index of the slice at timestamp - offset, -1 if absent
  slot_of_day / day_of_week / slot_of_week   calendar positions (Monday = 0)
  gaps() / summary()    what is missing, for the load-time log line

Rules for valid timestamps (`check_timestamps`, DataError otherwise, naming the first offending
index and timestamps): 1-d datetime64 in whole minutes, no NaT, strictly increasing (so no
duplicates), and every step a positive multiple of `interval_minutes`; a step of k intervals is a
gap of k - 1 missing slots.

Two ways to treat gaps downstream (`GAP_RULES`, `pipeline.build_task(gap_rule=...)`):
  skip  keep exactly the slices present; a window across a gap is never trained on and its
        current slice is not scored.
  fill  `fill_gaps`: put the series on the regular grid, the inserted slices all NaN (= not
        observed, the pipeline's existing meaning: every coarse cell missing in every pattern,
        0 in normalised arrays, no contribution to any metric). Windows reaching back over a gap
        are then scored, seeing the missing slices as wholly unobserved; inserted slices are
        never scored and never part of a training window.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Optional, Sequence

import numpy as np

from diffrecon_jax.data.errors import DataError

MINUTES_PER_DAY = 24 * 60
DAYS_PER_WEEK = 7
# Day 0 of datetime64[D] (1970-01-01) was a Thursday: weekday 3 with Monday = 0.
EPOCH_WEEKDAY = 3
GAP_RULES = ("skip", "fill")


def format_time(t) -> str:
  """'2013-07-03 10:00' for a datetime64[m]."""
  return str(np.datetime64(t, "m")).replace("T", " ")


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

def as_minutes(timestamps, name: str = "series") -> np.ndarray:
  """(T,) datetime64 of any unit -> (T,) datetime64[m]; sub-minute parts are an error."""
  ts = np.asarray(timestamps)
  if ts.ndim != 1:
    raise DataError(f"{name}: timestamps must be 1-d, got shape {ts.shape}")
  if ts.dtype.kind != "M":
    raise DataError(f"{name}: timestamps must be datetime64, got dtype {ts.dtype}")
  out = ts.astype("datetime64[m]")
  nat = np.isnat(ts)
  if nat.any():
    i = int(np.argmax(nat))
    raise DataError(f"{name}: timestamp {i} is NaT (not a time), {int(nat.sum())} in all; "
                    f"drop those slices or give their times")
  off = out.astype(ts.dtype) != ts
  if off.any():
    i = int(np.argmax(off))
    raise DataError(f"{name}: timestamp {i} ({ts[i]}) is not a whole minute")
  return out


def check_order(ts: np.ndarray, name: str = "series") -> None:
  """Strictly increasing (T,) datetime64[m]: duplicates and out-of-order pairs are errors."""
  bad = np.diff(ts) <= np.timedelta64(0, "m")
  if not bad.any():
    return
  i = int(np.argmax(bad))
  if ts[i + 1] == ts[i]:
    n_dup = int((np.diff(ts) == np.timedelta64(0, "m")).sum())
    raise DataError(f"{name}: duplicate timestamp {format_time(ts[i])} at indices {i} and "
                    f"{i + 1} ({n_dup} duplicated step(s) in all); keep one slice per time")
  raise DataError(f"{name}: timestamps not in time order: index {i} ({format_time(ts[i])}) is "
                  f"followed by index {i + 1} ({format_time(ts[i + 1])}); sort the slices "
                  f"(values, timestamps and external features together) by time")


def check_timestamps(timestamps, interval_minutes: int, name: str = "series") -> np.ndarray:
  """Validates a time axis (module docstring) and returns it as (T,) datetime64[m]."""
  if int(interval_minutes) != interval_minutes or int(interval_minutes) < 1:
    raise DataError(f"{name}: interval_minutes must be a positive integer, got "
                    f"{interval_minutes!r}")
  interval = int(interval_minutes)
  ts = as_minutes(timestamps, name)
  check_order(ts, name)
  steps = np.diff(ts).astype(np.int64)
  off = steps % interval != 0
  if off.any():
    i = int(np.argmax(off))
    raise DataError(f"{name}: step from index {i} ({format_time(ts[i])}) to {i + 1} "
                    f"({format_time(ts[i + 1])}) is {steps[i]} min, not a multiple of the interval "
                    f"{interval} min ({int(off.sum())} such step(s)); the slices are not on one "
                    f"regular grid")
  return ts


def infer_interval(timestamps, name: str = "series") -> int:
  """The nominal interval of file timestamps: the most common step in minutes (ties: the
  smaller). Robust to dropped records (a gap is a rarer, longer step); an off-grid timestamp then
  fails `check_timestamps` with a message naming it, instead of shrinking the interval."""
  ts = as_minutes(timestamps, name)
  if ts.shape[0] < 2:
    raise DataError(f"{name}: need at least 2 timestamps to infer the interval")
  check_order(ts, name)
  values, counts = np.unique(np.diff(ts).astype(np.int64), return_counts=True)
  return int(values[np.argmax(counts)])  # argmax takes the first (smallest) of equal counts.


# ---------------------------------------------------------------------------------------------
# Calendar positions from timestamps
# ---------------------------------------------------------------------------------------------

def default_slots_per_day(interval_minutes: int) -> int:
  """Slots of a day for slices `interval_minutes` apart: 1440 // interval, at least 1."""
  return max(1, MINUTES_PER_DAY // int(interval_minutes))


def day_number(timestamps) -> np.ndarray:
  """(T,) datetime64 -> (T,) int64 calendar day of each timestamp, days since 1970-01-01."""
  return np.asarray(timestamps).astype("datetime64[D]").astype(np.int64)


def number_of_days(timestamps) -> int:
  """Calendar days from the first to the last of (T,) datetime64 `timestamps`, both counted
  (0 for none)."""
  days = day_number(timestamps)
  return int(days.max() - days.min()) + 1 if days.size else 0


def day_of_week(timestamps) -> np.ndarray:
  """(T,) datetime64 -> (T,) int64 weekday, Monday = 0 .. Sunday = 6."""
  return (day_number(timestamps) + EPOCH_WEEKDAY) % DAYS_PER_WEEK


def slot_of_day(timestamps, slots_per_day: int) -> np.ndarray:
  """(T,) datetime64 -> (T,) int64 in [0, slots_per_day): minutes since midnight * spd // 1440."""
  ts = np.asarray(timestamps).astype("datetime64[m]")
  minutes = (ts - ts.astype("datetime64[D]")).astype(np.int64)
  return (minutes * int(slots_per_day)) // MINUTES_PER_DAY


def slot_of_week(timestamps, slots_per_day: int) -> np.ndarray:
  """(T,) datetime64 -> (T,) int64 in [0, 7 * slots_per_day): day_of_week * spd + slot_of_day."""
  return day_of_week(timestamps) * int(slots_per_day) + slot_of_day(timestamps, slots_per_day)


# ---------------------------------------------------------------------------------------------
# The axis
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Gap:
  """Missing slots between two present slices.

  Attributes:
    index: index of the first present slice after the gap (slices index-1 and index straddle it).
    start: timestamp (datetime64[m]) of the first missing slot.
    missing: number of missing slots (>= 1).
  """
  index: int
  start: np.datetime64
  missing: int


@dataclasses.dataclass(frozen=True, eq=False)
class TimeAxis:
  """A validated time axis: timestamps (T,) datetime64[m] on a grid of `interval_minutes`.

  Construction validates (`check_timestamps`); derived arrays are computed once, on first use.
  """
  timestamps: np.ndarray
  interval_minutes: int
  name: str = "series"

  def __post_init__(self):
    ts = check_timestamps(self.timestamps, self.interval_minutes, self.name)
    ts.setflags(write=False)
    object.__setattr__(self, "timestamps", ts)
    object.__setattr__(self, "interval_minutes", int(self.interval_minutes))

  @classmethod
  def of(cls, series) -> "TimeAxis":
    """The axis of a `SpatioTemporalSeries` (its timestamps, interval and name)."""
    return cls(series.timestamps, series.interval_minutes, series.name)

  @property
  def num_slices(self) -> int:
    return int(self.timestamps.shape[0])

  @functools.cached_property
  def steps(self) -> np.ndarray:
    """(T-1,) int64: step from slice s to s+1 in intervals (1 = contiguous, k = k-1 missing)."""
    return np.diff(self.timestamps).astype(np.int64) // self.interval_minutes

  @functools.cached_property
  def positions(self) -> np.ndarray:
    """(T,) int64: position of every slice on the regular grid starting at timestamps[0]."""
    return np.concatenate([[0], np.cumsum(self.steps)]).astype(np.int64)

  @property
  def num_regular(self) -> int:
    """Slots of the regular grid from the first to the last timestamp, present or not."""
    return int(self.positions[-1]) + 1

  @property
  def num_missing(self) -> int:
    return self.num_regular - self.num_slices

  @property
  def has_gaps(self) -> bool:
    return self.num_missing > 0

  def gaps(self) -> tuple:
    """Every gap, in time order, as `Gap`s."""
    where = np.nonzero(self.steps > 1)[0]
    step = np.timedelta64(self.interval_minutes, "m")
    return tuple(Gap(index=int(i) + 1, start=self.timestamps[i] + step,
                     missing=int(self.steps[i]) - 1) for i in where)

  def summary(self) -> str:
    """One line for the load-time log, e.g. '4320 slices at 30 min (2013-07-01 00:00 ..
    2013-10-30 23:30), 3 gaps totalling 17 missing slots, largest 12 slots at 2013-07-03 10:00'."""
    head = (f"{self.num_slices} slices at {self.interval_minutes} min "
            f"({format_time(self.timestamps[0])} .. {format_time(self.timestamps[-1])})")
    gaps = self.gaps()
    if not gaps:
      return head + ", no gaps"
    big = max(gaps, key=lambda g: g.missing)  # the first of equally large gaps.
    return (f"{head}, {len(gaps)} gap{'s' if len(gaps) > 1 else ''} totalling "
            f"{self.num_missing} missing slot{'s' if self.num_missing > 1 else ''}, largest "
            f"{big.missing} slot{'s' if big.missing > 1 else ''} at {format_time(big.start)}")

  def whole_windows(self, window: int) -> np.ndarray:
    """(T,) bool: True where slices s-window+1 .. s are all present and consecutive on the grid
    (consecutive indices whose timestamps are exactly one interval apart). False for
    s < window - 1 (the window would start before the series)."""
    window = int(window)
    if window < 1:
      raise ValueError(f"window must be >= 1, got {window}")
    # broken[s]: the step into slice s is not one interval; the step into the window's first
    # slice does not matter, so look back window - 1 slices.
    broken = np.concatenate([[False], self.steps != 1])
    return _clear(broken, window - 1, window - 1)

  def periodic_index(self, offsets_minutes: Sequence[int]) -> np.ndarray:
    """(T, K) int32: the index of the slice at timestamps[s] - offsets_minutes[k], -1 where the
    series has no slice at that time (a gap, or before the start). Offsets are positive for the
    past (1440: same slot yesterday, 10080: last week) and must be multiples of the interval."""
    offsets = np.asarray(offsets_minutes, np.int64).reshape(-1)
    bad = offsets % self.interval_minutes != 0
    if bad.any():
      raise ValueError(f"periodic offsets {offsets[bad].tolist()} min are not multiples of the "
                       f"interval {self.interval_minutes} min")
    minutes = self.timestamps.astype(np.int64)
    target = minutes[:, None] - offsets[None, :]
    pos = np.searchsorted(minutes, target)
    found = (pos < self.num_slices) & (minutes[np.minimum(pos, self.num_slices - 1)] == target)
    return np.where(found, pos, -1).astype(np.int32)

  def slot_of_day(self, slots_per_day: Optional[int] = None) -> np.ndarray:
    """(T,) int64 in [0, slots_per_day); default slots_per_day = 1440 // interval."""
    return slot_of_day(self.timestamps, slots_per_day or default_slots_per_day(
        self.interval_minutes))

  def day_of_week(self) -> np.ndarray:
    """(T,) int64, Monday = 0."""
    return day_of_week(self.timestamps)

  def slot_of_week(self, slots_per_day: Optional[int] = None) -> np.ndarray:
    """(T,) int64 in [0, 7 * slots_per_day); default slots_per_day = 1440 // interval."""
    return slot_of_week(self.timestamps, slots_per_day or default_slots_per_day(
        self.interval_minutes))

  def regular_timestamps(self) -> np.ndarray:
    """(num_regular,) datetime64[m]: every slot of the grid from the first to the last slice."""
    return self.timestamps[0] + np.arange(self.num_regular) * np.timedelta64(
        self.interval_minutes, "m")


def _clear(flag: np.ndarray, span: int, first: int) -> np.ndarray:
  """(T,) bool: flag[s-span+1 .. s] all False (nothing if span = 0) and s >= first.

  A cumulative count makes every window test O(1).
  """
  t = len(flag)
  count = np.concatenate([[0], np.cumsum(flag.astype(np.int64))])  # count[s] = flags in [0, s).
  s = np.arange(t)
  lo = np.maximum(s - span + 1, 0)
  return (s >= first) & (count[s + 1] - count[lo] == 0)


def windows_without(flag: np.ndarray, window: int) -> np.ndarray:
  """(T,) bool: slices s whose window s-window+1 .. s holds no flagged slice (e.g. no inserted
  slice); False for s < window - 1."""
  window = int(window)
  return _clear(np.asarray(flag, bool), window, window - 1)


def contiguous_runs(indices) -> list:
  """Sorted slice indices (n,) -> [(start, stop), ...] half-open runs of consecutive indices."""
  idx = np.asarray(indices, np.int64)
  if idx.size == 0:
    return []
  breaks = np.nonzero(np.diff(idx) != 1)[0]
  starts = np.concatenate([[0], breaks + 1])
  stops = np.concatenate([breaks + 1, [idx.size]])
  return [(int(idx[a]), int(idx[b - 1]) + 1) for a, b in zip(starts, stops)]


# ---------------------------------------------------------------------------------------------
# The `fill` rule
# ---------------------------------------------------------------------------------------------

def fill_gaps(series) -> tuple:
  """Puts a series on its regular grid: -> (series (T', H, W, C), inserted (T',) bool).

  T' = `TimeAxis.num_regular`. Present slices keep their values, timestamps and external
  features; an inserted slice is all NaN (not observed; see the module docstring). Its external
  features must stay finite, so they repeat the last present slice's, except the calendar
  one-hots of `series.calendar_features` (columns dow_0..dow_6 and slot_0..slot_{n-1}), which are
  recomputed from its own timestamp. A series without gaps comes back unchanged.
  """
  axis = TimeAxis.of(series)
  if not axis.has_gaps:
    return series, np.zeros(series.num_slices, bool)
  n = axis.num_regular
  pos = axis.positions
  inserted = np.ones(n, bool)
  inserted[pos] = False
  values = np.full((n,) + series.values.shape[1:], np.nan, np.float32)
  values[pos] = series.values
  # Last present slice at or before every grid slot.
  src = np.searchsorted(pos, np.arange(n), side="right") - 1
  external = np.array(series.external[src], np.float32)
  timestamps = axis.regular_timestamps()
  _recompute_calendar(external, series.external_names, timestamps, inserted)
  filled = dataclasses.replace(series, values=values, timestamps=timestamps, external=external)
  return filled, inserted


def _recompute_calendar(external: np.ndarray, names: tuple, timestamps: np.ndarray,
                        rows: np.ndarray) -> None:
  """Rewrites, in place, the day-of-week and slot-of-day one-hots of `rows` (calendar_features
  column names) from their timestamps."""
  names = list(names)
  rows = np.nonzero(rows)[0]
  dow_cols = [f"dow_{d}" for d in range(DAYS_PER_WEEK)]
  if all(c in names for c in dow_cols):
    cols = np.array([names.index(c) for c in dow_cols])
    external[np.ix_(rows, cols)] = 0.0
    external[rows, cols[day_of_week(timestamps[rows])]] = 1.0
  spd = sum(1 for c in names if re.fullmatch(r"slot_\d+", c))
  if spd and all(f"slot_{i}" in names for i in range(spd)):
    cols = np.array([names.index(f"slot_{i}") for i in range(spd)])
    external[np.ix_(rows, cols)] = 0.0
    external[rows, cols[slot_of_day(timestamps[rows], spd)]] = 1.0
