"""Reconstruct a user's own incomplete coarse observations with a trained workdir
(`--mode=reconstruct --config.reconstruct.input=FILE`).

The input is a file of coarse maps (T, I, J[, C]) in NetCDF / Zarr / .npz / .npy, NaN = not
observed, read by the same loader as a user's training grid (`data.custom.load_array`), with a time
axis (a CF time coordinate, or a `time` / `reconstruct.timestamps_key` array). Everything about
the model comes from the workdir alone (`loading.from_workdir`: the checkpoint's config,
normalisation statistics, shapes, scale N and aggregation; `prior.npz`); nothing of the training
data is read when the model has its climatology prior (the default).

Each slice s with 2 * history slices before it, one interval apart, is reconstructed: stage 1
completes the coarse maps of s's window, each from its own window of observations (as in an
evaluation, `diffrecon/method.py`), stage 2 infers the fine map. Written to `reconstruct.output`
(default `workdir/reconstruction/<input name>`) as .nc and .npz:
  fine (n, N*I, N*J, C)      the point estimate (`sampling.point`)
  fine_q05, fine_q95         the 90% interval of every fine cell: the recalibrated interval
                             (`calibration.py`, fitted on the validation split of the training
                             data and kept in the workdir), or without one the 5% / 95%
                             quantiles of the members (Weibull positions)
  samples (S, n, N*I, N*J, C) with `reconstruct.save_samples`: the (calibrated) members
  coarse (n, I, J, C)        the completed coarse maps (observed cells keep their values)
  coarse_q05, coarse_q95     the 90% interval of the completed coarse cells (observed: exact)
  observed (n, I, J)         1 where the coarse cell was observed (every channel finite)
  time (n,)                  the slices' timestamps
The NetCDF file holds the same arrays in CF-1.10 form, named after the input's variable, with
the input's coordinates refined by N (`refine_coordinates`) and their bounds (`cf_output`). Figures of the last slice go to
`workdir/figures/`. Bad input is a `DataError` naming the file and the value to fix.
"""
from __future__ import annotations

import dataclasses
import pathlib
import time

import numpy as np
from absl import logging

import diffrecon_jax
from diffrecon_jax import cf_output
from diffrecon_jax import evaluate as evaluate_lib
from diffrecon_jax import paths
from diffrecon_jax import figures as figures_lib
from diffrecon_jax.data import custom, pipeline, registry, time_axis
from diffrecon_jax.cf_output import interval_outputs, refine_coordinates  # noqa: F401
from diffrecon_jax.data.errors import DataError
from diffrecon_jax.diffrecon import ablations, loading

# `start` handed to the loader: a file without a time axis gets timestamps from this year, which no
# real series has, so its absence can be told apart from a file that has one.
_NO_TIME = np.datetime64("0001-01-01T00:00", "m")


@dataclasses.dataclass(frozen=True)
class CoarseInput:
  """A user's coarse observations.

  values: (T, I, J, C) float32 physical units, NaN = not observed.
  timestamps: (T,) datetime64[m], strictly increasing on one interval grid (gaps allowed).
  interval_minutes: the step of that grid.
  external: (T, F) float32 external features (the file's `external_key` array, else calendar
    features of the timestamps, as the loader makes them for a training grid).
  dims: (row dimension, column dimension) names; coords: {dim: (I,) or (J,) float64} for the
    dims that have a 1-D coordinate in the file; units: the variable's units ("" if none).
  source: the file's path. variable: the values' variable name (npz / npy: its key, or "values");
  coord_attrs: {dim: the coordinate's attributes (units, standard_name, ...)}; history: the
  file's global `history` attribute ("" if none).
  """
  values: np.ndarray
  timestamps: np.ndarray
  interval_minutes: int
  external: np.ndarray
  dims: tuple
  coords: dict
  units: str
  source: str
  variable: str = "values"
  coord_attrs: dict = dataclasses.field(default_factory=dict)
  history: str = ""


def read_coarse_file(path, variable: str = "", layout: str = "THWC", timestamps_key: str = "",
                     external_key: str = "") -> CoarseInput:
  """Reads coarse observations (see module docstring); DataError for a missing or unreadable
  file, an unsupported format, a wrong number of dimensions, Inf, no observed value or no time
  axis."""
  path = pathlib.Path(path)
  if not path.exists():
    raise DataError(f"{path}: file not found (reconstruct.input)")
  tkey = timestamps_key or None
  if path.suffix.lower() == ".npz" and tkey is None:
    with _readable(path):
      with np.load(path, allow_pickle=False) as z:
        tkey = "time" if "time" in z.files else None  # what example_grid and most exports write
  with _readable(path):
    series, labels = custom.load_with_labels(path, name=path.stem, variable=variable or None,
                                             start=_NO_TIME, timestamps_key=tkey,
                                             external_key=external_key or None, layout=layout)
  if series.timestamps[0] == _NO_TIME:
    raise DataError(f"{path}: no time axis; the model needs each slice's time (calendar "
                    f"features, climatology slot): add a CF time coordinate (NetCDF/Zarr) or a "
                    f"`time` array (npz), or name it with --config.reconstruct.timestamps_key")
  return CoarseInput(values=series.values, timestamps=series.timestamps,
                     interval_minutes=int(series.interval_minutes), external=series.external,
                     source=str(path), **dataclasses.asdict(labels))


