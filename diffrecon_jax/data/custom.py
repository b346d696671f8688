"""Generic loader for a user's gridded series (the file helpers live in `data/files.py`).

`load_array` reads one (T, H, W) or (T, H, W, C) array from .npy / .npz / NetCDF (.nc) / Zarr
(v2 directory stores are decoded directly with numcodecs; v3 stores through the `zarr` package)
and returns a `SpatioTemporalSeries`. NaN in the values means "not observed" and is kept; Inf is
an error.

Timestamps, in order of precedence:
  1. from the file: `timestamps_key` (an array of datetime64, ISO strings, or integers read as
     minutes since 1970-01-01), or a CF time coordinate ("<unit> since <date>") on the variable's
     first dimension in NetCDF/Zarr; `interval_minutes` is then the most common step of those
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

import pathlib
from typing import Optional, Union

import numpy as np

from diffrecon_jax.data import files
from diffrecon_jax.data import time_axis
from diffrecon_jax.data.series import (AGGREGATIONS, DataError, SpatioTemporalSeries,
                                       calendar_features)

PathLike = Union[str, pathlib.Path]


# ---------------------------------------------------------------------------------------------
# Generic loader.
# ---------------------------------------------------------------------------------------------

def _pick(names: list, variable: Optional[str], path: pathlib.Path, what: str) -> str:
  if variable is not None:
    if variable not in names:
      raise DataError(f"{path}: no {what} named {variable!r}; available: {sorted(names)}")
    return variable
  if len(names) != 1:
    raise DataError(f"{path}: {len(names)} candidate {what}s {sorted(names)}; choose one with "
                    f"variable=... (--config.data.variable=...)")
  return names[0]


def _read_file(path: pathlib.Path, variable, timestamps_key, external_key):
  """-> (raw values, variable name, timestamps or None, external or None)."""
  suffix = path.suffix.lower()
  times = external = None
  if suffix == ".npy":
    return np.load(path, allow_pickle=False), variable, None, None
  if suffix == ".npz":
    with np.load(path, allow_pickle=False) as z:
      keys = [k for k in z.files if k not in (timestamps_key, external_key)]
      var = _pick(keys, variable, path, "array")
      for key in (timestamps_key, external_key):
        if key is not None and key not in z.files:
          raise DataError(f"{path}: no array {key!r}; available: {sorted(z.files)}")
      values = z[var]
      times = z[timestamps_key] if timestamps_key else None
      external = z[external_key] if external_key else None
    return values, var, times, external
  if suffix in (".nc", ".nc4", ".netcdf", ".cdf"):
    import netCDF4
    with netCDF4.Dataset(path) as ds:
      ds.set_auto_maskandscale(True)
      candidates = [k for k, v in ds.variables.items()
                    if v.ndim >= 3 and k not in (timestamps_key, external_key)]
      var = _pick(candidates, variable, path, "variable (>= 3-d)")
      v = ds.variables[var]
      values = np.ma.filled(np.ma.asarray(v[...]).astype(np.float64), np.nan)
      tname = timestamps_key or v.dimensions[0]
      if tname in ds.variables and "since" in str(getattr(ds.variables[tname], "units", "")):
        tv = ds.variables[tname]
        tv.set_auto_maskandscale(False)
        tv.set_auto_mask(True)  # a masked (fill value) time -> NaN -> NaT, refused later.
        traw = np.ma.filled(np.ma.asarray(tv[...]).astype(np.float64), np.nan)
        times = files.decode_cf_time(traw, tv.units, getattr(tv, "calendar", None))
      elif timestamps_key:
        raise DataError(f"{path}: timestamps variable {timestamps_key!r} missing or has no CF "
                        f"'<unit> since <date>' units")
      if external_key:
        external = np.ma.filled(np.ma.asarray(ds.variables[external_key][...]), np.nan)
    return values, var, times, external
  if path.is_dir() and ((path / ".zmetadata").exists() or (path / ".zgroup").exists()
                        or (path / ".zarray").exists() or (path / "zarr.json").exists()):
    arrays = files.zarr_arrays(path)
    candidates = [k for k, a in arrays.items() if k not in (timestamps_key, external_key)]
    if variable is None:  # only >= 3-d arrays are candidates; coordinates are 1-d.
      candidates = [k for k in candidates if len(files.read_zarr_shape(path, k)) >= 3]
    var = _pick(candidates, variable, path, "array")
    raw, attrs = files.read_zarr(path, var)
    values = files.cf_decode(raw, attrs) if raw.dtype.kind in "iuf" else raw
    dims = attrs.get("_ARRAY_DIMENSIONS") or [None]
    tname = timestamps_key or dims[0]
    if tname in arrays and "since" in str(arrays[tname].get("units", "")):
      traw, tattrs = files.read_zarr(path, tname)
      times = files.decode_cf_time(traw, tattrs["units"], tattrs.get("calendar"))
    elif timestamps_key in arrays:
      times = files.read_zarr(path, timestamps_key)[0]
    elif timestamps_key:
      raise DataError(f"{path}: no timestamps array {timestamps_key!r}")
    if external_key:
      external = files.read_zarr(path, external_key)[0]
    return values, var or path.stem, times, external
  raise DataError(f"{path}: unsupported file; use .npy, .npz, .nc or a Zarr directory")


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


def load_array(path: PathLike, name: str = "custom", variable: Optional[str] = None,
               aggregation: str = "sum", interval_minutes: int = 60,
               start: Optional[Union[str, np.datetime64]] = None,
               timestamps_key: Optional[str] = None, external_key: Optional[str] = None,
               layout: str = "THWC") -> SpatioTemporalSeries:
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
    values (T, H, W, C) float32 with NaN where unobserved; timestamps (T,) datetime64[m];
    external (T, F) float32.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise DataError(f"{path}: file not found")
  if aggregation not in AGGREGATIONS:
    raise DataError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
  raw, var, times, external = _read_file(path, variable, timestamps_key, external_key)
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
  return SpatioTemporalSeries(
      name=name, values=values, timestamps=timestamps, external=external,
      external_names=tuple(ext_names), aggregation=aggregation, units="",
      interval_minutes=int(interval_minutes), channel_names=channels, source=str(path))
