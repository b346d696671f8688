"""File-format helpers every loader shares: value checks, CF time decoding, Zarr stores.

Zarr v2 directory stores are decoded directly with numcodecs (no `zarr` import needed for the
real data this project ships with); v3 stores (`zarr.json`) go through the `zarr` package.
"""
from __future__ import annotations

import json
import math
import pathlib
import re
from typing import Optional, Union

import numpy as np

from diffrecon_jax.data.series import DataError

PathLike = Union[str, pathlib.Path]

_TIME_UNIT_MINUTES = {"day": 1440.0, "days": 1440.0, "d": 1440.0,
                      "hour": 60.0, "hours": 60.0, "h": 60.0, "hr": 60.0,
                      "minute": 1.0, "minutes": 1.0, "min": 1.0, "mins": 1.0,
                      "second": 1 / 60, "seconds": 1 / 60, "s": 1 / 60, "sec": 1 / 60}
_GREGORIAN = (None, "", "standard", "gregorian", "proleptic_gregorian")


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
  finite = np.isfinite(minutes)
  out = origin + np.where(finite, minutes, 0).astype(np.int64).astype("timedelta64[m]")
  return np.where(finite, out, np.datetime64("NaT", "m"))


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


def cf_decode(raw: np.ndarray, attrs: dict) -> np.ndarray:
  """Applies CF _FillValue/missing_value (-> NaN), scale_factor and add_offset."""
  values = raw.astype(np.float64)
  for key in ("_FillValue", "missing_value"):
    if attrs.get(key) is not None:
      values[raw == np.asarray(attrs[key]).astype(raw.dtype)] = np.nan
  values = values * float(attrs.get("scale_factor", 1.0)) + float(attrs.get("add_offset", 0.0))
  return values


def read_zarr_shape(store: PathLike, name: str) -> tuple:
  """Shape of one array of a Zarr store without reading its chunks."""
  store = pathlib.Path(store)
  meta = _zarr_v2_meta(store)
  if meta is not None:
    return tuple(meta[f"{name}/.zarray" if name else ".zarray"]["shape"])
  import zarr
  node = zarr.open(str(store), mode="r")
  return tuple((node if not name else node[name]).shape)


def to_datetimes(arr: np.ndarray, source: str) -> np.ndarray:
  """(T,) datetime64 / integer minutes since 1970 / ISO strings -> (T,) datetime64[m]."""
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
