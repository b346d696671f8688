"""Dataset loaders on the real data in ../shared/data (and small fixtures where data is absent)."""
import hashlib
import logging
import shutil

import h5py
import numpy as np
import pytest

from diffrecon_jax.data import (bikenyc14, custom, files, ncep_air, nyc_dsan, pipeline, registry,
                                tapbj, taxibj)
from diffrecon_jax.data.series import DataError


def _sha256(path):
  return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- NYC DSAN (embedded) ----------------------------------------------------------------------

def test_nytaxi_embedded(shared_data_dir):
  s = nyc_dsan.load_nytaxi()
  assert s.values.shape == (4320, 16, 12, 2) and s.values.dtype == np.float32
  assert s.timestamps[0] == np.datetime64("2016-01-01T00:00")
  assert s.timestamps[-1] == np.datetime64("2016-03-30T23:30")
  assert (np.diff(s.timestamps) == np.timedelta64(30, "m")).all()
  assert not s.time_axis.has_gaps
  assert s.external.shape == (4320, 65) and len(s.external_names) == 65
  names = list(s.external_names)
  # Slot 0 = Friday 1 Jan 2016, New Year's Day.
  assert s.external[0, names.index("dow_fri")] == 1 and s.external[0, :7].sum() == 1
  assert s.external[0, names.index("holiday")] == 1
  assert s.external[47, names.index("halfhour_47")] == 1
  assert (s.aggregation, s.interval_minutes, s.channel_names) == ("sum", 30, ("inflow", "outflow"))
  assert s.values.min() == 0 and s.values.max() == 1518
  shared = nyc_dsan.load_nytaxi(shared_data_dir / "NYC_DSAN" / "NYTaxi")
  np.testing.assert_array_equal(shared.values, s.values)
  np.testing.assert_array_equal(shared.external, s.external)
  # Train split comes first, unchanged.
  with np.load(shared_data_dir / "NYC_DSAN" / "NYTaxi" / "flow_test.npz") as z:
    np.testing.assert_array_equal(s.values[-864:], z["flow"].astype(np.float32))


def test_nybike_embedded():
  s = nyc_dsan.load_nybike()
  assert s.values.shape == (4320, 14, 8, 2)
  assert s.timestamps[0] == np.datetime64("2016-08-01T00:00")
  assert s.external[0, list(s.external_names).index("dow_mon")] == 1
  assert s.values.max() == 323


def test_nyc_calendar_check_rejects_wrong_start():
  s = nyc_dsan.load_nytaxi()
  with pytest.raises(DataError, match="disagree"):
    nyc_dsan._check_calendar(s.external, s.timestamps + np.timedelta64(30, "m"), "x")


def test_nyc_inf_and_missing_file_name_the_file(tmp_path):
  folder = tmp_path / "NYTaxi"
  shutil.copytree(nyc_dsan.EMBEDDED_DIR / "nytaxi", folder)
  with np.load(folder / "flow_val.npz") as z:
    flow = z["flow"].copy()
  flow[3, 1, 1, 0] = np.inf
  np.savez(folder / "flow_val.npz", flow=flow)
  with pytest.raises(DataError, match=r"flow_val\.npz.*infinite"):
    nyc_dsan.load_nytaxi(folder)
  shutil.copy(nyc_dsan.EMBEDDED_DIR / "nytaxi" / "flow_val.npz", folder / "flow_val.npz")
  nyc_dsan.load_nytaxi(folder)  # repaired copy loads.
  (folder / "ex_knlg_test.npz").unlink()
  with pytest.raises(DataError, match=r"ex_knlg_test\.npz: file missing"):
    nyc_dsan.load_nytaxi(folder)


# ---- BikeNYC 2014 -----------------------------------------------------------------------------

