"""Generic loader for a user's gridded series (the file helpers live in `data/files.py`).

`load_array` reads one (T, H, W) or (T, H, W, C) array from .npy / .npz, or through xarray
(`data/gridded.py`) from NetCDF (one file, a folder of files or a glob such as `DIR/*.nc`, joined
along time; any cftime calendar but 360_day) or Zarr, and returns a `SpatioTemporalSeries` with
the variable's units. NaN in the values means "not observed" and is kept; Inf is
an error.

Timestamps, in order of precedence:
  1. from the file: `timestamps_key` (an array of datetime64, ISO strings, or integers read as
     minutes since 1970-01-01), or a CF time coordinate on the variable's first dimension in
     NetCDF/Zarr (decoded by xarray / cftime); `interval_minutes` is then the most common step of those
     stamps (`time_axis.infer_interval`);
  2. `start` + k * `interval_minutes`;
  3. nothing given: 1970-01-01 00:00 + k * `interval_minutes` (placeholder steps, so calendar
     features are meaningless; pass `start` for real dates).

File timestamps may have gaps (dropped records, a sensor offline): every step must be a multiple
of the interval, and the slices present are kept as they are (`time_axis` marks the windows that
cross a gap; `pipeline.build_task` logs how many gaps there are). Anything else is a DataError
naming the first offending index and timestamps, never silently repaired: a NaT timestamp,
timestamps out of time order (the file is not sorted for you, since values, timestamps and
external features must be sorted together), a duplicated timestamp, or a step that is not a
multiple of the interval (slices off one regular grid).
"""
from __future__ import annotations

import inspect
import pathlib
from typing import Optional, Union

import numpy as np

from diffrecon_jax.data import files
from diffrecon_jax.data import gridded
from diffrecon_jax.data import time_axis
from diffrecon_jax.data.series import (AGGREGATIONS, DataError, SpatioTemporalSeries,
                                       calendar_features)

PathLike = Union[str, pathlib.Path]


# ---------------------------------------------------------------------------------------------
# Generic loader.
# ---------------------------------------------------------------------------------------------

def _read_file(path: pathlib.Path, variable, timestamps_key, external_key):
  """-> (raw values, variable name, timestamps or None, external or None, gridded.Labels or
  None)."""
  suffix = path.suffix.lower()
  times = external = None
  if suffix == ".npy":
    return np.load(path, allow_pickle=False), variable, None, None, None
  if suffix == ".npz":
    with np.load(path, allow_pickle=False) as z:
      keys = [k for k in z.files if k not in (timestamps_key, external_key)]
      var = files.pick_name(keys, variable, path, "array")
      for key in (timestamps_key, external_key):
        if key is not None and key not in z.files:
          raise DataError(f"{path}: no array {key!r}; available: {sorted(z.files)}")
      values = z[var]
      times = z[timestamps_key] if timestamps_key else None
      external = z[external_key] if external_key else None
    return values, var, times, external, None
  if gridded.is_gridded(path):  # NetCDF, Zarr, a glob or a folder of files: xarray
    got = gridded.read(path, variable, timestamps_key, external_key)
    return got.values, got.labels.variable, got.times, got.external, got.labels
  raise DataError(f"{path}: unsupported file; use .npy, .npz, .nc (one file, a folder of them or a "
                  f"glob such as 'DIR/*.nc') or a Zarr directory")


def _to_thwc(values: np.ndarray, layout: str, source: str) -> np.ndarray:
  layout = layout.upper()
  if values.ndim == 3 and layout == "THWC":
    layout = "THW"  # a plain (T, H, W) grid: one channel.
  if sorted(layout) not in (sorted("THW"), sorted("THWC")):
    raise DataError(f"{source}: layout {layout!r} must be a permutation of 'THWC' or 'THW'")
  if values.ndim != len(layout):
    raise DataError(f"{source}: array has shape {values.shape} ({values.ndim}-d) but layout "
                    f"{layout!r} needs {len(layout)}-d; expected (T, H, W) or (T, H, W, C)")
  if "C" not in layout:
    values, layout = values[..., None], layout + "C"
  return np.transpose(values, [layout.index(a) for a in "THWC"])


def load_array(path: PathLike, name: str = "custom", **kwargs) -> SpatioTemporalSeries:
  """The series of `load_with_labels` (its arguments), without the labels."""
  return load_with_labels(path, name, **kwargs)[0]


