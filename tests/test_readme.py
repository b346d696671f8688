"""The README's commands run as written.

Every line of every ```bash block in README.md is classified and either run or accounted for:
`python -m diffrecon_jax...` lines run verbatim (relative paths included) from a temporary copy
of the repository, the `diffrecon_jax.main` ones in smoke form (tiny models, a few steps and
slices, appended as config overrides); `pip install` and the test command itself are checked
against `.ci/run`, which must run them. Any other line fails the test, so a command added to the
README without a way to check it is caught here.
"""
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from tests import _train_helpers as helpers
from tests.conftest import REPO_ROOT

README = REPO_ROOT / "README.md"
TEST_COMMAND = "python -m pytest tests -q"
INSTALL_PREFIX = "pip install -e "

# Appended to every README `diffrecon_jax.main` line: the smallest run that still trains all
# three phases, checkpoints, evaluates and writes the results files.
SMOKE_OVERRIDES = [
    "--config.train.steps_c=2", "--config.train.steps_f=2", "--config.train.steps_joint=2",
    "--config.train.checkpoint_every=2", "--config.train.log_every=2",
    "--config.train.batch_size=4",
    "--config.eval.max_slices=4", "--config.eval.batch_size=4",
    "--config.diffusion.num_steps=10", "--config.sampling.steps=2",
    "--config.data.history=2",
    "--config.patterns.eval=('random:0.4','large_scale:0.25')",
    "--config.patterns.train=('random:0.4',)",
] + [f"--config.model_{m}.{k}={v}" for m in ("c", "f") for k, v in (
    ("base_channels", 8), ("channel_mults", "(1,)"), ("emb_dim", 8), ("d_model", 8),
    ("inter_dim", 8))] + [
    "--config.model_c.num_heads=2", "--config.model_c.ff_dim=8", "--config.model_f.d_ff=8",
    "--config.model_f.top_k=1", "--config.model_f.num_blocks=1",
    "--config.model_f.num_kernels=1", "--config.model_f.encoder_channels=2",
]


# Appended to a README `diffrecon_jax.experiments` line (later flags win).
EXPERIMENTS_SMOKE = ["--smoke", "--methods=interp,srcnn"]


def readme_commands(text: str) -> list:
  """The command lines of the ```bash blocks (comments stripped, `\\` continuations joined)."""
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
    joined = block.replace("\\\n", " ")
    for line in joined.splitlines():
      line = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
      if line:
        commands.append(" ".join(line.split()))
  return commands


def _classify(cmd: str) -> str:
  if cmd.startswith(INSTALL_PREFIX):
    return "install"
  if cmd.startswith(TEST_COMMAND):
    return "test"
  if cmd.startswith("python -m diffrecon_jax.main "):
    return "main"
  if cmd.startswith("python -m diffrecon_jax.experiments "):
    return "experiments"
  if cmd.startswith("python -m diffrecon_jax."):
    return "module"
  return "unknown"


def test_every_readme_command_is_known():
  commands = readme_commands(README.read_text())
  kinds = [_classify(c) for c in commands]
  assert "unknown" not in kinds, [c for c in commands if _classify(c) == "unknown"]
  assert kinds.count("install") == 1 and kinds.count("test") == 1, commands
  assert kinds.count("main") >= 3, commands  # main, interp and own-grid commands at least.


def test_ci_installs_into_a_fresh_venv_and_runs_the_readme_test_command():
  ci = (REPO_ROOT / ".ci" / "run").read_text()
  install = next(c for c in readme_commands(README.read_text()) if _classify(c) == "install")
  assert "-m venv" in ci, "CI must install into a fresh virtual environment"
  assert install.replace("pip install", "python -m pip install") in ci, (install, ci)
  assert TEST_COMMAND in ci


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory):
  """The repository as a new user has it: no workdirs, no caches, no git metadata."""
  dest = tmp_path_factory.mktemp("clone") / "diffrecon_jax"
  shutil.copytree(REPO_ROOT, dest, ignore=shutil.ignore_patterns(
      ".git", "runs", "workdirs", "__pycache__", "*.egg-info", ".pytest_cache", ".jax_cache"))
  return dest


def test_readme_commands_run_as_written(repo_copy, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=helpers.FAST_COMPILE_XLA_FLAGS,
             PYTHONPATH=str(repo_copy), JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"))
  ran = []
  for cmd in readme_commands(README.read_text()):
    kind = _classify(cmd)
    if kind in ("install", "test"):
      continue  # CI runs both (checked above); running the suite from itself would recurse.
    argv = shlex.split(cmd)
    argv[0] = sys.executable
    if kind == "main":
      argv += SMOKE_OVERRIDES + [f"--config.train.compilation_cache_dir={tmp_path / 'xla_cache'}"]
    elif kind == "experiments":
      # Its own smoke mode on two methods (test_experiments.py runs every method's smoke).
      argv += EXPERIMENTS_SMOKE
    proc = subprocess.run(argv, cwd=repo_copy, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{cmd}\nrc {proc.returncode}\n{proc.stderr[-4000:]}"
    if kind == "main":
      workdir = next(a.split("=", 1)[1] for a in argv if a.startswith("--workdir="))
      assert not pathlib.Path(workdir).is_absolute(), cmd  # the README uses relative paths.
      if "--mode=reconstruct" in argv:  # a user's file: the reconstruction files, no results
        stem = pathlib.Path(next(a.split("=", 1)[1] for a in argv
                                 if a.startswith("--config.reconstruct.input="))).stem
        for suffix in (".nc", ".npz"):
          assert (repo_copy / workdir / "reconstruction" / (stem + suffix)).is_file(), cmd
      else:
        doc = json.loads((repo_copy / workdir / "results.json").read_text())
        assert doc["results"] and all(r["mae"] is not None for r in doc["results"]), cmd
    if kind == "experiments":
      workdir = next(a.split("=", 1)[1] for a in argv if a.startswith("--workdir="))
      assert (repo_copy / workdir / "comparison.md").is_file(), cmd
    ran.append(cmd)
  assert len(ran) >= 4, ran
