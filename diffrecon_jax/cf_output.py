"""Reconstructions as CF-1.10 NetCDF (xarray), for xarray, cdo, Panoply and GIS tools.

Layout of the file `write` makes from the arrays of `user_reconstruct` (VAR is the input's
variable name, ROW / COL its row and column dimension names, e.g. lat / lon):
  VAR (time, ROW, COL, channel)                    the point estimate of the fine maps
  VAR_interval (quantile, time, ROW, COL, channel) its 90% interval (quantile 0.05, 0.95)
  VAR_members (realization, time, ROW, COL, channel)  the ensemble members, when saved
  VAR_coarse (time, ROW_coarse, COL_coarse, channel)  the completed coarse maps
  VAR_coarse_interval (quantile, ...)              their 90% interval (exact where observed)
  observed (time, ROW_coarse, COL_coarse)          flag: 0 hidden, 1 observed
Coordinates: time (CF units and calendar), ROW / COL refined by N from the input's (with its
units, standard_name and axis; `lat` / `lon` get the CF latitude / longitude attributes when the
input has none) and their cell bounds (ROW_bnds ...), the input's coarse coordinates and bounds,
channel (index), quantile, realization. Global attributes: Conventions, title, source, history
(the input's, with this command appended), institution-free provenance (package version, git
commit, sampler as JSON) and the scale factor N.
"""
from __future__ import annotations

import datetime
import json
import sys
from typing import Optional

import numpy as np

from diffrecon_jax import metrics as metrics_lib
from diffrecon_jax import paths

CONVENTIONS = "CF-1.10"
# CF attributes of the usual geographic names, for inputs that carry none.
_GEO = {"lat": ("latitude", "degrees_north", "Y"), "latitude": ("latitude", "degrees_north", "Y"),
        "lon": ("longitude", "degrees_east", "X"), "longitude": ("longitude", "degrees_east", "X")}


def refine_coordinates(coarse: np.ndarray, scale: int) -> np.ndarray:
  """(I,) coarse cell-centre coordinates -> (N*I,) fine cell centres: cell i of spacing d_i
  (the local step, `np.gradient`) splits into N cells centred at c_i + d_i * ((m + 0.5) / N - 0.5),
  m = 0 .. N-1. A single coarse cell has no spacing: its fine cells get the centre +- index."""
  c = np.asarray(coarse, np.float64)
  d = np.gradient(c) if c.size > 1 else np.ones_like(c)
  offsets = (np.arange(scale) + 0.5) / scale - 0.5                         # (N,)
  return (c[:, None] + d[:, None] * offsets[None, :]).reshape(-1)


def interval_outputs(parts: list, members: bool = False) -> dict:
  """The arrays written for a list of `DiffReconMethod.reconstruct` outputs (contiguous pieces):
  fine, coarse, and the 90% intervals fine_q05 / fine_q95 / coarse_q05 / coarse_q95 (float32);
  with `members` (and members in the outputs) also `samples` (S, n, NI, NJ, C).
  Calibrated intervals when the method had a calibration; else the members' central 90%
  interval at Weibull positions (`metrics.ensemble_interval`; the members' completions for the
  coarse cells, the point completion when there are none)."""
  cat = lambda key, axis=0: np.concatenate([p[key] for p in parts], axis=axis)
  out = {"fine": cat("fine").astype(np.float32), "coarse": cat("coarse").astype(np.float32)}
  for name, rec_key, samples_key in (("fine", "intervals", "samples"),
                                     ("coarse", "coarse_intervals", "coarse_samples")):
    if parts[0].get(rec_key) is not None:
      lo, hi = (np.concatenate([p[rec_key][0.9][i] for p in parts]) for i in (0, 1))
    elif parts[0].get(samples_key) is not None:
      lo, hi = metrics_lib.ensemble_interval(cat(samples_key, axis=1), 0.9)
    else:
      lo = hi = out[name]
    out[f"{name}_q05"], out[f"{name}_q95"] = (np.asarray(a, np.float32) for a in (lo, hi))
  if members and parts[0].get("samples") is not None:
    out["samples"] = cat("samples", axis=1).astype(np.float32)
  return out


