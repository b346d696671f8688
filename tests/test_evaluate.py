"""The evaluation contract end to end with the `interp` baseline on the embedded real data."""
import json
import subprocess
import sys

import numpy as np
import pytest

from diffrecon_jax.configs import default, tapbj
from diffrecon_jax import evaluate, methods, run
from diffrecon_jax.data import pipeline
from diffrecon_jax.data.series import DataError, SpatioTemporalSeries
from tests.conftest import REPO_ROOT

KEYS = {"pattern", "missing_ratio", "mae", "rmse", "completion_mae", "completion_rmse", "crps",
        "n_test_slices", "seconds", "maps_per_second"}


def test_interp_writes_results_for_all_nine_patterns(tmp_path):
  config = default.get_config()
  config.method = "interp"
  config.eval.max_slices = 48
  docs = run.run(config, str(tmp_path), mode="evaluate")
  doc = json.loads((tmp_path / "results.json").read_text())
  assert doc == json.loads(json.dumps(docs[0]))
  assert doc["dataset"] == "nytaxi" and doc["method"] == "interp" and doc["scale_factor"] == 2
  assert doc["coarse_shape"] == [8, 6] and doc["fine_shape"] == [16, 12] and doc["channels"] == 2
  assert doc["aggregation"] == "sum" and doc["sampler"] is None and doc["seed"] == 0
  assert [(r["pattern"], r["missing_ratio"]) for r in doc["results"]] == [
      ("fixed", 0.2), ("fixed", 0.4), ("fixed", 0.6), ("fixed", 0.8), ("random", 0.2),
      ("random", 0.4), ("random", 0.6), ("random", 0.8), ("large_scale", 0.25)]
  for r in doc["results"]:
    assert KEYS <= set(r)
    assert r["n_test_slices"] == 48 and r["crps"] == r["mae"]  # a point forecast's CRPS
    assert 0 < r["mae"] <= r["rmse"] and 0 < r["completion_mae"] <= r["completion_rmse"]
  md = (tmp_path / "results.md").read_text()
  assert "| fixed | 0.2 | MAE |" in md and "| large_scale | 0.25 | RMSE |" in md
  # the masks are saved and reproduce the evaluation
  saved = np.load(tmp_path / "masks" / "random_0.4.npz")
  task = pipeline.prepare_task(config)
  mask, seed = evaluate.eval_mask(task, evaluate.patterns_lib.parse_pattern("random:0.4"), 0)
  np.testing.assert_array_equal(saved["mask"], mask.astype(np.uint8))
  assert int(saved["seed"]) == seed == doc["results"][5]["mask_seed"]


def test_more_missing_costs_more_and_metrics_are_in_physical_units():
  config = default.get_config()
  task = pipeline.prepare_task(config)
  res = evaluate.evaluate_method(task, methods.build("interp"), ("random:0.2", "random:0.8"),
                                 seed=0, max_slices=200)
  assert res[0]["mae"] < res[1]["mae"]
  # physical units: the error of predicting zero everywhere is the mean flow (tens of trips)
  zero_mae = float(np.abs(task.fine_phys[task.split.test_start:][:200]).mean())
  assert 10 < zero_mae and res[1]["mae"] < zero_mae


def test_user_mask_file_is_accepted(tmp_path):
  config = default.get_config()
  task = pipeline.prepare_task(config)
  m = np.ones((8, 6))
  m[:2, :2] = 0
  np.save(tmp_path / "sensors.npy", m)
  res = evaluate.evaluate_method(task, methods.build("interp"), (f"file:{tmp_path}/sensors.npy",),
                                 seed=0, max_slices=20)
  assert res[0]["pattern"] == "file" and res[0]["missing_ratio"] == pytest.approx(4 / 48, abs=1e-4)


def test_unknown_method_and_mode():
  config = default.get_config()
  config.method = "vdsr"
  with pytest.raises(ValueError, match="unknown method 'vdsr'"):
    run.run(config, "/tmp/unused_wd", mode="evaluate")
  config.method = "interp"
  with pytest.raises(ValueError, match="nothing to train"):
    run.run(config, "/tmp/unused_wd", mode="train")


def test_tapbj_without_data_says_where_to_get_it(tmp_path):
  config = tapbj.get_config()
  config.method = "interp"
  with pytest.raises(DataError, match="tapdata.org.cn"):
    run.run(config, str(tmp_path), mode="evaluate")


def test_main_command_line_runs_interp(tmp_path):
  cmd = [sys.executable, "-m", "diffrecon_jax.main", "--config=configs/nytaxi.py",
         f"--workdir={tmp_path}", "--config.method=interp", "--mode=evaluate",
         "--config.eval.max_slices=24", "--config.patterns.eval=('fixed:0.4','large_scale:0.25')"]
  out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  doc = json.loads((tmp_path / "results.json").read_text())
  assert [r["pattern"] for r in doc["results"]] == ["fixed", "large_scale"]


def test_masks_of_one_kind_are_nested():
  task = pipeline.prepare_task(default.get_config())
  for kind in ("fixed", "random"):
    masks = [evaluate.eval_mask(task, evaluate.patterns_lib.parse_pattern(f"{kind}:{r}"), 0)[0]
             for r in (0.2, 0.4, 0.6, 0.8)]
    for lo, hi in zip(masks, masks[1:]):
      assert ((hi == 0) | (lo == 1)).all() and (hi <= lo).all() and hi.sum() < lo.sum()


