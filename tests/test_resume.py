"""Kill-and-resume: a run SIGKILLed mid-phase, between saves or inside a save, and rerun ends with
the uninterrupted run's params.

Each run is a separate process (as a real crash and restart would be); they share a persistent
compilation cache so only the first one pays for compiling. One workdir is killed four times, once
in each phase inside a save (while Orbax writes the temporary directory, or after it wrote
everything but before it commits it) and once in joint between saves; each rerun must resume
from the last committed checkpoint of the killed phase. The resume logic is model-agnostic: by
default the runs use the stand-in denoisers of _train_helpers (about 15 s on 2 cores); with
DIFFRECON_SLOW_TESTS=1 they use the real ones (measured 75 s).
"""
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest


from diffrecon_jax.diffrecon import loading
from tests import _train_helpers as helpers

REPO = pathlib.Path(__file__).resolve().parents[1]
SLOW = os.environ.get("DIFFRECON_SLOW_TESTS", "") == "1"
# stage_c 4, stage_f 4, joint 6 steps; checkpoints every 2 steps (tiny_config), 2 kept.
STEPS = "4,4,6"
PHASES = ("stage_c", "stage_f", "joint")
TMP = ".orbax-checkpoint-tmp"
# The kills, in order, on one workdir: (phase, step of the save, moment; see _train_subprocess).
KILLS = (("stage_c", 4, "writing"),      # stage_c's last save: state being written
         ("stage_f", 4, "finalizing"),   # stage_f's last save: written, not committed
         ("joint", 4, "before_save"),    # between saves: steps 3-4 computed, not saved
         ("joint", 6, "writing"))        # joint's last save
# What each rerun after a kill must resume from: the last committed step of the killed phase.
RESUMED_FROM = (("stage_c", 2), ("stage_f", 2), ("joint", 2), ("joint", 4))


def _run(workdir, out, cache, *extra, expect_rc=0):
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PLATFORMS="cpu",
             XLA_FLAGS=helpers.FAST_COMPILE_XLA_FLAGS)
  proc = subprocess.run(
      [sys.executable, "-m", "tests._train_subprocess", str(workdir), str(out), "--steps", STEPS,
       *extra, *([] if SLOW else ["--standins"])], cwd=REPO, env=env, capture_output=True,
      text=True, timeout=300)
  assert proc.returncode == expect_rc, (
      f"rc {proc.returncode} (expected {expect_rc})\n{proc.stderr[-4000:]}")
  return proc


def _steps(phase_dir: pathlib.Path) -> list:
  """Committed checkpoint steps of a phase directory ([] if it does not exist)."""
  if not phase_dir.is_dir():
    return []
  return sorted(int(p.name) for p in phase_dir.iterdir() if p.name.isdigit())


def _tmp_dirs(phase_dir: pathlib.Path) -> list:
  """Uncommitted (temporary) step directories of a phase directory."""
  if not phase_dir.is_dir():
    return []
  return sorted(p.name for p in phase_dir.iterdir() if TMP in p.name)


def _items(step_dir: pathlib.Path) -> list:
  """The item directories (committed or temporary) inside a step directory."""
  return sorted(p.name for p in step_dir.iterdir() if p.is_dir())


