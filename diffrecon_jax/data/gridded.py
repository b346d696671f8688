"""NetCDF and Zarr inputs through xarray: one file, a Zarr store, or many files (a glob such as
`DIR/*.nc`, or a folder of .nc files) joined along time, with CF decoding (fill values, scale and
offset, time units on any cftime calendar) and the variable's labels (units, dimension names,
coordinates and their attributes, the file's history) kept for the outputs.

Calendars: the standard ones map onto the real time axis as they are; `noleap` / `365_day` /
`all_leap` / `366_day` / `julian` dates are taken as the same calendar dates on the real axis
(a noleap series then simply has no 29 February: a hole the time axis' gap rule handles);
`360_day` has dates the real calendar does not (30 February) and is refused in one line.
"""
from __future__ import annotations

import dataclasses
import glob as glob_lib
import pathlib
from typing import Optional

import numpy as np

from diffrecon_jax.data import files
from diffrecon_jax.data.series import DataError

NETCDF_SUFFIXES = (".nc", ".nc4", ".netcdf", ".cdf")
_DEFAULT_FILL = 9.9e36  # netCDF's default fill values of float types are 9.97e36
_GLOB = set("*?[")
# cftime calendars whose dates all exist on the real (proleptic Gregorian) calendar.
_MAPPABLE = ("standard", "gregorian", "proleptic_gregorian", "noleap", "365_day", "all_leap",
             "366_day", "julian", "")


@dataclasses.dataclass(frozen=True)
class Labels:
  """What a gridded variable is called and where it sits: dims (row, column dimension names),
  coords {dim: (n,) float64}, coord_attrs {dim: attributes}, units, variable, history."""
  dims: tuple = ("y", "x")
  coords: dict = dataclasses.field(default_factory=dict)
  coord_attrs: dict = dataclasses.field(default_factory=dict)
  units: str = ""
  variable: str = "values"
  history: str = ""


def is_gridded(path) -> bool:
  """Whether `path` is read here: a NetCDF file, a Zarr store, a glob of files or a folder of
  NetCDF files."""
  text = str(path)
  if _GLOB & set(text):
    return True
  p = pathlib.Path(text)
  if p.suffix.lower() in NETCDF_SUFFIXES:
    return True
  if p.is_dir():
    return (any((p / m).exists() for m in (".zmetadata", ".zgroup", ".zarray", "zarr.json"))
            or bool(_netcdf_files(p)))
  return False


def _netcdf_files(folder: pathlib.Path) -> list:
  return sorted(str(f) for f in folder.iterdir() if f.suffix.lower() in NETCDF_SUFFIXES)


def sources(path) -> list:
  """The files (or the one Zarr store) `path` names, sorted; DataError when there are none."""
  text = str(path)
  if _GLOB & set(text):
    found = sorted(glob_lib.glob(text))
    if not found:
      raise DataError(f"{text}: no file matches this pattern")
    return found
  p = pathlib.Path(text)
  if not p.exists():
    raise DataError(f"{p}: file not found")
  if p.is_dir() and not any((p / m).exists() for m in (".zmetadata", ".zgroup", ".zarray",
                                                      "zarr.json")):
    found = _netcdf_files(p)
    if not found:
      raise DataError(f"{p}: a folder with no NetCDF files and no Zarr store")
    return found
  return [text]


def _open_one(path: str):
  """One file or store, its CF time variables decoded here (`decode_time`) from their raw
  numbers: xarray's own decoding turns a missing time into the epoch without a word, and a Zarr
  array's storage fill_value (0 for a float time array: a real first time) would mask it."""
  import xarray as xr  # pylint: disable=g-import-not-at-top
  engine = "zarr" if pathlib.Path(path).is_dir() else "netcdf4"
  try:
    ds = xr.open_dataset(path, engine=engine, decode_times=False, chunks=None)
    raw = xr.open_dataset(path, engine=engine, decode_times=False, chunks=None,
                          mask_and_scale=False)
  except ValueError as err:
    raise DataError(f"{path}: cannot decode it with CF conventions ({err})") from err
  for name in list(ds.variables):
    var = raw[name]
    units = str(var.attrs.get("units", ""))
    if " since " in units and var.dtype.kind in "iuf":
      attrs = {k: v for k, v in ds[name].attrs.items() if k not in ("units", "calendar")}
      values = np.asarray(var.values, np.float64)
      if "missing_value" in var.attrs:
        values = np.where(values == float(var.attrs["missing_value"]), np.nan, values)
      decoded = decode_time(values, units, str(var.attrs.get("calendar", "standard")),
                            f"{path}/{name}")
      ds[name] = xr.Variable(var.dims, decoded, attrs)
  return ds


def decode_time(raw, units: str, calendar: str, source: str) -> np.ndarray:
  """CF time numbers -> datetime64[m] on the real calendar (`to_datetime64`; cftime reads any
  "<unit> since <date>"), NaT where a value is missing (NaN / the fill value)."""
  import cftime  # pylint: disable=g-import-not-at-top
  raw = np.asarray(raw, np.float64)
  out = np.full(raw.shape, np.datetime64("NaT", "m"))
  # NetCDF's default fill value (9.97e36: a record never written) is missing too; xarray masks
  # only an explicit _FillValue.
  finite = np.isfinite(raw) & (np.abs(raw) < _DEFAULT_FILL)
  if finite.any():
    try:
      dates = cftime.num2date(raw[finite], units, calendar=calendar or "standard",
                              only_use_cftime_datetimes=True)
    except (ValueError, OverflowError) as err:  # "months since", an unknown calendar or unit
      raise DataError(f"{source}: time units {units!r} (calendar {calendar!r}) not understood "
                      f"({err})") from err
    out[finite] = to_datetime64(np.asarray(dates, dtype=object), source)
  return out


