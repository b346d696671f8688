"""Generic loader for a user's gridded series, plus the file helpers the other loaders share.

`load_array` reads one (T, H, W) or (T, H, W, C) array from .npy / .npz / NetCDF (.nc) / Zarr
(v2 directory stores are decoded directly with numcodecs; v3 stores through the `zarr` package)
and returns a `SpatioTemporalSeries`. NaN in the values means "not observed" and is kept; Inf is
an error.

Timestamps, in order of precedence:
  1. from the file: `timestamps_key` (an array of datetime64, ISO strings, or integers read as
     minutes since 1970-01-01), or a CF time coordinate ("<unit> since <date>") on the variable's
     first dimension in NetCDF/Zarr; `interval_minutes` is then the median step of those stamps;
  2. `start` + k * `interval_minutes`;
  3. nothing given: 1970-01-01 00:00 + k * `interval_minutes` (placeholder steps, so calendar
     features are meaningless; pass `start` for real dates).
"""
from __future__ import annotations

import json
import math
import pathlib
import re
from typing import Optional, Union

import numpy as np

from diffrecon_jax.data.series import (AGGREGATIONS, DataError, SpatioTemporalSeries,
                                       calendar_features)

PathLike = Union[str, pathlib.Path]

_TIME_UNIT_MINUTES = {"day": 1440.0, "days": 1440.0, "d": 1440.0,
                      "hour": 60.0, "hours": 60.0, "h": 60.0, "hr": 60.0,
                      "minute": 1.0, "minutes": 1.0, "min": 1.0, "mins": 1.0,
                      "second": 1 / 60, "seconds": 1 / 60, "s": 1 / 60, "sec": 1 / 60}
_GREGORIAN = (None, "", "standard", "gregorian", "proleptic_gregorian")


# ---------------------------------------------------------------------------------------------
# Shared helpers (also used by the dataset-specific loaders).
# ---------------------------------------------------------------------------------------------

def check_values(values: np.ndarray, source: str, allow_nan: bool = False) -> np.ndarray:
  """Casts to float32 and rejects Inf (always) and NaN (unless `allow_nan`: NaN = missing)."""
  values = np.asarray(values, dtype=np.float32)
  if np.isinf(values).any():
    raise DataError(f"{source}: {int(np.isinf(values).sum())} infinite values (Inf) in the data "
                    f"(after casting to float32); fix or mask them as NaN in the file")
  n_nan = int(np.isnan(values).sum())
  if n_nan and not allow_nan:
    raise DataError(f"{source}: {n_nan} NaN values, but this dataset has no missing values; "
                    f"the file is corrupt or not the expected one")
  if n_nan == values.size:
    raise DataError(f"{source}: every value is NaN (nothing observed)")
  return values


def decode_cf_time(values: np.ndarray, units: str, calendar: Optional[str] = None) -> np.ndarray:
  """CF time ("hours since 1800-01-01 00:00:00") -> (T,) datetime64[m], Gregorian calendars only."""
  m = re.fullmatch(r"\s*(\w+)\s+since\s+(.+?)\s*", str(units))
  if not m or m.group(1).lower() not in _TIME_UNIT_MINUTES:
    raise DataError(f"time units {units!r} not understood; expected '<days|hours|minutes|seconds> "
                    f"since <YYYY-MM-DD[ hh:mm:ss]>'")
  if calendar not in _GREGORIAN:
    raise DataError(f"time calendar {calendar!r} is not supported (only standard/gregorian); "
                    f"convert the time axis or pass timestamps explicitly")
  ref = m.group(2).strip().replace("T", " ")
  ref = re.sub(r"(\s*(UTC|Z|[+-]00:?00))$", "", ref)
  parts = ref.split()
  date = parts[0]
  y, mo, d = (date.split("-") + ["1", "1"])[:3]
  clock = parts[1] if len(parts) > 1 else "00:00:00"
  hms = [float(x) for x in clock.split(":")] + [0.0, 0.0]
  origin = (np.datetime64(f"{int(y):04d}-{int(mo):02d}-{int(d):02d}", "m")
            + np.timedelta64(int(round(hms[0] * 60 + hms[1] + hms[2] / 60)), "m"))
  minutes = np.rint(np.asarray(values, np.float64) * _TIME_UNIT_MINUTES[m.group(1).lower()])
  return origin + minutes.astype(np.int64).astype("timedelta64[m]")