def _resumed(stderr: str) -> list:
  """(phase, step) of every "[phase] resuming from step k/n" a run logged."""
  return [(p, int(k)) for p, k in re.findall(r"\[(\w+)\] resuming from step (\d+)/", stderr)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("resume")
  cache = root / "jax_cache"
  _run(root / "ref", root / "ref.npz", cache)
  wd = root / "crash"
  after_kill, resumes = [], []
  for k, (phase, step, at) in enumerate(KILLS):
    proc = _run(wd, root / "unused.npz", cache, "--kill-phase", phase, "--kill-step", str(step),
                "--kill-at", at, expect_rc=-signal.SIGKILL)
    if k:
      resumes.append(_resumed(proc.stderr))
    after_kill.append({p: (_steps(wd / p), _tmp_dirs(wd / p)) for p in PHASES})
    if at != "before_save":
      after_kill[-1]["items"] = _items(wd / phase / f"{step}{TMP}")
    if at == "before_save":  # joint unfinished: for load_for_sampling's fallback
      shutil.copytree(wd, root / "crash_copy")
  proc = _run(wd, root / "resumed.npz", cache)
  resumes.append(_resumed(proc.stderr))
  _run(wd, root / "again.npz", cache)
  return root, after_kill, resumes


def test_kills_leave_only_committed_checkpoints_and_a_partial_temporary_directory(runs):
  """After each kill: the killed save is not a checkpoint (at most an uncommitted temporary
  directory), and every earlier checkpoint is still there."""
  root, after_kill, _ = runs
  assert [{p: a[p][0] for p in PHASES} for a in after_kill] == [
      {"stage_c": [2], "stage_f": [], "joint": []},
      {"stage_c": [2, 4], "stage_f": [2], "joint": []},
      {"stage_c": [2, 4], "stage_f": [2, 4], "joint": [2]},
      {"stage_c": [2, 4], "stage_f": [2, 4], "joint": [2, 4]},
  ]
  # Killed inside the save: the step's temporary directory had been started; while writing its
  # items are temporary too, when finalizing they are complete but the step is not committed.
  for (phase, step, at), state in zip(KILLS, after_kill):
    tmp = state[phase][1]
    if at == "before_save":
      assert tmp == [], (phase, step, at, tmp)
      continue
    assert tmp == [f"{step}{TMP}"], (phase, step, at, tmp)
    want = ["meta", "state"] if at == "finalizing" else [f"meta{TMP}", f"state{TMP}"]
    assert state["items"] == want, (phase, step, at, state["items"])
  # and once the reruns are done, no temporary directory is left over.
  assert all(_tmp_dirs(root / "crash" / p) == [] for p in PHASES)


def test_each_rerun_resumes_from_the_killed_phase_last_checkpoint(runs):
  _, _, resumes = runs
  for want, got in zip(RESUMED_FROM, resumes):
    assert want in got, (want, got)
    assert all(p != want[0] or s == want[1] for p, s in got), got  # and from nowhere else


def test_resumed_run_matches_uninterrupted_run(runs):
  root, _, _ = runs
  ref, resumed = np.load(root / "ref.npz"), np.load(root / "resumed.npz")
  assert sorted(ref.files) == sorted(resumed.files) and len(ref.files) > 4
  for k in ref.files:
    np.testing.assert_allclose(resumed[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
  # The last rerun did continue (not restart) the joint phase, after skipping the finished ones.
  summary = json.loads((root / "resumed.npz.json").read_text())
  assert summary["stage_c"]["skipped"] and summary["stage_f"]["skipped"]
  assert not summary["joint"]["skipped"] and summary["joint"]["start_step"] == 4
  assert _steps(root / "crash" / "joint") == [4, 6]  # keep_checkpoints = 2


def test_rerun_of_finished_training_skips_every_phase(runs):
  root, _, _ = runs
  summary = json.loads((root / "again.npz.json").read_text())
  assert all(s["skipped"] for s in summary.values()), summary
  ref, again = np.load(root / "ref.npz"), np.load(root / "again.npz")
  for k in ref.files:
    np.testing.assert_allclose(again[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
  lines = [json.loads(l) for l in (root / "crash" / "metrics.jsonl").read_text().splitlines()]
  assert {"phase", "step", "loss", "steps_per_sec", "eta_sec"} <= set(lines[-1])
  assert lines[-1]["phase"] == "joint" and lines[-1]["step"] == 6


def test_load_for_sampling_takes_the_newest_finished_phase(runs):
  root, _, _ = runs
  build = {} if SLOW else {"build_models": helpers.standin_models}
  config, ema, _, meta = loading.load_for_sampling(root / "crash", **build)
  assert meta["phase"] == "joint" and meta["finished"] and meta["step"] == 6
  assert config.train.steps_joint == 6 and config.model_c.channel_mults == (1,)
  assert set(meta["stats"]) == {"fine", "coarse"} and meta["shapes"]["scale"] == 2
  ref = np.load(root / "ref.npz")
  for path, leaf in jax.tree_util.tree_leaves_with_path(ema):
    np.testing.assert_allclose(np.asarray(leaf), ref["ema" + jax.tree_util.keystr(path)],
                               rtol=1e-5, atol=1e-6)
  # Killed mid-joint: joint is unfinished, so the finished stage_f is used.
  _, _, _, meta = loading.load_for_sampling(root / "crash_copy", **build)
  assert meta["phase"] == "stage_f" and meta["finished"] and meta["step"] == 4
  with pytest.raises(FileNotFoundError, match="no finished training phase"):
    loading.load_for_sampling(root / "empty", **build)


def test_same_config_ignores_the_fields_chosen_at_evaluate_time():
  """A resumed training warns only when a trained field changed: evaluate-time fields (the
  sampler, noFG's base, ...) and their absence from an older checkpoint's config do not count."""
  from diffrecon_jax.configs import nytaxi
  from diffrecon_jax.diffrecon import checkpoints
  config = nytaxi.get_config()
  saved = config.to_json()
  assert checkpoints.same_config(saved, config)
  assert not checkpoints.same_config(None, config)

  evaluated = config.copy_and_resolve_references()
  evaluated.sampling.steps = int(config.sampling.steps) + 5
  evaluated.ablation_fine_on_base = not config.ablation_fine_on_base
  assert checkpoints.same_config(saved, evaluated)

  older = json.loads(saved)
  del older["ablation_fine_on_base"]  # saved before the field existed
  assert checkpoints.same_config(json.dumps(older), config)

  trained = config.copy_and_resolve_references()
  trained.train.steps_c = int(config.train.steps_c) + 1
  assert not checkpoints.same_config(saved, trained)
