"""The time axis: gaps, whole windows, periodic lookups, calendar positions, and the consumers
(training draws, evaluation slices, the `fill` rule) on a series with known holes."""
import logging as py_logging

import jax
import numpy as np
import pytest

from diffrecon_jax.data import custom, patterns, pipeline, time_axis
from diffrecon_jax.data.series import DataError, SpatioTemporalSeries, calendar_features

START = np.datetime64("2013-07-01T00:00")  # a Monday
STEP = np.timedelta64(30, "m")
# Grid positions removed from a 240-slot, 30-min grid: one slot and a 6-slot hole in the train
# split ([0, 116) of the 232 slices present), one slot in the test split.
HOLES = (50, 90, 91, 92, 93, 94, 95, 200)


def holey_series(n_grid=240, holes=HOLES, with_calendar=False, seed=0):
  """A 4x4x1 series on a 30-min grid with `holes` removed. External column 0 is the grid
  position of the slice, so a drawn window shows where it came from."""
  pos = np.setdiff1d(np.arange(n_grid), np.asarray(holes, np.int64))
  ts = START + pos * STEP
  values = np.random.default_rng(seed).uniform(0, 10, (len(pos), 4, 4, 1)).astype(np.float32)
  ext, names = pos[:, None].astype(np.float32), ("position",)
  if with_calendar:
    cal, cal_names = calendar_features(ts, 48)
    ext, names = np.concatenate([ext, cal], 1), names + cal_names
  return SpatioTemporalSeries("holey", values, ts, ext, names, "sum", "count", 30, ("v",))


# ---- the axis itself -------------------------------------------------------------------------

def test_gaps_and_summary():
  axis = holey_series().time_axis
  assert axis.num_slices == 232 and axis.num_regular == 240 and axis.num_missing == 8
  gaps = axis.gaps()
  assert [(g.index, g.missing) for g in gaps] == [(50, 1), (89, 6), (193, 1)]
  assert gaps[1].start == START + 90 * STEP
  assert axis.summary() == ("232 slices at 30 min (2013-07-01 00:00 .. 2013-07-05 23:30), 3 gaps "
                            "totalling 8 missing slots, largest 6 slots at 2013-07-02 21:00")
  regular = pipeline.build_task(holey_series(holes=()), 2, 2).time_axis
  assert not regular.has_gaps and regular.summary().endswith("no gaps")


def test_whole_windows_by_hand():
  axis = time_axis.TimeAxis(START + np.array([0, 1, 2, 3, 5, 6, 7, 8, 20]) * STEP, 30)
  np.testing.assert_array_equal(axis.whole_windows(3), [0, 0, 1, 1, 0, 0, 1, 1, 0])
  np.testing.assert_array_equal(axis.whole_windows(1), np.ones(9, bool))
  np.testing.assert_array_equal(axis.whole_windows(2), [0, 1, 1, 1, 0, 1, 1, 1, 0])
  # The definition, literally: consecutive indices whose timestamps are one interval apart.
  ts = holey_series().timestamps
  w = 5
  expect = [s >= w - 1 and all(ts[k + 1] - ts[k] == STEP for k in range(s - w + 1, s))
            for s in range(len(ts))]
  np.testing.assert_array_equal(holey_series().time_axis.whole_windows(w), expect)
  with pytest.raises(ValueError, match=">= 1"):
    axis.whole_windows(0)


def test_periodic_lookups_across_a_hole_are_minus_one():
  s = holey_series()
  axis = s.time_axis
  pos = s.external[:, 0].astype(int)
  idx = axis.periodic_index([30, 60 * 24])  # previous slot, same slot yesterday
  assert idx.shape == (232, 2) and idx.dtype == np.int32
  for k in range(232):
    for j, back in enumerate((1, 48)):
      hit = np.nonzero(pos == pos[k] - back)[0]
      assert idx[k, j] == (hit[0] if hit.size else -1)
  # Grid slot 96 is the first after the 6-slot hole: its previous slot (95) is missing.
  k96 = int(np.nonzero(pos == 96)[0][0])
  assert idx[k96, 0] == -1 and idx[k96 - 1, 0] == k96 - 2
  # Grid slot 138 = 90 + 48: yesterday's slot is inside the hole.
  assert idx[np.nonzero(pos == 138)[0][0], 1] == -1
  assert (idx[:48, 1] == -1).all()  # the first day has no yesterday
  with pytest.raises(ValueError, match="multiples"):
    axis.periodic_index([45])


