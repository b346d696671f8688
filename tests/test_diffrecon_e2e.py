"""DiffRecon end to end on the embedded real data: the main command trains (three phases),
evaluates beside `interp`, and a second command reconstructs from the workdir alone.

Tiny models and a few steps: this checks the wiring, not the accuracy (the README's table does).
"""
import json
import re
import os
import subprocess
import sys
import textwrap

import numpy as np

from tests import _fingerprint
from tests import _train_helpers as helpers
from tests.conftest import REPO_ROOT

CONFIG = textwrap.dedent("""
    from tests._train_helpers import tiny_config

    def get_config():
      c = tiny_config(steps=(2, 2, 2), batch_size=4, steps_per_call=2, checkpoint_every=2)
      c.eval.max_slices = 6
      c.eval.batch_size = 4
      c.sampling.n_samples = 2
      c.sampling.steps = 2
      c.patterns.eval = ("random:0.4", "large_scale:0.25")
      return c
    """)


def _main(tmp_path, *flags):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=helpers.FAST_COMPILE_XLA_FLAGS,
             PYTHONPATH=str(REPO_ROOT))
  cmd = [sys.executable, "-m", "diffrecon_jax.main", f"--config={tmp_path}/tiny.py",
         f"--workdir={tmp_path}/wd", *flags]
  out = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-4000:]
  return out


def test_train_evaluate_then_reconstruct_from_the_workdir(tmp_path):
  (tmp_path / "tiny.py").write_text(CONFIG)
  _main(tmp_path, "--config.train.tensorboard=True", "--config.eval.save_predictions=True",
        "--config.eval.save_members=True")  # default mode: train_and_evaluate
  wd = tmp_path / "wd"
  for phase in ("stage_c", "stage_f", "joint"):
    assert (wd / phase).is_dir()
  logged = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
  assert {r["phase"] for r in logged} == {"stage_c", "stage_f", "joint"}
  # The curves: a figure from metrics.jsonl, TensorBoard events of the same records.
  assert (wd / "figures" / "training_curves.png").stat().st_size > 10_000
  assert list((wd / "tensorboard").glob("events.out.tfevents.*"))
  doc = json.loads((wd / "results.json").read_text())
  assert doc["method"] == "diffrecon" and doc["dataset"] == "nytaxi"
  assert doc["sampler"] == {"name": "ddim", "steps": 2, "n_samples": 2, "eta": 1.0,
                            "point": "posterior_mean", "ensemble": "members"}
  # The recalibration was fitted on the validation split, saved, and its numbers reported
  # beside the raw ensemble's.
  cal = json.loads((wd / "calibration.json").read_text())
  assert cal["fitted_on"]["split"] == "val" and cal["sampler"] == doc["sampler"]
  assert doc["calibration"]["spread_scale"] == cal["spread_scale"]
  assert doc["trained_on"] == ["random:0.4", "large_scale:0.25"]
  for r in doc["results"]:
    assert r["n_test_slices"] == 6
    for key in ("mae", "rmse", "completion_mae", "completion_rmse", "crps", "maps_per_second",
                "crps_raw", "spread_skill", "spread_skill_raw", "completion_crps"):
      assert np.isfinite(r[key]) and r[key] > 0, (key, r)
    for key in ("coverage_50", "coverage_90", "coverage_90_hidden", "coverage_90_raw"):
      assert 0.0 <= r[key] <= 1.0, (key, r)
    assert sum(r["rank_histogram"]) > 0 and len(r["rank_histogram"]) == 3
  # What was scored, saved for rescoring offline: the file gives the results' MAE again.
  import cf_xarray  # noqa: F401  (the .cf accessor: CF axes as analysts' tools read them)
  import xarray as xr
  for r in doc["results"]:
    with xr.open_dataset(r["predictions_file"]) as pred:
      assert pred.attrs["Conventions"] == "CF-1.10" and set(pred.cf.axes) >= {"T", "X", "Y"}
      err = np.abs(pred["nytaxi"].values - pred["nytaxi_truth"].values)
      np.testing.assert_allclose(np.nanmean(err), r["mae"], rtol=1e-5)
      assert pred["nytaxi_members"].shape[:2] == (2, 6)
      assert pred["nytaxi_interval"].dims[0] == "quantile"
  for name in ("prior", "climatology", "interp"):  # the references, on the same masks
    ref = json.loads((wd / f"results_{name}.json").read_text())
    assert ref["method"] == name and len(ref["results"]) == 2 and ref["sampler"] is None
    assert all(r["crps"] == r["mae"] for r in ref["results"])  # point forecasts
  # Every results file says what produced it; provenance.json keeps one entry per command.
  assert doc["provenance"]["mode"] == "train_and_evaluate"
  assert doc["provenance"]["packages"]["jax"] and doc["provenance"]["backend"] == "cpu"
  assert json.loads((wd / "results_interp.json").read_text())["provenance"] == doc["provenance"]
  md = (wd / "results.md").read_text()
  assert "| diffrecon | prior | climatology | interp |" in md and "CRPS" in md
  # The calendar table ("auto": chosen on the validation split) is named in results.md.
  assert re.search(r"`climatology`: .*calendar table `(day|week|blend:[0-9.]+)` \(validation MAE\)", md)

  # --mode=reconstruct needs nothing but the workdir's checkpoints (and the data).
  _main(tmp_path, "--mode=reconstruct")
  runs = json.loads((wd / "provenance.json").read_text())["runs"]
  assert [r["mode"] for r in runs] == ["train_and_evaluate", "reconstruct"]
  rec = np.load(wd / "reconstruction_random_0.4.npz")
  assert rec["fine"].shape == (6, 16, 12, 2) and rec["coarse"].shape == (6, 8, 6, 2)
  assert np.isfinite(rec["fine"]).all()
  assert (rec["fine_q05"] <= rec["fine_q95"] + 1e-5).all()
  assert (rec["coarse_q05"] <= rec["coarse_q95"] + 1e-5).all()
  assert (rec["fine_q95"] - rec["fine_q05"]).max() > 0  # a real band, from the calibration
  # observed coarse cells are reproduced exactly (imposed at every reverse step)
  mask = rec["mask"].astype(bool)
  from diffrecon_jax.data import nyc_dsan, coarsen
  truth = coarsen.coarsen(nyc_dsan.load_nytaxi().values[rec["slices"]], 2, "sum")
  np.testing.assert_allclose(rec["coarse"][mask], truth[mask], rtol=1e-4, atol=1e-2)
  # Losses, metrics and reconstructions equal the recorded ones: a behaviour-preserving change
  # (a move, a refactor) keeps them bit-identical (tests/_fingerprint.py).
  _fingerprint.check(wd)