def test_main_stops_with_a_clear_message_when_data_is_missing(tmp_path):
  cmd = [sys.executable, "-m", "diffrecon_jax.main", "--config=configs/tapbj.py",
         f"--workdir={tmp_path}"]
  out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert "data error" in out.stderr and "tapdata.org.cn" in out.stderr
  assert "Traceback" not in out.stderr


def _hand_task():
  """8 slices of a 4x4 fine grid, 2 channels, N = 2 (coarse 2x2), history 0: test slices 6, 7."""
  t = 8
  values = np.arange(t * 4 * 4 * 2, dtype=np.float32).reshape(t, 4, 4, 2)
  series = SpatioTemporalSeries(
      name="hand", values=values,
      timestamps=np.datetime64("2020-01-01T00:00") + np.arange(t) * np.timedelta64(30, "m"),
      external=np.zeros((t, 0), np.float32), external_names=(), aggregation="sum", units="",
      interval_minutes=30, channel_names=("a", "b"))
  return pipeline.build_task(series, 2, 0)


class _OffOnHidden:
  """Completion exact on observed cells, off by +1 (channel a) and -3 (channel b) on hidden ones;
  fine maps off by 0.25 everywhere. Holds the test's truth (it is the test's oracle)."""
  name, sampler = "off_on_hidden", None

  def __init__(self, task):
    self.task = task

  def reconstruct(self, view, slices):
    hidden = (view.mask[slices] == 0)[..., None]
    coarse = self.task.coarse_phys[slices] + np.where(hidden, np.array([1.0, -3.0]), 0.0)
    return {"coarse": coarse, "fine": self.task.fine_phys[slices] + 0.25, "samples": None}


def test_completion_metrics_score_the_hidden_cells_only():
  """large_scale on a 2x2 grid hides cell (1, 1): 2 test slices x 2 channels = 4 hidden values
  with errors 1, 3, 1, 3, so completion MAE = 2 and RMSE = sqrt(5); scored over all 16 coarse
  values it would be 0.5 and sqrt(5) / 2."""
  task = _hand_task()
  (res,) = evaluate.evaluate_method(task, _OffOnHidden(task), ("large_scale:0.25",), seed=0)
  assert res["n_test_slices"] == 2 and res["observed_missing_ratio"] == 0.25
  assert res["completion_mae"] == pytest.approx(2.0, rel=1e-12)
  assert res["completion_rmse"] == pytest.approx(np.sqrt(5.0), rel=1e-12)
  assert res["mae"] == pytest.approx(0.25, rel=1e-12)
  assert res["rmse"] == pytest.approx(0.25, rel=1e-12)
  assert res["crps"] == res["mae"] and res["coverage_90"] is None


def test_the_train_split_is_never_evaluated():
  task = _hand_task()
  with pytest.raises(ValueError, match="train split's truth"):
    evaluate.evaluate_method(task, _OffOnHidden(task), ("large_scale:0.25",), seed=0,
                             split="train")
  with pytest.raises(ValueError, match="use one of"):
    evaluate.evaluation_slices(task, "bogus")
  np.testing.assert_array_equal(evaluate.evaluation_slices(task, "val")[0], [4, 5])


class _Recording:
  """Wraps a method and records the slice pieces it is asked to reconstruct."""

  def __init__(self, inner):
    self.inner, self.name, self.sampler, self.pieces = inner, inner.name, inner.sampler, []

  def reconstruct(self, view, slices):
    self.pieces.append(np.asarray(slices))
    return self.inner.reconstruct(view, slices)


@pytest.mark.parametrize("gap_rule", ["skip", "fill"])
def test_a_series_with_holes_is_scored_only_where_spans_are_whole(gap_rule):
  from diffrecon_jax.data import example_grid
  series = example_grid.example_series(drop_every=97)  # real nybike flows, 44 slots missing
  task = pipeline.build_task(series, scale=2, history=3, gap_rule=gap_rule)
  method = _Recording(methods.build("interp"))
  (res,) = evaluate.evaluate_method(task, method, ("random:0.4",), seed=0, chunk=100)
  report = res["slices"]
  lo, hi = task.split.range("test")
  assert report["rule"] == gap_rule and report["span"] == 2 * 3 + 1
  assert report["n_slices_in_split"] == int((~task.inserted[lo:hi]).sum())
  scored = np.concatenate(method.pieces)
  assert res["n_test_slices"] == report["n_scored"] == len(scored)
  assert all(len(p) <= 100 and np.all(np.diff(p) == 1) for p in method.pieces)
  assert not task.inserted[scored].any()  # inserted (never observed) slots are never scored
  if gap_rule == "skip":
    # Every scored slice's span lies on the 30-min grid; the ones whose span crosses a hole
    # are counted, not scored.
    minutes = task.series.timestamps.astype("datetime64[m]").astype(np.int64)
    assert all(minutes[s] - minutes[s - 6] == 6 * 30 for s in scored)
    assert report["n_skipped_gap"] > 0
    assert report["n_scored"] + report["n_skipped_gap"] == report["n_slices_in_split"]
  else:
    assert report["n_skipped_gap"] == 0 and report["n_inserted"] > 0
    assert report["n_scored"] == report["n_slices_in_split"]
