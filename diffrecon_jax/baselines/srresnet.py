"""SRResNet (Ledig et al.: "Photo-Realistic Single Image Super-Resolution Using a Generative
Adversarial Network", CVPR 2017; the generator trained with MSE alone) as a deterministic
baseline network.

As in the paper: a 9x9 convolution with PReLU, B residual blocks (3x3 conv, PReLU, 3x3 conv,
identity skip), a 3x3 convolution with a long skip from the first features, sub-pixel
upsampling (a convolution to N^2 times the features, then a pixel shuffle) with PReLU, and a 9x9
output convolution.
Changed or guessed: widths and depth scaled down for CPU (`features` 32 and 4 blocks by default
in configs/default.py; the paper: 64 and 16); batch normalisation is left out (the small batches
of a 8x6 grid give noisy batch statistics; EDSR, Lim et al. 2017, also drops it); one pixel
shuffle by N instead of repeated shuffles by 2, so any N works; inputs and outputs are the
per-channel z-scored coarse / fine flows.
"""
from __future__ import annotations

import flax.linen as nn
import jax


def pixel_shuffle(x: jax.Array, scale: int) -> jax.Array:
  """Sub-pixel rearrangement (Shi et al. 2016): (B, I, J, C*N*N) -> (B, N*I, N*J, C)."""
  b, i, j, cn = x.shape
  c = cn // (scale * scale)
  x = x.reshape(b, i, j, scale, scale, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, i * scale, j * scale, c)


class ResidualBlock(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x):
    h = nn.PReLU()(nn.Conv(self.features, (3, 3))(x))
    return x + nn.Conv(self.features, (3, 3))(h)


class SRResNet(nn.Module):
  """(B, I, J, C) normalised coarse maps (+ unused external features) -> (B, N*I, N*J, C)
  normalised fine maps."""
  scale: int
  channels: int
  features: int = 64     # paper: 64
  num_blocks: int = 16   # paper: 16

  @nn.compact
  def __call__(self, x: jax.Array, external: jax.Array = None) -> jax.Array:
    del external  # SRResNet sees the map alone.
    first = nn.PReLU()(nn.Conv(self.features, (9, 9))(x))
    h = first
    for _ in range(self.num_blocks):
      h = ResidualBlock(self.features)(h)
    h = first + nn.Conv(self.features, (3, 3))(h)
    h = nn.Conv(self.features * self.scale * self.scale, (3, 3))(h)
    h = nn.PReLU()(pixel_shuffle(h, self.scale))
    return nn.Conv(self.channels, (9, 9))(h)