def test_bikenyc14(shared_data_dir):
  h5 = shared_data_dir / "BikeNYC" / "NYC14_M16x8_T60_NewEnd.h5"
  assert _sha256(h5) == "4a4ad6aa703b127b133e2b04f6dfe5b79e9da9805bff7c4ca7da5a1bcbbca772"
  s = bikenyc14.load_bikenyc14(h5.parent)
  assert s.values.shape == (4392, 16, 8, 2) and s.values.dtype == np.float32
  assert s.timestamps[0] == np.datetime64("2014-04-01T00:00")
  assert s.timestamps[-1] == np.datetime64("2014-09-30T23:00")
  assert (np.diff(s.timestamps) == np.timedelta64(60, "m")).all()
  assert s.time_axis.summary().endswith("no gaps")
  with h5py.File(h5, "r") as f:
    raw = f["data"][()]
  np.testing.assert_array_equal(s.values, raw.transpose(0, 2, 3, 1).astype(np.float32))
  names = list(s.external_names)
  assert s.external.shape == (4392, 7 + 24 + 1)
  assert s.external[0, names.index("dow_1")] == 1  # 2014-04-01 was a Tuesday (Monday = 0).
  assert s.external[23, names.index("slot_23")] == 1
  hol = s.external[:, names.index("holiday")]
  # Memorial Day, Independence Day, Labor Day: 3 days x 24 h inside Apr-Sep 2014.
  assert hol.sum() == 72
  assert hol[s.timestamps.astype("datetime64[D]") == np.datetime64("2014-07-04")].all()
  same = bikenyc14.load_bikenyc14(h5)  # the file itself works too.
  np.testing.assert_array_equal(same.values, s.values)


def _nth_weekday(year, month, weekday, n):
  """n-th (1-based; -1 = last) `weekday` (Monday = 0) of a month as datetime64[D]."""
  first = np.datetime64(f"{year}-{month:02d}-01", "D")
  days = first + np.arange(31)
  days = days[days.astype("datetime64[M]") == first.astype("datetime64[M]")]
  match = days[(days.astype(np.int64) + 3) % 7 == weekday]
  return match[n - 1] if n > 0 else match[-1]


def _observed(d):
  dow = (np.datetime64(d, "D").astype(np.int64) + 3) % 7
  return np.datetime64(d, "D") + {5: -1, 6: 1}.get(int(dow), 0)


@pytest.mark.parametrize("year", [2014, 2016])
def test_us_holiday_table_matches_rules(year):
  expected = {_observed(f"{year}-01-01"), _nth_weekday(year, 1, 0, 3), _nth_weekday(year, 2, 0, 3),
              _nth_weekday(year, 5, 0, -1), _observed(f"{year}-07-04"), _nth_weekday(year, 9, 0, 1),
              _nth_weekday(year, 10, 0, 2), _observed(f"{year}-11-11"),
              _nth_weekday(year, 11, 3, 4), _observed(f"{year}-12-25")}
  table = {d for d in bikenyc14.US_FEDERAL_HOLIDAYS if d.astype("datetime64[Y]").astype(int)
           + 1970 == year}
  assert table == expected


def test_parse_slot_dates_rejects_bad_slot():
  with pytest.raises(DataError, match="SS in 01..24"):
    bikenyc14.parse_slot_dates([b"2014040125"], 24, "f.h5")


# ---- NCEP air temperature ---------------------------------------------------------------------

def test_ncep_air(shared_data_dir):
  store = shared_data_dir / "NCEP_air_temperature" / "air_temperature.zarr"
  s = ncep_air.load_ncep_air(store)
  assert s.values.shape == (2920, 25, 53, 1) and s.values.dtype == np.float32
  assert s.values.min() == pytest.approx(221.0) and s.values.max() == pytest.approx(317.4)
  assert float(s.values.mean(dtype=np.float64)) == pytest.approx(281.255, abs=1e-3)
  assert s.timestamps[0] == np.datetime64("2013-01-01T00:00")
  assert s.timestamps[-1] == np.datetime64("2014-12-31T18:00")
  assert (s.aggregation, s.interval_minutes) == ("mean", 360)
  assert not s.time_axis.has_gaps
  assert s.external.shape == (2920, 7 + 4 + 1 + 2)
  names = list(s.external_names)
  assert s.external[1, names.index("slot_1")] == 1
  # Day-of-year cycle: 1 Jan 00:00 is angle 0.
  assert s.external[0, names.index("doy_sin")] == pytest.approx(0, abs=1e-6)
  assert s.external[0, names.index("doy_cos")] == pytest.approx(1)
  # Chunk placement checked against the zarr library.
  import zarr
  ref = zarr.open_group(str(store), mode="r")["air"][:]
  np.testing.assert_allclose(s.values[..., 0], ref * 0.01, rtol=0, atol=1e-4)

  d = ncep_air.load_ncep_air(store.parent, daily=True)
  assert d.values.shape == (730, 25, 53, 1) and d.interval_minutes == 1440
  assert d.values.min() == pytest.approx(222.82, abs=0.01)
  assert d.values.max() == pytest.approx(309.80, abs=0.01)
  np.testing.assert_allclose(d.values, s.values.reshape(730, 4, 25, 53, 1).mean(1), atol=1e-4)
  assert d.timestamps[1] == np.datetime64("2013-01-02T00:00")
  assert d.external.shape == (730, 7 + 1 + 1 + 2)

  c = ncep_air.load_ncep_air(store, window=(slice(0, 24), slice(2, 50)))
  assert c.values.shape == (2920, 24, 48, 1)
  np.testing.assert_array_equal(c.values, s.values[:, :24, 2:50])