def _zarr_v2_meta(store: pathlib.Path) -> Optional[dict]:
  """All v2 metadata documents of a store, keyed like .zmetadata ("air/.zarray"), or None."""
  consolidated = store / ".zmetadata"
  if consolidated.is_file():
    return json.loads(consolidated.read_text())["metadata"]
  meta = {}
  for f in list(store.glob("**/.zarray")) + list(store.glob("**/.zattrs")) + list(
      store.glob("**/.zgroup")):
    meta[f.relative_to(store).as_posix()] = json.loads(f.read_text())
  return meta if any(k.endswith(".zarray") for k in meta) else None


def zarr_arrays(store: PathLike) -> dict:
  """Names -> attributes of the arrays in a Zarr store ("" = the store is itself an array)."""
  store = pathlib.Path(store)
  meta = _zarr_v2_meta(store)
  if meta is not None:
    out = {}
    for k in meta:
      if k.endswith(".zarray"):
        name = k[:-len(".zarray")].rstrip("/")
        out[name] = meta.get(f"{name}/.zattrs" if name else ".zattrs", {})
    return out
  import zarr  # v3 stores (zarr.json): use the library.
  node = zarr.open(str(store), mode="r")
  if isinstance(node, zarr.Array):
    return {"": dict(node.attrs)}
  return {name: dict(arr.attrs) for name, arr in node.arrays()}


def read_zarr(store: PathLike, name: str = "") -> tuple[np.ndarray, dict]:
  """Reads one array of a Zarr store -> (raw stored values, attributes); no CF decoding.

  Zarr v2 chunks are decoded with numcodecs (compressor + filters), each placed at its offset
  and cropped at the edges; missing chunks are the array's fill value.
  """
  store = pathlib.Path(store)
  meta = _zarr_v2_meta(store)
  prefix = f"{name}/" if name else ""
  if meta is None:
    import zarr
    node = zarr.open(str(store), mode="r")
    arr = node if not name else node[name]
    return np.asarray(arr[...]), dict(arr.attrs)
  if f"{prefix}.zarray" not in meta:
    raise DataError(f"{store}: no array {name!r}; arrays: {sorted(zarr_arrays(store))}")
  za = meta[f"{prefix}.zarray"]
  attrs = meta.get(f"{prefix}.zattrs", {})
  import numcodecs
  dtype = np.dtype(za["dtype"])
  if dtype.kind in "OUSV":
    raise DataError(f"{store}/{name}: dtype {dtype} not supported (numeric arrays only)")
  shape, chunks = tuple(za["shape"]), tuple(za["chunks"])
  fill = za.get("fill_value")
  if fill is None:
    fill = 0
  elif isinstance(fill, str):  # "NaN", "Infinity", "-Infinity"
    fill = float(fill.replace("Infinity", "inf"))
  out = np.full(shape, fill, dtype=dtype)
  sep = za.get("dimension_separator", ".")
  compressor = numcodecs.get_codec(za["compressor"]) if za.get("compressor") else None
  filters = [numcodecs.get_codec(f) for f in (za.get("filters") or [])]
  grid = [math.ceil(s / c) for s, c in zip(shape, chunks)] or [1]
  for idx in np.ndindex(*grid):
    chunk_file = store / prefix / sep.join(str(i) for i in idx)
    if not chunk_file.is_file():
      continue
    buf = chunk_file.read_bytes()
    if compressor is not None:
      buf = compressor.decode(buf)
    for f in reversed(filters):
      buf = f.decode(buf)
    block = np.frombuffer(buf, dtype=dtype).reshape(chunks, order=za.get("order", "C"))
    if not shape:
      return block.reshape(()).copy(), attrs
    dst = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(idx, chunks, shape))
    out[dst] = block[tuple(slice(0, d.stop - d.start) for d in dst)]
  return out, attrs


