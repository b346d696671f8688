"""NCEP/NCAR Reanalysis 1 surface air temperature (xarray tutorial grid), 2013-2014.

Source: `shared/data/NCEP_air_temperature/air_temperature.zarr`, a Zarr v2 store (blosc/lz4):
`air` int16 (2920, 25, 53) x scale_factor 0.01 = Kelvin, `time` hours since 1800-01-01,
`lat` 75..15 N (row 0 northernmost), `lon` 200..330 E. 6-hourly, no gaps, no missing values.
Kalnay et al. (1996), "NCEP/NCAR Reanalysis data provided by NOAA PSL, Boulder, Colorado, USA".
The same grid is NOAA PSL's NCEP/NCAR Reanalysis 1 `air.sig995` 4x-daily files (surface, sigma
0.995; one air.sig995.<year>.nc per year, the 2013 and 2014 ones cropped to this window), which
xarray's tutorial `air_temperature` dataset holds: the loader reads the store, the downloaded
file(s) (one, a folder, or a glob such as 'DIR/air.sig995.*.nc'; xarray, `data/gridded.py`).

Temperature is intensive, so aggregation is "mean". The grid (25 x 53) is not cropped here;
making it divisible by the magnification N is the coarse-graining module's job (`window` exists
for callers that want a fixed window, e.g. (slice(0, 24), slice(2, 50)); it is not called `crop`
because the registry would pass it the config's `data.crop`, which is the pipeline's).
"""
from __future__ import annotations

import pathlib
from typing import Optional, Union

import numpy as np

from diffrecon_jax.data import time_axis
from diffrecon_jax.data import gridded
from diffrecon_jax.data.files import check_values
from diffrecon_jax.data.series import DataError, SpatioTemporalSeries, calendar_features


def day_of_year_features(timestamps: np.ndarray) -> tuple[np.ndarray, tuple]:
  """(T, 2) float32 [sin, cos] of 2 pi (day of year - 1) / days in that year (seasonal cycle)."""
  ts = np.asarray(timestamps).astype("datetime64[m]")
  years = ts.astype("datetime64[Y]")
  year_start = years.astype("datetime64[m]")
  year_len = ((years + 1).astype("datetime64[m]") - year_start).astype(np.float64)
  frac = (ts - year_start).astype(np.float64) / year_len
  feats = np.stack([np.sin(2 * np.pi * frac), np.cos(2 * np.pi * frac)], axis=1)
  return feats.astype(np.float32), ("doy_sin", "doy_cos")


def load_ncep_air(path: Union[str, pathlib.Path], daily: bool = False,
                  window: Optional[tuple] = None) -> SpatioTemporalSeries:
  """Loads the NCEP air temperature store.

  Args:
    path: the `air_temperature.zarr` directory (or the folder that contains it).
    daily: average the four 6-hourly fields of each day -> 730 daily slices (timestamp 00:00).
    window: optional (row slice, column slice) applied to the (25, 53) grid.

  Returns:
    values (T, 25, 53, 1) float32 Kelvin, T = 2920 (6-hourly) or 730 (daily); external =
    calendar features (4 slots per day, or 1 when daily) + day-of-year sin/cos.
  """
  store = pathlib.Path(path)
  if (store.is_dir() and not (store / ".zmetadata").exists()
      and (store / "air_temperature.zarr").is_dir()):
    store = store / "air_temperature.zarr"
  if not gridded.is_gridded(store):
    raise DataError(f"{store}: NCEP air temperature not found (expected the Zarr store "
                    f"shared/data/NCEP_air_temperature/air_temperature.zarr, or NOAA PSL's "
                    f"air.sig995.<year>.nc files: one, a folder or a glob)")
  got = gridded.read(store, "air")
  if got.values.ndim != 3:
    raise DataError(f"{store}/air: expected (time, lat, lon), got shape {got.values.shape}")
  values = check_values(got.values, f"{store}/air")[..., None]
  timestamps = got.times
  if timestamps is None or timestamps.shape[0] != values.shape[0]:
    raise DataError(f"{store}: no CF time coordinate for the {values.shape[0]} fields of air")
  interval = time_axis.infer_interval(timestamps, f"{store}/time")
  time_axis.check_timestamps(timestamps, interval, f"{store}/time")

  if daily:
    days, first, counts = np.unique(timestamps.astype("datetime64[D]"), return_index=True,
                                    return_counts=True)
    per_day = 1440 // interval
    if (counts != per_day).any() or np.any(np.diff(first) != per_day):
      raise DataError(f"{store}: daily means need {per_day} consecutive fields per day; "
                      f"found days with {sorted(set(counts.tolist()))}")
    values = values.reshape(len(days), per_day, *values.shape[1:]).mean(axis=1)
    timestamps = days.astype("datetime64[m]")
    interval = 1440

  axes = gridded.series_axes(got.labels)  # lat / lon in degrees
  if window is not None:
    rows, cols = window
    values = values[:, rows, cols]
    axes = tuple((name, coord[cut], unit) for (name, coord, unit), cut in zip(axes, window))
  values = np.ascontiguousarray(values, dtype=np.float32)

  cal, cal_names = calendar_features(timestamps, 1440 // interval)
  doy, doy_names = day_of_year_features(timestamps)
  return SpatioTemporalSeries(
      name="ncep_air", values=values, timestamps=timestamps,
      external=np.concatenate([cal, doy], axis=1), external_names=cal_names + doy_names,
      aggregation="mean", units="K", interval_minutes=interval,
      channel_names=("air_temperature",), axes=axes,
      source=f"{store} (NCEP/NCAR Reanalysis 1, Kalnay et al. 1996; NOAA PSL)")