# ---- custom -----------------------------------------------------------------------------------

def _grid(t=6, h=4, w=3, c=2, seed=0):
  x = np.random.default_rng(seed).uniform(0, 10, (t, h, w, c)).astype(np.float32)
  x[1, 2, 0, 0] = np.nan
  return x


def test_custom_npy_roundtrip_with_nan(tmp_path):
  x = _grid()
  np.save(tmp_path / "g.npy", x)
  s = custom.load_array(tmp_path / "g.npy", start="2020-02-28T23:00", interval_minutes=60)
  np.testing.assert_array_equal(s.values, x)  # NaN in the same place (assert_array_equal).
  assert np.isnan(s.values[1, 2, 0, 0]) and np.isfinite(s.values).sum() == x.size - 1
  assert s.timestamps[1] == np.datetime64("2020-02-29T00:00")
  assert s.external.shape == (6, 7 + 24 + 1) and s.channel_names == ("custom_0", "custom_1")
  assert s.external[1, list(s.external_names).index("slot_0")] == 1


def test_custom_thw_default_timestamps_and_layout(tmp_path):
  x = _grid(c=1)[..., 0]
  np.save(tmp_path / "thw.npy", x)
  s = custom.load_array(tmp_path / "thw.npy", aggregation="mean", interval_minutes=1440)
  assert s.values.shape == (6, 4, 3, 1) and s.aggregation == "mean"
  assert s.timestamps[0] == np.datetime64("1970-01-01T00:00")
  assert s.timestamps[2] == np.datetime64("1970-01-03T00:00")
  y = _grid()
  np.save(tmp_path / "tchw.npy", y.transpose(0, 3, 1, 2))
  s2 = custom.load_array(tmp_path / "tchw.npy", layout="TCHW")
  np.testing.assert_array_equal(s2.values, y)


def test_custom_bad_inputs(tmp_path):
  np.save(tmp_path / "2d.npy", np.zeros((5, 4)))
  with pytest.raises(DataError, match=r"\(5, 4\).*2-d"):
    custom.load_array(tmp_path / "2d.npy")
  x = _grid()
  x[0, 0, 0, 1] = -np.inf
  np.save(tmp_path / "inf.npy", x)
  with pytest.raises(DataError, match=r"inf\.npy.*infinite"):
    custom.load_array(tmp_path / "inf.npy")
  with pytest.raises(DataError, match="not found"):
    custom.load_array(tmp_path / "nope.npy")
  np.save(tmp_path / "bad_layout.npy", _grid())
  with pytest.raises(DataError, match="permutation"):
    custom.load_array(tmp_path / "bad_layout.npy", layout="TXYC")


def test_custom_npz_keys(tmp_path):
  x = _grid()
  ts = np.arange("2021-03-01T00:00", "2021-03-01T03:00", 30, dtype="datetime64[m]")
  ext = np.arange(12, dtype=np.float32).reshape(6, 2)
  np.savez(tmp_path / "a.npz", flow=x, time=ts, ext=ext)
  s = custom.load_array(tmp_path / "a.npz", timestamps_key="time", external_key="ext")
  np.testing.assert_array_equal(s.values, x)
  np.testing.assert_array_equal(s.timestamps, ts)
  assert s.interval_minutes == 30  # from the file's timestamps, not the default 60.
  np.testing.assert_array_equal(s.external, ext)
  assert s.channel_names == ("flow_0", "flow_1")
  np.savez(tmp_path / "two.npz", a=x, b=x)
  with pytest.raises(DataError, match="variable="):
    custom.load_array(tmp_path / "two.npz")
  np.testing.assert_array_equal(custom.load_array(tmp_path / "two.npz", variable="b").values, x)


