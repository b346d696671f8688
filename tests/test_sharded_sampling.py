"""Sampling spread over devices: DiffRecon's sampler batches run on every local device (batch k on
device k mod their number) and give exactly what one device gives (8 fake CPU devices)."""
import json
import os
import subprocess
import sys

from tests import _train_helpers as helpers
from tests.conftest import REPO_ROOT


def test_eight_devices_sample_exactly_what_one_device_samples(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT),
             XLA_FLAGS=helpers.FAST_COMPILE_XLA_FLAGS
             + " --xla_force_host_platform_device_count=8")
  out = tmp_path / "out.json"
  proc = subprocess.run([sys.executable, "-m", "tests._sharded_sampling_subprocess", str(out)],
                        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  got = json.loads(out.read_text())
  assert got["batch_devices"] == [[k, k % 8] for k in range(10)]  # [batch, device]
  assert got["n_slices"] == 32 and got["finite"]
  # Every output: the completion, the point fine map, the members of both stages.
  assert {"coarse", "fine", "samples"} <= set(got["same"]) and all(got["same"].values()), got
