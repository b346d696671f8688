"""Kill-and-resume: a run SIGKILLed mid-phase and rerun ends with the uninterrupted run's params.

Each run is a separate process (as a real crash and restart would be); they share a persistent
compilation cache so only the first one pays for compiling. The resume logic is model-agnostic:
by default the runs use the stand-in denoisers of _train_helpers (fast); with
DIFFRECON_SLOW_TESTS=1 they use the real ones (about 4 minutes on 2 cores).
"""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from diffrecon_jax import train
from tests import _train_helpers as helpers

REPO = pathlib.Path(__file__).resolve().parents[1]
SLOW = os.environ.get("DIFFRECON_SLOW_TESTS", "") == "1"
STEPS = "2,0,6"  # stage_c 2, stage_f 0 (finished at once), joint 6: checkpoints at 2, 4, 6.


def _run(workdir, out, cache, *extra, expect_rc=0):
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PLATFORMS="cpu",
             XLA_FLAGS=helpers.FAST_COMPILE_XLA_FLAGS)
  proc = subprocess.run(
      [sys.executable, "-m", "tests._train_subprocess", str(workdir), str(out), "--steps", STEPS,
       *extra, *([] if SLOW else ["--standins"])], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == expect_rc, (
      f"rc {proc.returncode} (expected {expect_rc})\n{proc.stderr[-4000:]}")
  return proc


def _steps(phase_dir: pathlib.Path) -> list:
  return sorted(int(p.name) for p in phase_dir.iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("resume")
  cache = root / "jax_cache"
  _run(root / "ref", root / "ref.npz", cache)
  # Killed while joint is about to save step 4: steps 3-4 are lost, step 2 is on disk.
  _run(root / "crash", root / "unused.npz", cache, "--kill-phase", "joint", "--kill-step", "4",
       expect_rc=-signal.SIGKILL)
  after_kill = {p: _steps(root / "crash" / p) for p in ("stage_c", "stage_f", "joint")}
  shutil.copytree(root / "crash", root / "crash_copy")
  _run(root / "crash", root / "resumed.npz", cache)
  _run(root / "crash", root / "again.npz", cache)
  return root, after_kill


def test_killed_run_left_only_complete_checkpoints(runs):
  _, after_kill = runs
  assert after_kill == {"stage_c": [2], "stage_f": [0], "joint": [2]}


def test_resumed_run_matches_uninterrupted_run(runs):
  root, _ = runs
  ref, resumed = np.load(root / "ref.npz"), np.load(root / "resumed.npz")
  assert sorted(ref.files) == sorted(resumed.files) and len(ref.files) > 4
  for k in ref.files:
    np.testing.assert_allclose(resumed[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
  # The resume did continue (not restart) the joint phase, after skipping the finished ones.
  summary = json.loads((root / "resumed.npz.json").read_text())
  assert summary["stage_c"]["skipped"] and summary["stage_f"]["skipped"]
  assert not summary["joint"]["skipped"] and summary["joint"]["start_step"] == 2
  assert _steps(root / "crash" / "joint") == [4, 6]  # keep_checkpoints = 2


def test_rerun_of_finished_training_skips_every_phase(runs):
  root, _ = runs
  summary = json.loads((root / "again.npz.json").read_text())
  assert all(s["skipped"] for s in summary.values()), summary
  ref, again = np.load(root / "ref.npz"), np.load(root / "again.npz")
  for k in ref.files:
    np.testing.assert_allclose(again[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
  lines = [json.loads(l) for l in (root / "crash" / "metrics.jsonl").read_text().splitlines()]
  assert {"phase", "step", "loss", "steps_per_sec", "eta_sec"} <= set(lines[-1])
  assert lines[-1]["phase"] == "joint" and lines[-1]["step"] == 6


def test_load_for_sampling_takes_the_newest_finished_phase(runs, monkeypatch):
  root, _ = runs
  if not SLOW:
    monkeypatch.setattr(train, "build_models", helpers.standin_models)
  config, ema, meta = train.load_for_sampling(root / "crash")
  assert meta["phase"] == "joint" and meta["finished"] and meta["step"] == 6
  assert config.train.steps_joint == 6 and config.model_c.channel_mults == (1,)
  assert set(meta["stats"]) == {"fine", "coarse"} and meta["shapes"]["scale"] == 2
  ref = np.load(root / "ref.npz")
  for path, leaf in jax.tree_util.tree_leaves_with_path(ema):
    np.testing.assert_allclose(np.asarray(leaf), ref["ema" + jax.tree_util.keystr(path)],
                               rtol=1e-5, atol=1e-6)
  # Killed mid-joint: joint is unfinished, so the finished stage_f (= stage_c's params) is used.
  _, _, meta = train.load_for_sampling(root / "crash_copy")
  assert meta["phase"] == "stage_f" and meta["finished"]
  with pytest.raises(FileNotFoundError, match="no finished training phase"):
    train.load_for_sampling(root / "empty")