def test_custom_netcdf_roundtrip(tmp_path):
  import netCDF4
  x = _grid(c=1)[..., 0]
  path = tmp_path / "pm.nc"
  with netCDF4.Dataset(path, "w") as ds:
    ds.createDimension("time", 6)
    ds.createDimension("y", 4)
    ds.createDimension("x", 3)
    tv = ds.createVariable("time", "f8", ("time",))
    tv.units = "days since 2014-01-01"
    tv[:] = np.arange(6)
    v = ds.createVariable("pm25", "f4", ("time", "y", "x"), fill_value=-999.0)
    v[:] = np.where(np.isnan(x), -999.0, x)
    other = ds.createVariable("no2", "f4", ("time", "y", "x"))
    other[:] = x
  with pytest.raises(DataError, match="pm25.*no2|no2.*pm25"):
    custom.load_array(path)
  s = custom.load_array(path, variable="pm25", aggregation="mean")
  np.testing.assert_array_equal(s.values[..., 0], x)  # fill value -> NaN.
  assert s.timestamps[3] == np.datetime64("2014-01-04T00:00") and s.interval_minutes == 1440
  assert s.external.shape == (6, 7 + 1 + 1)


def test_custom_netcdf_time_axis_with_dropped_records(tmp_path):
  import netCDF4
  x = _grid(t=6, c=1)[..., 0]

  def write(path, hours):
    with netCDF4.Dataset(path, "w") as ds:
      ds.createDimension("time", 6)
      ds.createDimension("y", 4)
      ds.createDimension("x", 3)
      tv = ds.createVariable("time", "f8", ("time",))
      tv.units = "hours since 2014-01-01 00:00:00"
      tv[:] = hours
      ds.createVariable("pm25", "f4", ("time", "y", "x"))[:] = x

  write(tmp_path / "gaps.nc", [0, 1, 2, 6, 7, 8])  # a sensor offline 03:00 .. 05:00
  s = custom.load_array(tmp_path / "gaps.nc", aggregation="mean")
  assert s.interval_minutes == 60 and s.num_slices == 6
  assert s.time_axis.summary() == ("6 slices at 60 min (2014-01-01 00:00 .. 2014-01-01 08:00), "
                                   "1 gap totalling 3 missing slots, largest 3 slots at "
                                   "2014-01-01 03:00")
  np.testing.assert_array_equal(s.time_axis.whole_windows(2), [0, 1, 1, 0, 1, 1])
  write(tmp_path / "unsorted.nc", [0, 1, 2, 8, 7, 6])
  with pytest.raises(DataError, match=r"unsorted\.nc: timestamps not in time order: index 3 "
                                      r"\(2014-01-01 08:00\) is followed by index 4"):
    custom.load_array(tmp_path / "unsorted.nc")
  write(tmp_path / "dup.nc", [0, 1, 2, 2, 3, 4])
  with pytest.raises(DataError, match=r"dup\.nc: duplicate timestamp 2014-01-01 02:00"):
    custom.load_array(tmp_path / "dup.nc")
  for label, hours in (("nan", [0, 1, np.nan, 3, 4, 5]),
                       ("masked", np.ma.masked_array(np.arange(6.0), np.arange(6) == 2))):
    write(tmp_path / f"{label}.nc", hours)  # masked: written as the fill value
    with pytest.raises(DataError, match=rf"{label}\.nc: timestamp 2 is NaT"):
      custom.load_array(tmp_path / f"{label}.nc")


def test_custom_zarr_v2(tmp_path):
  import zarr
  x = _grid(t=7, h=5, w=3, c=1)[..., 0].astype(np.float64)
  g = zarr.open_group(str(tmp_path / "z.zarr"), mode="w", zarr_format=2)
  # fill_value: xarray reads a v2 array's fill as CF's _FillValue
  a = g.create_array("temp", shape=x.shape, chunks=(3, 2, 2), dtype="i2", fill_value=-1)
  a[:] = np.nan_to_num(x * 100, nan=-1).astype(np.int16)
  a.attrs.update({"scale_factor": 0.01, "_FillValue": -1, "_ARRAY_DIMENSIONS": ["time", "y", "x"]})
  t = g.create_array("time", shape=(7,), chunks=(7,), dtype="f8")
  t[:] = np.arange(7) * 6.0
  t.attrs.update({"units": "hours since 2013-01-01", "_ARRAY_DIMENSIONS": ["time"]})
  zarr.consolidate_metadata(str(tmp_path / "z.zarr"))
  s = custom.load_array(tmp_path / "z.zarr", aggregation="mean")
  expected = np.where(np.isnan(x), np.nan, np.trunc(x * 100) / 100)
  np.testing.assert_allclose(s.values[..., 0], expected, atol=1e-5)
  assert np.isnan(s.values[1, 2, 0, 0])
  assert s.timestamps[2] == np.datetime64("2013-01-01T12:00") and s.interval_minutes == 360
  assert s.channel_names == ("temp",)