def cell_bounds(centres: np.ndarray) -> np.ndarray:
  """(n,) cell centres -> (n, 2) bounds: halfway to each neighbour, the end cells mirrored."""
  c = np.asarray(centres, np.float64)
  if c.size == 1:
    return np.array([[c[0] - 0.5, c[0] + 0.5]])
  mid = (c[1:] + c[:-1]) / 2
  lower = np.concatenate([[c[0] - (mid[0] - c[0])], mid])
  upper = np.concatenate([mid, [c[-1] + (c[-1] - mid[-1])]])
  return np.stack([lower, upper], axis=1)


def axis_attrs(dim: str, axis: str, given: Optional[dict], indices: bool) -> dict:
  """CF attributes of a spatial coordinate: the input's, completed for lat / lon names; cell
  indices get a long_name and the axis only."""
  if indices:
    return {"long_name": f"{dim} index of the cell", "axis": axis, "units": "1"}
  attrs = {k: v for k, v in (given or {}).items() if k in ("units", "standard_name", "long_name")}
  name, units, geo_axis = _GEO.get(dim.lower(), (None, None, axis))
  if name:
    attrs.setdefault("standard_name", name)
    attrs.setdefault("units", units)
  attrs.setdefault("long_name", f"{dim} of the cell centre")
  attrs["axis"] = geo_axis if name else axis
  return attrs


def history_line(previous: str = "") -> str:
  """The input's history with this command appended (CF: one dated line per process step)."""
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
  line = f"{stamp}: {' '.join(sys.argv)} (diffrecon_jax reconstruct)"
  return f"{previous.rstrip()}\n{line}" if previous.strip() else line


