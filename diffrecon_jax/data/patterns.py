"""Sparse patterns: which coarse cells are observed (paper Sec. V-A.2, docs/evaluation.md).

A mask is float32 with 1 = observed, 0 = missing, the same for every channel. A pattern with
missing ratio r hides n = floor(r * I * J + 0.5) cells of every slice (round half up, the same rule
in numpy and in JAX):
  - ``fixed``: the same n cells in every slice (fixed sensors);
  - ``random``: a fresh random set of n cells in each slice (mobile sensing);
  - ``large_scale``: the lower-right floor(I/2) x floor(J/2) block in every slice (ratio 0.25);
  - ``file``: a user mask (.npy, 1 = observed, 0 or NaN = missing, shape (I, J) or (T, I, J)
    over the whole series). In training, a file pattern is a fixed sensor *layout*: the same
    cells in every slice, so its file must be (I, J) or the same in every slice (training on the
    evaluation's own layout, as UrbanSTA trains per sensor layout).

`make_eval_mask` draws the evaluation masks with numpy from a recorded seed (saved beside the
results). `sample_train_masks` draws masks on the fly inside the jitted training step.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffrecon_jax.data.series import DataError

KINDS = ("fixed", "random", "large_scale")
LARGE_SCALE_RATIO = 0.25


@dataclasses.dataclass(frozen=True)
class Pattern:
  """One sparse pattern. `kind` in KINDS or "file"; `ratio` the nominal missing ratio."""
  kind: str
  ratio: float
  path: str = ""

  @property
  def label(self) -> str:
    if self.kind == "file":
      return f"file:{self.path}"
    return f"{self.kind}:{self.ratio:g}"


def parse_pattern(spec: str) -> Pattern:
  """Parses "fixed:0.2", "random:0.8", "large_scale:0.25" or "file:/path/mask.npy"."""
  if not isinstance(spec, str) or ":" not in spec:
    raise DataError(f"pattern {spec!r} must look like 'kind:ratio' with kind in {KINDS}, "
                    "or 'file:/path/mask.npy'")
  kind, arg = spec.split(":", 1)
  if kind == "file":
    # Absolute at parse time: a relative mask path means "from the directory the run started in",
    # whatever the process's directory is when the mask is read.
    return Pattern("file", float("nan"), os.path.abspath(os.path.expanduser(arg)))
  if kind not in KINDS:
    raise DataError(f"pattern {spec!r}: unknown kind {kind!r}; expected one of {KINDS} or 'file'")
  try:
    ratio = float(arg)
  except ValueError:
    raise DataError(f"pattern {spec!r}: ratio {arg!r} is not a number") from None
  if not 0.0 <= ratio < 1.0:
    # 1 hides everything (nothing to condition on); 0 hides nothing (super-resolution only).
    raise DataError(f"pattern {spec!r}: missing ratio must be in [0, 1), got {ratio}; e.g. "
                    f"'{kind}:0.4' hides 40% of the coarse cells")
  if kind == "large_scale" and abs(ratio - LARGE_SCALE_RATIO) > 1e-9:
    raise DataError(f"pattern {spec!r}: large_scale hides the lower-right quarter, so its ratio "
                    f"is {LARGE_SCALE_RATIO}; use 'file:' for other blocks")
  return Pattern(kind, ratio)


def num_missing(ratio: float, num_cells: int) -> int:
  """n = floor(r * cells + 0.5); an error if that hides every cell."""
  n = int(np.floor(ratio * num_cells + 0.5))
  if n >= num_cells:
    raise DataError(f"missing ratio {ratio} hides all {num_cells} coarse cells of a slice")
  return n


def large_scale_block(coarse_shape: tuple) -> np.ndarray:
  """(I, J) float32 mask with the lower-right floor(I/2) x floor(J/2) block missing."""
  i, j = coarse_shape
  if i < 2 or j < 2:
    raise DataError(f"large_scale needs a coarse grid of at least 2x2, got {i}x{j}")
  mask = np.ones((i, j), np.float32)
  mask[i - i // 2:, j - j // 2:] = 0.0
  return mask


def make_eval_mask(pattern: Pattern, num_slices: int, coarse_shape: tuple,
                   seed: int) -> np.ndarray:
  """The evaluation mask of a whole series: (T, I, J) float32, 1 = observed."""
  i, j = coarse_shape
  cells = i * j
  if pattern.kind == "file":
    return load_user_mask(pattern.path, num_slices, coarse_shape)
  if pattern.kind == "large_scale":
    return np.broadcast_to(large_scale_block(coarse_shape), (num_slices, i, j)).copy()
  n = num_missing(pattern.ratio, cells)
  rng = np.random.default_rng(seed)
  if pattern.kind == "fixed":
    flat = np.ones(cells, np.float32)
    flat[rng.permutation(cells)[:n]] = 0.0
    return np.broadcast_to(flat.reshape(i, j), (num_slices, i, j)).copy()
  # random: an independent set of n cells per slice.
  ranks = np.argsort(np.argsort(rng.random((num_slices, cells)), axis=1), axis=1)
  return (ranks >= n).astype(np.float32).reshape(num_slices, i, j)


def load_user_mask(path: str, num_slices: int, coarse_shape: tuple) -> np.ndarray:
  """A user mask file (.npy) of shape (I, J) or (T, I, J) -> (T, I, J) float32.

  Values: 1 = observed, 0 or NaN = missing (NaN as in the data files, where it marks a value
  nobody observed); anything else is a DataError naming the file and the first bad value.
  """
  p = pathlib.Path(path)
  if not p.is_file():
    raise DataError(f"mask file {path} not found (pattern 'file:{path}')")
  try:
    m = np.load(p, allow_pickle=False)
  except (OSError, ValueError, EOFError) as e:
    first = (str(e).strip().splitlines() or [""])[0][:160]
    raise DataError(f"mask file {path}: not a NumPy .npy array ({type(e).__name__}: {first}); "
                    "save it with numpy.save") from None
  if not isinstance(m, np.ndarray) or m.dtype.kind not in "biuf":
    raise DataError(f"mask file {path}: expected one numeric .npy array of 0/1, got "
                    f"{type(m).__name__} {getattr(m, 'dtype', '')}; save it with numpy.save")
  m = np.where(np.isnan(m), 0, m) if m.dtype.kind == "f" else m
  bad = ~((m == 0) | (m == 1))
  if bad.any():
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    raise DataError(f"mask file {path}: values must be 1 (observed), 0 or NaN (missing); found "
                    f"{m[where].item()!r} at index {where} ({int(bad.sum())} such values)")
  if m.shape == tuple(coarse_shape):
    m = np.broadcast_to(m, (num_slices,) + tuple(coarse_shape))
  if m.shape != (num_slices,) + tuple(coarse_shape):
    raise DataError(f"mask file {path}: shape {m.shape} must be {tuple(coarse_shape)} or "
                    f"{(num_slices,) + tuple(coarse_shape)} (coarse grid, whole series)")
  return m.astype(np.float32)


LAYOUT_KIND = len(KINDS)  # kind id of a training layout from a file (ratio = its index)


def encode_train_patterns(patterns: Sequence[Pattern], coarse_shape: tuple = None) -> tuple:
  """(kind ids (P,) int32, ratios (P,) float32) for `sample_train_masks`, plus the layouts
  (L, I, J) float32 when a pattern is a file (kind `LAYOUT_KIND`, its ratio the layout's index;
  `coarse_shape` is then required to read the files)."""
  kinds, ratios, layouts = [], [], []
  for p in patterns:
    if p.kind == "file":
      if coarse_shape is None:
        raise DataError(f"training layout {p.path}: the coarse shape is needed to read it")
      layouts.append(load_train_layout(p.path, coarse_shape))
      kinds.append(LAYOUT_KIND)
      ratios.append(float(len(layouts) - 1))
      continue
    kinds.append(KINDS.index(p.kind))
    ratios.append(p.ratio)
  if not kinds:
    raise DataError("config.patterns.train is empty")
  encoded = (np.asarray(kinds, np.int32), np.asarray(ratios, np.float32))
  return encoded + ((np.stack(layouts).astype(np.float32),) if layouts else ())


def load_train_layout(path: str, coarse_shape: tuple) -> np.ndarray:
  """A training layout file -> (I, J) float32, 1 = observed; a DataError when its cells change
  between slices (a layout is fixed sensors) or nothing is observed."""
  m = np.asarray(np.load(path, allow_pickle=False)) if pathlib.Path(path).is_file() else None
  if m is None:
    raise DataError(f"training layout {path} not found (pattern 'file:{path}')")
  m = load_user_mask(path, m.shape[0] if m.ndim == 3 else 1, coarse_shape)
  if not (m == m[:1]).all():
    first = int(np.argmax(~(m == m[:1]).all(axis=(1, 2))))
    raise DataError(f"training layout {path}: the observed cells change at slice {first}; a "
                    "training layout must be the same in every slice (save it as (I, J))")
  if not m[0].any():
    raise DataError(f"training layout {path}: no cell is observed")
  return m[0]


def sample_train_masks(rng: jax.Array, batch_size: int, window: int, coarse_shape: tuple,
                       kind_ids: jax.Array, ratios: jax.Array,
                       layouts: jax.Array = None) -> jax.Array:
  """Masks drawn on the fly, one pattern per window chosen uniformly from the train patterns.

  Same rules as `make_eval_mask`; jit-able (shapes are static, the choice is data). `layouts`
  (L, I, J): the fixed layouts of `LAYOUT_KIND` patterns (`encode_train_patterns`).
  Returns (B, window, I, J) float32, 1 = observed.
  """
  i, j = coarse_shape
  cells = i * j
  k_pat, k_fixed, k_rand = jax.random.split(rng, 3)
  choice = jax.random.randint(k_pat, (batch_size,), 0, kind_ids.shape[0])
  kind = kind_ids[choice]                                   # (B,)
  n = jnp.floor(ratios[choice] * cells + 0.5)               # (B,)
  u_fixed = jax.random.uniform(k_fixed, (batch_size, 1, cells))
  u_rand = jax.random.uniform(k_rand, (batch_size, window, cells))
  u = jnp.where((kind == KINDS.index("fixed"))[:, None, None], u_fixed, u_rand)
  ranks = jnp.argsort(jnp.argsort(u, axis=-1), axis=-1)
  rank_mask = (ranks >= n[:, None, None]).astype(jnp.float32).reshape(batch_size, window, i, j)
  block = jnp.asarray(large_scale_block(coarse_shape)) if (i >= 2 and j >= 2) else jnp.ones((i, j))
  is_block = (kind == KINDS.index("large_scale"))[:, None, None, None]
  mask = jnp.where(is_block, block[None, None], rank_mask)
  if layouts is None:
    return mask
  index = jnp.clip(ratios[choice].astype(jnp.int32), 0, layouts.shape[0] - 1)
  is_layout = (kind == LAYOUT_KIND)[:, None, None, None]
  return jnp.where(is_layout, jnp.asarray(layouts)[index][:, None], mask)
