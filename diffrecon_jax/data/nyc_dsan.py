"""NYC taxi and bike in/out flows of DSAN/STSAN (Lin et al., KDD 2020), embedded in the package.

Source: GitHub haoxingl/STSAN (MIT), `data/NYTaxi`, `data/NYBike` at commit f5d09f8; raw data
NYC TLC trip records 2016 and Citi Bike trip data 2016. Per city: `flow_{train,val,test}.npz`
(key `flow`, (T, H, W, 2) [inflow, outflow] counts) and `ex_knlg_{train,val,test}.npz` (key
`external_knowledge`, (T, 65)). The splits concatenate (train, val, test) into 4320 contiguous
30-min slots: NYTaxi 2016-01-01 00:00 .. 03-30 23:30 (16 x 12), NYBike 2016-08-01 00:00 ..
10-29 23:30 (14 x 8).

The 65 external features are kept as given (the authors' encoding):
  0-6    dow_sun..dow_sat   day-of-week one-hot, Sunday = 0
  7-54   halfhour_0..47     half-hour-of-day one-hot
  55     holiday            the authors' holiday flag
  56-58  temp_min/max/mean  daily temperatures, min-max scaled by the authors
  59-61  precip, snowfall, snow_depth              daily amounts scaled to [0, 1]
  62-64  precip_trace, snowfall_trace, snow_depth_trace   1 where the record is "T" (trace)
The day-of-week and half-hour columns are checked against the assumed start date on load.
"""
from __future__ import annotations

import pathlib
from typing import Optional, Union

import numpy as np

from diffrecon_jax.data.files import check_values
from diffrecon_jax.data.series import DataError, SpatioTemporalSeries

EMBEDDED_DIR = pathlib.Path(__file__).resolve().parent / "embedded"
SPLITS = ("train", "val", "test")
EXTERNAL_NAMES = tuple(
    [f"dow_{d}" for d in ("sun", "mon", "tue", "wed", "thu", "fri", "sat")]
    + [f"halfhour_{i}" for i in range(48)] + ["holiday", "temp_min", "temp_max", "temp_mean"]
    + ["precip", "snowfall", "snow_depth", "precip_trace", "snowfall_trace", "snow_depth_trace"])
_CITIES = {
    "nytaxi": ("nytaxi", "2016-01-01T00:00", "taxi trips per 30 min", "NYC TLC trip records 2016"),
    "nybike": ("nybike", "2016-08-01T00:00", "bike trips per 30 min", "Citi Bike trip data 2016"),
}


def _load_npz_key(path: pathlib.Path, key: str) -> np.ndarray:
  if not path.is_file():
    raise DataError(f"{path}: file missing (expected flow_*/ex_knlg_*.npz of DSAN/STSAN, "
                    f"GitHub haoxingl/STSAN data/)")
  with np.load(path, allow_pickle=False) as z:
    if key not in z.files:
      raise DataError(f"{path}: no array {key!r}; has {z.files}")
    return z[key]


def _check_calendar(external: np.ndarray, timestamps: np.ndarray, folder: pathlib.Path):
  """The file's own weekday / half-hour one-hots must agree with our timestamps."""
  days = timestamps.astype("datetime64[D]")
  dow_sun0 = (days.astype(np.int64) + 4) % 7  # 1970-01-01 was a Thursday (Sunday = 0 -> 4).
  halfhour = (timestamps - days).astype(np.int64) // 30
  bad = ((external[:, :7].argmax(1) != dow_sun0) | (external[:, 7:55].argmax(1) != halfhour))
  if bad.any():
    i = int(np.argmax(bad))
    raise DataError(f"{folder}: external features disagree with the assumed start "
                    f"{timestamps[0]} at slot {i} ({timestamps[i]}); wrong folder or start date")


def _load_city(key: str, path: Optional[Union[str, pathlib.Path]]) -> SpatioTemporalSeries:
  name, start, units, raw_source = _CITIES[key]
  folder = EMBEDDED_DIR / name if path is None else pathlib.Path(path)
  flows, exts = [], []
  for split in SPLITS:
    flow = _load_npz_key(folder / f"flow_{split}.npz", "flow")
    ext = _load_npz_key(folder / f"ex_knlg_{split}.npz", "external_knowledge")
    if flow.ndim != 4 or flow.shape[-1] != 2 or ext.shape != (flow.shape[0], 65):
      raise DataError(f"{folder}: split {split!r} has flow {flow.shape} and external "
                      f"{ext.shape}; expected (T, H, W, 2) and (T, 65)")
    flows.append(check_values(flow, str(folder / f"flow_{split}.npz")))
    exts.append(check_values(ext, str(folder / f"ex_knlg_{split}.npz")))
  values = np.concatenate(flows, axis=0)
  external = np.concatenate(exts, axis=0)
  t = values.shape[0]
  timestamps = np.datetime64(start, "m") + np.arange(t) * np.timedelta64(30, "m")
  _check_calendar(external, timestamps, folder)
  return SpatioTemporalSeries(
      name=name, values=values, timestamps=timestamps, external=external,
      external_names=EXTERNAL_NAMES, aggregation="sum", units=units, interval_minutes=30,
      channel_names=("inflow", "outflow"),
      source=f"{folder} (DSAN/STSAN, Lin et al. KDD 2020, github.com/haoxingl/STSAN; "
             f"{raw_source})")


def load_nytaxi(path: Optional[Union[str, pathlib.Path]] = None) -> SpatioTemporalSeries:
  """NYC taxi in/out flow: values (4320, 16, 12, 2) float32, 30 min from 2016-01-01 00:00.

  Args:
    path: folder with flow_*.npz / ex_knlg_*.npz; None = the copy embedded in the package.
  """
  return _load_city("nytaxi", path)


def load_nybike(path: Optional[Union[str, pathlib.Path]] = None) -> SpatioTemporalSeries:
  """NYC Citi Bike in/out flow: values (4320, 14, 8, 2) float32, 30 min from 2016-08-01 00:00.

  Args:
    path: folder with flow_*.npz / ex_knlg_*.npz; None = the copy embedded in the package.
  """
  return _load_city("nybike", path)
