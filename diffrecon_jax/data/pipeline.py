"""From a dataset config to model-ready arrays: the task of paper Sec. III and V-A.

  real fine series (T, H, W, C)  -- coarsen by N -->  pseudo-complete coarse series (T, I, J, C)
  chronological 2:1:1 split; per-channel z-score fitted on the train split only (EVALUATION.md)
  training windows: t = history + 1 consecutive slices, the current one last, with sparse masks
  drawn on the fly inside the jitted step (`sample_train_batch`).

Normalised arrays are what the models see; `Normalizer.inverse` brings predictions back to physical
units for every metric. NaN in the fine data (unobserved, custom grids) becomes: NaN coarse cells
(always treated as missing), 0 (the train mean) in the normalised arrays, and no contribution to
any metric.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffrecon_jax.data import coarsen as coarsen_lib
from diffrecon_jax.data import patterns as patterns_lib
from diffrecon_jax.data.series import DataError, SpatioTemporalSeries


@dataclasses.dataclass(frozen=True)
class Split:
  """Chronological 2:1:1 boundaries: train [0, val_start), val [val_start, test_start), test [test_start, T)."""
  num_slices: int
  val_start: int
  test_start: int

  @classmethod
  def chronological(cls, num_slices: int) -> "Split":
    return cls(num_slices, 2 * num_slices // 4, 3 * num_slices // 4)

  def range(self, name: str) -> tuple:
    return {"train": (0, self.val_start), "val": (self.val_start, self.test_start),
            "test": (self.test_start, self.num_slices)}[name]


@dataclasses.dataclass(frozen=True)
class Normalizer:
  """Per-channel z-score. mean, std: (C,) float32. Fitted on finite train values only."""
  mean: np.ndarray
  std: np.ndarray

  @classmethod
  def fit(cls, values: np.ndarray, name: str) -> "Normalizer":
    flat = values.reshape(-1, values.shape[-1])
    finite = np.isfinite(flat)
    if not finite.any(axis=0).all():
      raise DataError(f"{name}: a channel of the training split has no finite value")
    mean = np.nanmean(np.where(finite, flat, np.nan), axis=0)
    std = np.nanstd(np.where(finite, flat, np.nan), axis=0)
    std = np.where(std > 0, std, 1.0)  # a constant channel: keep values, avoid division by 0.
    return cls(mean.astype(np.float32), std.astype(np.float32))

  def apply(self, x):
    return (x - self.mean) / self.std

  def inverse(self, x):
    return x * self.std + self.mean

  def to_json(self) -> dict:
    return {"mean": self.mean.tolist(), "std": self.std.tolist()}

  @classmethod
  def from_json(cls, d: dict) -> "Normalizer":
    return cls(np.asarray(d["mean"], np.float32), np.asarray(d["std"], np.float32))


@dataclasses.dataclass(frozen=True)
class TaskData:
  """Everything a method needs about one dataset at one magnification.

  Attributes:
    series: the (possibly cropped) fine series, physical units.
    fine_phys: (T, NI, NJ, C) float32 physical fine truth (NaN = unobserved).
    coarse_phys: (T, I, J, C) float32 physical pseudo-complete coarse series (pooled truth).
    fine: (T, NI, NJ, C) float32 normalised fine series (NaN -> 0).
    coarse: (T, I, J, C) float32 normalised coarse series (NaN -> 0).
    coarse_valid: (T, I, J) float32, 0 where the coarse value is NaN (never observable).
    external: (T, F) float32.
    history: t - 1.
    scale: N.
    split: chronological boundaries.
    fine_norm, coarse_norm: normalisers fitted on the train split.
    patterns_train: the Patterns drawn in training.
  """
  series: SpatioTemporalSeries
  fine_phys: np.ndarray
  coarse_phys: np.ndarray
  fine: np.ndarray
  coarse: np.ndarray
  coarse_valid: np.ndarray
  external: np.ndarray
  history: int
  scale: int
  split: Split
  fine_norm: Normalizer
  coarse_norm: Normalizer
  patterns_train: tuple

  @property
  def window(self) -> int:
    return self.history + 1

  @property
  def coarse_shape(self) -> tuple:
    return tuple(self.coarse.shape[1:3])

  @property
  def fine_shape(self) -> tuple:
    return tuple(self.fine.shape[1:3])

  @property
  def channels(self) -> int:
    return self.fine.shape[-1]

  @property
  def train_range(self) -> tuple:
    """Valid current-slice indices [lo, hi) whose whole window lies in the train split."""
    return (self.history, self.split.val_start)

  @property
  def stats(self) -> dict:
    return {"fine": self.fine_norm.to_json(), "coarse": self.coarse_norm.to_json()}

  @property
  def shapes(self) -> dict:
    return {"coarse_shape": list(self.coarse_shape), "fine_shape": list(self.fine_shape),
            "channels": self.channels, "external_dim": int(self.external.shape[1]),
            "window": self.window, "scale": self.scale, "num_slices": int(self.fine.shape[0])}

  def device_arrays(self) -> dict:
    """The normalised series as jnp arrays, the `arrays` argument of `sample_train_batch`."""
    return {"coarse": jnp.asarray(self.coarse), "fine": jnp.asarray(self.fine),
            "external": jnp.asarray(self.external), "valid": jnp.asarray(self.coarse_valid)}


def load_series(config) -> SpatioTemporalSeries:
  """Loads config.data.name; `registry.loader_kwargs` maps the config's fields to the loader."""
  from diffrecon_jax.data import registry  # local: keeps this module importable on its own.
  return registry.load_from_config(config.data)