class _readable:
  """Turns a reader's low-level error (a .nc that is not NetCDF, a broken npz) into a DataError
  naming the file; DataErrors pass through unchanged."""

  def __init__(self, path):
    self.path = path

  def __enter__(self):
    return self

  def __exit__(self, kind, err, tb):
    if err is None or isinstance(err, DataError):
      return False
    raise DataError(f"{self.path}: not a readable file of coarse maps (T, I, J[, C]) in NetCDF, "
                    f"Zarr, .npz or .npy ({type(err).__name__}: {err})") from err


def _check_against_model(obs: CoarseInput, meta: dict, models, workdir) -> None:
  """The input must fit the model: grid, channels, external features, interval."""
  shapes = meta["shapes"]
  i, j = shapes["coarse_shape"]
  got = obs.values.shape
  if got[-1] != int(shapes["channels"]):
    raise DataError(f"{obs.source}: {got[-1]} channel(s), but the model in {workdir} was "
                    f"trained on {shapes['channels']}; give the same channels in the same order "
                    f"(layout THWC, channel last)")
  if tuple(got[1:3]) != (i, j):
    hint = (" (that is the model's fine grid: give the coarse maps, pooled by "
            f"N={shapes['scale']})" if tuple(got[1:3]) == tuple(shapes["fine_shape"]) else "")
    raise DataError(f"{obs.source}: coarse grid {got[1]}x{got[2]}, but the model in {workdir} "
                    f"reconstructs from {i}x{j} coarse maps{hint}")
  if obs.external.shape[1] != int(shapes["external_dim"]):
    raise DataError(f"{obs.source}: {obs.external.shape[1]} external features, but the model in "
                    f"{workdir} was trained with {shapes['external_dim']}; put the training's "
                    f"(T, {shapes['external_dim']}) external array in the file and name it with "
                    f"--config.reconstruct.external_key")
  prior = models.prior
  if prior is not None and obs.interval_minutes != int(prior.interval_minutes):
    raise DataError(f"{obs.source}: slices {obs.interval_minutes} min apart, but the model in "
                    f"{workdir} was trained on slices {prior.interval_minutes} min apart")


def observed_task(obs: CoarseInput, meta: dict, name: str) -> evaluate_lib.ObservedTask:
  """The `ObservedTask` a method reconstructs from: the user's observations, the checkpoint's
  normalisers, no truth (train_fine / train_coarse have 0 slices)."""
  shapes = meta["shapes"]
  (i, j), (ni, nj), c = shapes["coarse_shape"], shapes["fine_shape"], int(shapes["channels"])
  values = obs.values
  finite = np.isfinite(values)
  mask = finite.all(axis=-1)
  partial = int((finite.any(axis=-1) & ~mask).sum())
  if partial:
    # The model's masks hide a cell in every channel at once (docs/evaluation.md).
    logging.warning("%s: %d cells observed in some channels only are treated as not observed",
                    obs.source, partial)
  t = values.shape[0]
  stats = meta["stats"]
  return evaluate_lib.ObservedTask(
      name=name, coarse_obs=np.where(mask[..., None], values, np.nan).astype(np.float32),
      mask=mask.astype(np.float32), external=np.asarray(obs.external, np.float32),
      timestamps=obs.timestamps, interval_minutes=obs.interval_minutes,
      scale=int(meta["scale"]), aggregation=str(meta.get("aggregation", "sum")),
      history=int(shapes["window"]) - 1, split=pipeline.Split(t, t, t),
      coarse_norm=pipeline.Normalizer.from_json(stats["coarse"]),
      fine_norm=pipeline.Normalizer.from_json(stats["fine"]),
      train_fine=np.zeros((0, ni, nj, c), np.float32),
      train_coarse=np.zeros((0, i, j, c), np.float32))


