"""UrbanFM (Liang, Ouyang, Jiang, Zhang et al.: "UrbanFM: Inferring Fine-Grained Urban Flows",
KDD 2019) as a deterministic baseline network.

As in the paper: feature extraction (9x9 convolution, M residual blocks, a 3x3 convolution with a
long skip), distributional upsampling (sub-pixel upsampling, a 9x9 convolution to one map per
channel) and the N^2-Normalization: the output is turned into a distribution over each N x N
block and multiplied by the block's coarse value, so every block of the fine map sums (`sum`
aggregation; averages for `mean`) exactly to its coarse cell. External factors (here the view's
calendar features) pass through a small dense subnet whose output is added as one extra channel
on the coarse grid (input) and one on the fine grid (before the output convolution), as the
paper fuses them.
Changed or guessed: widths and depth scaled down for CPU (`features` 32, 4 blocks by default in
configs/default.py; the paper: 128 and 16); batch normalisation left out (as in `srresnet.py`);
one pixel shuffle by N instead of repeated shuffles by 2; the block distribution is a softmax of
the output over the block (the paper: ReLU output divided by its block sum plus epsilon), so the
shares are exact and never all zero; the external subnet is one hidden layer of 64 units (the
paper: embeddings of weather, holiday and time, then two dense layers).
Inputs and outputs are z-scored maps like the other baselines: the module de-normalises the coarse
input with the train split's coarse normaliser, applies the constraint in physical units and
z-scores the result with the fine normaliser.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffrecon_jax.baselines.srresnet import pixel_shuffle


def block_softmax(logits: jax.Array, scale: int) -> jax.Array:
  """(B, N*I, N*J, C) -> the same shape, softmax over each N x N block: every block sums to 1."""
  b, h, w, c = logits.shape
  x = logits.reshape(b, h // scale, scale, w // scale, scale, c)
  x = jax.nn.softmax(x, axis=(2, 4))
  return x.reshape(b, h, w, c)


class _ResBlock(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(self.features, (3, 3))(x))
    return x + nn.Conv(self.features, (3, 3))(h)


class UrbanFM(nn.Module):
  """(B, I, J, C) normalised coarse maps and (B, F) external features -> (B, N*I, N*J, C)
  normalised fine maps whose physical values pool exactly to the physical coarse input.

  coarse_mean / coarse_std / fine_mean / fine_std: (C,) train-split normalisers (tuples).
  """
  scale: int
  channels: int
  coarse_mean: tuple
  coarse_std: tuple
  fine_mean: tuple
  fine_std: tuple
  aggregation: str = "sum"
  features: int = 128    # paper: 128
  num_blocks: int = 16   # paper: 16
  external_hidden: int = 64  # ours (paper: 128 after the embeddings)

  def _external_map(self, external, h, w, name):
    """(B, F) -> (B, h, w, 1) external channel."""
    e = nn.relu(nn.Dense(self.external_hidden, name=f"{name}_hidden")(external))
    return nn.relu(nn.Dense(h * w, name=f"{name}_out")(e)).reshape(-1, h, w, 1)

  def _trunk(self, x: jax.Array, first: jax.Array) -> jax.Array:
    """Feature extraction between the first convolution and the long skip: (B, I, J, features)
    -> the same shape. UrbanFM: M residual blocks; FODE and STCF replace or widen it (`x`, the
    (B, I, J, C) normalised input, is for networks that encode it again)."""
    del x
    h = first
    for _ in range(self.num_blocks):
      h = _ResBlock(self.features)(h)
    return h

  @nn.compact
  def __call__(self, x: jax.Array, external: jax.Array) -> jax.Array:
    if self.aggregation not in ("sum", "mean"):
      raise ValueError(f"aggregation must be 'sum' or 'mean', got {self.aggregation!r}")
    b, i, j, c = x.shape
    n = self.scale
    h = jnp.concatenate([x, self._external_map(external, i, j, "ext_coarse")], -1)
    first = nn.relu(nn.Conv(self.features, (9, 9))(h))
    h = first + nn.Conv(self.features, (3, 3))(self._trunk(x, first))
    # Distributional upsampling.
    h = nn.relu(pixel_shuffle(nn.Conv(self.features * n * n, (3, 3))(h), n))
    h = jnp.concatenate([h, self._external_map(external, i * n, j * n, "ext_fine")], -1)
    share = block_softmax(nn.Conv(self.channels, (9, 9))(h), n)
    # N^2-Normalization: share of the block times the block's coarse value, in physical units.
    coarse = x * jnp.asarray(self.coarse_std) + jnp.asarray(self.coarse_mean)
    up = jnp.repeat(jnp.repeat(coarse, n, axis=1), n, axis=2)
    fine = share * up * (n * n if self.aggregation == "mean" else 1.0)
    return (fine - jnp.asarray(self.fine_mean)) / jnp.asarray(self.fine_std)