def test_calendar_positions_come_from_timestamps():
  ts = np.array(["2016-01-01T00:00", "2016-01-01T23:30", "2016-01-03T12:00", "2016-01-04T00:30",
                 "1970-01-01T00:00"], "datetime64[m]")
  axis = time_axis.TimeAxis(ts[:4], 30)
  np.testing.assert_array_equal(axis.day_of_week(), [4, 4, 6, 0])  # Fri, Fri, Sun, Mon
  np.testing.assert_array_equal(axis.slot_of_day(), [0, 47, 24, 1])
  np.testing.assert_array_equal(axis.slot_of_week(), [4 * 48, 4 * 48 + 47, 6 * 48 + 24, 1])
  np.testing.assert_array_equal(axis.slot_of_day(24), [0, 23, 12, 0])
  assert time_axis.day_of_week(ts[4:])[0] == 3  # 1970-01-01 was a Thursday
  # After a gap the slot is not index % 48: it is read from the timestamp.
  s = holey_series(with_calendar=True)
  slot = s.time_axis.slot_of_day()
  assert not np.array_equal(slot, np.arange(232) % 48)
  np.testing.assert_array_equal(slot, s.external[:, 0].astype(int) % 48)
  # calendar_features uses the same positions.
  names = list(s.external_names)
  np.testing.assert_array_equal(s.external[:, names.index("dow_0"):][:, :7].argmax(1),
                                s.time_axis.day_of_week())
  np.testing.assert_array_equal(s.external[:, names.index("slot_0"):][:, :48].argmax(1), slot)


@pytest.mark.parametrize("stamps,msg", [
    (["2020-01-01T01:00", "2020-01-01T00:00", "2020-01-01T02:00"],
     r"not in time order: index 0 \(2020-01-01 01:00\) is followed by index 1 "
     r"\(2020-01-01 00:00\)"),
    (["2020-01-01T00:00", "2020-01-01T01:00", "2020-01-01T01:00"],
     r"duplicate timestamp 2020-01-01 01:00 at indices 1 and 2"),
    (["2020-01-01T00:00", "NaT", "2020-01-01T02:00"], r"timestamp 1 is NaT"),
    (["2020-01-01T00:00", "2020-01-01T01:00", "2020-01-01T01:30"],
     r"step from index 1 \(2020-01-01 01:00\) to 2 \(2020-01-01 01:30\) is 30 min, not a "
     r"multiple of the interval 60 min"),
])
def test_bad_timestamps_name_the_first_offender(stamps, msg):
  with pytest.raises(DataError, match=msg):
    time_axis.TimeAxis(np.array(stamps, "datetime64[m]"), 60, "grid.nc")
  with pytest.raises(DataError, match=msg):  # the series type refuses them too
    SpatioTemporalSeries("s", np.zeros((3, 2, 2, 1), np.float32),
                         np.array(stamps, "datetime64[m]"), np.zeros((3, 0), np.float32), (),
                         "sum", "", 60, ("v",))
  with pytest.raises(DataError, match="whole minute"):
    time_axis.TimeAxis(np.array(["2020-01-01T00:00:30", "2020-01-01T01:00:30"],
                                "datetime64[s]"), 60)


# ---- custom grids ----------------------------------------------------------------------------

def test_custom_timestamps_gaps_kept_and_bad_stamps_rejected(tmp_path):
  x = np.random.default_rng(0).uniform(0, 1, (8, 4, 2, 1)).astype(np.float32)
  grid = np.array([0, 1, 2, 5, 6, 7, 8, 9])  # 3 slots missing after the third
  good = START + grid * STEP
  np.savez(tmp_path / "gaps.npz", v=x, time=good)
  s = custom.load_array(tmp_path / "gaps.npz", timestamps_key="time")
  assert s.interval_minutes == 30  # the most common step, not the median or the mean
  np.testing.assert_array_equal(s.timestamps, good)
  assert [(g.index, g.missing) for g in s.time_axis.gaps()] == [(3, 2)]
  names = list(s.external_names)
  assert s.external[3, names.index("slot_5")] == 1  # calendar from the timestamp, not the index
  cases = {"unsorted": (good[[0, 2, 1, 3, 4, 5, 6, 7]], "not in time order: index 1"),
           "dup": (good[[0, 1, 2, 2, 4, 5, 6, 7]], "duplicate timestamp 2013-07-01 01:00"),
           "nat": (np.where(np.arange(8) == 4, np.datetime64("NaT"), good).astype(
               "datetime64[m]"), "timestamp 4 is NaT"),
           "offgrid": (good + np.array([0, 0, 0, 0, 0, 0, 0, 10], "timedelta64[m]"),
                       r"step from index 6 .* is 40 min, not a multiple of the interval 30")}
  for label, (stamps, msg) in cases.items():
    np.savez(tmp_path / f"{label}.npz", v=x, time=stamps)
    with pytest.raises(DataError, match=msg):
      custom.load_array(tmp_path / f"{label}.npz", timestamps_key="time")
  np.savez(tmp_path / "iso.npz", v=x, time=np.array([str(t) for t in good[:7]] + ["NaT"]))
  with pytest.raises(DataError, match="timestamp 7 is NaT"):
    custom.load_array(tmp_path / "iso.npz", timestamps_key="time")


