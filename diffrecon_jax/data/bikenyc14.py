"""ST-ResNet BikeNYC (NYC Citi Bike, 2014-04-01 .. 09-30, hourly, 16 x 8).

Source: `NYC14_M16x8_T60_NewEnd.h5` of Zhang, Zheng, Qi, "Deep Spatio-Temporal Residual Networks
for Citywide Crowd Flows Prediction", AAAI 2017 (copy from GitHub 761049669/ST-D3DDARN,
BikeNYC.zip). `data` (4392, 2, 16, 8) float64 counts [new-flow (bikes checked out), end-flow
(bikes returned)], `date` bytes YYYYMMDDSS with SS = 01..24 the 1-based hour slot. The file has
no external features: day of week, hour of day and US federal holidays are derived from `date`.
"""
from __future__ import annotations

import pathlib
from typing import Union

import numpy as np

from diffrecon_jax.data import time_axis
from diffrecon_jax.data.files import check_values
from diffrecon_jax.data.series import DataError, SpatioTemporalSeries, calendar_features

FILE_NAME = "NYC14_M16x8_T60_NewEnd.h5"

# US federal holidays (observed dates) for the years of the NYC datasets, 5 U.S.C. 6103.
US_FEDERAL_HOLIDAYS = frozenset(np.datetime64(d, "D") for d in (
    # 2014: New Year, MLK, Washington, Memorial, Independence, Labor, Columbus, Veterans,
    # Thanksgiving, Christmas.
    "2014-01-01", "2014-01-20", "2014-02-17", "2014-05-26", "2014-07-04", "2014-09-01",
    "2014-10-13", "2014-11-11", "2014-11-27", "2014-12-25",
    # 2016 (Christmas on a Sunday -> observed Monday 26 Dec).
    "2016-01-01", "2016-01-18", "2016-02-15", "2016-05-30", "2016-07-04", "2016-09-05",
    "2016-10-10", "2016-11-11", "2016-11-24", "2016-12-26",
))


def parse_slot_dates(dates, slots_per_day: int, source: str) -> np.ndarray:
  """ST-ResNet `date` strings YYYYMMDDSS (SS = 1-based slot of the day) -> (T,) datetime64[m]."""
  out = np.empty(len(dates), dtype="datetime64[m]")
  step = 1440 // slots_per_day
  for i, d in enumerate(dates):
    s = d.decode() if isinstance(d, bytes) else str(d)
    slot = int(s[8:]) if len(s) == 10 and s.isdigit() else -1
    if not 1 <= slot <= slots_per_day:
      raise DataError(f"{source}: date entry {i} = {s!r} is not YYYYMMDDSS with SS in "
                      f"01..{slots_per_day:02d}")
    day = np.datetime64(f"{s[:4]}-{s[4:6]}-{s[6:8]}", "m")
    out[i] = day + np.timedelta64((slot - 1) * step, "m")
  return out


def load_bikenyc14(path: Union[str, pathlib.Path]) -> SpatioTemporalSeries:
  """Loads BikeNYC 2014.

  Args:
    path: the .h5 file or the folder that holds `NYC14_M16x8_T60_NewEnd.h5`.

  Returns:
    values (4392, 16, 8, 2) float32 bike counts per hour, channels (new_flow, end_flow);
    timestamps hourly from 2014-04-01 00:00; external = calendar features (24 hour slots)
    with US federal holidays.
  """
  import h5py
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / FILE_NAME
  if not path.is_file():
    raise DataError(f"{path}: BikeNYC file not found (ST-ResNet `{FILE_NAME}`, e.g. from "
                    f"GitHub 761049669/ST-D3DDARN BikeNYC.zip)")
  with h5py.File(path, "r") as f:
    for key in ("data", "date"):
      if key not in f:
        raise DataError(f"{path}: no dataset {key!r} (has {list(f.keys())})")
    data = f["data"][()]
    dates = f["date"][()]
  if data.ndim != 4 or data.shape[1] != 2 or data.shape[0] != len(dates):
    raise DataError(f"{path}: data {data.shape} / {len(dates)} dates; expected (T, 2, H, W)")
  values = check_values(np.transpose(data, (0, 2, 3, 1)), str(path))
  timestamps = parse_slot_dates(dates, 24, str(path))
  # Sorted, no duplicates, hourly grid (the official file has no gaps; any would be kept).
  time_axis.check_timestamps(timestamps, 60, str(path))
  external, names = calendar_features(timestamps, 24, set(US_FEDERAL_HOLIDAYS))
  return SpatioTemporalSeries(
      name="bikenyc14", values=np.ascontiguousarray(values), timestamps=timestamps,
      external=external, external_names=names, aggregation="sum",
      units="bike trips per hour", interval_minutes=60, channel_names=("new_flow", "end_flow"),
      source=f"{path} (ST-ResNet BikeNYC, Zhang et al. AAAI 2017; Citi Bike NYC)")
