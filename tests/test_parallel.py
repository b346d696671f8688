"""The sharded train step: 8 simulated CPU devices give the 1-device result, with no recompiles.

Runs in a subprocess because the device count must be set before JAX starts (other tests import
JAX first). Both the stand-in denoisers (Adam as configured) and the real tiny denoisers (Adam's
eps raised to 1e-3; _parallel_subprocess says why) are compared parameter by parameter; about
30-50 s on 2 cores, most of it compiling the real step twice.
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
MODEL_SETS = ("standins", "real")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
  out = tmp_path_factory.mktemp("parallel") / "out.npz"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=helpers.FAST_COMPILE_XLA_FLAGS)
  proc = subprocess.run(
      [sys.executable, "-m", "tests._parallel_subprocess", str(out),
       "--models", ",".join(MODEL_SETS)],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return np.load(out)


@pytest.mark.parametrize("models", MODEL_SETS)
def test_eight_devices_match_one_device(result, models):
  r = lambda key: result[f"{models}/{key}"]
  assert int(r("one/metric_replicas")) == 1 and int(r("eight/metric_replicas")) == 8
  # Same batches, same losses and gradients (up to the order of the float reductions).
  for m in ("losses", "grad_norms"):
    np.testing.assert_allclose(r("eight/" + m), r("one/" + m), rtol=1e-4, err_msg=m)
  prefix = f"{models}/one/params"
  keys = [k[len(prefix):] for k in result.files if k.startswith(prefix)]
  assert len(keys) > (100 if models == "real" else 4)
  # Every parameter, to float rounding (measured: at most 6e-8 apart).
  for k in keys:
    np.testing.assert_allclose(r("eight/params" + k), r("one/params" + k), rtol=1e-4, atol=1e-6,
                               err_msg=k)
  # ... while training moved them far more than that (measured: median move 4e-4 real, 1e-3
  # stand-ins).
  moved = np.median([np.median(np.abs(r("one/params" + k) - r("init" + k))) for k in keys])
  assert moved > 1e-4, moved
  # The sharded step really splits the batch: its gradients are all-reduced, the 1-device one's not.
  assert bool(r("eight/all_reduce")) and not bool(r("one/all_reduce"))


@pytest.mark.parametrize("models", MODEL_SETS)
def test_no_recompilation_after_the_first_call(result, models):
  for layout in ("one", "eight"):
    assert int(result[f"{models}/{layout}/recompiles"]) == 0, layout
    assert int(result[f"{models}/{layout}/cache_size"]) == 1, layout


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


def test_explicit_multi_host_start_from_flags_or_environment():
  args = {"coordinator_address": "10.0.0.1:8476", "num_processes": 2, "process_id": 1}
  assert parallel.distributed_args({}, **args) == args
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:8476", "JAX_NUM_PROCESSES": "2",
         "JAX_PROCESS_ID": "1"}
  assert parallel.distributed_args(env) == args
  # A flag wins over the environment.
  assert parallel.distributed_args(env, process_id=0)["process_id"] == 0
  # Nothing given, one process, or only an address (a cluster JAX detects): no explicit start.
  assert parallel.distributed_args({}) is None
  assert parallel.distributed_args({}, num_processes=1) is None
  assert parallel.distributed_args({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:8476"}) is None


@pytest.mark.parametrize("env, kwargs, message", [
    ({}, {"num_processes": 2, "process_id": 0}, r"missing: --coordinator_address"),
    ({}, {"coordinator_address": "h:1", "num_processes": 2}, r"missing: --process_id"),
    ({"JAX_PROCESS_ID": "1"}, {"coordinator_address": "h:1"}, r"missing: --num_processes"),
    ({}, {"coordinator_address": "h", "num_processes": 2, "process_id": 0}, "HOST:PORT"),
    ({}, {"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, r"in 0\.\.1"),
    ({"JAX_NUM_PROCESSES": "two"}, {}, "JAX_NUM_PROCESSES='two' is not an integer"),
])
def test_an_incomplete_multi_host_start_says_what_is_missing(env, kwargs, message):
  with pytest.raises(ValueError, match=message):
    parallel.distributed_args(env, **kwargs)
