"""The one in-memory type every dataset loader returns.

A `SpatioTemporalSeries` is the real *fine-grained* series of a dataset in physical units,
aligned with its timestamps and external features. Everything downstream (coarse-graining,
sparse patterns, windows, models, metrics) starts from it.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from diffrecon_jax.data import time_axis
from diffrecon_jax.data.errors import DataError  # re-exported: `series.DataError` is public.

AGGREGATIONS = ("sum", "mean")


@dataclasses.dataclass(frozen=True)
class SpatioTemporalSeries:
  """A fine-grained spatiotemporal series.

  Attributes:
    name: dataset name, e.g. "nytaxi".
    values: (T, H, W, C) float32, physical units (counts for flows, Kelvin for temperature...).
    timestamps: (T,) numpy datetime64[m] start time of each slice: no NaT, strictly increasing,
      every step a multiple of `interval_minutes`. Steps longer than one interval are gaps
      (missing slots); `time_axis` says which windows are whole.
    external: (T, F) float32 external features per slice (time of day, day of week, holiday,
      weather where the source has it). F may be 0.
    external_names: F names, one per column of `external`.
    aggregation: "sum" (counts: a coarse cell is the total of its fine cells) or "mean"
      (intensive quantities such as PM2.5 or temperature). Definition 1-2 of the paper.
    units: free text, e.g. "trips per 30 min".
    interval_minutes: the nominal time between slices (the grid the timestamps lie on).
    channel_names: C names, e.g. ("inflow", "outflow").
    source: free text, where the data came from (file path, citation).
    axes: () or ((row name, (H,) row coordinates, units), (column name, (W,) coordinates,
      units)): the grid's coordinates where the source has them (e.g. lat / lon in degrees), for
      figures and outputs; () = cell indices.
  """
  name: str
  values: np.ndarray
  timestamps: np.ndarray
  external: np.ndarray
  external_names: tuple
  aggregation: str
  units: str
  interval_minutes: int
  channel_names: tuple
  source: str = ""
  axes: tuple = ()

  def __post_init__(self):
    v = self.values
    if not isinstance(v, np.ndarray) or v.ndim != 4:
      raise DataError(f"{self.name}: values must be a (T, H, W, C) array, got shape "
                      f"{getattr(v, 'shape', None)}")
    t = v.shape[0]
    if t < 2:
      raise DataError(f"{self.name}: need at least 2 time slices, got {t}")
    if self.timestamps.shape != (t,):
      raise DataError(f"{self.name}: timestamps shape {self.timestamps.shape} != ({t},)")
    if self.external.ndim != 2 or self.external.shape[0] != t:
      raise DataError(f"{self.name}: external shape {self.external.shape} must be ({t}, F)")
    if len(self.external_names) != self.external.shape[1]:
      raise DataError(f"{self.name}: {len(self.external_names)} external names for "
                      f"{self.external.shape[1]} external columns")
    if self.axes and tuple(len(a[1]) for a in self.axes) != v.shape[1:3]:
      raise DataError(f"{self.name}: coordinates of lengths {[len(a[1]) for a in self.axes]} "
                      f"for a {v.shape[1]}x{v.shape[2]} grid")
    if len(self.channel_names) != v.shape[3]:
      raise DataError(f"{self.name}: {len(self.channel_names)} channel names for "
                      f"{v.shape[3]} channels")
    if self.aggregation not in AGGREGATIONS:
      raise DataError(f"{self.name}: aggregation must be one of {AGGREGATIONS}, "
                      f"got {self.aggregation!r}")
    if not np.all(np.isfinite(self.external)):
      raise DataError(f"{self.name}: external features contain NaN/Inf")
    _ = self.time_axis  # validates the timestamps against interval_minutes.

  @property
  def time_axis(self):
    """The validated `time_axis.TimeAxis` of the timestamps (gaps, whole windows, calendar)."""
    return time_axis.TimeAxis.of(self)

  @property
  def num_slices(self) -> int:
    return self.values.shape[0]

  @property
  def fine_shape(self) -> tuple:
    """(H, W) of the fine grid."""
    return tuple(self.values.shape[1:3])

  @property
  def channels(self) -> int:
    return self.values.shape[3]

  def slice_time(self, start: int, stop: Optional[int] = None) -> "SpatioTemporalSeries":
    """The sub-series of slices [start, stop)."""
    return dataclasses.replace(
        self, values=self.values[start:stop], timestamps=self.timestamps[start:stop],
        external=self.external[start:stop])


def calendar_features(timestamps: np.ndarray, slots_per_day: int,
                      holidays: Optional[set] = None) -> tuple[np.ndarray, tuple]:
  """External features derived from the calendar alone.

  Returns (features (T, 7 + slots_per_day + 1) float32, names): day-of-week one-hot
  (Monday = 0), slot-of-day one-hot, holiday flag (date in `holidays`, a set of
  numpy datetime64[D]). Used for datasets whose source has no external features.
  """
  ts = np.asarray(timestamps).astype("datetime64[m]")
  days = ts.astype("datetime64[D]")
  dow = time_axis.day_of_week(ts)
  slot = time_axis.slot_of_day(ts, slots_per_day)
  t = ts.shape[0]
  feats = np.zeros((t, 7 + slots_per_day + 1), np.float32)
  feats[np.arange(t), dow] = 1.0
  feats[np.arange(t), 7 + slot] = 1.0
  if holidays:
    hol = np.array([d in holidays for d in days])
    feats[:, -1] = hol.astype(np.float32)
  names = tuple([f"dow_{i}" for i in range(7)] + [f"slot_{i}" for i in range(slots_per_day)]
                + ["holiday"])
  return feats, names
