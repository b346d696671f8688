"""NetCDF / Zarr through xarray (data/gridded.py): many files joined along time, cftime calendars
on the real time axis, units and coordinates kept; and a folder of per-year NetCDF files with a
noleap calendar trained and evaluated as a user's grid (`--config.data.path='DIR/*.nc'`)."""
import numpy as np
import pytest

from diffrecon_jax import run
from diffrecon_jax.configs import custom as custom_config
from diffrecon_jax.data import custom, gridded
from diffrecon_jax.data.errors import DataError
from tests.test_bucket_workdir import _overrides


def _year_file(path, year: int, calendar: str = "noleap", days: int = 70, seed: int = 0,
               units: str = "days since 2000-01-01"):
  """One year's daily file from 1 January: `days` (time, lat, lon) = (days, 8, 6) temperatures in
  K with CF time on `calendar`, lat / lon in degrees."""
  import cftime
  import netCDF4
  rs = np.random.RandomState(seed + year)
  dates = [cftime.datetime(year, 1, 1, calendar=calendar) + __import__("datetime").timedelta(d)
           for d in range(days)]
  with netCDF4.Dataset(path, "w") as ds:
    ds.history = f"written for {year}"
    for name, size in (("time", None), ("lat", 8), ("lon", 6)):
      ds.createDimension(name, size)
    t = ds.createVariable("time", "f8", ("time",))
    t.units, t.calendar = units, calendar
    t[:] = cftime.date2num(dates, units, calendar=calendar)
    lat = ds.createVariable("lat", "f4", ("lat",))
    lat.units, lat.standard_name = "degrees_north", "latitude"
    lat[:] = np.linspace(60, 42.5, 8)
    lon = ds.createVariable("lon", "f4", ("lon",))
    lon.units = "degrees_east"
    lon[:] = np.linspace(0, 12.5, 6)
    v = ds.createVariable("tas", "f4", ("time", "lat", "lon"), fill_value=-999.0)
    v.units = "K"
    season = 270 + 10 * np.sin(np.arange(days) / 10.0)
    v[:] = season[:, None, None] + rs.randn(days, 8, 6).astype(np.float32)
  return path


def test_files_joined_in_time_order_with_units_and_coordinates(tmp_path):
  for year in (2021, 2019, 2020):  # written out of order: joined by time
    _year_file(tmp_path / f"tas_{year}.nc", year, calendar="standard", days=5)
  for path in (tmp_path / "tas_*.nc", tmp_path):  # a glob, or the folder
    s = custom.load_array(path, aggregation="mean")
    assert s.values.shape == (15, 8, 6, 1) and s.units == "K"
    assert s.timestamps[0] == np.datetime64("2019-01-01T00:00")
    assert s.timestamps[5] == np.datetime64("2020-01-01T00:00")
  (lat, lat_values, lat_units), (lon, _, _) = s.axes  # the grid's coordinates travel
  assert (lat, lon, lat_units) == ("lat", "lon", "degrees_north") and lat_values[0] == 60.0
  got = gridded.read(tmp_path / "tas_*.nc")
  assert got.labels.dims == ("lat", "lon") and got.labels.variable == "tas"
  assert got.labels.coord_attrs["lat"]["standard_name"] == "latitude"
  np.testing.assert_allclose(got.labels.coords["lon"], np.linspace(0, 12.5, 6))


def test_noleap_dates_land_on_the_real_calendar_and_360_day_is_refused(tmp_path):
  _year_file(tmp_path / "a.nc", 2020, calendar="noleap", days=70)
  s = custom.load_array(tmp_path / "a.nc", aggregation="mean")
  # Day 59 of a noleap 2020 is 1 March: on the real calendar 29 February is a hole.
  assert s.timestamps[58] == np.datetime64("2020-02-28T00:00")
  assert s.timestamps[59] == np.datetime64("2020-03-01T00:00")
  _year_file(tmp_path / "b.nc", 2020, calendar="360_day", days=3)
  with pytest.raises(DataError, match="360_day.*real calendar lacks"):
    custom.load_array(tmp_path / "b.nc")
  _year_file(tmp_path / "c.nc", 2020, calendar="standard", days=3)
  with pytest.raises(DataError, match="no file matches"):
    custom.load_array(tmp_path / "nothing_*.nc")


