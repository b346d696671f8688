"""Fixed-size sampler batches shared by the diffusion methods (DiffRecon, DiffUFlow).

A sampler program is compiled for one batch shape; a split into (nearly) equal batches keeps
every worker of `eval.concurrent_batches` busy to the end, and the partition depends on the
config alone, so the random key of every batch does too.
"""
from __future__ import annotations

import jax


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
  n = int(config.eval.get("concurrent_batches", 0))
  if n < 0:
    raise ValueError(f"eval.concurrent_batches must be >= 0 (0 = automatic), got {n}")
  if n == 0:
    n = 2 if jax.default_backend() == "cpu" else 1
  return n