# ---- training draws only whole windows -------------------------------------------------------

def _sampler(task, batch_size):
  enc = patterns.encode_train_patterns(task.patterns_train)
  return jax.jit(lambda a, k: pipeline.sample_train_batch(
      a, k, batch_size=batch_size, history=task.history, index_range=task.train_range,
      patterns=enc))


def test_training_never_draws_a_window_across_a_hole():
  task = pipeline.build_task(holey_series(), 2, history=3, train_patterns=("random:0.4",))
  pos = task.external[:, 0].astype(int)
  lo, hi = task.train_range
  # The windows a plain randint(lo, hi) could draw include broken ones (so the test can fail).
  broken = [s for s in range(lo, hi) if (np.diff(pos[s - 3:s + 1]) != 1).any()]
  assert len(broken) == 3 + 3  # ending on grid slots 51..53 and 96..98
  np.testing.assert_array_equal(task.train_current,
                                [s for s in range(lo, hi) if s not in broken])
  assert not task.whole_windows[broken].any() and task.whole_windows[task.train_current].all()
  fn = _sampler(task, 256)
  arrays = task.device_arrays()
  drawn = set()
  for i in range(40):
    b = jax.device_get(fn(arrays, jax.random.key(i)))
    win = b["external"][..., 0].astype(int)  # (B, window) grid positions
    assert (np.diff(win, axis=1) == 1).all(), win[(np.diff(win, axis=1) != 1).any(1)]
    current = np.searchsorted(pos, win[:, -1])
    assert (current < task.split.val_start).all()
    drawn.update(current.tolist())
  assert drawn == set(task.train_current.tolist())  # uniform over all of them: every one seen


def test_gap_free_draws_are_bit_identical_to_the_index_range_draw():
  task = pipeline.build_task(holey_series(holes=()), 2, history=3,
                             train_patterns=("random:0.4", "large_scale:0.25"))
  lo, hi = task.train_range
  np.testing.assert_array_equal(task.train_current, np.arange(lo, hi))
  fn = _sampler(task, 32)
  with_array = task.device_arrays()
  without = {k: v for k, v in with_array.items() if k != "train_current"}
  for seed in range(5):
    key = jax.random.PRNGKey(seed)
    a, b = jax.device_get(fn(with_array, key)), jax.device_get(fn(without, key))
    for name in a:
      np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_no_whole_training_window_is_an_error():
  every_other = tuple(range(1, 240, 2))  # no two consecutive slots anywhere
  with pytest.raises(DataError, match=r"holey: the train split .* holds no window of 3 "
                                      r"consecutive slices at 30 min .*lower data.history"):
    pipeline.build_task(holey_series(holes=every_other), 2, history=2)
  pipeline.build_task(holey_series(holes=every_other), 2, history=0)  # windows of 1 are fine


def test_build_task_logs_the_gaps(caplog):
  with caplog.at_level(py_logging.INFO):
    pipeline.build_task(holey_series(), 2, history=3)
  line = [r.getMessage() for r in caplog.records if "holey:" in r.getMessage()]
  assert len(line) == 1
  assert "3 gaps totalling 8 missing slots, largest 6 slots at 2013-07-02 21:00" in line[0]
  assert "107 of 113 training windows of 4 slices are whole" in line[0]


# ---- evaluation: which slices are scored -----------------------------------------------------

