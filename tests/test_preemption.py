"""SIGTERM (a spot VM or Colab runtime being taken back) saves a checkpoint at the step reached,
exits with `preemption.EXIT_CODE`, and the same command resumes to exactly the parameters of an
uninterrupted run."""
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest

from diffrecon_jax import preemption
from tests import _train_helpers as helpers

REPO = pathlib.Path(__file__).resolve().parents[1]
# Checkpoints every 4 steps, one step per compiled call: the signal at joint step 3 falls
# between checkpoints, where a run without the handler would lose steps 1-3 of joint.
ARGS = ("--steps", "4,4,6", "--checkpoint-every", "4", "--steps-per-call", "1", "--standins")


def _run(workdir, out, cache, *extra):
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PLATFORMS="cpu",
             XLA_FLAGS=helpers.FAST_COMPILE_XLA_FLAGS)
  return subprocess.run([sys.executable, "-m", "tests._train_subprocess", str(workdir), str(out),
                         *ARGS, *extra], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)


def _steps(phase_dir: pathlib.Path) -> list:
  return sorted(int(p.name) for p in phase_dir.iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("preempt")
  cache = root / "jax_cache"
  ref = _run(root / "ref", root / "ref.npz", cache)
  assert ref.returncode == 0, ref.stderr[-3000:]
  stopped = _run(root / "wd", root / "unused.npz", cache, "--sigterm-phase", "joint",
                 "--sigterm-step", "3")
  joint_steps = _steps(root / "wd" / "joint")
  resumed = _run(root / "wd", root / "resumed.npz", cache)
  return root, stopped, joint_steps, resumed


def test_sigterm_saves_the_step_reached_and_exits_with_the_preemption_code(runs):
  _, stopped, joint_steps, _ = runs
  assert stopped.returncode == preemption.EXIT_CODE, stopped.stderr[-3000:]
  assert "preempted at step 3/6 of phase joint: checkpoint saved" in stopped.stderr
  assert 3 in joint_steps  # not a multiple of checkpoint_every (4): saved for the signal


def test_the_rerun_resumes_from_that_step_to_the_uninterrupted_parameters(runs):
  root, _, _, resumed = runs
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "[joint] resuming from step 3/6" in resumed.stderr
  ref, got = np.load(root / "ref.npz"), np.load(root / "resumed.npz")
  assert sorted(ref.files) == sorted(got.files)
  for name in ref.files:
    np.testing.assert_array_equal(got[name], ref[name], err_msg=name)


def test_watcher_sets_a_flag_instead_of_dying_and_restores_the_handler():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.Watcher() as watcher:
    assert not watcher.stop_now()
    os.kill(os.getpid(), signal.SIGTERM)
    assert watcher.requested == signal.SIGTERM and watcher.stop_now()
  assert signal.getsignal(signal.SIGTERM) is before
