"""Fixed-size batches of every method's compiled calls (DiffRecon, its prior, the baselines).

A compiled program sees one batch shape: `run_batched` runs a function over fixed-size batches,
the last one padded. For the samplers, a split into (nearly) equal batches keeps every worker of
`eval.concurrent_batches` busy to the end, and the partition depends on the config alone, so
the random key of every batch does too.

Where batch k runs (`run_batched`): on one process, on device k mod D of its D devices; across
P processes (`across_processes`), on process k mod P, there on its local device (k // P) mod D,
and every process then holds every batch's outputs (`parallel.allgather`). Which device runs a
batch never changes its rows or its key, so the outputs are the same everywhere.
"""
from __future__ import annotations

import concurrent.futures
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from diffrecon_jax import parallel


# Batches are split for this many workers whatever `eval.concurrent_batches` is, so the batch
# partition, and with it every batch's random key, depends on the config alone: a run with 1
# worker reproduces a run with 2 exactly.
BALANCE_BATCHES_FOR = 2


def balanced_batch_size(n: int, max_batch: int, workers: int, multiple: int = 8) -> int:
  """Batch size <= max_batch splitting n items into a multiple of `workers` batches of (nearly)
  equal size; rounded up to `multiple` when that keeps the batch count (fewer distinct shapes).

  With 2 workers, 1080 slices at max 128 would be 9 batches (the 9th runs alone, padded with 72
  copies); 10 batches of 112 keep both workers busy to the end.
  """
  if n < 1 or max_batch < 1 or workers < 1:
    raise ValueError(f"balanced_batch_size: need n, max_batch, workers >= 1, got "
                     f"{n}, {max_batch}, {workers}")
  batches = -(-n // (max_batch * workers)) * workers
  size = -(-n // batches)
  rounded = -(-size // multiple) * multiple
  return rounded if rounded <= max_batch and -(-n // rounded) == batches else size


def concurrent_batches(config) -> int:
  """Sampler batches run at once: `config.eval.concurrent_batches`, or when it is 0, 2 on CPU
  (XLA:CPU leaves a core idle with one program; measured) and 1 on accelerators."""
  n = int(config.eval.concurrent_batches)
  if n < 0:
    raise ValueError(f"eval.concurrent_batches must be >= 0 (0 = automatic), got {n}")
  if n == 0:
    n = 2 if jax.default_backend() == "cpu" else 1
  return n


def batches_here(n_batches: int, across_processes: bool = False) -> list:
  """The batches of `run_batched` this process runs: all of them, or across P processes
  (`across_processes` with jax.process_count() > 1) batches k with k mod P == this process's
  index."""
  count, index = _processes(across_processes)
  return list(range(index, n_batches, count))


def _processes(across_processes: bool) -> tuple:
  """(process count, this process's index) over which batches are spread: (1, 0) unless
  `across_processes` in a multi-process run."""
  if across_processes and jax.process_count() > 1:
    return jax.process_count(), jax.process_index()
  return 1, 0


def run_batched(fn: Callable, arrays: Sequence[np.ndarray], size: int, *,
                rng: Optional[jax.Array] = None, workers: int = 1, first_alone: bool = True,
                out_axis: int = 0, devices: Optional[Sequence] = None,
                across_processes: bool = False) -> list:
  """`fn` over fixed-size batches of `arrays` (each (n, ...), batched along axis 0).

  Batch k holds rows [k * size, (k + 1) * size); the last one is padded to `size` rows with
  copies of its last row (one compiled shape) and the padding is cut from every output.
  fn(*batch) -> an array or a tuple of arrays with the batch on `out_axis`; with `rng`, it is
  called as fn(*batch, fold_in(rng, k)), so a batch's key does not depend on how many run at
  once. `workers` > 1 runs batches in threads; `first_alone` runs the first batch here before
  the others (it compiles). With several `devices`, batch k runs on devices[k % len(devices)]
  (its arrays and key are put there; what `fn` closes over must be uncommitted, e.g. numpy, to
  follow them), at least one thread per device: the same batches with the same keys as on one
  device, so the outputs are identical.

  With `across_processes` in a run of P > 1 processes, every process must make this call with
  the same arguments (a collective): batch k runs on process k mod P (`batches_here`), there on
  devices[(k // P) % len(devices)], and the outputs are gathered so that every process returns
  all of them, the same as one process would. `fn` must then be traceable by `jax.eval_shape`
  (a process with no batch learns the output shapes so).

  Returns the list of outputs, each concatenated along `out_axis`. n >= 1.
  """
  n = arrays[0].shape[0]
  if n < 1 or size < 1:
    raise ValueError(f"run_batched: need n >= 1 rows and size >= 1, got {n}, {size}")
  starts = list(range(0, n, size))
  procs, _ = _processes(across_processes)
  spread = list(devices) if devices is not None and len(devices) > 1 else None

  def inputs(k: int) -> tuple:
    """Batch k's arrays (padded to `size` rows) and key."""
    part = [a[starts[k]:starts[k] + size] for a in arrays]
    real = part[0].shape[0]
    if real < size:
      part = [np.concatenate([p, np.repeat(p[-1:], size - real, axis=0)]) for p in part]
    return part, (None if rng is None else jax.random.fold_in(rng, k))

  def one(k: int) -> list:
    """Batch k's outputs, padding rows included."""
    part, key = inputs(k)
    if spread:
      part, key = jax.device_put((part, key), spread[(k // procs) % len(spread)])
    res = fn(*part) if key is None else fn(*part, key)
    return [np.asarray(r) for r in (res if isinstance(res, tuple) else (res,))]

  mine = batches_here(len(starts), across_processes)
  if spread:
    workers = max(workers, len(spread))
  done = [one(mine[0])] if first_alone and mine else []
  rest = mine[len(done):]
  if workers > 1 and len(rest) > 1:
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      done += list(pool.map(one, rest))
  else:
    done += [one(k) for k in rest]
  outs = dict(zip(mine, done))
  if procs > 1:
    outs = _gather_batches(outs, len(starts), procs, lambda: _output_shapes(fn, *inputs(0)))
  cut = lambda r, k: r[(slice(None),) * out_axis + (slice(0, min(size, n - starts[k])),)]
  return [np.concatenate([cut(outs[k][i], k) for k in range(len(starts))], axis=out_axis)
          for i in range(len(outs[0]))]


def _output_shapes(fn: Callable, part: list, key) -> list:
  """[jax.ShapeDtypeStruct] of fn's outputs on one batch, without running it."""
  res = jax.eval_shape(fn, *part) if key is None else jax.eval_shape(fn, *part, key)
  return list(res if isinstance(res, tuple) else (res,))


def _gather_batches(outs: dict, n_batches: int, procs: int, shapes: Callable) -> dict:
  """{k: outputs of batch k} of this process's batches -> the same for every batch, from every
  process (a collective: all processes call it with the same n_batches).

  Process p holds batches p, p + P, ...: it sends them stacked as (m, ...) per output, m =
  ceil(n_batches / P), zeros where it has fewer (every process sends the same shapes); batch k
  is then entry (k mod P, k // P) of the gathered (P, m, ...)."""
  m = -(-n_batches // procs)
  if outs:
    like = next(iter(outs.values()))
  else:  # fewer batches than processes: this one ran none
    like = [np.zeros(s.shape, s.dtype) for s in shapes()]
  _, index = _processes(True)
  stacked = [np.stack([outs[k][i] if k in outs else np.zeros_like(like[i])
                       for k in range(index, index + m * procs, procs)])
             for i in range(len(like))]
  gathered = parallel.allgather(stacked)  # each (P, m, ...)
  return {k: [g[k % procs, k // procs] for g in gathered] for k in range(n_batches)}
