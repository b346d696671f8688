"""Coarse-graining by a magnification factor N (paper Definition 2) and its consistent inverse.

A coarse cell holds the **sum** of its N x N fine cells for counts (flows) and their **mean** for
intensive quantities (PM2.5, temperature). NaN in a fine cell (unobserved) makes its coarse cell NaN.
"""
from __future__ import annotations

import numpy as np

from diffrecon_jax.data.series import AGGREGATIONS, DataError


def check_divisible(fine_shape: tuple, scale: int, crop: bool, name: str = "data") -> tuple:
  """Returns the (H, W) actually used: (H, W) itself, or cropped to multiples of `scale`.

  Raises DataError when `scale` does not divide the grid and `crop` is False.
  """
  if not isinstance(scale, (int, np.integer)) or scale < 1:
    raise DataError(f"{name}: scale factor N must be a positive integer, got {scale!r}")
  h, w = fine_shape
  if h % scale == 0 and w % scale == 0:
    return h, w
  if not crop:
    raise DataError(
        f"{name}: fine grid {h}x{w} is not divisible by N={scale}. Choose another N, or set "
        f"--config.data.crop=fit to crop the last {h % scale} row(s) and {w % scale} column(s).")
  hc, wc = (h // scale) * scale, (w // scale) * scale
  if hc == 0 or wc == 0:
    raise DataError(f"{name}: fine grid {h}x{w} is smaller than N={scale}")
  return hc, wc


def coarsen(fine: np.ndarray, scale: int, aggregation: str) -> np.ndarray:
  """Pools (..., H, W, C) fine maps to (..., H/N, W/N, C) coarse maps.

  Args:
    fine: (..., H, W, C) array; H and W must be multiples of `scale`.
    scale: N.
    aggregation: "sum" or "mean".
  """
  if aggregation not in AGGREGATIONS:
    raise DataError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
  *lead, h, w, c = fine.shape
  if h % scale or w % scale:
    raise DataError(f"fine grid {h}x{w} is not divisible by N={scale}")
  blocks = fine.reshape(*lead, h // scale, scale, w // scale, scale, c)
  pooled = blocks.sum(axis=(-4, -2))
  if aggregation == "mean":
    pooled = pooled / (scale * scale)
  return pooled


def upsample_uniform(coarse: np.ndarray, scale: int, aggregation: str) -> np.ndarray:
  """The inverse of `coarsen` that spreads each coarse value evenly over its N x N fine cells.

  (..., I, J, C) -> (..., N*I, N*J, C). For "sum" every fine cell gets value / N^2, so pooling the
  result gives back `coarse` exactly; for "mean" every fine cell gets the value itself.
  """
  up = np.repeat(np.repeat(coarse, scale, axis=-3), scale, axis=-2)
  if aggregation == "sum":
    up = up / (scale * scale)
  return up


def block_mean_zero(residual, scale: int):
  """Removes the mean of every N x N block: (B, NI, NJ, C) -> same shape (numpy or jax arrays).

  Every block then sums to 0, so added to a fine map that pools (sum or mean) to a coarse map,
  the result pools to the same coarse map: Diffusion-F's residual over its base
  (`model.sample_fine`) and the noFG network's correction of it (`supervised.OnBase`).
  """
  b, h, w, c = residual.shape
  blocks = residual.reshape(b, h // scale, scale, w // scale, scale, c)
  return (blocks - blocks.mean(axis=(2, 4), keepdims=True)).reshape(b, h, w, c)
