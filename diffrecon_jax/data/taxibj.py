"""TaxiBJ (Beijing taxi in/out flow, 32 x 32, 30 min) in the official ST-ResNet layout.

Zhang, Zheng, Qi, "Deep Spatio-Temporal Residual Networks for Citywide Crowd Flows Prediction",
AAAI 2017. The files are not redistributed with this package; `path` must be a folder holding
  BJ{yy}_M32x32_T30_InOut.h5  `data` (T, 2, 32, 32) [inflow, outflow], `date` YYYYMMDDSS (SS=01..48)
  BJ_Meteorology.h5           `date`, `Temperature` (T,), `WindSpeed` (T,), `Weather` (T, 17)
  BJ_Holiday.txt              one YYYYMMDD per line
The flow and meteorology files are checked against the sha256 recorded for the official release.

Gaps: the real files miss some 30-min slots and contain duplicated and incomplete days. We keep
exactly the slots present: the first occurrence of a duplicated `date` (how many were dropped,
and how many of those held different values, is logged), sorted by time. Timestamps come from
`date`, on the 30-min grid (`interval_minutes` = 30), so they are NOT contiguous where slots are
missing: `time_axis.TimeAxis` finds the gaps, training draws only windows that do not cross one,
and `pipeline.eval_slices` skips (or, with gap rule "fill", fills) them. Incomplete days are not
dropped (ST-ResNet's own preprocessing drops them); their count is logged.

External features (F = 75): calendar (day-of-week one-hot, 48 half-hour one-hot, holiday from
BJ_Holiday.txt), then meteorology matched by `date`: temperature and wind speed min-max scaled
with the fixed ranges below (fixed, not fitted, so that every year shares one scale; values
outside are not clipped), then the 17 weather-type one-hots as given.
"""
from __future__ import annotations

import hashlib
import pathlib
from typing import Union

import numpy as np
from absl import logging

from diffrecon_jax.data import time_axis
from diffrecon_jax.data.bikenyc14 import parse_slot_dates
from diffrecon_jax.data.files import check_values
from diffrecon_jax.data.series import DataError, SpatioTemporalSeries, calendar_features

METEOROLOGY_FILE = "BJ_Meteorology.h5"
HOLIDAY_FILE = "BJ_Holiday.txt"
# sha256 of the official files (Git-LFS pointers of GitHub nickash2/UC-DeepLGR-CX, data/).
SHA256 = {
    "BJ13_M32x32_T30_InOut.h5": "3b215591e2e6382aca9c98494cacccc7b51755f796d0a085b78d7057ed930c70",
    "BJ14_M32x32_T30_InOut.h5": "30823970950a0184c9e0ca16378926478c7e5154008eb997a683840ba5cf4e48",
    "BJ15_M32x32_T30_InOut.h5": "c763ac230a4241b3287ab68c5dd3a7f730108687f37b8b596ae281e84913a794",
    "BJ16_M32x32_T30_InOut.h5": "5d41f33b2acdb69e5f45d69117b13c77bfffaeb14e5620da7efebb6f1e5ae443",
    METEOROLOGY_FILE: "1e8fda1fa660d07f7b628557792f41fe40e33fa05cafbc203ac7e64000f7370c",
}
# Fixed min-max ranges: Beijing's recorded air temperature extremes lie inside -25..45 deg C;
# 0..50 covers the wind speeds of the meteorology file (its own units).
TEMPERATURE_RANGE = (-25.0, 45.0)
WIND_SPEED_RANGE = (0.0, 50.0)
SLOTS_PER_DAY = 48

MANUAL_DOWNLOAD = (
    "TaxiBJ cannot be downloaded automatically. Manual download: follow the data-release "
    "links in data/TaxiBJ/README.md of the ST-ResNet/DeepST repository "
    "(https://github.com/lucktroy/DeepST), get BJ13..16_M32x32_T30_InOut.h5, BJ_Meteorology.h5 "
    "and BJ_Holiday.txt, put them in one folder and pass it as path "
    "(--config.data.path=...).")


def flow_file_name(year: int) -> str:
  yy = year % 100
  if yy not in (13, 14, 15, 16):
    raise DataError(f"TaxiBJ year must be 13, 14, 15 or 16 (or 2013..2016), got {year}")
  return f"BJ{yy}_M32x32_T30_InOut.h5"


