"""The launch scripts' dry runs: every command they would run, printed and checked, nothing run.

launch/tpu_vm.sh (from a laptop): the checkout packed by git, copied to every worker, unpacked
into a virtual environment with the `tpu` extra, then the entry point on every worker;
launch/gpu_train.sh: a virtual environment with the `cuda12` extra, a GPU check, the entry point.
"""
import os
import pathlib
import shlex
import subprocess
import tarfile

from tests.conftest import REPO_ROOT

FLAGS = ["--config.train.steps_c=2", "--config.patterns.eval=('random:0.4',)"]


def _dry_run(script: str, *args: str, cwd: pathlib.Path, env=None) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", str(REPO_ROOT / "launch" / script), "--dry-run", *args],
                        cwd=cwd, env=env or os.environ, capture_output=True, text=True, timeout=60)


def _remote(command: list) -> str:
  """The --command= value of a printed gcloud ssh line."""
  (value,) = [a[len("--command="):] for a in command if a.startswith("--command=")]
  return value


def test_tpu_vm_dry_run_copies_installs_and_runs_on_every_worker(tmp_path):
  # A python that does not exist: a dry run must not run (or install) anything.
  env = dict(os.environ, PYTHON=str(tmp_path / "no-python"), TMPDIR=str(tmp_path))
  proc = _dry_run("tpu_vm.sh", "--tpu=my-tpu", "--zone=us-west4-a", "--project=lab",
                  "configs/nytaxi.py:tpu", "gs://bucket/runs/nytaxi", *FLAGS, cwd=tmp_path,
                  env=env)
  assert proc.returncode == 0, proc.stderr
  pack, *lines = proc.stdout.splitlines()
  archive = str(tmp_path / "diffrecon_jax_code.tgz")
  assert pack.startswith("git ls-files -z --cached --others --exclude-standard | tar czf")
  assert not (tmp_path / "diffrecon_jax_code.tgz").exists()  # nothing packed in a dry run
  scp, setup, job = [shlex.split(line) for line in lines]
  where = ["--zone=us-west4-a", "--worker=all", "--project=lab"]
  assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive,
                 "my-tpu:diffrecon_jax_code.tgz"] + where
  assert setup[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
  assert setup[6:9] == where
  steps = _remote(setup).split(" && ")
  assert steps[:3] == ["rm -rf ~/diffrecon_jax", "mkdir -p ~/diffrecon_jax",
                       "tar xzf ~/diffrecon_jax_code.tgz -C ~/diffrecon_jax"]
  assert "python3 -m venv ~/diffrecon_venv" in steps
  assert steps[-2:] == ["cd ~/diffrecon_jax",
                        "~/diffrecon_venv/bin/python -m pip install -q -e '.[tpu]'"]
  assert job[:9] == setup[:9]
  cd, main = _remote(job).split(" && ")
  assert cd == "cd ~/diffrecon_jax"
  # The entry point's command, each flag one argument as given (quoting survives two shells).
  assert shlex.split(main) == ["~/diffrecon_venv/bin/python", "-m", "diffrecon_jax.main",
                               "--config=configs/nytaxi.py:tpu",
                               "--workdir=gs://bucket/runs/nytaxi", *FLAGS]


def test_tpu_vm_needs_a_name_and_a_zone(tmp_path):
  proc = _dry_run("tpu_vm.sh", "configs/nytaxi.py", "runs/x", cwd=tmp_path)
  assert proc.returncode == 2 and "usage: launch/tpu_vm.sh [--dry-run] --tpu=NAME" in proc.stderr


def test_the_archive_holds_the_checkout_and_not_the_runs(tmp_path):
  """The packing line of tpu_vm.sh, run for real on this checkout."""
  archive = tmp_path / "code.tgz"
  subprocess.run(f"git ls-files -z --cached --others --exclude-standard | tar czf {archive} "
                 "--null -T -", shell=True, check=True, cwd=REPO_ROOT)
  with tarfile.open(archive) as tar:
    names = set(tar.getnames())
    assert {"setup.py", "pyproject.toml", "diffrecon_jax/main.py", "launch/tpu_vm.sh",
            "diffrecon_jax/configs/nytaxi.py"} <= names
    assert tar.getmember("configs").issym()  # the configs/ link travels as a link
  assert not any(n.startswith(("runs/", ".venv/")) or "__pycache__" in n for n in names)


def test_gpu_train_dry_run_installs_the_cuda_extra_into_a_venv(tmp_path):
  env = dict(os.environ, VENV=str(tmp_path / "venv"))
  proc = _dry_run("gpu_train.sh", "configs/nytaxi.py:gpu", "runs/gpu", *FLAGS, cwd=tmp_path,
                  env=env)
  assert proc.returncode == 0, proc.stderr
  commands = [shlex.split(line) for line in proc.stdout.splitlines()]
  py = f"{tmp_path}/venv/bin/python"
  assert commands[0][1:] == ["-m", "venv", f"{tmp_path}/venv"]
  assert commands[2] == [py, "-m", "pip", "install", "-q", "-e", ".[cuda12]"]
  assert commands[3][:2] == [py, "-c"] and "default_backend() == 'gpu'" in commands[3][2]
  assert commands[4] == [py, "-m", "diffrecon_jax.main", "--config=configs/nytaxi.py:gpu",
                         "--workdir=runs/gpu", *FLAGS]
