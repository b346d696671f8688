"""Tests of diffrecon_jax/user_reconstruct.py: `--mode=reconstruct` on a user's own file of
incomplete coarse maps, with a tiny model trained on a user-style grid (the README's flow)."""
import json
import os
import pathlib
import subprocess
import sys

import netCDF4
import numpy as np
import pytest

from diffrecon_jax.configs import custom as custom_config
from diffrecon_jax import user_reconstruct
from diffrecon_jax.data import coarsen, example_grid
from diffrecon_jax.data.errors import DataError
from tests import _train_helpers as helpers
from tests.conftest import REPO_ROOT
from tests.test_readme import SMOKE_OVERRIDES

N = 2  # configs/custom.py's scale factor


def _main(cwd, *flags):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=helpers.FAST_COMPILE_XLA_FLAGS,
             PYTHONPATH=str(REPO_ROOT))
  cmd = [sys.executable, "-m", "diffrecon_jax.main", f"--config={REPO_ROOT}/configs/custom.py",
         "--workdir=wd", "--config.data.path=grid.nc", *SMOKE_OVERRIDES,
         f"--config.train.compilation_cache_dir={cwd}/xla", *flags]
  out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-4000:]
  return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir trained a few steps on the example grid (real nybike flows), and an observed
  file: the last 24 coarse slices with 30% of the cells NaN."""
  d = tmp_path_factory.mktemp("user")
  example_grid.main([str(d / "grid.nc")])
  example_grid.main([str(d / "observed.nc"), "--coarsen", str(N), "--last", "24",
                     "--nan-fraction", "0.3"])
  _main(d, "--mode=train")
  return d


def _read(path):
  with netCDF4.Dataset(path) as ds:
    return {k: np.ma.filled(ds.variables[k][...], np.nan) for k in ds.variables}


def test_reconstructs_a_user_file_with_gaps(trained):
  _main(trained, "--mode=reconstruct", "--config.reconstruct.input=observed.nc",
        "--config.reconstruct.save_samples=True")
  obs = _read(trained / "observed.nc")
  nc = _cf_as_arrays(_read(trained / "wd" / "reconstruction" / "observed.nc"), "flow")
  z = np.load(trained / "wd" / "reconstruction" / "observed.npz")
  history = 2  # the smoke overrides' data.history: 2 * 2 past slices before the first one
  n = 24 - 2 * history
  assert nc["fine"].shape == z["fine"].shape == (n, 14, 8, 2)
  s = custom_config.get_config().sampling.n_samples  # the default ensemble size
  assert nc["samples"].shape == (s, n, 14, 8, 2) and nc["coarse"].shape == (n, 7, 4, 2)
  np.testing.assert_array_equal(nc["fine"], z["fine"])
  assert np.isfinite(nc["fine"]).all() and (nc["fine_q05"] <= nc["fine_q95"]).all()
  # The workdir had no calibration (trained with --mode=train): reconstruct fitted one on the
  # validation split of the training grid, kept it, and wrote its 90% interval: centred on the
  # point estimate (except where the lower bound, the smallest training value, cuts it).
  cal = json.loads((trained / "wd" / "calibration.json").read_text())
  assert cal["fitted_on"]["split"] == "val"
  inside = (nc["fine_q05"] <= nc["fine"] + 1e-4) & (nc["fine"] <= nc["fine_q95"] + 1e-4)
  assert inside[nc["fine"] >= cal["lower_bound"]].all()
  assert (nc["fine_q95"] - nc["fine_q05"]).max() > 0  # the members differ: a real interval
  # the members written are the calibrated ones: centred on the point estimate
  np.testing.assert_allclose(nc["samples"].mean(axis=0), nc["fine"], rtol=1e-4, atol=1e-3)
  # the completed coarse cells' interval: exact where observed, open where hidden
  observed_c = nc["observed"].astype(bool)
  np.testing.assert_array_equal(nc["coarse_q05"][observed_c], nc["coarse_q95"][observed_c])
  assert (nc["coarse_q95"][~observed_c] >= nc["coarse_q05"][~observed_c]).all()
  assert (nc["coarse_q95"][~observed_c] > nc["coarse_q05"][~observed_c]).mean() > 0.5
  # timestamps from the file; the coarse cell centres refined by N (fine rows 0..13)
  np.testing.assert_array_equal(nc["time"], obs["time"][2 * history:])
  np.testing.assert_allclose(nc["y"], np.arange(14)) and np.testing.assert_allclose(
      nc["x"], np.arange(8))
  np.testing.assert_array_equal(nc["y_coarse"], obs["y"])
  # the fine maps pool to the observed coarse values wherever a cell was observed
  values = obs["flow"][2 * history:]
  observed = np.isfinite(values).all(-1)
  np.testing.assert_array_equal(nc["observed"].astype(bool), observed)
  assert 0 < observed.mean() < 1
  pooled = coarsen.coarsen(nc["fine"], N, "sum")
  np.testing.assert_allclose(pooled[observed], values[observed], rtol=1e-4, atol=1e-2)
  np.testing.assert_allclose(nc["coarse"][observed], values[observed], rtol=1e-4, atol=1e-2)
  figures = sorted(p.name for p in (trained / "wd" / "figures").glob("reconstruction_*"))
  assert figures == ["reconstruction_observed_3d.png", "reconstruction_observed_maps.png"]
  assert all((trained / "wd" / "figures" / f).stat().st_size > 5000 for f in figures)


def _cf_as_arrays(nc: dict, var: str) -> dict:
  """The CF file's variables (named after the input's `var`) under the npz's names."""
  out = dict(nc, fine=nc[var], coarse=nc[f"{var}_coarse"])
  out["fine_q05"], out["fine_q95"] = nc[f"{var}_interval"]
  out["coarse_q05"], out["coarse_q95"] = nc[f"{var}_coarse_interval"]
  if f"{var}_members" in nc:
    out["samples"] = nc[f"{var}_members"]
  return out


