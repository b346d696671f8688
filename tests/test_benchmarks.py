"""The benchmark suite still runs against the package: `python -m benchmarks.run --tiny`.

Tiny mode calls every section's functions (train steps, sub-networks, sampling, the whole-split
`reconstruct`, scaling, the default config's section) on a shrunk config, so a change of a
public function the suite calls (an argument order, a new required input) fails here instead of
in the next minutes-long benchmark run. Its timings mean nothing; they only have to exist, be
finite and positive. 47 s on 2 CPU cores shared with another job (about half of it the three
train-step compiles).
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO_ROOT

# results.json key -> the timings of each of its rows that must be finite and > 0.
ROW_TIMINGS = {
    "train": (("jax", "step_ms"), ("jax", "compile_s")),
    "components": (("jax_fwd_ms",), ("jax_fwd_bwd_ms",), ("jax_compile_s",)),
    "sampling": (("jax", "time_s"), ("jax", "compile_c_s"), ("jax", "compile_f_s"),
                 ("jax", "fine_maps_per_s")),
    "scaling": (("jax", "step_ms"), ("jax", "compile_s")),
    "scaling_samples": (("jax", "time_s"),),
}
SPLIT_TIMINGS = ("measured_s", "all_patterns_s", "fine_maps_per_s")


def _get(row: dict, path: tuple):
  for key in path:
    row = row[key]
  return row


def _check_rows(where: str, rows: list, paths: tuple) -> None:
  assert rows, f"{where}: no rows"
  for row in rows:
    assert "error" not in row and "skipped" not in row.get("jax", {}), (where, row)
    for path in paths:
      value = _get(row, path)
      assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, \
          (where, path, row)


def _check_split(where: str, split: dict) -> None:
  assert split["patterns_run"] >= 1 and split["slices"] >= 1, (where, split)
  for key in SPLIT_TIMINGS:
    assert math.isfinite(split[key]) and split[key] > 0, (where, key, split)
  assert all(p["time_s"] > 0 for p in split["per_pattern"]), (where, split)


def test_tiny_benchmark_run_writes_every_section(tmp_path):
  out = tmp_path / "bench"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
  cmd = [sys.executable, "-m", "benchmarks.run", "--tiny", "--no-torch", "--out", str(out)]
  proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, f"rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"

  results = json.loads((out / "results.json").read_text())
  assert results["mode"] == "tiny" and results["finished"]
  assert results["config"].startswith("configs/nytaxi.py:cpu,paper")
  for key, paths in ROW_TIMINGS.items():
    _check_rows(key, results.get(key), paths)
  assert [r["phase"] for r in results["train"]] == ["joint"]
  # Scaling times each side in alternating rounds and keeps its fastest round's median.
  for row in results["scaling"]:
    rounds = row["jax"]["round_ms"]
    assert len(rounds) == 2 and row["jax"]["step_ms"] == min(rounds), row
  assert {r["component"] for r in results["components"]} == {
      "unet_c", "unet_f", "st_pointformer", "t_patternnet"}
  _check_split("split", results["split"])

  # The default config (what a user runs), timed apart from the paper's architecture.
  default = results["default"]
  assert default["config"].startswith("configs/nytaxi.py:cpu") and "paper" not in default["config"]
  _check_rows("default.train", default.get("train"), ROW_TIMINGS["train"])
  _check_rows("default.sampling", default.get("sampling"), ROW_TIMINGS["sampling"])
  _check_split("default.split", default["split"])

  # MFU: achieved FLOP/s over this CPU's float32 peak, for the train steps and the samplers.
  assert results["machine"]["peak_flops"] > 1e9
  for row in results["train"] + results["sampling"]:
    assert 0 < row["jax"]["mfu"] < 1, row
  assert "MFU %" in (out / "results.md").read_text()

  # results.md is the rendering of results.json (benchmarks/report.py), with every table.
  from benchmarks import report
  md = (out / "results.md").read_text()
  assert md == report.markdown(results)
  for title in ("## Train step", "## Where the time goes", "## Sampling", "## Whole test split",
                "## Scaling: joint train step", "## Scaling: samples per map",
                "## Default config", "## Default config: train step",
                "## Default config: sampling", "## Default config: whole test split"):
    assert title in md, title


def test_eval_time_copies_the_checkpoints_without_results_and_refuses_an_untrained_workdir(
    tmp_path):
  import pytest
  from benchmarks import eval_time
  src = tmp_path / "wd"
  for name in ("joint/1/x", "stage_c/1/x", "prior.npz", "config.json", "results.json",
               "results_prior.json", "results.md", "calibration.json", "masks/a.npz",
               "figures/f.png"):
    (src / name).parent.mkdir(parents=True, exist_ok=True)
    (src / name).write_text("x")
  eval_time.copy_workdir(src, tmp_path / "copy")
  kept = sorted(str(p.relative_to(tmp_path / "copy")) for p in (tmp_path / "copy").rglob("*")
                if p.is_file())
  # The checkpoints, prior and config travel; nothing an evaluation writes is read back.
  assert kept == ["config.json", "joint/1/x", "prior.npz", "stage_c/1/x"]
  with pytest.raises(SystemExit, match="no joint/ checkpoints"):
    eval_time.main([f"--workdir={tmp_path / 'copy' / 'stage_c'}", "--config=configs/nytaxi.py",
                    f"--out={tmp_path / 'out'}"])


def test_stage2_split_error_ignores_the_level_and_scores_the_split():
  import numpy as np
  from benchmarks import stage2_inputs
  from diffrecon_jax.data import coarsen
  rng = np.random.default_rng(0)
  truth = rng.gamma(2.0, 3.0, size=(3, 4, 4, 2)).astype(np.float32)
  truth_c = coarsen.coarsen(truth, 2, "sum")
  # The right shares at twice the level: the split error is zero, the fine error is not.
  hidden = np.zeros((3, 4, 4, 1), bool)
  hidden[:, :2, :2] = True
  s = stage2_inputs.score(2 * truth, truth, truth_c, hidden, 2, "sum")
  assert s["split_mae"] < 1e-5 and s["fine_mae"] > 1.0
  # A block the estimate leaves empty is split evenly, so it still pools to the truth.
  empty = truth.copy()
  empty[0, :2, :2] = 0.0
  rescaled = stage2_inputs.rescaled_to_truth(empty, truth_c, 2, "sum")
  np.testing.assert_allclose(coarsen.coarsen(rescaled, 2, "sum"), truth_c, rtol=1e-5)
  np.testing.assert_allclose(rescaled[0, :2, :2], np.broadcast_to(truth_c[0, 0, 0] / 4, (2, 2, 2)),
                             rtol=1e-5)
  # Wrong shares are charged, under the hidden blocks too.
  swapped = truth[:, ::-1]
  assert stage2_inputs.score(swapped, truth, truth_c, hidden, 2, "sum")["split_mae_hidden"] > 0.1


def test_cpu_peak_from_cpuinfo():
  from benchmarks import timing
  avx512 = "flags\t\t: fpu sse avx2 fma avx512f\ncpu MHz\t\t: 2000.000\n"
  assert timing.cpu_peak_flops(avx512, cores=2) == 2 * 16 * 2 * 2 * 2.0e9
  assert timing.cpu_peak_flops(avx512, cores=2, max_khz=3_000_000) == 2 * 16 * 4 * 3.0e9
  assert timing.cpu_peak_flops("flags : avx2 fma\ncpu MHz : 1000\n", 1) == 8 * 4 * 1.0e9
  assert timing.cpu_peak_flops("flags : sse\n", 1) is None  # no clock: no peak
  assert timing.mfu(5e9, 10e9) == 0.5 and timing.mfu(None, 1.0) is None


def _tiny_prior(aggregation: str, local: bool, rng):
  from diffrecon_jax.data import coarsen
  from diffrecon_jax.diffrecon import prior as prior_lib
  fine = rng.gamma(2.0, 3.0, (7, 8, 6, 2)).astype(np.float32)
  coarse = coarsen.coarsen(fine, 2, aggregation)
  stats = {"fine": {"mean": np.full(2, 5.0), "std": np.full(2, 3.0)},
           "coarse": {"mean": np.full(2, 20.0), "std": np.full(2, 9.0)}}
  return prior_lib.Prior(fine=fine, coarse=coarse.astype(np.float32), period=7,
                         interval_minutes=60 * 24, aggregation=aggregation, scale=2, stats=stats,
                         local=local, local_sigma=0.7 if local else 0.0, local_shrink=1.0)


@pytest.mark.parametrize("aggregation,local", [("sum", True), ("sum", False), ("mean", True)])
def test_following_slices_guess_without_following_slices_is_the_models_guess(aggregation, local):
  """The study's guess with k = 0 following slices is `prior.coarse_guess`, the first guess the
  model uses, so its k > 0 columns change one thing: the window."""
  from benchmarks import following_slices
  from diffrecon_jax.diffrecon import prior as prior_lib
  rng = np.random.default_rng(0)
  prior = _tiny_prior(aggregation, local, rng)
  series = rng.gamma(2.0, 10.0, (20, 4, 3, 2))
  observed = rng.random((20, 4, 3)) > 0.5
  slots = np.arange(20) % 7
  h = 3
  current = np.arange(h, 20)
  ours = following_slices.guess_with_following(prior, series, observed, slots, current, h, 0)
  idx = current[:, None] + np.arange(-h, 1)[None, :]
  mean, std = 20.0, 9.0
  obs = ((series[idx] - mean) / std).astype(np.float32)
  guess = prior_lib.coarse_guess(prior, obs, observed[idx].astype(np.float32), slots[idx])
  np.testing.assert_allclose(ours, np.asarray(guess) * std + mean, rtol=1e-4, atol=1e-3)
  # A following slice that observes a hidden cell moves its guess (the lever measured).
  later = following_slices.guess_with_following(prior, series, observed, slots, current[:-1], h, 1)
  assert not np.allclose(later, ours[:-1])
