"""The sharded train step: 8 simulated CPU devices give the 1-device result, with no recompiles.

Runs in a subprocess because the device count must be set before JAX starts (other tests import
JAX first). Stand-in denoisers by default (fast); DIFFRECON_SLOW_TESTS=1 uses the real ones.
"""
import os
import pathlib
import subprocess
import sys
import types

import jax

import numpy as np
import pytest

from diffrecon_jax import parallel
from tests import _train_helpers as helpers

REPO = pathlib.Path(__file__).resolve().parents[1]
SLOW = os.environ.get("DIFFRECON_SLOW_TESTS", "") == "1"


@pytest.fixture(scope="module")
def result(tmp_path_factory):
  out = tmp_path_factory.mktemp("parallel") / "out.npz"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=helpers.FAST_COMPILE_XLA_FLAGS)
  proc = subprocess.run(
      [sys.executable, "-m", "tests._parallel_subprocess", str(out),
       *([] if SLOW else ["--standins"])],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return np.load(out)


def test_eight_devices_match_one_device(result):
  assert int(result["one/metric_replicas"]) == 1 and int(result["eight/metric_replicas"]) == 8
  # Same batches, same losses and gradients (up to the order of the float reductions).
  for m in ("losses", "grad_norms"):
    np.testing.assert_allclose(result["eight/" + m], result["one/" + m], rtol=1e-4, err_msg=m)
  keys = [k[len("one/"):] for k in result.files if k.startswith("one/params")]
  assert len(keys) > 4
  # Parameters: exact up to float rounding with the stand-ins. The real denoisers have parameters
  # the loss is invariant to (attention key biases; conv biases before a GroupNorm with one
  # channel per group) whose gradients are pure rounding noise, which Adam scales up to +-lr
  # steps: their values depend on reduction order, so with them only losses and gradient norms
  # are compared.
  if not SLOW:
    for k in keys:
      np.testing.assert_allclose(result["eight/" + k], result["one/" + k], rtol=1e-4, atol=1e-5,
                                 err_msg=k)
  # The sharded step really splits the batch: its gradients are all-reduced, the 1-device one's not.
  assert bool(result["eight/all_reduce"]) and not bool(result["one/all_reduce"])


def test_no_recompilation_after_the_first_call(result):
  for name in ("one", "eight"):
    assert int(result[f"{name}/recompiles"]) == 0, name
    assert int(result[f"{name}/cache_size"]) == 1, name


def test_batch_must_divide_device_count():
  eight = types.SimpleNamespace(devices=np.empty((8,), object))  # a mesh's device count only.
  parallel.check_batch_size(16, eight)
  with pytest.raises(ValueError, match="batch size 12 is not divisible by the 8 devices"):
    parallel.check_batch_size(12, eight)
  parallel.check_batch_size(3, parallel.make_mesh(jax.devices()[:1]))


def test_multi_host_detection_never_fires_on_a_single_host():
  assert not parallel._is_multi_host_env({})
  assert not parallel._is_multi_host_env({"JAX_NUM_PROCESSES": "1", "TPU_WORKER_HOSTNAMES": "h0"})
  assert parallel._is_multi_host_env({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
  assert parallel._is_multi_host_env({"TPU_WORKER_HOSTNAMES": "h0,h1"})
  assert parallel._is_multi_host_env({"SLURM_NTASKS": "4"})
  assert not parallel.maybe_initialize_distributed({})
