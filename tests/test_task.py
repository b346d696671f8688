"""Coarse-graining, sparse patterns and the task pipeline, on real data slices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffrecon_jax.data import coarsen, patterns, pipeline
from diffrecon_jax.data.series import DataError, SpatioTemporalSeries, calendar_features

ALL9 = ("fixed:0.2", "fixed:0.4", "fixed:0.6", "fixed:0.8", "random:0.2", "random:0.4",
        "random:0.6", "random:0.8", "large_scale:0.25")


def real_nytaxi(t=400):
  """The first t slots of the embedded NYC taxi flows, as a series (no dependence on loaders)."""
  import diffrecon_jax.data as d
  import pathlib
  root = pathlib.Path(d.__file__).parent / "embedded" / "nytaxi"
  flow = np.load(root / "flow_train.npz")["flow"][:t].astype(np.float32)
  ts = np.datetime64("2016-01-01T00:00") + np.arange(t) * np.timedelta64(30, "m")
  ext, names = calendar_features(ts, 48)
  return SpatioTemporalSeries("nytaxi", flow, ts, ext, names, "sum", "trips", 30,
                              ("inflow", "outflow"))


def test_coarsen_sum_and_mean_by_hand():
  fine = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
  s = coarsen.coarsen(fine, 2, "sum")
  assert s[0, :, :, 0].tolist() == [[0 + 1 + 4 + 5, 2 + 3 + 6 + 7], [8 + 9 + 12 + 13, 10 + 11 + 14 + 15]]
  m = coarsen.coarsen(fine, 2, "mean")
  np.testing.assert_allclose(m, s / 4)


def test_upsample_is_consistent_with_aggregation():
  rng = np.random.default_rng(0)
  c = rng.random((3, 4, 3, 2)).astype(np.float32)
  for agg in ("sum", "mean"):
    up = coarsen.upsample_uniform(c, 3, agg)
    assert up.shape == (3, 12, 9, 2)
    np.testing.assert_allclose(coarsen.coarsen(up, 3, agg), c, rtol=1e-5)


def test_indivisible_grid_is_an_error_unless_cropped():
  with pytest.raises(DataError, match="not divisible by N=4"):
    coarsen.check_divisible((25, 53), 4, crop=False, name="ncep_air")
  assert coarsen.check_divisible((25, 53), 4, crop=True) == (24, 52)
  with pytest.raises(DataError, match="positive integer"):
    coarsen.check_divisible((16, 12), 0, crop=False)


@pytest.mark.parametrize("spec,missing", [("fixed:0.2", 10), ("fixed:0.8", 38), ("random:0.4", 19),
                                          ("random:0.6", 29), ("large_scale:0.25", 12),
                                          ("random:0.0", 0)])
def test_eval_masks_hide_the_right_number_of_cells(spec, missing):
  p = patterns.parse_pattern(spec)
  m = patterns.make_eval_mask(p, 30, (8, 6), seed=3)
  assert m.shape == (30, 8, 6) and m.dtype == np.float32
  np.testing.assert_array_equal((1 - m).sum(axis=(1, 2)), missing)
  if p.kind in ("fixed", "large_scale"):
    assert (m == m[0]).all()
  elif missing:
    assert not (m == m[0]).all()  # random: a new set per slice
  if p.kind == "large_scale":
    assert (m[0, 4:, 3:] == 0).all() and m[0, :4].all() and m[0, :, :3].all()


def test_eval_masks_are_seeded():
  p = patterns.parse_pattern("random:0.4")
  a = patterns.make_eval_mask(p, 10, (8, 6), seed=1)
  np.testing.assert_array_equal(a, patterns.make_eval_mask(p, 10, (8, 6), seed=1))
  assert not np.array_equal(a, patterns.make_eval_mask(p, 10, (8, 6), seed=2))


@pytest.mark.parametrize("spec,msg", [("random:1.0", r"\[0, 1\), got 1.0"),
                                      ("fixed:-0.1", r"\[0, 1\), got -0.1"),
                                      ("holes:0.2", "unknown kind"), ("fixed", "kind:ratio"),
                                      ("random:abc", "not a number"),
                                      ("large_scale:0.5", "lower-right quarter")])
def test_bad_pattern_specs(spec, msg):
  with pytest.raises(DataError, match=msg):
    patterns.parse_pattern(spec)


def test_ratio_hiding_every_cell_is_an_error():
  with pytest.raises(DataError, match="hides all"):
    patterns.make_eval_mask(patterns.parse_pattern("random:0.9"), 3, (1, 2), 0)


def test_user_mask_file(tmp_path):
  good = np.ones((8, 6), np.int64)
  good[0, 0] = 0
  np.save(tmp_path / "m.npy", good)
  m = patterns.make_eval_mask(patterns.parse_pattern(f"file:{tmp_path}/m.npy"), 5, (8, 6), 0)
  assert m.shape == (5, 8, 6) and (m[:, 0, 0] == 0).all() and m.sum() == 5 * 47
  np.save(tmp_path / "bad_shape.npy", np.ones((6, 8)))
  with pytest.raises(DataError, match=r"shape \(6, 8\)"):
    patterns.make_eval_mask(patterns.parse_pattern(f"file:{tmp_path}/bad_shape.npy"), 5, (8, 6), 0)
  # NaN marks a missing cell, as in the data files.
  nan = good.astype(np.float32)
  nan[1, 1] = np.nan
  np.save(tmp_path / "nan.npy", nan)
  m = patterns.make_eval_mask(patterns.parse_pattern(f"file:{tmp_path}/nan.npy"), 5, (8, 6), 0)
  assert (m[:, 1, 1] == 0).all() and m.sum() == 5 * 46 and not np.isnan(m).any()
  vals = np.ones((8, 6))
  vals[2, 3] = 0.5
  np.save(tmp_path / "bad_vals.npy", vals)
  with pytest.raises(DataError, match=r"bad_vals.npy: values must be 1 \(observed\), 0 or NaN "
                     r"\(missing\); found 0.5 at index \(2, 3\)"):
    patterns.make_eval_mask(patterns.parse_pattern(f"file:{tmp_path}/bad_vals.npy"), 5, (8, 6), 0)
  (tmp_path / "text.npy").write_text("0 1 1\n")
  with pytest.raises(DataError, match=r"text.npy: not a NumPy .npy array"):
    patterns.make_eval_mask(patterns.parse_pattern(f"file:{tmp_path}/text.npy"), 5, (8, 6), 0)


def test_train_masks_follow_the_same_rules():
  pats = [patterns.parse_pattern(s) for s in ALL9]
  kinds, ratios = patterns.encode_train_patterns(pats)
  m = np.asarray(patterns.sample_train_masks(jax.random.key(0), 256, 3, (8, 6), kinds, ratios))
  assert m.shape == (256, 3, 8, 6)
  missing = (1 - m).sum(axis=(2, 3))
  assert set(np.unique(missing).tolist()) == {10, 19, 29, 38, 12}
  # every window keeps the same count across its slices
  assert (missing == missing[:, :1]).all()
  with pytest.raises(DataError, match="coarse shape is needed"):
    patterns.encode_train_patterns([patterns.parse_pattern("file:x.npy")])


def test_a_training_layout_file_gives_its_cells_in_every_window(tmp_path):
  """A `file:` training pattern is a fixed sensor layout: every window drawn with it hides
  exactly the file's cells, in every slice; other patterns are drawn as before."""
  layout = np.ones((8, 6), np.float32)
  layout[[0, 3, 5], [1, 2, 4]] = 0
  np.save(tmp_path / "layout.npy", layout)
  pats = [patterns.parse_pattern(s) for s in ("random:0.4", f"file:{tmp_path}/layout.npy")]
  kinds, ratios, layouts = patterns.encode_train_patterns(pats, (8, 6))
  assert kinds.tolist() == [1, patterns.LAYOUT_KIND] and layouts.shape == (1, 8, 6)
  m = np.asarray(patterns.sample_train_masks(jax.random.key(1), 128, 3, (8, 6), kinds, ratios,
                                             layouts))
  is_layout = (m == layout).all(axis=(1, 2, 3))
  assert 30 < is_layout.sum() < 98  # about half the windows take the layout
  assert ((1 - m[~is_layout]).sum(axis=(2, 3)) == 19).all()  # the others: random:0.4