def build_task(series: SpatioTemporalSeries, scale: int, history: int, crop: bool = False,
               train_patterns: tuple = ("random:0.5",)) -> TaskData:
  """Coarse-grains, splits and normalises a series (no I/O; the tests call it directly)."""
  h, w = coarsen_lib.check_divisible(series.fine_shape, scale, crop, series.name)
  fine_phys = np.asarray(series.values[:, :h, :w], np.float32)
  if np.isinf(fine_phys).any():
    raise DataError(f"{series.name}: values contain Inf")
  t = fine_phys.shape[0]
  split = Split.chronological(t)
  if history < 0:
    raise DataError(f"history must be >= 0, got {history}")
  if split.val_start - history < 1:
    raise DataError(f"{series.name}: the train split has {split.val_start} slices, too few for "
                    f"windows of history {history}")
  coarse_phys = coarsen_lib.coarsen(fine_phys, scale, series.aggregation).astype(np.float32)
  lo, hi = split.range("train")
  fine_norm = Normalizer.fit(fine_phys[lo:hi], f"{series.name} (fine)")
  coarse_norm = Normalizer.fit(coarse_phys[lo:hi], f"{series.name} (coarse)")
  coarse_valid = np.all(np.isfinite(coarse_phys), axis=-1).astype(np.float32)
  if not coarse_valid.any(axis=(1, 2)).all():
    bad = np.nonzero(~coarse_valid.any(axis=(1, 2)))[0]
    raise DataError(f"{series.name}: {len(bad)} slice(s) have no finite coarse cell at all "
                    f"(first at index {bad[0]}, {series.timestamps[bad[0]]}); drop them first")
  return TaskData(
      series=series, fine_phys=fine_phys, coarse_phys=coarse_phys,
      fine=np.nan_to_num(fine_norm.apply(fine_phys), nan=0.0).astype(np.float32),
      coarse=np.nan_to_num(coarse_norm.apply(coarse_phys), nan=0.0).astype(np.float32),
      coarse_valid=coarse_valid, external=np.asarray(series.external, np.float32),
      history=history, scale=scale, split=split, fine_norm=fine_norm, coarse_norm=coarse_norm,
      patterns_train=tuple(patterns_lib.parse_pattern(p) for p in train_patterns))


