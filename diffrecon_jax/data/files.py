"""File-format helpers every loader shares: value checks and timestamps given as arrays.

NetCDF and Zarr (CF decoding, time units and calendars) are read through xarray:
`data/gridded.py`.
"""
from __future__ import annotations

import pathlib
from typing import Union

import numpy as np

from diffrecon_jax.data.series import DataError

PathLike = Union[str, pathlib.Path]


def pick_name(names: list, variable, source, what: str) -> str:
  """`variable` when it is one of `names`, else the only name; a DataError that lists them."""
  if variable is not None:
    if variable not in names:
      raise DataError(f"{source}: no {what} named {variable!r}; available: {sorted(names)}")
    return variable
  if len(names) != 1:
    raise DataError(f"{source}: {len(names)} candidate {what}s {sorted(names)}; choose one with "
                    f"variable=... (--config.data.variable=...)")
  return names[0]


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