def test_the_written_netcdf_is_cf_for_xarray_and_cf_xarray(trained):
  """The reconstruction opens in xarray with its CF axes, bounds, units and flags (cf_xarray
  reads them as analysts' tools do); the input's variable name, units and history travel."""
  import cf_xarray  # noqa: F401  (registers the .cf accessor)
  import xarray as xr
  path = trained / "wd" / "reconstruction" / "observed.nc"
  if not path.exists():
    _main(trained, "--mode=reconstruct", "--config.reconstruct.input=observed.nc")
  with xr.open_dataset(path) as ds, xr.open_dataset(trained / "observed.nc") as given:
    assert ds.attrs["Conventions"] == "CF-1.10"
    assert ds.attrs["history"].splitlines()[-1].endswith("(diffrecon_jax reconstruct)")
    assert json.loads(ds.attrs["sampler"])["n_samples"] >= 2
    assert json.loads(ds.attrs["provenance"])["mode"] == "reconstruct"
    assert ds["flow"].attrs.get("units", "") == given["flow"].attrs.get("units", "")
    assert ds["flow"].dims == ("time", "y", "x", "channel")
    assert ds["flow_interval"].dims[0] == "quantile" and ds["quantile"].values.tolist() == [0.05,
                                                                                          0.95]
    axes = ds.cf.axes
    assert axes["T"] == ["time"] and "y" in axes["Y"] and "x" in axes["X"]
    assert ds.cf.bounds["y"] == ["y_bnds"] and ds["y_bnds"].shape == (14, 2)
    np.testing.assert_allclose(ds["y_bnds"].values[:, 1] - ds["y_bnds"].values[:, 0], 1.0)
    assert ds["observed"].attrs["flag_meanings"] == "hidden observed"
    assert ds["time"].dtype.kind == "M"  # decoded: CF units and calendar


def test_refined_coordinates_are_the_fine_cell_centres():
  np.testing.assert_allclose(user_reconstruct.refine_coordinates([0.5, 2.5, 4.5], 2),
                             np.arange(6.0))
  # irregular spacing: each cell splits by its own step; degrees of latitude
  np.testing.assert_allclose(user_reconstruct.refine_coordinates([40.0, 41.0, 43.0], 2),
                             [39.75, 40.25, 40.625, 41.375, 42.5, 43.5])


def _write_npz(path, values, times):
  np.savez(path, flow=values.astype(np.float32), time=times)
  return path


def _reconstruct(trained, path, **fields):
  config = custom_config.get_config()
  config.reconstruct.input = str(path)
  for k, v in fields.items():
    config.reconstruct[k] = v
  return user_reconstruct.reconstruct_file(config, str(trained / "wd"))


@pytest.fixture(scope="module")
def good(trained):
  """(values (24, 7, 4, 2), times) of the observed file, to break one way at a time."""
  obs = _read(trained / "observed.nc")
  times = np.datetime64("1970-01-01T00:00", "m") + obs["time"].astype("timedelta64[m]")
  return obs["flow"], times


