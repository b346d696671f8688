"""TAPBJ: daily 1 km PM2.5 over Beijing from the TAP dataset (Tracking Air Pollution in China).

TAP data (Geng et al., Environ. Sci. Technol. 2021; http://tapdata.org.cn) are behind
registration and their terms forbid redistribution, so nothing is bundled: the user exports the
grids to a file and this loader reads it with `custom.load_array` (aggregation "mean", daily,
start 2014-01-01 unless the file carries timestamps). NaN cells are kept as missing.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Optional, Union

from diffrecon_jax.data.custom import load_array
from diffrecon_jax.data.series import DataError, SpatioTemporalSeries

MANUAL_DOWNLOAD = (
    "TAPBJ (TAP daily PM2.5) cannot be downloaded automatically and may not be redistributed. "
    "Manual download instructions:\n"
    "  1. Register at http://tapdata.org.cn and request the daily 1 km PM2.5 product.\n"
    "  2. Download the daily 1 km PM2.5 grids covering Beijing for 2014-01-01 .. 2017-12-31.\n"
    "  3. Export them to one NetCDF (.nc), Zarr or .npy/.npz file holding an array of shape "
    "(T, H, W) in ug/m3 (NaN = no data), one slice per day in date order.\n"
    "  4. Point the loader at it: --config.data.path=/path/to/tapbj.nc "
    "--config.data.variable=<name of the PM2.5 variable, e.g. pm25>.")


def load_tapbj(path: Optional[Union[str, pathlib.Path]], variable: Optional[str] = "pm25",
               start: str = "2014-01-01", **kwargs) -> SpatioTemporalSeries:
  """Loads the user's TAP PM2.5 export.

  Args:
    path: the exported file (see `MANUAL_DOWNLOAD`); None or missing -> DataError.
    variable: PM2.5 variable / array name (ignored for .npy).
    start: date of the first slice when the file has no timestamps.
    **kwargs: passed to `custom.load_array` (timestamps_key, external_key, layout).

  Returns:
    values (T, H, W, 1) float32 ug/m3 (NaN = missing), daily, aggregation "mean".
  """
  if path is None or str(path) == "" or not pathlib.Path(path).exists():
    where = "no path given" if not path else f"{path} does not exist"
    raise DataError(f"TAPBJ: {where}. {MANUAL_DOWNLOAD}")
  series = load_array(path, name="tapbj", variable=variable, aggregation="mean",
                      interval_minutes=1440, start=start, **kwargs)
  return dataclasses.replace(
      series, units="ug/m3 (daily mean PM2.5)",
      source=f"{path} (TAP, Geng et al. 2021, http://tapdata.org.cn)")