def sha256_of(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _require(path: pathlib.Path) -> pathlib.Path:
  if not path.is_file():
    raise DataError(f"TaxiBJ file {path.name} is missing from {path.parent}. {MANUAL_DOWNLOAD}")
  return path


def _verify(path: pathlib.Path):
  actual = sha256_of(path)
  expected = SHA256[path.name]
  if actual != expected:
    raise DataError(f"{path}: sha256 mismatch, expected {expected}, actual {actual}; the file is "
                    f"corrupt or not the official release (re-download it; "
                    f"verify_checksum=False skips this check)")


def _read_h5(path: pathlib.Path, keys: tuple) -> dict:
  import h5py
  with h5py.File(path, "r") as f:
    missing = [k for k in keys if k not in f]
    if missing:
      raise DataError(f"{path}: datasets {missing} missing (has {list(f.keys())})")
    return {k: f[k][()] for k in keys}


def _dedupe_sorted(timestamps: np.ndarray) -> np.ndarray:
  """Indices keeping the first occurrence of each timestamp, in time order."""
  _, first = np.unique(timestamps, return_index=True)  # unique() sorts by time.
  return first


def _log_duplicates_and_days(all_times: np.ndarray, keep: np.ndarray, data: np.ndarray,
                             path: pathlib.Path) -> None:
  """Logs the duplicated slots dropped (and how many differ from the kept first occurrence)
  and the incomplete days kept. all_times (T0,), keep (T,) indices into it, data (T0, ...)."""
  dropped = np.setdiff1d(np.arange(len(all_times)), keep)
  kept_times = all_times[keep]  # sorted
  days, counts = np.unique(kept_times.astype("datetime64[D]"), return_counts=True)
  incomplete = int((counts < SLOTS_PER_DAY).sum())
  if dropped.size:
    first = keep[np.searchsorted(kept_times, all_times[dropped])]
    differ = int((data[dropped] != data[first]).reshape(len(dropped), -1).any(axis=1).sum())
    logging.info("%s: %d duplicated slots dropped (first %s; %d with values different from the "
                 "kept first occurrence); %d of %d days incomplete", path.name, dropped.size,
                 time_axis.format_time(all_times[dropped[0]]), differ, incomplete, len(days))
  else:
    logging.info("%s: no duplicated slots; %d of %d days incomplete", path.name, incomplete,
                 len(days))


def _minmax(x: np.ndarray, lo_hi: tuple) -> np.ndarray:
  lo, hi = lo_hi
  return (x - lo) / (hi - lo)


def load_taxibj(path: Union[str, pathlib.Path], year: int = 13,
                verify_checksum: bool = True) -> SpatioTemporalSeries:
  """Loads one TaxiBJ year.

  Args:
    path: folder with BJ{yy}_M32x32_T30_InOut.h5, BJ_Meteorology.h5 and BJ_Holiday.txt.
    year: 13 (2013-07-01 .. 10-30, the paper's TaxiBJ), 14, 15 or 16.
    verify_checksum: check the sha256 of the flow and meteorology files.

  Returns:
    values (T, 32, 32, 2) float32 taxi counts per 30 min [inflow, outflow], T = slots present
    (duplicates dropped); timestamps (T,) sorted, on the 30-min grid, with gaps where slots are
    missing (module docstring); external (T, 75) float32 (see module docstring).
  """
  if path is None:
    raise DataError(f"TaxiBJ needs the folder of its files (path). {MANUAL_DOWNLOAD}")
  folder = pathlib.Path(path)
  flow_path = _require(folder / flow_file_name(year))
  met_path = _require(folder / METEOROLOGY_FILE)
  hol_path = _require(folder / HOLIDAY_FILE)
  if verify_checksum:
    _verify(flow_path)
    _verify(met_path)

  flow = _read_h5(flow_path, ("data", "date"))
  data, dates = flow["data"], flow["date"]
  if data.ndim != 4 or data.shape[1] != 2 or data.shape[0] != len(dates):
    raise DataError(f"{flow_path}: data {data.shape} with {len(dates)} dates; expected "
                    f"(T, 2, 32, 32) and T dates")
  all_times = parse_slot_dates(dates, SLOTS_PER_DAY, str(flow_path))
  keep = _dedupe_sorted(all_times)
  timestamps = time_axis.check_timestamps(all_times[keep], 30, str(flow_path))
  _log_duplicates_and_days(all_times, keep, data, flow_path)
  values = check_values(np.transpose(data[keep], (0, 2, 3, 1)), str(flow_path))

  met = _read_h5(met_path, ("date", "Temperature", "WindSpeed", "Weather"))
  met_times = parse_slot_dates(met["date"], SLOTS_PER_DAY, str(met_path))
  met_keep = _dedupe_sorted(met_times)
  met_times = met_times[met_keep]
  pos = np.clip(np.searchsorted(met_times, timestamps), 0, len(met_times) - 1)
  missing = met_times[pos] != timestamps
  if missing.any():
    raise DataError(f"{met_path}: no meteorology for {int(missing.sum())} flow slots, first "
                    f"{timestamps[np.argmax(missing)]}; the files do not belong together")
  rows = met_keep[pos]
  weather = np.asarray(met["Weather"], np.float64)
  if weather.ndim != 2 or weather.shape[0] != len(met["date"]):
    raise DataError(f"{met_path}: Weather shape {weather.shape}, expected (T, 17)")
  meteo = np.concatenate([
      _minmax(np.asarray(met["Temperature"], np.float64)[rows, None], TEMPERATURE_RANGE),
      _minmax(np.asarray(met["WindSpeed"], np.float64)[rows, None], WIND_SPEED_RANGE),
      weather[rows]], axis=1)
  meteo = check_values(meteo, str(met_path))

  try:
    hol_text = hol_path.read_text().split()
    holidays = {np.datetime64(f"{s[:4]}-{s[4:6]}-{s[6:8]}", "D") for s in hol_text}
  except ValueError as e:
    raise DataError(f"{hol_path}: expected one YYYYMMDD date per line ({e})") from e
  cal, cal_names = calendar_features(timestamps, SLOTS_PER_DAY, holidays)
  names = cal_names + ("temperature", "wind_speed") + tuple(
      f"weather_{i}" for i in range(weather.shape[1]))
  return SpatioTemporalSeries(
      name="taxibj", values=np.ascontiguousarray(values), timestamps=timestamps,
      external=np.concatenate([cal, meteo], axis=1), external_names=names,
      aggregation="sum", units="taxi trips per 30 min", interval_minutes=30,
      channel_names=("inflow", "outflow"),
      source=f"{flow_path} (TaxiBJ, ST-ResNet, Zhang et al. AAAI 2017)")