def test_a_training_layout_must_not_change_over_time(tmp_path):
  m = np.ones((4, 8, 6), np.float32)
  m[2, 0, 0] = 0
  np.save(tmp_path / "moving.npy", m)
  with pytest.raises(DataError, match=r"moving.npy: the observed cells change at slice 2"):
    patterns.encode_train_patterns([patterns.parse_pattern(f"file:{tmp_path}/moving.npy")], (8, 6))
  np.save(tmp_path / "empty.npy", np.zeros((8, 6), np.float32))
  with pytest.raises(DataError, match="no cell is observed"):
    patterns.encode_train_patterns([patterns.parse_pattern(f"file:{tmp_path}/empty.npy")], (8, 6))


def test_build_task_split_and_normalisation_on_real_data():
  series = real_nytaxi(400)
  task = pipeline.build_task(series, scale=2, history=3, train_patterns=ALL9)
  assert task.coarse.shape == (400, 8, 6, 2) and task.fine.shape == (400, 16, 12, 2)
  assert task.split.range("train") == (0, 200) and task.split.range("test") == (300, 400)
  # sum-pooled physical coarse equals the pooled truth
  np.testing.assert_allclose(task.coarse_phys[5].sum(axis=(0, 1)), series.values[5].sum(axis=(0, 1)),
                             rtol=1e-5)
  # the normalisation is fitted on the train split only
  tr = task.fine[:200].reshape(-1, 2)
  np.testing.assert_allclose(tr.mean(0), 0, atol=1e-4)
  np.testing.assert_allclose(tr.std(0), 1, atol=1e-3)
  assert abs(task.fine[300:].mean()) > 1e-3
  np.testing.assert_allclose(task.fine_norm.inverse(task.fine), task.fine_phys, rtol=1e-4, atol=1e-3)
  assert task.train_range == (3, 200)