def load_with_labels(path: PathLike, name: str = "custom", variable: Optional[str] = None,
                     aggregation: str = "sum", interval_minutes: int = 60,
                     start: Optional[Union[str, np.datetime64]] = None,
                     timestamps_key: Optional[str] = None, external_key: Optional[str] = None,
                     layout: str = "THWC") -> tuple:
  """Loads a user grid as a `SpatioTemporalSeries`.

  Args:
    path: .npy, .npz (array `variable`, default the only array besides the timestamps /
      external keys), NetCDF .nc (`variable` required when several >= 3-d variables exist) or a
      Zarr directory (same rule; CF scale_factor/add_offset/_FillValue are applied).
    name: series name.
    variable: array / variable name inside the file (ignored for .npy).
    aggregation: "sum" (counts) or "mean" (intensive quantities); see `SpatioTemporalSeries`.
    interval_minutes: minutes between slices (ignored when the file has timestamps).
    start: first timestamp (ISO string or datetime64) when the file has none.
    timestamps_key: array/variable holding the timestamps (datetime64, ISO strings, integer
      minutes since 1970, or CF "<unit> since <date>" in NetCDF/Zarr). Gaps are kept; NaT,
      unsorted or duplicated timestamps and steps off the interval grid are DataErrors (module
      docstring).
    external_key: array/variable holding (T, F) external features; default calendar features.
    layout: axis order of the stored array, a permutation of "THWC" (or "THW"); a 3-d array with
      the default "THWC" is read as (T, H, W) with C = 1.

  Returns:
    (series, labels): the series (values (T, H, W, C) float32 with NaN where unobserved;
    timestamps (T,) datetime64[m]; external (T, F) float32) and the values' `gridded.Labels`
    (NetCDF / Zarr: dimension names, coordinates, units, history; npz / npy: the array's name).
  """
  path = pathlib.Path(path)
  if not path.exists() and not gridded.is_gridded(path):  # a glob names files, not itself
    raise DataError(f"{path}: file not found")
  if aggregation not in AGGREGATIONS:
    raise DataError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
  raw, var, times, external, labels = _read_file(path, variable, timestamps_key, external_key)
  raw = np.asarray(raw)
  if raw.dtype.kind not in "iufb":
    raise DataError(f"{path}: values dtype {raw.dtype} is not numeric")
  values = files.check_values(_to_thwc(raw, layout, str(path)), str(path), allow_nan=True)
  t = values.shape[0]

  if times is not None:
    timestamps = files.to_datetimes(times, str(path))
    if timestamps.shape != (t,):
      raise DataError(f"{path}: {timestamps.shape[0]} timestamps for {t} slices")
    interval_minutes = time_axis.infer_interval(timestamps, str(path))
    timestamps = time_axis.check_timestamps(timestamps, interval_minutes, str(path))
  else:
    if interval_minutes <= 0:
      raise DataError(f"interval_minutes must be positive, got {interval_minutes}")
    origin = np.datetime64(start if start is not None else "1970-01-01T00:00", "m")
    timestamps = origin + np.arange(t, dtype=np.int64) * np.timedelta64(int(interval_minutes), "m")

  if external is not None:
    external = np.asarray(external, np.float32)
    if external.ndim == 1:
      external = external[:, None]
    if external.ndim != 2 or external.shape[0] != t:
      raise DataError(f"{path}: external array {external_key!r} has shape {external.shape}, "
                      f"expected ({t}, F)")
    if not np.isfinite(external).all():
      raise DataError(f"{path}: external array {external_key!r} contains NaN/Inf")
    ext_names = tuple(f"{external_key}_{i}" for i in range(external.shape[1]))
  else:
    external, ext_names = calendar_features(timestamps, max(1, 1440 // int(interval_minutes)))

  base = var or name
  channels = (base,) if values.shape[3] == 1 else tuple(
      f"{base}_{i}" for i in range(values.shape[3]))
  series = SpatioTemporalSeries(
      name=name, values=values, timestamps=timestamps, external=external,
      external_names=tuple(ext_names), aggregation=aggregation,
      units=labels.units if labels else "",
      axes=gridded.series_axes(labels) if labels and layout.upper() in ("THWC", "THW") else (),
      interval_minutes=int(interval_minutes), channel_names=channels, source=str(path))
  return series, labels or gridded.Labels(variable=var or "values")


# `load_array` shows the options of `load_with_labels` as its own signature: the registry reads a
# loader's options from its signature, and their defaults stay written once, above.
load_array.__signature__ = inspect.signature(load_with_labels).replace(
    return_annotation="SpatioTemporalSeries")