@pytest.mark.parametrize("case, message", [
    ("fine_grid", r"coarse grid 14x8, but the model in .* reconstructs from 7x4 coarse maps "
                  r"\(that is the model's fine grid"),
    ("channels", r"1 channel\(s\), but the model in .* was trained on 2"),
    ("history", r"4 slice\(s\), but the model in .* \(history 2\) needs 4 past slices"),
    ("nothing_observed", r"every value is NaN"),
    ("not_netcdf", r"not a readable file of coarse maps"),
    ("suffix", r"unsupported file"),
    ("no_time", r"no time axis"),
])
def test_bad_input_is_a_clear_error(trained, good, tmp_path, case, message):
  values, times = good
  if case == "fine_grid":
    path = _write_npz(tmp_path / "fine.npz", np.repeat(np.repeat(values, 2, 1), 2, 2), times)
  elif case == "channels":
    path = _write_npz(tmp_path / "one.npz", values[..., :1], times)
  elif case == "history":
    path = _write_npz(tmp_path / "short.npz", values[:4], times[:4])
  elif case == "nothing_observed":
    path = _write_npz(tmp_path / "empty.npz", np.full_like(values, np.nan), times)
  elif case == "not_netcdf":
    path = tmp_path / "broken.nc"
    path.write_text("not a netcdf file")
  elif case == "suffix":
    path = tmp_path / "maps.csv"
    path.write_text("1,2,3")
  else:
    path = tmp_path / "untimed.npz"
    np.savez(path, flow=values)
  with pytest.raises(DataError, match=message) as err:
    _reconstruct(trained, path)
  assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_zarr_store_gives_values_times_coordinates_and_units(tmp_path):
  import zarr
  values = np.arange(5 * 3 * 2 * 2, dtype=np.float32).reshape(5, 3, 2, 2)
  values[0, 1, 1] = np.nan
  g = zarr.open_group(str(tmp_path / "obs.zarr"), mode="w", zarr_format=2)
  for name, arr, dims, attrs in (
      ("flow", values, ["time", "lat", "lon", "channel"], {"units": "trips"}),
      ("time", np.arange(5, dtype="i8") * 30, ["time"],
       {"units": "minutes since 2016-10-29 00:00:00"}),
      ("lat", np.array([40.0, 40.5, 41.0]), ["lat"], {}),
      ("lon", np.array([-74.0, -73.5]), ["lon"], {})):
    a = g.create_array(name, shape=arr.shape, dtype=arr.dtype, fill_value=None)
    a[...] = arr
    a.attrs.update(dict(attrs, _ARRAY_DIMENSIONS=dims))
  zarr.consolidate_metadata(str(tmp_path / "obs.zarr"))
  obs = user_reconstruct.read_coarse_file(tmp_path / "obs.zarr")
  np.testing.assert_array_equal(obs.values, values)
  assert obs.dims == ("lat", "lon") and obs.units == "trips" and obs.interval_minutes == 30
  assert str(obs.timestamps[1]) == "2016-10-29T00:30"
  np.testing.assert_allclose(obs.coords["lat"], [40.0, 40.5, 41.0])
  np.testing.assert_allclose(user_reconstruct.refine_coordinates(obs.coords["lon"], 2),
                             [-74.125, -73.875, -73.625, -73.375])


def test_cf_layout_for_a_lat_lon_input_with_members():
  """cf_output on a latitude / longitude grid: the geographic axes are recognised, the fine
  bounds refine the coarse ones by N, the members carry a realization dimension."""
  import cf_xarray  # noqa: F401
  from diffrecon_jax import cf_output
  n, i, j, c, s = 3, 2, 3, 1, 4
  rs = np.random.RandomState(0)
  fine = rs.rand(n, 2 * i, 2 * j, c).astype(np.float32)
  coarse = coarsen.coarsen(fine, 2, "mean")
  out = dict(fine=fine, fine_q05=fine - 1, fine_q95=fine + 1, coarse=coarse,
             coarse_q05=coarse - 1, coarse_q95=coarse + 1, samples=np.stack([fine] * s),
             observed=np.ones((n, i, j), np.uint8),
             time=np.datetime64("2020-01-01T00:00") + np.arange(n) * np.timedelta64(6, "h"))
  ds = cf_output.build(out, variable="air", units="K", dims=("lat", "lon"),
                       coords={"lat": np.array([50.0, 47.5]), "lon": np.array([0.0, 2.5, 5.0])},
                       coord_attrs={"lat": {"units": "degrees_north"}}, scale=2,
                       attrs={"history": "ncks earlier"})
  assert ds.cf.axes["Y"] == ["lat", "lat_coarse"] or set(ds.cf.axes["Y"]) == {"lat",
                                                                              "lat_coarse"}
  assert set(ds.cf.coordinates["latitude"]) == {"lat", "lat_coarse"}
  assert set(ds.cf.coordinates["longitude"]) == {"lon", "lon_coarse"}
  assert ds["lon"].attrs["units"] == "degrees_east" and ds["air"].attrs["units"] == "K"
  np.testing.assert_allclose(ds["lat"].values, [50.625, 49.375, 48.125, 46.875])
  # the two fine cells of a coarse cell share its bounds between them
  np.testing.assert_allclose(ds["lat_bnds"].values[[0, 1], [0, 1]], ds["lat_coarse_bnds"][0])
  assert ds["air_members"].dims[0] == "realization" and ds["realization"].size == s
  assert ds.attrs["history"].startswith("ncks earlier\n")
