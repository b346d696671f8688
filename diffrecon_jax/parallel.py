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
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"

# Environment variables that mean "this process is one of several" (set by launchers / clusters).
_MULTI_PROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")
# The explicit start without a cluster manager (same names as jax.distributed's own variables).
ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = (
    "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
# How long a finished process waits at exit for the others (jax.distributed's shutdown barrier):
# process 0 scores the references (or a method that samples on one process) and writes the
# files alone while the others wait there (JAX's default is 300 s).
SHUTDOWN_TIMEOUT_S = 3600
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


def distributed_args(env: Optional[dict] = None, coordinator_address: Optional[str] = None,
                     num_processes: Optional[int] = None,
                     process_id: Optional[int] = None) -> Optional[dict]:
  """The explicit multi-process start: arguments (main's flags) first, then the environment
  (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).

  Returns {'coordinator_address', 'num_processes', 'process_id'} when all three are given;
  None when no count, id or address argument is (single host, or a cluster JAX detects itself
  from its own environment, JAX_COORDINATOR_ADDRESS included) or the count is 1; raises
  ValueError naming what is missing or wrong otherwise.
  """
  env = os.environ if env is None else env

  def pick(value, key, cast):
    if value is not None:
      return value
    raw = str(env.get(key, "")).strip()
    if not raw:
      return None
    try:
      return cast(raw)
    except ValueError:
      raise ValueError(f"{key}={raw!r} is not an integer") from None

  address = pick(coordinator_address, ENV_COORDINATOR, str)
  count = pick(num_processes, ENV_NUM_PROCESSES, int)
  index = pick(process_id, ENV_PROCESS_ID, int)
  if count is None and index is None and coordinator_address is None:
    # Nothing, or only JAX_COORDINATOR_ADDRESS: JAX's cluster detection supplies the rest.
    return None
  if count == 1 and index in (None, 0):
    return None
  missing = [name for name, v in (("--coordinator_address (JAX_COORDINATOR_ADDRESS)", address),
                                  ("--num_processes (JAX_NUM_PROCESSES)", count),
                                  ("--process_id (JAX_PROCESS_ID)", index)) if v is None]
  if missing:
    raise ValueError(
        "a multi-host start without a cluster manager needs the coordinator address, the "
        f"process count and this process's id on every host; missing: {', '.join(missing)} "
        "(e.g. --coordinator_address=10.0.0.1:8476 --num_processes=2 --process_id=0 on the "
        "first host, --process_id=1 on the second)")
  if ":" not in address or not address.rsplit(":", 1)[1].isdigit():
    raise ValueError(f"coordinator address {address!r} must be HOST:PORT (process 0's host)")
  if count < 1 or not 0 <= index < count:
    raise ValueError(f"process id {index} must be in 0..{count - 1} for {count} processes")
  return {"coordinator_address": address, "num_processes": count, "process_id": index}


def maybe_initialize_distributed(env: Optional[dict] = None, *,
                                 coordinator_address: Optional[str] = None,
                                 num_processes: Optional[int] = None,
                                 process_id: Optional[int] = None) -> bool:
  """Calls `jax.distributed.initialize` when (and only when) the run spans several processes.

  Explicit arguments or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
  (`distributed_args`) start it by hand on any hosts; otherwise a TPU pod slice, SLURM or Open
  MPI job is recognised (`_is_multi_host_env`) and JAX detects its own arguments. Must run
  before any other JAX call in the process. Idempotent. Returns True when the distributed
  runtime was (or already had been) initialised here.
  """
  global _initialized
  if _initialized:
    return True
  args = distributed_args(env, coordinator_address, num_processes, process_id)
  if args is None and not _is_multi_host_env(env):
    return False
  # Several CPU processes need cross-process collectives: gloo (JAX's default here) unless the
  # environment chose another (JAX_CPU_COLLECTIVES_IMPLEMENTATION=mpi).
  if not jax.config.jax_cpu_collectives_implementation:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**(args or {}), shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)
  _initialized = True
  logging.info("jax.distributed initialised: process %d of %d, %d global devices",
               jax.process_index(), jax.process_count(), jax.device_count())
  return True


def process_index_for_logs() -> int:
  """This process's index without starting a JAX backend in a one-process run (0 there), so
  the console filter (`console.setup`) is in place before JAX probes its backends and logs
  ("Unable to initialize backend 'tpu'" on a machine without one)."""
  return jax.process_index() if _initialized else 0


def is_main_process() -> bool:
  """True on the one process that writes shared files (results, metrics, masks): process 0."""
  return jax.process_index() == 0


def local_copy(tree: Any) -> Any:
  """Replicated global arrays -> the same values on this process's first local device.

  For work each process does on its own devices (sampler batches; see `batching.run_batched`),
  or one process does alone: a computation on arrays that span other processes' devices would
  wait for those processes to join it.
  """
  if jax.process_count() == 1:
    return tree
  return jax.device_put(to_host(tree), jax.local_devices()[0])


def allgather(tree: Any) -> Any:
  """Numpy arrays, the same shapes and dtypes on every process -> numpy arrays (P, ...): entry p
  is process p's (exact: the values are moved, never combined). A collective: every process
  calls it, in the same order as its other collectives. One process: each array with a leading
  axis of 1."""
  if jax.process_count() == 1:
    return jax.tree_util.tree_map(lambda x: np.asarray(x)[None], tree)
  return multihost_utils.process_allgather(tree)


def broadcast_text(text: Optional[str]) -> Optional[str]:
  """Process 0's `text` (None allowed) on every process (a collective, like `allgather`); the
  others' argument is ignored. One process: `text` itself.

  For a decision every process must take alike (whether a file process 0 reads exists): a
  process that decided otherwise would wait for a collective the others never enter.
  """
  if jax.process_count() == 1:
    return text
  data = np.frombuffer(b"" if text is None else text.encode("utf-8"), np.uint8)
  # The length first (-1 = None): every process must pass the same shapes.
  length = int(multihost_utils.broadcast_one_to_all(
      np.int32(-1 if text is None else data.size)))
  if length <= 0:
    return None if length < 0 else ""
  if not is_main_process():
    data = np.zeros(length, np.uint8)
  data = np.asarray(multihost_utils.broadcast_one_to_all(data), np.uint8)
  return data.tobytes().decode("utf-8")


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
