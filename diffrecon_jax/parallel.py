"""Device mesh, shardings and the multi-host start.

Data parallelism is expressed with `jax.jit` over a one-axis `Mesh` ('data') and `NamedSharding`s
(not `pmap`): parameters and the (small) normalised series are replicated, every batch array is
split along its leading axis. The same compiled step then serves one CPU, several simulated CPU
devices (tests), one GPU and a multi-host TPU pod.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence

from absl import logging
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"

# Environment variables that mean "this process is one of several" (set by launchers / clusters).
_MULTI_PROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")
_initialized = False


def _is_multi_host_env(env: Optional[dict] = None) -> bool:
  """True when the environment describes a multi-process run.

  Recognised: an explicit coordinator address (JAX_COORDINATOR_ADDRESS), JAX_NUM_PROCESSES > 1,
  a Cloud TPU pod slice (TPU_WORKER_HOSTNAMES lists more than one host), or a SLURM / Open MPI
  job with more than one task. A single host never matches.
  """
  env = os.environ if env is None else env
  if any(env.get(k) for k in _MULTI_PROCESS_ENV):
    return True
  for key in ("JAX_NUM_PROCESSES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    try:
      if int(env.get(key, "1")) > 1:
        return True
    except ValueError:
      pass
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  return len(hosts) > 1


def maybe_initialize_distributed(env: Optional[dict] = None) -> bool:
  """Calls `jax.distributed.initialize()` when (and only when) the run spans several hosts.

  Must run before any other JAX call in the process. Idempotent. Returns True when the
  distributed runtime was (or already had been) initialised here.
  """
  global _initialized
  if _initialized:
    return True
  if not _is_multi_host_env(env):
    return False
  # Arguments come from the environment (coordinator address, process id / count, or the TPU
  # / SLURM auto-detection built into JAX).
  jax.distributed.initialize()
  _initialized = True
  logging.info("jax.distributed initialised: process %d of %d, %d global devices",
               jax.process_index(), jax.process_count(), jax.device_count())
  return True


def make_mesh(devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A one-axis mesh ('data',) over `devices` (default: every global device)."""
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError("make_mesh: no devices given")
  return Mesh(np.asarray(devices, dtype=object), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (parameters, optimizer state, the series)."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data'; other axes whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  """Raises ValueError unless the global batch splits evenly over the mesh's devices."""
  n = mesh.devices.size
  if batch_size < 1 or batch_size % n:
    raise ValueError(
        f"global batch size {batch_size} is not divisible by the {n} devices of the mesh; set "
        f"config.train.batch_size to a multiple of {n} (e.g. {max(n, (batch_size // n) * n)})")


def put_replicated(tree: Any, mesh: Mesh) -> Any:
  """Host arrays -> global jax.Arrays replicated on the mesh (works across hosts too).

  Every process must pass the same values; each builds only its addressable shards.
  """
  sharding = replicated(mesh)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  return jax.tree_util.tree_map(put, tree)


def to_host(tree: Any) -> Any:
  """Replicated global arrays -> numpy (reads the local copy; no cross-host transfer)."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(x.addressable_data(0))
    return np.asarray(x)
  return jax.tree_util.tree_map(get, tree)