def test_a_folder_of_per_year_noleap_files_trains_and_evaluates(tmp_path, monkeypatch):
  """The issue's case: three per-year files with a noleap calendar and lat / lon in degrees,
  as `--config.data.path='DIR/*.nc'`; the units reach the results."""
  data = tmp_path / "years"
  data.mkdir()
  for year in (2019, 2020, 2021):
    _year_file(data / f"tas_{year}.nc", year, days=70)
  monkeypatch.chdir(tmp_path)
  config = custom_config.get_config()
  config.data.path = str(data / "*.nc")
  config.data.variable, config.data.aggregation = "tas", "mean"
  _overrides(config)
  config.data.interval_minutes = 1440
  config.train.compilation_cache_dir = str(tmp_path / "xla")
  docs = run.run(config, str(tmp_path / "wd"), "train_and_evaluate")
  assert docs[0]["method"] == "diffrecon" and np.isfinite(docs[0]["results"][0]["mae"])
  assert docs[0]["units"] == "K" and docs[0]["channel_names"] == ["tas"]
  assert "errors in K" in (tmp_path / "wd" / "results.md").read_text()
  # The evaluation's 2-D figure of every channel on the grid's own axes (lat / lon).
  assert list((tmp_path / "wd" / "figures").glob("diffrecon_*_fields_tas.png"))


def test_ncep_loader_reads_noaa_psl_yearly_files(tmp_path):
  """`air.sig995.<year>.nc` as NOAA PSL publishes them (int16 `air` with scale / offset, time in
  hours since 1800, lat north to south), one per year, read through a glob."""
  import netCDF4
  from diffrecon_jax.data import ncep_air
  for year, start in ((2013, 1867128.0), (2014, 1875888.0)):  # hours since 1800-01-01
    with netCDF4.Dataset(tmp_path / f"air.sig995.{year}.nc", "w") as ds:
      for name, size in (("time", None), ("lat", 3), ("lon", 4)):
        ds.createDimension(name, size)
      t = ds.createVariable("time", "f8", ("time",))
      t.units = "hours since 1800-01-01 00:00:0.0"
      t[:] = start + 6.0 * np.arange(8)
      lat = ds.createVariable("lat", "f4", ("lat",))
      lat.units = "degrees_north"
      lat[:] = [75.0, 72.5, 70.0]
      lon = ds.createVariable("lon", "f4", ("lon",))
      lon.units = "degrees_east"
      lon[:] = [200.0, 202.5, 205.0, 207.5]
      air = ds.createVariable("air", "i2", ("time", "lat", "lon"))
      air.scale_factor, air.add_offset, air.units = 0.01, 300.0, "degK"
      air[:] = 250.0 + np.arange(8 * 12, dtype=np.float64).reshape(8, 3, 4) / 10
  s = ncep_air.load_ncep_air(tmp_path / "air.sig995.*.nc")
  assert s.values.shape == (16, 3, 4, 1) and s.interval_minutes == 360
  assert s.timestamps[0] == np.datetime64("2013-01-01T00:00")
  assert s.timestamps[8] == np.datetime64("2014-01-01T00:00")
  np.testing.assert_allclose(s.values[0, 0, :2, 0], [250.0, 250.1], atol=0.006)
  assert s.axes[0][0] == "lat" and s.axes[1][2] == "degrees_east"


def test_example_grid_monthly_files_read_back_as_the_one_file(tmp_path):
  from diffrecon_jax.data import example_grid
  example_grid.main([str(tmp_path / "grid.nc"), "--last", "2000"])
  example_grid.main([str(tmp_path / "months"), "--monthly", "--last", "2000"])
  whole = custom.load_array(tmp_path / "grid.nc", variable="flow")
  parts = custom.load_array(tmp_path / "months" / "*.nc", variable="flow")
  assert len(list((tmp_path / "months").glob("*.nc"))) == 2  # the last 2000 slices span 2 months
  np.testing.assert_array_equal(parts.values, whole.values)
  np.testing.assert_array_equal(parts.timestamps, whole.timestamps)
