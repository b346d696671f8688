"""Stack per-ST-point encodings onto the U-Net's downsampled grid (paper eqs. 24-25).

The inter-map encoders (ST-PointFormer, T-PatternNet) produce one vector per spatiotemporal
point, shape (B, t, I, J, D). The U-Net bottleneck is a coarser map (B, Id, Jd, C) in which each
cell summarises a subregion of (I / Id) x (J / Jd) points. `stack_to_grid` concatenates, for every
bottleneck cell, the encodings of all ST-points (all t slices) that lie in its subregion, so the
two feature maps can be concatenated channel-wise (eq. 13: S_intra (+) S_inter).

Worked example (B = 1, t = 1, D = 1, I = J = 4, down_shape = (2, 2) -> bi = bj = 2):

    x[0, 0, :, :, 0] = [[ 0,  1,  2,  3],
                        [ 4,  5,  6,  7],
                        [ 8,  9, 10, 11],
                        [12, 13, 14, 15]]
    y = stack_to_grid(x, (2, 2))             # (1, 2, 2, 4)
    y[0, 0, 0] = [0, 1, 4, 5]                # top-left 2x2 block, row-major
    y[0, 0, 1] = [2, 3, 6, 7]
    y[0, 1, 0] = [8, 9, 12, 13]
    y[0, 1, 1] = [10, 11, 14, 15]

Channel order of one output cell: (s, u, v, d) flattened row-major, i.e.
    y[b, p, q, ((s * bi + u) * bj + v) * D + d] = x[b, s, p * bi + u, q * bj + v, d]
for slice s < t, in-block row u < bi, in-block column v < bj.

Non-divisible grids are padded with zeros at the bottom/right (I = 5, Id = 2 -> bi = 3, the grid is
padded to 6 rows; the last cell holds rows 3, 4 and one zero row). If the point grid is coarser
than the bottleneck (I < Id, e.g. Diffusion-F whose U-Net runs on the fine grid), the point grid
is first upsampled by nearest neighbour to exactly Id rows (bi = 1): output row r takes source row
floor(r * I / Id). When Id is a multiple of I this is repeating every row Id / I times; otherwise
it still keeps every source row (a plain repeat-by-ceil(Id / I)-then-crop would drop the last rows,
e.g. I = 5, Id = 8). Columns are handled the same way, independently.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax.numpy as jnp
import numpy as np


def _block_size(n: int, n_down: int) -> int:
  """Points per bottleneck cell along one axis: ceil(n / n_down), at least 1."""
  return max(1, math.ceil(n / n_down))


def _check_down_shape(down_shape: Sequence[int]) -> tuple[int, int]:
  if len(down_shape) != 2:
    raise ValueError(f"down_shape must be (Id, Jd), got {down_shape!r}")
  i_down, j_down = (int(d) for d in down_shape)
  if i_down < 1 or j_down < 1:
    raise ValueError(f"down_shape must be positive, got {down_shape!r}")
  return i_down, j_down


def stacked_channels(t: int, i: int, j: int, d: int, down_shape: Sequence[int]) -> int:
  """Last dim of `stack_to_grid` output: t * ceil(I / Id) * ceil(J / Jd) * D (bi, bj >= 1)."""
  i_down, j_down = _check_down_shape(down_shape)
  return t * _block_size(i, i_down) * _block_size(j, j_down) * d


def _fit_axis(x: jnp.ndarray, axis: int, n_down: int) -> jnp.ndarray:
  """Resizes `axis` of x so its length is a multiple of n_down with ceil(n / n_down) per cell.

  n >= n_down: zero-pad to ceil(n / n_down) * n_down. n < n_down: nearest-neighbour upsample
  to exactly n_down (static gather indices, so jit-compatible).
  """
  n = x.shape[axis]
  if n < n_down:
    idx = (np.arange(n_down) * n) // n_down  # floor(r * n / n_down): every source row kept
    return jnp.take(x, jnp.asarray(idx), axis=axis)
  target = _block_size(n, n_down) * n_down
  if target == n:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, target - n)
  return jnp.pad(x, pad)


def stack_to_grid(x: jnp.ndarray, down_shape: Sequence[int]) -> jnp.ndarray:
  """Stack (eq. 25): per-ST-point encodings -> features on the downsampled grid.

  Args:
    x: (B, t, I, J, D) encodings of every ST-point.
    down_shape: (Id, Jd) static python ints, the U-Net bottleneck grid.

  Returns:
    (B, Id, Jd, t * bi * bj * D) with bi = ceil(I / Id), bj = ceil(J / Jd) (1 when I < Id / J < Jd);
    see the module docstring for the channel order, padding and upsampling.
  """
  if x.ndim != 5:
    raise ValueError(f"stack_to_grid expects x of shape (B, t, I, J, D), got shape {x.shape}")
  i_down, j_down = _check_down_shape(down_shape)
  b, t, _, _, d = x.shape
  x = _fit_axis(x, 2, i_down)
  x = _fit_axis(x, 3, j_down)
  bi, bj = x.shape[2] // i_down, x.shape[3] // j_down
  x = x.reshape(b, t, i_down, bi, j_down, bj, d)
  x = x.transpose(0, 2, 4, 1, 3, 5, 6)  # (B, Id, Jd, t, bi, bj, D)
  return x.reshape(b, i_down, j_down, t * bi * bj * d)
