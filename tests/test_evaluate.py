"""The evaluation contract end to end with the `interp` baseline on the embedded real data."""
import json
import subprocess
import sys

import numpy as np
import pytest

from configs import default, tapbj
from diffrecon_jax import evaluate, run
from diffrecon_jax.data import pipeline
from diffrecon_jax.data.series import DataError
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
    assert r["n_test_slices"] == 48 and r["crps"] is None
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
  res = evaluate.evaluate_method(task, run._baseline("interp"), ("random:0.2", "random:0.8"),
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
  res = evaluate.evaluate_method(task, run._baseline("interp"), (f"file:{tmp_path}/sensors.npy",),
                                 seed=0, max_slices=20)
  assert res[0]["pattern"] == "file" and res[0]["missing_ratio"] == pytest.approx(4 / 48, abs=1e-4)


def test_unknown_method_and_mode():
  config = default.get_config()
  config.method = "srcnn"
  with pytest.raises(ValueError, match="unknown method 'srcnn'"):
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