def test_eval_slices_skip_rule():
  task = pipeline.build_task(holey_series(), 2, history=3)
  pos = task.external[:, 0].astype(int)
  slices, rep = pipeline.eval_slices(task, "test")  # span 2 * 3 + 1 = 7
  lo, hi = task.split.range("test")
  broken = [s for s in range(lo, hi) if (np.diff(pos[s - 6:s + 1]) != 1).any()]
  assert len(broken) == 6  # the spans ending on grid slots 201..206 cross the hole at 200
  np.testing.assert_array_equal(slices, [s for s in range(lo, hi) if s not in broken])
  assert rep == {"rule": "skip", "span": 7, "n_slices_in_split": hi - lo, "n_scored": hi - lo - 6,
                 "n_skipped_gap": 6, "n_skipped_start": 0, "n_inserted": 0,
                 "first_skipped": "2013-07-05T04:30"}
  assert not task.whole_windows[broken[:3]].any()  # windows of 4 across the hole: not whole
  # The train split also loses the spans that start before the series.
  _, rep_train = pipeline.eval_slices(task, "train", span=4)
  assert rep_train["n_skipped_start"] == 3 and rep_train["n_skipped_gap"] == 6
  assert time_axis.contiguous_runs(slices) == [(lo, broken[0]), (broken[-1] + 1, hi)]
  gap_free = pipeline.build_task(holey_series(holes=()), 2, history=3)
  s2, rep2 = pipeline.eval_slices(gap_free, "test")
  np.testing.assert_array_equal(s2, np.arange(*gap_free.split.range("test")))
  assert rep2["n_skipped_gap"] == 0 and rep2["first_skipped"] is None


def test_fill_gaps_returns_a_regular_series_and_the_inserted_mask():
  s = holey_series(with_calendar=True)
  filled, inserted = time_axis.fill_gaps(s)
  assert filled.num_slices == 240 and inserted.sum() == 8
  np.testing.assert_array_equal(np.nonzero(inserted)[0], HOLES)
  assert not filled.time_axis.has_gaps
  np.testing.assert_array_equal(filled.timestamps, START + np.arange(240) * STEP)
  np.testing.assert_array_equal(filled.values[~inserted], s.values)
  assert np.isnan(filled.values[inserted]).all()
  np.testing.assert_array_equal(filled.external[~inserted], s.external)
  # Inserted slices: calendar one-hots from their own time, other columns from the last slice.
  names = list(filled.external_names)
  regular_cal, _ = calendar_features(filled.timestamps, 48)
  np.testing.assert_array_equal(filled.external[:, names.index("dow_0"):], regular_cal)
  np.testing.assert_array_equal(filled.external[90:96, 0], 89)  # "position" repeats slot 89
  same, none = time_axis.fill_gaps(holey_series(holes=()))
  assert not none.any() and same.num_slices == 240


def test_fill_rule_task_and_eval_slices():
  skip = pipeline.build_task(holey_series(), 2, history=3)
  fill = pipeline.build_task(holey_series(), 2, history=3, gap_rule="fill")
  pos = skip.time_axis.positions
  assert fill.fine.shape[0] == 240 and fill.inserted.sum() == 8
  # The split is carried over by timestamp: the same real slices in every split.
  for name in ("train", "val", "test"):
    a, b = skip.split.range(name), fill.split.range(name)
    np.testing.assert_array_equal(pos[a[0]:a[1]], np.nonzero(~fill.inserted)[0][
        (np.nonzero(~fill.inserted)[0] >= b[0]) & (np.nonzero(~fill.inserted)[0] < b[1])])
  np.testing.assert_allclose(fill.fine_norm.mean, skip.fine_norm.mean, rtol=1e-6)
  np.testing.assert_allclose(fill.coarse_norm.std, skip.coarse_norm.std, rtol=1e-6)
  # Inserted slices: never observable, 0 in normalised arrays, never a training window.
  assert (fill.coarse_valid[fill.inserted] == 0).all() and fill.coarse_valid[~fill.inserted].all()
  assert (fill.fine[fill.inserted] == 0).all() and np.isfinite(fill.coarse).all()
  np.testing.assert_array_equal(fill.train_current, pos[skip.train_current])
  # Evaluation: every real test slice is scored, its span may hold inserted (unobserved) slices.
  slices, rep = pipeline.eval_slices(fill, "test")
  lo, hi = fill.split.range("test")
  np.testing.assert_array_equal(slices, np.setdiff1d(np.arange(lo, hi), HOLES))
  assert rep == {"rule": "fill", "span": 7, "n_slices_in_split": skip.split.range("test")[1]
                 - skip.split.range("test")[0], "n_scored": len(slices), "n_skipped_gap": 0,
                 "n_skipped_start": 0, "n_inserted": 1, "first_skipped": None}
  np.testing.assert_array_equal(fill.fine_phys[slices], skip.fine_phys[np.searchsorted(
      pos, slices)])
  with pytest.raises(DataError, match="gap rule"):
    pipeline.build_task(holey_series(), 2, history=3, gap_rule="drop")
