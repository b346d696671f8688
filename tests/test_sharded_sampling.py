"""Sampling spread over devices: DiffRecon's sampler batches run on every local device (batch k on
device k mod their number) and give exactly what one device gives (8 fake CPU devices); spread
over processes (batch k on process k mod P, the outputs gathered), every process gets exactly
what one process gets (processes simulated by threads here; test_multihost.py runs two real
ones)."""
import json
import os
import subprocess
import sys
import threading

import jax
import numpy as np

from diffrecon_jax import batching

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


def test_batches_split_over_processes_come_back_whole_and_in_order(monkeypatch):
  """Three processes simulated by threads (`batching._processes` and `parallel.allgather`
  replaced): batch k runs on process k mod 3 only, and every process returns what one process
  returns, also when some processes have no batch (they learn the shapes by `jax.eval_shape`)."""
  procs = 3
  me = threading.local()
  barrier = threading.Barrier(procs, timeout=120)
  posted, ran = {}, []

  def allgather(tree):
    posted[me.index] = tree
    barrier.wait()
    out = [np.stack([posted[p][i] for p in range(procs)]) for i in range(len(tree))]
    barrier.wait()  # every process has read before the next call posts again
    return out

  monkeypatch.setattr(batching, "_processes",
                      lambda across: (procs, me.index) if across else (1, 0))
  monkeypatch.setattr(batching.parallel, "allgather", allgather)
  sample = jax.jit(lambda a, key: (a * 2 + jax.random.uniform(key, a.shape),
                                   jax.random.normal(key, (2,) + a.shape)))

  def fn(a, key):
    if not isinstance(a, jax.core.Tracer):  # a run, not `eval_shape`
      ran.append((me.size, me.index, int(np.asarray(a)[0, 0]) // 2 // me.size))
    return sample(a, key)

  key = jax.random.key(7)
  cases = ((10, 3), (2, 4), (9, 2))  # (rows, batch size): 4, 1 and 5 batches over 3 processes
  rows = lambda n: np.arange(2.0 * n).reshape(n, 2)  # row r holds 2r, 2r + 1
  want = {c: batching.run_batched(sample, [rows(c[0])], c[1], rng=key) for c in cases}
  got = {}

  def process(index):
    me.index, got[index] = index, {}
    for n, size in cases:
      me.size = size
      got[index][n, size] = batching.run_batched(fn, [rows(n)], size, rng=key, workers=2,
                                                 across_processes=True)

  threads = [threading.Thread(target=process, args=(i,)) for i in range(procs)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  assert sorted(got) == [0, 1, 2]
  for index in range(procs):
    for c in cases:
      assert len(got[index][c]) == 2
      for a, b in zip(got[index][c], want[c]):
        np.testing.assert_array_equal(a, b, err_msg=f"process {index} {c}")
  for n, size in cases:
    batches = -(-n // size)
    assert sorted((k, p) for s, p, k in ran if s == size) == [(k, k % procs)
                                                             for k in range(batches)]