def build(out: dict, *, variable: str, units: str, dims: tuple = ("y", "x"),
          coords: Optional[dict] = None, coord_attrs: Optional[dict] = None, scale: int,
          attrs: dict):
  """The xarray Dataset of a reconstruction (module docstring).

  out: `user_reconstruct` arrays: fine / fine_q05 / fine_q95 (n, N*I, N*J, C), coarse /
    coarse_q05 / coarse_q95 (n, I, J, C), observed (n, I, J), time (n,) datetime64, optional
    samples (S, n, N*I, N*J, C).
  variable, units: the input variable's name and units; dims: its (row, column) dimension
    names; coords: {dim: (I,) or (J,) coarse centres} where the input has them; coord_attrs:
    {dim: the input coordinate's attributes}; attrs: global attributes (history appended to).
  """
  import xarray as xr  # pylint: disable=g-import-not-at-top
  coords, coord_attrs = coords or {}, coord_attrs or {}
  n, ni, nj, c = out["fine"].shape
  i, j = out["coarse"].shape[1:3]
  row, col = dims
  coord_vars, bounds = {}, {}
  for dim, size, axis in ((row, i, "Y"), (col, j, "X")):
    given = coords.get(dim)
    coarse = (np.asarray(given, np.float64) if given is not None
              else np.arange(size, dtype=np.float64))
    fine = (refine_coordinates(coarse, scale) if given is not None
            else np.arange(size * scale, dtype=np.float64))
    for name, values in ((dim, fine), (f"{dim}_coarse", coarse)):
      a = axis_attrs(dim, axis, coord_attrs.get(dim), given is None)
      a["bounds"] = f"{name}_bnds"
      coord_vars[name] = xr.Variable((name,), values, a)
      bounds[f"{name}_bnds"] = xr.Variable((name, "nv"), cell_bounds(values))
  coord_vars["time"] = xr.Variable(("time",), out["time"].astype("datetime64[ns]"),
                                   {"standard_name": "time", "axis": "T"})
  coord_vars["channel"] = xr.Variable(("channel",), np.arange(c, dtype=np.int32),
                                      {"long_name": "channel index (the input's last axis)"})
  coord_vars["quantile"] = xr.Variable(("quantile",), np.array([0.05, 0.95]),
                                       {"long_name": "quantile of the 90% interval",
                                        "units": "1"})
  fine_dims = ("time", row, col, "channel")
  coarse_dims = ("time", f"{row}_coarse", f"{col}_coarse", "channel")
  unit = {"units": units} if units else {}
  data = {
      variable: xr.Variable(fine_dims, out["fine"], dict(
          long_name=f"{variable}, fine grid, point estimate", **unit)),
      f"{variable}_interval": xr.Variable(
          ("quantile",) + fine_dims, np.stack([out["fine_q05"], out["fine_q95"]]), dict(
              long_name=f"{variable}, fine grid, 90% interval", **unit)),
      f"{variable}_coarse": xr.Variable(coarse_dims, out["coarse"], dict(
          long_name=f"{variable}, completed coarse grid (observed cells keep their values)",
          **unit)),
      f"{variable}_coarse_interval": xr.Variable(
          ("quantile",) + coarse_dims, np.stack([out["coarse_q05"], out["coarse_q95"]]), dict(
              long_name=f"{variable}, completed coarse grid, 90% interval", **unit)),
      "observed": xr.Variable(("time", f"{row}_coarse", f"{col}_coarse"),
                              out["observed"].astype(np.int8), {
                                  "long_name": "whether the coarse cell was observed",
                                  "flag_values": np.array([0, 1], np.int8),
                                  "flag_meanings": "hidden observed"}),
      **bounds,
  }
  if "truth" in out:  # evaluation predictions: the scored truth beside them
    data[f"{variable}_truth"] = xr.Variable(fine_dims, out["truth"], dict(
        long_name=f"{variable}, fine grid, the true values scored", **unit))
  if "samples" in out:
    coord_vars["realization"] = xr.Variable(
        ("realization",), np.arange(out["samples"].shape[0], dtype=np.int32),
        {"standard_name": "realization", "long_name": "ensemble member"})
    data[f"{variable}_members"] = xr.Variable(("realization",) + fine_dims, out["samples"], dict(
        long_name=f"{variable}, fine grid, ensemble members", **unit))
  global_attrs = {"Conventions": CONVENTIONS,
                  "title": f"{variable} reconstructed on a grid {scale}x finer by DiffRecon",
                  "scale_factor_N": int(scale), **attrs,
                  "history": history_line(str(attrs.get("history", "")))}
  return xr.Dataset(data, coords=coord_vars, attrs=global_attrs)


def write(path, out: dict, **kwargs):
  """`build(out, **kwargs)` written to `path` (any `paths` location; compressed, float32 values,
  time in minutes since 1970 on the standard calendar); returns the path."""
  ds = build(out, **kwargs)
  encoding = {name: {"zlib": True, "complevel": 4} for name in ds.data_vars
              if ds[name].dtype.kind == "f" and not name.endswith("_bnds")}
  encoding["time"] = {"units": "minutes since 1970-01-01 00:00:00", "calendar": "standard",
                      "dtype": "int64"}
  path = paths.as_path(path)
  with paths.local_copy(path) as local:
    ds.to_netcdf(local, engine="netcdf4", encoding=encoding)
  return path


def provenance_text(mode: str) -> str:
  """What produced the file (`provenance.collect`: versions, devices, git commit, command) as a
  JSON global attribute."""
  from diffrecon_jax import provenance  # pylint: disable=g-import-not-at-top
  return json.dumps(provenance.collect(mode=mode), sort_keys=True, default=str)


def sampler_text(sampler) -> str:
  """The sampler settings as a JSON string (a NetCDF attribute cannot hold a dict)."""
  return json.dumps(sampler, sort_keys=True, default=str)