def test_custom_zarr_v3(tmp_path):
  import zarr
  x = _grid(t=4, h=3, w=2, c=1)[..., 0]
  g = zarr.open_group(str(tmp_path / "z3.zarr"), mode="w", zarr_format=3)
  # v3 names its dimensions in the metadata (what xarray writes and needs)
  g.create_array("v", shape=x.shape, chunks=(2, 2, 2), dtype="f4",
                 dimension_names=("time", "y", "x"))[:] = x
  s = custom.load_array(tmp_path / "z3.zarr", start="2020-01-01")
  np.testing.assert_array_equal(s.values[..., 0], x)
  assert s.channel_names == ("v",) and s.timestamps[1] == np.datetime64("2020-01-01T01:00")


# ---- TAPBJ ------------------------------------------------------------------------------------

def test_tapbj_missing_path_message(tmp_path):
  for path in (None, tmp_path / "absent.nc"):
    with pytest.raises(DataError) as e:
      tapbj.load_tapbj(path)
    msg = str(e.value)
    for needle in ("tapdata.org.cn", "Register", "Beijing", "2014", "2017", "(T, H, W)",
                   "--config.data.path=", "--config.data.variable="):
      assert needle in msg, needle


def test_tapbj_from_npy(tmp_path):
  x = _grid(t=5, c=1)[..., 0]
  np.save(tmp_path / "pm.npy", x)
  s = tapbj.load_tapbj(tmp_path / "pm.npy")
  assert s.name == "tapbj" and s.aggregation == "mean" and s.interval_minutes == 1440
  assert s.timestamps[0] == np.datetime64("2014-01-01T00:00")
  assert s.timestamps[4] == np.datetime64("2014-01-05T00:00")
  assert np.isnan(s.values).sum() == 1 and "ug/m3" in s.units


# ---- TaxiBJ (fixture in the official layout) --------------------------------------------------

def _write_taxibj(folder, rng):
  folder.mkdir()
  dates = [f"201307{d:02d}{s:02d}".encode() for d in (1, 2) for s in range(1, 49)]
  dates.remove(b"2013070105")                  # a missing slot (02:00)
  dates.insert(10, dates[9])                   # a duplicated slot
  data = rng.integers(0, 50, (len(dates), 2, 32, 32)).astype(np.float64)
  with h5py.File(folder / "BJ13_M32x32_T30_InOut.h5", "w") as f:
    f["data"] = data
    f["date"] = np.array(dates, dtype="S10")
  met_dates = [f"201306{30:02d}{s:02d}".encode() for s in range(1, 49)] + [
      f"201307{d:02d}{s:02d}".encode() for d in (1, 2, 3) for s in range(1, 49)]
  n = len(met_dates)
  weather = np.zeros((n, 17))
  weather[np.arange(n), np.arange(n) % 17] = 1
  with h5py.File(folder / "BJ_Meteorology.h5", "w") as f:
    f["date"] = np.array(met_dates, dtype="S10")
    f["Temperature"] = np.linspace(-10, 30, n)
    f["WindSpeed"] = np.linspace(0, 10, n)
    f["Weather"] = weather
  (folder / "BJ_Holiday.txt").write_text("20130101\n20130702")
  return data, dates, met_dates


