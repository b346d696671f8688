"""Writes a user-style grid file from the embedded real data, to try `configs/custom.py` on.

  python -m diffrecon_jax.data.example_grid grid.nc          # NetCDF, CF time axis
  python -m diffrecon_jax.data.example_grid grid.npz         # npz: `flow` + `time` arrays
  python -m diffrecon_jax.data.example_grid observed.nc --coarsen 2 --last 48 --nan-fraction 0.3
  python -m diffrecon_jax.data.example_grid grid_months --monthly   # one .nc per month

The file holds the embedded NYC Citi Bike flows (Lin et al., KDD 2020; Aug-Oct 2016, 30 min,
14 x 8 cells, inflow and outflow; `--dataset nytaxi`: the embedded NYC taxi flows, Jan-Mar 2016,
16 x 12 cells) as a variable `flow` (time, y, x, channel) with a CF time coordinate, the layout
most users' exports have. `--drop-every K` removes every K-th slice
(sensor outages: holes in the time axis) and `--nan-fraction F` sets a fraction F of the cells
of every slice to NaN (unobserved), so the gap and missing-value paths can be tried on real
values. `--coarsen N` writes the coarse maps instead (N x N blocks summed; NetCDF gets `y` / `x`
coordinates: the coarse cell centres in fine-grid rows / columns) with the NaN cells drawn on the
coarse grid, and `--last K` keeps the last K slices (`--first K` the first K): an incomplete coarse file of the kind
`--mode=reconstruct --config.reconstruct.input=...` reads. Nothing here is read by the training
code; it only writes files.
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib

import numpy as np

from diffrecon_jax.data import coarsen as coarsen_lib
from diffrecon_jax.data import nyc_dsan
from diffrecon_jax.data.series import SpatioTemporalSeries

_EPOCH = np.datetime64("1970-01-01T00:00", "m")


def write_grid(series: SpatioTemporalSeries, path, variable: str = "flow",
               coords: dict = None) -> pathlib.Path:
  """Writes `series.values` (T, H, W, C) and its timestamps to .nc (CF time in minutes since
  1970-01-01) or .npz (`variable` and `time` as datetime64[m]); returns the path written.
  coords: {"y": (H,), "x": (W,)} coordinate variables for the .nc file (None: none)."""
  path = pathlib.Path(path)
  values = np.asarray(series.values, np.float32)
  minutes = (series.timestamps.astype("datetime64[m]") - _EPOCH).astype(np.int64)
  path.parent.mkdir(parents=True, exist_ok=True)
  if path.suffix == ".npz":
    stamps = series.timestamps.astype("datetime64[m]")
    np.savez_compressed(path, **{variable: values, "time": stamps})
    return path
  if path.suffix != ".nc":
    raise ValueError(f"{path}: use a .nc or .npz file name")
  import netCDF4
  t, h, w, c = values.shape
  with netCDF4.Dataset(path, "w") as ds:
    ds.createDimension("time", t)
    ds.createDimension("y", h)
    ds.createDimension("x", w)
    ds.createDimension("channel", c)
    tv = ds.createVariable("time", "i8", ("time",))
    tv.units = "minutes since 1970-01-01 00:00:00"
    tv.calendar = "standard"
    tv[:] = minutes
    for dim, centres in (coords or {}).items():
      cv = ds.createVariable(dim, "f8", (dim,))
      cv[:] = centres
      cv.long_name = f"cell centre in fine-grid {'rows' if dim == 'y' else 'columns'}"
    v = ds.createVariable(variable, "f4", ("time", "y", "x", "channel"), zlib=True,
                          fill_value=np.float32(np.nan))
    v.long_name = f"{series.name} ({', '.join(series.channel_names)})"
    v.units = series.units
    v[:] = values
    ds.source = series.source
  return path


DATASETS = {"nybike": nyc_dsan.load_nybike, "nytaxi": nyc_dsan.load_nytaxi}


def example_series(drop_every: int = 0, nan_fraction: float = 0.0, seed: int = 0,
                   coarsen: int = 1, last: int = 0, first: int = 0,
                   dataset: str = "nybike") -> SpatioTemporalSeries:
  """The embedded `dataset` series (nybike or nytaxi), optionally pooled to coarse maps by
  `coarsen` = N (sums of N x N blocks), with every `drop_every`-th slice removed, a fraction
  `nan_fraction` of the cells of each slice set to NaN (seeded; coarse cells when coarsened)
  and only the `last` (or the `first`) slices kept (0: all)."""
  if dataset not in DATASETS:
    raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {dataset!r}")
  if first > 0 and last > 0:
    raise ValueError("give `first` or `last`, not both")
  s = DATASETS[dataset]()
  values, stamps = s.values.copy(), s.timestamps
  if coarsen > 1:
    values = coarsen_lib.coarsen(values, coarsen, s.aggregation)
  if nan_fraction > 0:
    rng = np.random.default_rng(seed)
    hidden = rng.random(values.shape[:3]) < nan_fraction
    values[hidden] = np.nan
  keep = np.ones(len(stamps), bool)
  if drop_every > 0:
    keep[drop_every - 1::drop_every] = False
  if last > 0:
    keep[:-last] = False
  if first > 0:
    keep[first:] = False
  return SpatioTemporalSeries(
      name="example", values=values[keep], timestamps=stamps[keep], external=s.external[keep],
      external_names=s.external_names, aggregation=s.aggregation, units=s.units,
      interval_minutes=s.interval_minutes, channel_names=s.channel_names, source=s.source)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("path", help="output file: NAME.nc or NAME.npz")
  p.add_argument("--drop-every", type=int, default=0, help="remove every K-th slice (0: none)")
  p.add_argument("--nan-fraction", type=float, default=0.0,
                 help="fraction of cells set to NaN in every slice (0: none)")
  p.add_argument("--coarsen", type=int, default=1,
                 help="write coarse maps: sums of N x N blocks (1: the fine grid)")
  p.add_argument("--last", type=int, default=0, help="keep only the last K slices (0: all)")
  p.add_argument("--first", type=int, default=0, help="keep only the first K slices (0: all)")
  p.add_argument("--dataset", default="nybike", choices=sorted(DATASETS),
                 help="the embedded dataset to write")
  p.add_argument("--monthly", action="store_true",
                 help="PATH is a folder: one NetCDF file per month (NAME_YYYY-MM.nc), as "
                      "per-period exports come; train on them with data.path='PATH/*.nc'")
  args = p.parse_args(argv)
  if not 0.0 <= args.nan_fraction < 1.0:
    p.error(f"--nan-fraction must be in [0, 1), got {args.nan_fraction}")
  if args.coarsen < 1 or args.last < 0 or args.first < 0:
    p.error(f"--coarsen must be >= 1 and --last, --first >= 0, got {args.coarsen}, {args.last} "
            f"and {args.first}")
  if args.last and args.first:
    p.error("give --first or --last, not both")
  series = example_series(args.drop_every, args.nan_fraction, coarsen=args.coarsen,
                          last=args.last, first=args.first, dataset=args.dataset)
  n = args.coarsen
  coords = None
  if n > 1:  # coarse cell centres in fine-grid rows / columns: refined by N they are 0, 1, ...
    h, w = series.fine_shape
    coords = {"y": np.arange(h) * n + (n - 1) / 2, "x": np.arange(w) * n + (n - 1) / 2}
  if args.monthly:
    out = write_monthly(series, pathlib.Path(args.path), coords)
  else:
    out = write_grid(series, args.path, coords=coords)
  print(f"wrote {out}: {series.values.shape[0]} slices of {series.fine_shape[0]}x"
        f"{series.fine_shape[1]} cells, {series.channels} channels ({series.units})")


def write_monthly(series: SpatioTemporalSeries, folder: pathlib.Path, coords=None) -> str:
  """`series` as one NetCDF file per calendar month in `folder` (created); returns a glob of
  them."""
  folder.mkdir(parents=True, exist_ok=True)
  months = series.timestamps.astype("datetime64[M]")
  for month in np.unique(months):
    keep = months == month
    part = dataclasses.replace(series, values=series.values[keep],
                               timestamps=series.timestamps[keep],
                               external=series.external[keep])
    write_grid(part, folder / f"{folder.name}_{month}.nc", coords=coords)
  return str(folder / "*.nc")


if __name__ == "__main__":
  main()