def test_build_task_rejects_tiny_series_and_inf():
  series = real_nytaxi(12)
  with pytest.raises(DataError, match="too few"):
    pipeline.build_task(series, 2, history=6)
  bad = real_nytaxi(40)
  bad.values[3, 0, 0, 0] = np.inf
  with pytest.raises(DataError, match="Inf"):
    pipeline.build_task(bad, 2, 2)


def test_nan_fine_cells_become_always_missing_coarse_cells():
  series = real_nytaxi(40)
  series.values[10, 0, 0, 1] = np.nan
  task = pipeline.build_task(series, 2, 2)
  assert task.coarse_valid[10, 0, 0] == 0 and task.coarse_valid.sum() == 40 * 48 - 1
  assert np.isfinite(task.fine).all() and np.isfinite(task.coarse).all()
  all_nan = real_nytaxi(40)
  all_nan.values[7] = np.nan
  with pytest.raises(DataError, match="no finite coarse cell"):
    pipeline.build_task(all_nan, 2, 2)


def test_sample_train_batch_windows_match_the_series():
  task = pipeline.build_task(real_nytaxi(200), 2, 3, train_patterns=("random:0.4",))
  enc = patterns.encode_train_patterns(task.patterns_train)
  fn = jax.jit(lambda a, k: pipeline.sample_train_batch(
      a, k, batch_size=8, history=3, index_range=task.train_range, patterns=enc))
  b = jax.tree.map(np.asarray, fn(task.device_arrays(), jax.random.key(1)))
  assert b["obs"].shape == (8, 4, 8, 6, 2) and b["mask"].shape == (8, 4, 8, 6)
  assert b["external"].shape == (8, 4, task.external.shape[1]) and b["fine"].shape == (8, 16, 12, 2)
  for k in range(8):
    # locate the window by its fine map, then check every field against the series
    s = int(np.nonzero((task.fine == b["fine"][k]).all(axis=(1, 2, 3)))[0][0])
    assert task.train_range[0] <= s < task.train_range[1]
    np.testing.assert_array_equal(b["coarse"][k], task.coarse[s - 3:s + 1])
    np.testing.assert_array_equal(b["external"][k], task.external[s - 3:s + 1])
    np.testing.assert_array_equal(b["obs"][k], b["coarse"][k] * b["mask"][k][..., None])
  assert ((1 - b["mask"]).sum(axis=(2, 3)) == 19).all()


def test_gap_free_series_draws_exactly_the_index_range_batches():
  """Drawing from `train_current` must not move the default run: on a series without gaps the
  batches are bit-identical to the former randint(lo, hi) draw."""
  task = pipeline.build_task(real_nytaxi(400), 2, 3, train_patterns=ALL9)
  assert not task.time_axis.has_gaps
  assert task.whole_windows[3:].all() and not task.whole_windows[:3].any()
  np.testing.assert_array_equal(task.train_current, np.arange(*task.train_range))
  arrays = task.device_arrays()
  assert arrays["train_current"].dtype == jnp.int32
  enc = patterns.encode_train_patterns(task.patterns_train)
  fn = jax.jit(lambda a, k: pipeline.sample_train_batch(
      a, k, batch_size=16, history=3, index_range=task.train_range, patterns=enc))
  without = {k: v for k, v in arrays.items() if k != "train_current"}
  for seed in range(3):
    key = jax.random.PRNGKey(seed)
    b = jax.device_get(fn(arrays, key))
    old = jax.device_get(fn(without, key))
    for name in b:
      np.testing.assert_array_equal(b[name], old[name], err_msg=name)
    # ... and the current slices are those of the former formula.
    current = np.asarray(jax.random.randint(jax.random.split(key)[0], (16,), *task.train_range))
    np.testing.assert_array_equal(b["fine"], task.fine[current])