def test_taxibj_fixture(tmp_path):
  folder = tmp_path / "TaxiBJ"
  data, dates, met_dates = _write_taxibj(folder, np.random.default_rng(0))
  s = taxibj.load_taxibj(folder, year=2013, verify_checksum=False)
  assert s.values.shape == (95, 32, 32, 2)      # 96 slots - 1 missing, duplicate dropped.
  assert s.timestamps[0] == np.datetime64("2013-07-01T00:00")
  assert s.timestamps[4] == np.datetime64("2013-07-01T02:30")  # gap kept, not filled.
  assert len(np.unique(s.timestamps)) == 95
  np.testing.assert_array_equal(s.values[0], data[0].transpose(1, 2, 0))
  assert s.external.shape == (95, 7 + 48 + 1 + 2 + 17) and len(s.external_names) == 75
  names = list(s.external_names)
  hol = s.external[:, names.index("holiday")]
  assert hol[s.timestamps.astype("datetime64[D]") == np.datetime64("2013-07-02")].all()
  assert hol[:47].sum() == 0
  # Meteorology matched by date: slot 2013-07-01 00:00 is met row 48.
  temp = np.linspace(-10, 30, len(met_dates))[48]
  lo, hi = taxibj.TEMPERATURE_RANGE
  assert s.external[0, names.index("temperature")] == pytest.approx((temp - lo) / (hi - lo))
  assert s.external[0, names.index("weather_0") + 48 % 17] == 1


def test_taxibj_fixture_gaps_go_through_the_time_axis(tmp_path, caplog):
  folder = tmp_path / "TaxiBJ"
  _write_taxibj(folder, np.random.default_rng(0))
  with caplog.at_level(logging.INFO):
    s = taxibj.load_taxibj(folder, year=13, verify_checksum=False)
  log = " ".join(r.getMessage() for r in caplog.records)
  # The fixture duplicates the 05:00 slot with other (random) values, and misses 02:00.
  assert ("1 duplicated slots dropped (first 2013-07-01 05:00; 1 with values different from the "
          "kept first occurrence); 1 of 2 days incomplete") in log
  axis = s.time_axis
  assert [(g.index, g.start, g.missing) for g in axis.gaps()] == [
      (4, np.datetime64("2013-07-01T02:00"), 1)]
  assert axis.summary() == ("95 slices at 30 min (2013-07-01 00:00 .. 2013-07-02 23:30), 1 gap "
                            "totalling 1 missing slot, largest 1 slot at 2013-07-01 02:00")
  names = list(s.external_names)
  np.testing.assert_array_equal(s.external[:, names.index("slot_0"):][:, :48].argmax(1),
                                axis.slot_of_day())
  assert axis.slot_of_day()[4] == 5  # 02:30, not index 4
  task = pipeline.build_task(s, 4, history=2)
  np.testing.assert_array_equal(np.nonzero(~task.whole_windows)[0], [0, 1, 4, 5])
  assert 4 not in task.train_current and 5 not in task.train_current and 6 in task.train_current
  slices, rep = pipeline.eval_slices(task, "test")
  assert rep["n_skipped_gap"] == 0 and len(slices) == rep["n_slices_in_split"] == 24


def test_taxibj_checksum_and_missing_files(tmp_path):
  folder = tmp_path / "TaxiBJ"
  _write_taxibj(folder, np.random.default_rng(1))
  actual = _sha256(folder / "BJ13_M32x32_T30_InOut.h5")
  with pytest.raises(DataError) as e:
    taxibj.load_taxibj(folder, year=13)
  msg = str(e.value)
  assert "BJ13_M32x32_T30_InOut.h5" in msg and actual in msg
  assert taxibj.SHA256["BJ13_M32x32_T30_InOut.h5"] in msg
  (folder / "BJ_Meteorology.h5").unlink()
  with pytest.raises(DataError, match=r"BJ_Meteorology\.h5 is missing.*DeepST"):
    taxibj.load_taxibj(folder, verify_checksum=False)
  with pytest.raises(DataError, match="BJ14_M32x32_T30_InOut.h5 is missing"):
    taxibj.load_taxibj(folder, year=14, verify_checksum=False)


# ---- registry ---------------------------------------------------------------------------------

def test_registry(shared_data_dir):
  assert set(registry.names()) == {"nytaxi", "nybike", "bikenyc14", "taxibj", "tapbj",
                                   "ncep_air", "custom"}
  with pytest.raises(ValueError, match="unknown dataset 'foo'.*nytaxi.*ncep_air"):
    registry.load_dataset("foo")
  s = registry.load_dataset("nybike", path="")  # config default "" = embedded.
  assert s.name == "nybike" and s.fine_shape == (14, 8)
  b = registry.load_dataset("bikenyc14", path=str(shared_data_dir / "BikeNYC"))
  assert b.num_slices == 4392
  with pytest.raises(DataError, match="tapdata"):
    registry.load_dataset("tapbj", path="", variable="")
