"""From a dataset config to model-ready arrays: the task of paper Sec. III and V-A.

  real fine series (T, H, W, C)  -- coarsen by N -->  pseudo-complete coarse series (T, I, J, C)
  chronological 2:1:1 split; per-channel z-score fitted on the train split only (docs/evaluation.md)
  training windows: t = history + 1 consecutive slices, the current one last, with sparse masks
  drawn on the fly inside the jitted step (`sample_train_batch`).

Time gaps (missing slots, e.g. TaxiBJ) are handled by `time_axis`: a window is *whole* when its
slices are present and one interval apart. Training draws only whole windows
(`TaskData.train_current`); `eval_slices` picks the slices to score and says how many were
skipped. `gap_rule` "skip" keeps the series as loaded; "fill" puts it on the regular grid with
all-NaN inserted slices (`time_axis.fill_gaps`).

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
from absl import logging

from diffrecon_jax.data import coarsen as coarsen_lib
from diffrecon_jax.data import patterns as patterns_lib
from diffrecon_jax.data import time_axis as time_axis_lib
from diffrecon_jax.data.series import DataError, SpatioTemporalSeries
from diffrecon_jax.data.splits import Split  # re-exported: `pipeline.Split` is the task's split.


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
    inserted: (T,) bool, slices inserted by the `fill` gap rule (all NaN; never trained on or
      scored). All False under `skip`.
    gap_rule: "skip" or "fill" (`time_axis.GAP_RULES`).

  Derived in __post_init__ from the fields above:
    time_axis: `time_axis.TimeAxis` of `series.timestamps`.
    whole_windows: (T,) bool, True where the window s-history .. s is present, one interval
      apart, and holds no inserted slice.
    train_current: (n,) int32, the current-slice indices training draws from: whole windows
      wholly inside the train split (s < split.val_start). DataError if there is none.
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
  inserted: Optional[np.ndarray] = None
  gap_rule: str = "skip"
  time_axis: time_axis_lib.TimeAxis = dataclasses.field(init=False)
  whole_windows: np.ndarray = dataclasses.field(init=False)
  train_current: np.ndarray = dataclasses.field(init=False)

  def __post_init__(self):
    name = self.series.name
    t = self.fine.shape[0]
    if self.gap_rule not in time_axis_lib.GAP_RULES:
      raise DataError(f"gap rule must be one of {time_axis_lib.GAP_RULES}, got {self.gap_rule!r}")
    inserted = (np.zeros(t, bool) if self.inserted is None
                else np.asarray(self.inserted, bool).reshape(-1))
    if inserted.shape != (t,):
      raise DataError(f"{name}: inserted has shape {inserted.shape}, expected ({t},)")
    axis = self.series.time_axis
    whole = axis.whole_windows(self.window) & time_axis_lib.windows_without(inserted, self.window)
    train = np.nonzero(whole[:self.split.val_start])[0].astype(np.int32)
    if train.size == 0:
      ts = axis.timestamps
      raise DataError(
          f"{name}: the train split ({time_axis_lib.format_time(ts[0])} .. "
          f"{time_axis_lib.format_time(ts[self.split.val_start - 1])}) holds no window of "
          f"{self.window} consecutive slices at {axis.interval_minutes} min ({axis.summary()}); "
          f"lower data.history (now {self.history}) or use a stretch of the series with fewer "
          f"gaps")
    for k, v in (("inserted", inserted), ("time_axis", axis), ("whole_windows", whole),
                 ("train_current", train)):
      object.__setattr__(self, k, v)

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
    """[lo, hi) bounding the current-slice indices whose window lies in the train split.

    Without gaps every index in it is drawn; with gaps `train_current` (which
    `sample_train_batch` reads from `device_arrays()` in preference) is the exact set.
    """
    return (self.history, self.split.val_start)

  @property
  def eval_span(self) -> int:
    """Slices s - span + 1 .. s a reconstruction of slice s reads: 2 * history + 1, because
    DiffRecon completes each of the `history` earlier coarse maps from its own window
    (diffrecon_method) before stage 2 reads them."""
    return 2 * self.history + 1

  @property
  def stats(self) -> dict:
    return {"fine": self.fine_norm.to_json(), "coarse": self.coarse_norm.to_json()}

  @property
  def shapes(self) -> dict:
    return {"coarse_shape": list(self.coarse_shape), "fine_shape": list(self.fine_shape),
            "channels": self.channels, "external_dim": int(self.external.shape[1]),
            "window": self.window, "scale": self.scale, "num_slices": int(self.fine.shape[0])}

  def device_arrays(self) -> dict:
    """The normalised series as jnp arrays, the `arrays` argument of `sample_train_batch`;
    "train_current" (n,) int32 holds the current-slice indices training draws from."""
    return {"coarse": jnp.asarray(self.coarse), "fine": jnp.asarray(self.fine),
            "external": jnp.asarray(self.external), "valid": jnp.asarray(self.coarse_valid),
            "train_current": jnp.asarray(self.train_current, jnp.int32)}


def load_series(config) -> SpatioTemporalSeries:
  """Loads config.data.name; `registry.loader_kwargs` maps the config's fields to the loader.

  With `config.data.tfds_dir` set, the series is read from a TFDS array_record copy there
  (prepared from the loader on first use; `data/tfds_builders.py`).
  """
  from diffrecon_jax.data import registry  # local: the loaders are only needed here.
  tfds_dir = registry.absolute_path(config.data.tfds_dir)
  if tfds_dir is not None:
    from diffrecon_jax.data import tfds_builders  # local: TFDS is slow to import.
    return tfds_builders.load_or_prepare(config.data, tfds_dir)
  return registry.load_from_config(config.data)


def build_task(series: SpatioTemporalSeries, scale: int, history: int, crop: bool = False,
               train_patterns: tuple = ("random:0.5",), gap_rule: str = "skip") -> TaskData:
  """Coarse-grains, splits and normalises a series (no I/O; the tests call it directly).

  gap_rule: "skip" (the series as loaded) or "fill" (`time_axis.fill_gaps`: the regular grid,
  inserted slices all NaN). The 2:1:1 split is made on the slices present and, under "fill",
  carried over to the grid by timestamp, so both rules split, normalise and score the same real
  slices. Logs one line with the time axis summary and the whole training windows.
  """
  if gap_rule not in time_axis_lib.GAP_RULES:
    raise DataError(f"gap rule must be one of {time_axis_lib.GAP_RULES}, got {gap_rule!r}")
  axis = series.time_axis
  split = Split.chronological(series.num_slices)
  inserted = None
  if gap_rule == "fill" and axis.has_gaps:
    series, inserted = time_axis_lib.fill_gaps(series)
    pos = axis.positions
    split = Split(series.num_slices, int(pos[split.val_start]), int(pos[split.test_start]))
  h, w = coarsen_lib.check_divisible(series.fine_shape, scale, crop, series.name)
  fine_phys = np.asarray(series.values[:, :h, :w], np.float32)
  if np.isinf(fine_phys).any():
    raise DataError(f"{series.name}: values contain Inf")
  t = fine_phys.shape[0]
  if history < 0:
    raise DataError(f"history must be >= 0, got {history}")
  if split.val_start - history < 1:
    raise DataError(f"{series.name}: the train split has {split.val_start} slices, too few for "
                    f"windows of history {history}")
  coarse_phys = coarsen_lib.coarsen(fine_phys, scale, series.aggregation).astype(np.float32)
  lo, hi = split.range("train")
  # Inserted slices are NaN, so the NaN-aware fit sees only the slices present.
  fine_norm = Normalizer.fit(fine_phys[lo:hi], f"{series.name} (fine)")
  coarse_norm = Normalizer.fit(coarse_phys[lo:hi], f"{series.name} (coarse)")
  coarse_valid = np.all(np.isfinite(coarse_phys), axis=-1).astype(np.float32)
  empty = ~coarse_valid.any(axis=(1, 2))
  if inserted is not None:
    empty &= ~inserted  # inserted slices are empty by construction.
  if empty.any():
    bad = np.nonzero(empty)[0]
    raise DataError(f"{series.name}: {len(bad)} slice(s) have no finite coarse cell at all "
                    f"(first at index {bad[0]}, {series.timestamps[bad[0]]}); drop them first")
  task = TaskData(
      series=series, fine_phys=fine_phys, coarse_phys=coarse_phys,
      fine=np.nan_to_num(fine_norm.apply(fine_phys), nan=0.0).astype(np.float32),
      coarse=np.nan_to_num(coarse_norm.apply(coarse_phys), nan=0.0).astype(np.float32),
      coarse_valid=coarse_valid, external=np.asarray(series.external, np.float32),
      history=history, scale=scale, split=split, fine_norm=fine_norm, coarse_norm=coarse_norm,
      patterns_train=tuple(patterns_lib.parse_pattern(p) for p in train_patterns),
      inserted=inserted, gap_rule=gap_rule)
  filled = (f"; gap rule fill: {int(task.inserted.sum())} all-NaN slices inserted"
            if inserted is not None else "")
  logging.info("%s: %s%s; %d of %d training windows of %d slices are whole", series.name,
               axis.summary(), filled, task.train_current.size, split.val_start - history,
               task.window)
  return task


def prepare_task(config, series: Optional[SpatioTemporalSeries] = None) -> TaskData:
  """The TaskData of a config (loads the dataset unless `series` is given).

  The gap rule is `config.data.gap_rule` ("skip" or "fill").
  """
  if series is None:
    series = load_series(config)
  return build_task(series, int(config.data.scale_factor), int(config.data.history),
                    crop=(config.data.crop == "fit"), train_patterns=tuple(config.patterns.train),
                    gap_rule=config.data.gap_rule)


def eval_slices(task: TaskData, split: str, span: Optional[int] = None) -> tuple:
  """The slices of `split` to score, and a report of those left out.

  A slice s is scored when the `span` slices s - span + 1 .. s it is reconstructed from
  (default `task.eval_span` = 2 * history + 1) lie on the grid without a break:
    skip  all present and one interval apart (`TimeAxis.whole_windows(span)`);
    fill  the grid is regular by construction; s itself must be a real (not inserted) slice,
          while inserted slices inside its span are seen as wholly unobserved.
  A span reaching before the first slice of the series is never scored. Windows of the first
  test slices reach back into validation as before.

  Returns:
    slices: (n,) int64 sorted indices to score (not necessarily contiguous; see
      `time_axis.contiguous_runs`).
    report: {"rule", "span", "n_slices_in_split" (real slices of the split, the same under both
      rules), "n_scored", "n_skipped_gap" (span crosses a gap), "n_skipped_start" (span starts
      before the series), "n_inserted" (inserted slices in the split, never scored),
      "first_skipped" (ISO timestamp of the first real slice skipped, or None)}.
  """
  span = task.eval_span if span is None else int(span)
  if span < 1:
    raise ValueError(f"span must be >= 1, got {span}")
  lo, hi = task.split.range(split)
  idx = np.arange(lo, hi)
  real = ~task.inserted[lo:hi]
  started = idx >= span - 1
  if task.gap_rule == "fill":
    whole = np.ones(hi - lo, bool)
  else:
    whole = task.time_axis.whole_windows(span)[lo:hi]
  keep = real & started & whole
  skipped = real & ~keep
  first = None
  if skipped.any():
    first = str(task.time_axis.timestamps[lo + int(np.argmax(skipped))])
  report = {"rule": task.gap_rule, "span": span, "n_slices_in_split": int(real.sum()),
            "n_scored": int(keep.sum()), "n_skipped_gap": int((real & started & ~whole).sum()),
            "n_skipped_start": int((real & ~started).sum()),
            "n_inserted": int((~real).sum()), "first_skipped": first}
  return idx[keep], report


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
    index_range: (lo, hi) current-slice indices to draw from (`TaskData.train_range`); used only
      when `arrays` has no "train_current", which takes precedence.
    patterns: (kind_ids, ratios[, layouts]) from `patterns.encode_train_patterns`.
  Returns dict: obs (B,t,I,J,C) masked coarse (missing = 0), mask (B,t,I,J) 1 = observed,
    coarse (B,t,I,J,C) pseudo-complete, external (B,t,F), fine (B,NI,NJ,C) current fine map,
    and slot (B,t) int32 when `arrays` has "slot" (T,), each slice's climatology slot.
  """
  window = history + 1
  k_idx, k_mask = jax.random.split(rng)
  if "train_current" in arrays:
    # Uniform over the whole training windows. jax.random.randint(k, lo, hi) is lo plus an
    # offset that depends on k and hi - lo only, so on a series without gaps (train_current =
    # arange(lo, hi)) this draws exactly the indices of the index_range draw.
    candidates = arrays["train_current"]
    current = candidates[jax.random.randint(k_idx, (batch_size,), 0, candidates.shape[0])]
  else:
    current = jax.random.randint(k_idx, (batch_size,), index_range[0], index_range[1])
  coarse = gather_windows(arrays["coarse"], current, window)
  coarse_shape = coarse.shape[2:4]
  kind_ids, ratios, *layouts = patterns
  mask = patterns_lib.sample_train_masks(
      k_mask, batch_size, window, coarse_shape, jnp.asarray(kind_ids), jnp.asarray(ratios),
      jnp.asarray(layouts[0], jnp.float32) if layouts else None)
  mask = mask * gather_windows(arrays["valid"], current, window)
  batch = {"obs": coarse * mask[..., None], "mask": mask, "coarse": coarse,
           "external": gather_windows(arrays["external"], current, window),
           "fine": arrays["fine"][current]}
  if "slot" in arrays:
    batch["slot"] = gather_windows(arrays["slot"], current, window)
  return batch