def _cf_decode(raw: np.ndarray, attrs: dict) -> np.ndarray:
  """Applies CF _FillValue/missing_value (-> NaN), scale_factor and add_offset."""
  values = raw.astype(np.float64)
  for key in ("_FillValue", "missing_value"):
    if attrs.get(key) is not None:
      values[raw == np.asarray(attrs[key]).astype(raw.dtype)] = np.nan
  values = values * float(attrs.get("scale_factor", 1.0)) + float(attrs.get("add_offset", 0.0))
  return values


# ---------------------------------------------------------------------------------------------
# Generic loader.
# ---------------------------------------------------------------------------------------------

def _to_datetimes(arr: np.ndarray, source: str) -> np.ndarray:
  arr = np.asarray(arr)
  if arr.ndim != 1:
    raise DataError(f"{source}: timestamps must be 1-d, got shape {arr.shape}")
  if arr.dtype.kind == "M":
    return arr.astype("datetime64[m]")
  if arr.dtype.kind in "iu":
    return arr.astype(np.int64).astype("datetime64[m]")  # minutes since 1970-01-01.
  if arr.dtype.kind in "SUO":
    try:
      return np.array([np.datetime64(a.decode() if isinstance(a, bytes) else str(a), "m")
                       for a in arr])
    except ValueError as e:
      raise DataError(f"{source}: timestamps not ISO 8601 strings ({e})") from e
  raise DataError(f"{source}: timestamps dtype {arr.dtype} not understood (use datetime64, ISO "
                  f"strings or integer minutes since 1970-01-01)")


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
        times = decode_cf_time(tv[...], tv.units, getattr(tv, "calendar", None))
      elif timestamps_key:
        raise DataError(f"{path}: timestamps variable {timestamps_key!r} missing or has no CF "
                        f"'<unit> since <date>' units")
      if external_key:
        external = np.ma.filled(np.ma.asarray(ds.variables[external_key][...]), np.nan)
    return values, var, times, external
  if path.is_dir() and ((path / ".zmetadata").exists() or (path / ".zgroup").exists()
                        or (path / ".zarray").exists() or (path / "zarr.json").exists()):
    arrays = zarr_arrays(path)
    candidates = [k for k, a in arrays.items() if k not in (timestamps_key, external_key)]
    if variable is None:  # only >= 3-d arrays are candidates; coordinates are 1-d.
      candidates = [k for k in candidates if len(read_zarr_shape(path, k)) >= 3]
    var = _pick(candidates, variable, path, "array")
    raw, attrs = read_zarr(path, var)
    values = _cf_decode(raw, attrs) if raw.dtype.kind in "iuf" else raw
    dims = attrs.get("_ARRAY_DIMENSIONS") or [None]
    tname = timestamps_key or dims[0]
    if tname in arrays and "since" in str(arrays[tname].get("units", "")):
      traw, tattrs = read_zarr(path, tname)
      times = decode_cf_time(traw, tattrs["units"], tattrs.get("calendar"))
    elif timestamps_key in arrays:
      times = read_zarr(path, timestamps_key)[0]
    elif timestamps_key:
      raise DataError(f"{path}: no timestamps array {timestamps_key!r}")
    if external_key:
      external = read_zarr(path, external_key)[0]
    return values, var or path.stem, times, external
  raise DataError(f"{path}: unsupported file; use .npy, .npz, .nc or a Zarr directory")


def read_zarr_shape(store: PathLike, name: str) -> tuple:
  """Shape of one array of a Zarr store without reading its chunks."""
  store = pathlib.Path(store)
  meta = _zarr_v2_meta(store)
  if meta is not None:
    return tuple(meta[f"{name}/.zarray" if name else ".zarray"]["shape"])
  import zarr
  node = zarr.open(str(store), mode="r")
  return tuple((node if not name else node[name]).shape)


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
      minutes since 1970, or CF "<unit> since <date>" in NetCDF/Zarr).
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
  values = check_values(_to_thwc(raw, layout, str(path)), str(path), allow_nan=True)
  t = values.shape[0]

  if times is not None:
    timestamps = _to_datetimes(times, str(path))
    if timestamps.shape != (t,):
      raise DataError(f"{path}: {timestamps.shape[0]} timestamps for {t} slices")
    steps = np.diff(timestamps).astype(np.int64)
    if (steps <= 0).any():
      raise DataError(f"{path}: timestamps are not strictly increasing")
    interval_minutes = int(np.median(steps))
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