def open_dataset(path):
  """The xarray Dataset of `path` (`sources`): several files are joined along the time
  dimension of their data variables, in time order."""
  import xarray as xr  # pylint: disable=g-import-not-at-top
  files = sources(path)
  parts = [_open_one(f) for f in files]
  if len(parts) == 1:
    return parts[0]
  time_dim = next((d for d in parts[0].dims if d.lower().startswith("time")), None)
  if time_dim is None:
    raise DataError(f"{path}: {len(files)} files but no time dimension to join them along")
  joined = xr.concat(parts, dim=time_dim, data_vars="minimal", coords="minimal",
                     compat="override", join="override")
  return joined.sortby(time_dim)


def to_datetime64(times, source: str) -> np.ndarray:
  """(T,) decoded CF times (cftime objects or datetime64) -> (T,) datetime64[m] on the real
  calendar (module docstring); DataError for 360_day or a date the real calendar lacks."""
  arr = np.asarray(times)
  if arr.dtype.kind == "M":
    return arr.astype("datetime64[m]")
  if arr.dtype.kind != "O" or not arr.size:
    return arr
  calendar = str(getattr(arr.flat[0], "calendar", "") or "")
  if calendar not in _MAPPABLE:
    raise DataError(f"{source}: time calendar {calendar!r} has dates the real calendar lacks "
                    f"(30 February); convert the time axis (e.g. cdo setcalendar) first")
  try:
    return np.array([np.datetime64(f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:"
                                   f"{t.minute:02d}", "m") for t in arr.ravel()]).reshape(
                                       arr.shape)
  except ValueError as err:
    raise DataError(f"{source}: a {calendar} date does not exist on the real calendar ({err})"
                    ) from err


def series_axes(labels: Labels) -> tuple:
  """`SpatioTemporalSeries.axes` from Labels: both spatial dims with coordinates, else ()."""
  if not all(d in labels.coords for d in labels.dims):
    return ()
  return tuple((d, labels.coords[d], labels.coord_attrs.get(d, {}).get("units", ""))
               for d in labels.dims)


@dataclasses.dataclass(frozen=True)
class Read:
  """One variable of a gridded input: values (raw array, NaN where missing), times (datetime64[m]
  or None), external (or None), labels."""
  values: np.ndarray
  times: Optional[np.ndarray]
  external: Optional[np.ndarray]
  labels: Labels


def read(path, variable: Optional[str] = None, timestamps_key: Optional[str] = None,
         external_key: Optional[str] = None, layout: str = "THWC") -> Read:
  """The values of `variable` (default: the only >= 3-d data variable) with their CF times (the
  variable's first dimension, or `timestamps_key`), `external_key`'s array and the labels."""
  ds = open_dataset(path)
  source = str(path)
  skip = (timestamps_key, external_key)
  names = [k for k, v in ds.data_vars.items() if v.ndim >= 3 and k not in skip]
  if variable is not None and variable not in ds.variables:
    raise DataError(f"{source}: no variable named {variable!r}; available: "
                    f"{sorted(ds.data_vars)}")
  var = variable if variable is not None else files.pick_name(names, None, source,
                                                              "variable (>= 3-d)")
  da = ds[var]
  values = np.asarray(da.values)
  if values.dtype.kind in "iu":
    values = values.astype(np.float64)
  times = None
  tname = timestamps_key or (da.dims[0] if da.dims else None)
  if tname in ds.variables:
    t = ds[tname].values
    if t.dtype.kind in "MO":
      times = to_datetime64(t, source)
    elif timestamps_key:
      times = t  # integer minutes / ISO strings: files.to_datetimes reads them
  elif timestamps_key:
    raise DataError(f"{source}: no timestamps variable {timestamps_key!r}")
  external = None
  if external_key:
    if external_key not in ds.variables:
      raise DataError(f"{source}: no variable {external_key!r} for the external features")
    external = np.asarray(ds[external_key].values)
  return Read(values=values, times=times, external=external,
              labels=labels_of(ds, var, layout))


def labels_of(ds, var: str, layout: str = "THWC") -> Labels:
  """The Labels of `ds[var]` (its row / column dims taken by `layout`, as the loader reads)."""
  da = ds[var]
  order = layout.upper() if da.ndim == 4 and len(layout) == 4 else "THW"
  if da.ndim < 3:
    return Labels(variable=var)
  dims = (da.dims[order.index("H")], da.dims[order.index("W")])
  has = [d for d in dims if d in ds.coords and ds[d].ndim == 1 and ds[d].dtype.kind in "iuf"]
  return Labels(dims=dims, variable=var, units=str(da.attrs.get("units", "")),
                coords={d: np.asarray(ds[d].values, np.float64) for d in has},
                coord_attrs={d: {k: str(a) for k, a in ds[d].attrs.items()} for d in has},
                history=str(ds.attrs.get("history", "")))