def reconstructable_slices(obs: CoarseInput, history: int, workdir) -> np.ndarray:
  """(n,) indices of the slices with 2 * history slices before them, one interval apart (each
  history slice is completed from its own window); DataError when there is none."""
  span = 2 * history + 1
  t = obs.values.shape[0]
  if t < span:
    raise DataError(f"{obs.source}: {t} slice(s), but the model in {workdir} (history "
                    f"{history}) needs {span - 1} past slices before each slice it reconstructs: "
                    f"give at least {span} consecutive slices")
  axis = time_axis.TimeAxis(obs.timestamps, obs.interval_minutes, obs.source)
  slices = np.nonzero(axis.whole_windows(span))[0]
  if not slices.size:
    raise DataError(f"{obs.source}: no run of {span} slices {obs.interval_minutes} min apart "
                    f"({axis.summary()}); the model (history {history}) needs {span - 1} past "
                    f"slices before each slice it reconstructs")
  observed = np.isfinite(obs.values).all(axis=-1)
  if not observed[slices[0] - span + 1:].any():
    raise DataError(f"{obs.source}: no coarse cell is observed in any slice used")
  return slices


def reconstruct_file(config, workdir: str) -> dict:
  """`--mode=reconstruct` with `config.reconstruct.input` set; returns {"netcdf", "npz",
  "figures": [...], "slices": n}. `config` gives the `reconstruct` section and the evaluate-time
  ones (`settings.EVALUATE_TIME_FIELDS`: sampling, eval, calibration, ...); the model and
  everything about the data come from `workdir`."""
  rc = config.reconstruct
  path = registry.absolute_path(rc.input)
  obs = read_coarse_file(path, rc.variable, rc.layout, rc.timestamps_key, rc.external_key)

  slices = []

  def check(saved, models, meta):  # before any calibration is fitted: the input fits the model
    if ablations.check(saved) == "noFG":
      raise ValueError(f"{workdir} holds the noFG ablation, whose Diffusion-F was never "
                       "trained; reconstruct with a DiffRecon workdir")
    _check_against_model(obs, meta, models, workdir)
    slices.extend(reconstructable_slices(obs, int(meta["shapes"]["window"]) - 1, workdir))

  # The calibration fitted when the workdir was evaluated; fitted here (on the validation split
  # of the training data the saved config names) when there is none for this sampler.
  method, saved, meta, _ = loading.from_workdir(workdir, config, check=check)
  history = int(meta["shapes"]["window"]) - 1
  slices = np.asarray(slices, np.int64)
  view = observed_task(obs, meta, pathlib.Path(path).stem)
  t0 = time.perf_counter()
  pieces = evaluate_lib.contiguous_pieces(slices, int(saved.eval.chunk_slices))
  parts = [method.reconstruct(view, piece) for piece in pieces]
  seconds = time.perf_counter() - t0
  out = interval_outputs(parts, members=bool(rc.save_samples))
  out.update(observed=view.mask[slices].astype(np.uint8), time=obs.timestamps[slices])
  stem = (paths.resolve(rc.output) if rc.output else
          paths.as_path(workdir) / "reconstruction" / pathlib.Path(path).stem)
  stem.parent.mkdir(parents=True, exist_ok=True)
  npz = stem.with_name(stem.name + ".npz")
  paths.save_npz(npz, **out)
  nc = cf_output.write(
      stem.with_name(stem.name + ".nc"), out, variable=obs.variable, units=obs.units,
      dims=obs.dims, coords=obs.coords, coord_attrs=obs.coord_attrs, scale=int(meta["scale"]),
      attrs={"source": obs.source, "history": obs.history, "workdir": str(workdir),
             "sampler": cf_output.sampler_text(method.sampler),
             "history_slices": history, "diffrecon_jax_version": diffrecon_jax.__version__,
             "provenance": cf_output.provenance_text("reconstruct")})
  figs = reconstruction_figures(paths.as_path(workdir) / "figures", pathlib.Path(path).stem, out,
                                obs.units)
  logging.info("reconstructed %d slices of %s in %.1f s (90%% interval: %s): wrote %s and %s",
               len(slices), path, seconds,
               "recalibrated on the validation split" if method.calibration is not None
               else "raw ensemble quantiles, no calibration in the workdir", nc, npz)
  return {"netcdf": str(nc), "npz": str(npz), "figures": [str(p) for p in figs],
          "slices": int(len(slices))}


def reconstruction_figures(folder, name: str, out: dict, units: str) -> list:
  """Maps and 3-D bars of the last reconstructed slice (channel 0), safely written."""
  k = -1
  when = str(out["time"][k])
  point, lo, hi = out["fine"][k, ..., 0], out["fine_q05"][k, ..., 0], out["fine_q95"][k, ..., 0]
  title = f"{name}: reconstruction of {when} (channel 0)"
  folder = paths.as_path(folder)
  written = [figures_lib.write_safely(figures_lib.uncertainty_maps, point, lo, hi,
                                      out["observed"][k],
                                      path=folder / f"reconstruction_{name}_maps.png",
                                      title=title, units=units),
             figures_lib.write_safely(figures_lib.surfaces_3d,
                                      [("reconstruction", point, True),
                                       ("90% interval width", hi - lo, False)],
                                      path=folder / f"reconstruction_{name}_3d.png",
                                      title=title, units=units)]
  return [p for p in written if p is not None]
