"""SRCNN (Dong, Loy, He, Tang: "Learning a Deep Convolutional Network for Image Super-Resolution",
ECCV 2014) as a deterministic baseline network.

As in the paper: the low-resolution map is first upsampled to the fine grid (bicubic), then three
convolutions do patch extraction (9x9, n1 filters, ReLU), non-linear mapping (1x1, n2 filters,
ReLU) and reconstruction (5x5, linear): the 9-1-5 network with n1 = 64, n2 = 32.
Changed or guessed: inputs and outputs are the per-channel z-scored coarse / fine flows (the paper
works on the Y channel of images); convolutions are zero-padded ("SAME") so the fine grid keeps its
size (the paper trains on valid-padded patches); the paper's MSE loss and Adam are those of the
shared loop (`supervised.py`) instead of SGD with per-layer learning rates.
"""
from __future__ import annotations

import flax.linen as nn
import jax


class SRCNN(nn.Module):
  """(B, I, J, C) normalised coarse maps (+ unused external features) -> (B, N*I, N*J, C)
  normalised fine maps."""
  scale: int
  channels: int
  features: tuple = (64, 32)   # n1, n2 (paper: 64, 32)
  kernels: tuple = (9, 1, 5)   # f1, f2, f3 (paper: 9-1-5)

  @nn.compact
  def __call__(self, x: jax.Array, external: jax.Array = None) -> jax.Array:
    del external  # SRCNN sees the map alone.
    b, i, j, c = x.shape
    h = jax.image.resize(x, (b, i * self.scale, j * self.scale, c), method="cubic")
    k1, k2, k3 = self.kernels
    h = nn.relu(nn.Conv(self.features[0], (k1, k1))(h))
    h = nn.relu(nn.Conv(self.features[1], (k2, k2))(h))
    return nn.Conv(self.channels, (k3, k3))(h)