def prepare_task(config, series: Optional[SpatioTemporalSeries] = None) -> TaskData:
  """The TaskData of a config (loads the dataset unless `series` is given)."""
  if series is None:
    series = load_series(config)
  return build_task(series, int(config.data.scale_factor), int(config.data.history),
                    crop=(config.data.crop == "fit"), train_patterns=tuple(config.patterns.train))


def gather_windows(x: jax.Array, current: jax.Array, window: int) -> jax.Array:
  """x (T, ...) and current slice indices (B,) -> (B, window, ...), the current slice last."""
  idx = current[:, None] + jnp.arange(-window + 1, 1)[None, :]
  return x[idx]


def sample_train_batch(arrays: dict, rng: jax.Array, *, batch_size: int, history: int,
                       index_range: tuple, patterns: tuple) -> dict:
  """A random training batch, drawn inside the jitted step (pure jnp).

  Args:
    arrays: `TaskData.device_arrays()`: coarse (T,I,J,C), fine (T,NI,NJ,C), external (T,F),
      valid (T,I,J).
    rng: PRNG key.
    batch_size: B.
    history: t - 1.
    index_range: (lo, hi) current-slice indices to draw from (`TaskData.train_range`).
    patterns: (kind_ids, ratios) from `patterns.encode_train_patterns`.
  Returns dict: obs (B,t,I,J,C) masked coarse (missing = 0), mask (B,t,I,J) 1 = observed,
    coarse (B,t,I,J,C) pseudo-complete, external (B,t,F), fine (B,NI,NJ,C) current fine map.
  """
  window = history + 1
  k_idx, k_mask = jax.random.split(rng)
  current = jax.random.randint(k_idx, (batch_size,), index_range[0], index_range[1])
  coarse = gather_windows(arrays["coarse"], current, window)
  coarse_shape = coarse.shape[2:4]
  kind_ids, ratios = patterns
  mask = patterns_lib.sample_train_masks(k_mask, batch_size, window, coarse_shape,
                                         jnp.asarray(kind_ids), jnp.asarray(ratios))
  mask = mask * gather_windows(arrays["valid"], current, window)
  return {"obs": coarse * mask[..., None], "mask": mask, "coarse": coarse,
          "external": gather_windows(arrays["external"], current, window),
          "fine": arrays["fine"][current]}


def fine_base(coarse_now, stats: dict, scale: int, aggregation: str):
  """The fine map implied by a coarse map alone, in normalised fine units (jnp, jit-able).

  (B, I, J, C) normalised coarse -> (B, N*I, N*J, C) normalised fine: each coarse value spread
  evenly over its N x N cells (`coarsen.upsample_uniform`: value / N^2 for sums, the value for
  means), i.e. the `interp` baseline's upsampling. Diffusion-F learns the residual on top of it.
  """
  c_mean = jnp.asarray(stats["coarse"]["mean"], jnp.float32)
  c_std = jnp.asarray(stats["coarse"]["std"], jnp.float32)
  f_mean = jnp.asarray(stats["fine"]["mean"], jnp.float32)
  f_std = jnp.asarray(stats["fine"]["std"], jnp.float32)
  phys = coarse_now * c_std + c_mean
  up = jnp.repeat(jnp.repeat(phys, scale, axis=-3), scale, axis=-2)
  if aggregation == "sum":
    up = up / (scale * scale)
  return (up - f_mean) / f_std


def block_mean_zero(residual, scale: int):
  """Removes the mean of every N x N block: (B, NI, NJ, C) -> same shape.

  Added to `fine_base` output, the result pools (sum or mean) exactly to the coarse map, since
  the normalisation is affine per channel and the base is constant over each block.
  """
  b, h, w, c = residual.shape
  blocks = residual.reshape(b, h // scale, scale, w // scale, scale, c)
  return (blocks - blocks.mean(axis=(2, 4), keepdims=True)).reshape(b, h, w, c)
