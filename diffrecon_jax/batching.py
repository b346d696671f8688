"""Fixed-size batches of every method's compiled calls (DiffRecon, its prior, the baselines).

A compiled program sees one batch shape: `run_batched` runs a function over fixed-size batches,
the last one padded. For the samplers, a split into (nearly) equal batches keeps every worker of
`eval.concurrent_batches` busy to the end, and the partition depends on the config alone, so
the random key of every batch does too.
"""
from __future__ import annotations

import concurrent.futures
from typing import Callable, Optional, Sequence

import jax
import numpy as np


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


def run_batched(fn: Callable, arrays: Sequence[np.ndarray], size: int, *,
                rng: Optional[jax.Array] = None, workers: int = 1, first_alone: bool = True,
                out_axis: int = 0, devices: Optional[Sequence] = None) -> list:
  """`fn` over fixed-size batches of `arrays` (each (n, ...), batched along axis 0).

  Batch k holds rows [k * size, (k + 1) * size); the last one is padded to `size` rows with
  copies of its last row (one compiled shape) and the padding is cut from every output.
  fn(*batch) -> an array or a tuple of arrays with the batch on `out_axis`; with `rng`, it is
  called as fn(*batch, fold_in(rng, k)), so a batch's key does not depend on how many run at
  once. `workers` > 1 runs batches in threads; `first_alone` runs batch 0 before the others (it
  compiles). With several `devices`, batch k runs on devices[k % len(devices)] (its arrays and
  key are put there; what `fn` closes over must be uncommitted, e.g. numpy, to follow them), at
  least one thread per device: the same batches with the same keys as on one device, so the
  outputs are identical. Returns the list of outputs, each concatenated along `out_axis`.
  n >= 1.
  """
  n = arrays[0].shape[0]
  if n < 1 or size < 1:
    raise ValueError(f"run_batched: need n >= 1 rows and size >= 1, got {n}, {size}")
  starts = list(range(0, n, size))
  spread = list(devices) if devices is not None and len(devices) > 1 else None
  cut = lambda r, real: np.asarray(r)[(slice(None),) * out_axis + (slice(0, real),)]

  def one(k: int) -> list:
    part = [a[starts[k]:starts[k] + size] for a in arrays]
    real = part[0].shape[0]
    if real < size:
      part = [np.concatenate([p, np.repeat(p[-1:], size - real, axis=0)]) for p in part]
    key = None if rng is None else jax.random.fold_in(rng, k)
    if spread:
      part, key = jax.device_put((part, key), spread[k % len(spread)])
    res = fn(*part) if key is None else fn(*part, key)
    return [cut(r, real) for r in (res if isinstance(res, tuple) else (res,))]

  if spread:
    workers = max(workers, len(spread))
  outs = [one(0)] if first_alone else []
  rest = range(len(outs), len(starts))
  if workers > 1 and len(rest) > 1:
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      outs += list(pool.map(one, rest))
  else:
    outs += [one(k) for k in rest]
  return [np.concatenate(parts, axis=out_axis) for parts in zip(*outs)]
