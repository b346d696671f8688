"""Conditional U-Net noise predictor with a fusion point for inter-map features (eqs. 8-13).

The encoder extracts intra-map features S_intra from the current map (eq. 11); at the bottleneck
they are fused with the stacked inter-map features S_inter of a sequence encoder (eq. 12) by
channel concatenation and a 1x1 conv + ResBlock (the "⊕" of eq. 13); the decoder predicts the
noise. The diffusion step and the external features of the current slice enter every ResBlock
through a shared embedding (as a scale and shift after a GroupNorm).

Grids need not be powers of two: the input is edge-padded (replicating border cells, so the
padded ring looks like nearby data rather than an artificial zero field) on the bottom/right to a
multiple of 2**(num_levels - 1) and the output is cropped back. `bottleneck_shape` gives the
bottleneck grid so callers can build S_inter on it before calling the U-Net.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def bottleneck_shape(h: int, w: int, num_levels: int) -> tuple[int, int]:
  """(Hd, Wd) of the U-Net bottleneck for an (h, w) grid: ceil(h / 2**(L-1)), ceil(w / 2**(L-1))."""
  if num_levels < 1:
    raise ValueError(f"bottleneck_shape: num_levels must be >= 1, got {num_levels}")
  f = 2 ** (num_levels - 1)
  return (-(-int(h) // f), -(-int(w) // f))


def group_count(channels: int, max_groups: int) -> int:
  """Largest number of GroupNorm groups <= max_groups that divides `channels`."""
  for g in range(min(max_groups, channels), 0, -1):
    if channels % g == 0:
      return g
  return 1


def timestep_embedding(tau: Array, dim: int, max_period: float = 10000.0) -> Array:
  """Sinusoidal embedding of diffusion steps: tau (B,) -> (B, dim) float32."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / max(half, 1))
  args = jnp.asarray(tau, jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class GroupNorm(nn.Module):
  """Group normalisation of (B, ..., C) over all middle axes and the channels of each group.

  The same function and parameters as `flax.linen.GroupNorm` (`scale`, `bias` (C,), epsilon
  1e-6, variance E[x^2] - E[x]^2, as flax's default `use_fast_variance`), so checkpoints and the
  PyTorch twin are unchanged, but laid out for XLA:CPU: per-channel sums over the contiguous
  (B, H*W, C) view first, then over the channels of a group on a tiny (B, G, C/G) array, and
  normalisation, affine and an optional FiLM scale/shift folded into one per-(B, C) multiply-add.
  flax reduces the (B, H, W, G, C/G) view over non-adjacent axes, which XLA:CPU runs slowly:
  measured GroupNorm + SiLU at (256, 16, 12, 16) 3.6 ms with flax vs 0.7 ms here
  (benchmarks/README.md).
  """
  num_groups: int
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: Array, film_scale: Optional[Array] = None,
               film_shift: Optional[Array] = None) -> Array:
    """x (B, ..., C); film_scale, film_shift (B, C) or None: returns
    GN(x) * (1 + film_scale) + film_shift, (B, ..., C)."""
    b, c = x.shape[0], x.shape[-1]
    g = self.num_groups
    if c % g:
      raise ValueError(f"GroupNorm: {g} groups do not divide {c} channels")
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    xf = x.reshape(b, -1, c).astype(jnp.float32)
    count = xf.shape[1] * (c // g)
    mean = jnp.sum(xf, axis=1).reshape(b, g, -1).sum(axis=-1) / count          # (B, G)
    mean_sq = jnp.sum(xf * xf, axis=1).reshape(b, g, -1).sum(axis=-1) / count
    inv = jax.lax.rsqrt(jnp.maximum(mean_sq - mean * mean, 0.0) + self.epsilon)
    mul = jnp.repeat(inv, c // g, axis=1) * scale                               # (B, C)
    add = bias - jnp.repeat(mean, c // g, axis=1) * mul
    if film_scale is not None:
      mul, add = mul * (1.0 + film_scale), add * (1.0 + film_scale) + film_shift
    bshape = (b,) + (1,) * (x.ndim - 2) + (c,)
    return (x.astype(jnp.float32) * mul.reshape(bshape) + add.reshape(bshape)).astype(x.dtype)


class ResBlock(nn.Module):
  """GroupNorm-SiLU-Conv x2 conditioned on the (step + external) embedding.

  The embedding enters as a per-channel scale and shift applied after the second GroupNorm
  (FiLM / "scale-shift norm", Dhariwal & Nichol 2021). An embedding *added before* the norm is
  erased by it whenever a group holds a single channel (small widths), leaving the network blind
  to the diffusion step.

  x (B, H, W, Cin), emb (B, E) -> (B, H, W, out_channels).
  """
  out_channels: int
  num_groups: int = 8
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: Array, emb: Array, *, deterministic: bool = True) -> Array:
    h = GroupNorm(num_groups=group_count(x.shape[-1], self.num_groups))(x)
    h = nn.Conv(self.out_channels, (3, 3))(nn.silu(h))
    film = nn.Dense(2 * self.out_channels)(nn.silu(emb))
    scale, shift = jnp.split(film, 2, axis=-1)
    h = GroupNorm(num_groups=group_count(self.out_channels, self.num_groups))(h, scale, shift)
    h = nn.Dropout(self.dropout)(nn.silu(h), deterministic=deterministic)
    h = nn.Conv(self.out_channels, (3, 3))(h)
    if x.shape[-1] != self.out_channels:
      x = nn.Conv(self.out_channels, (1, 1), name="skip")(x)
    return x + h


class UNet(nn.Module):
  """Conditional U-Net predicting the noise eps_hat (eqs. 8-13).

  Attributes:
    out_channels: C of the predicted noise.
    base_channels: channels of the first level; level l has base_channels * channel_mults[l].
    channel_mults: one entry per resolution level; len(channel_mults) - 1 stride-2 downsamplings.
    num_res_blocks: ResBlocks per level in the encoder (decoder uses one more per level).
    emb_dim: width of the step / external embedding.
    dropout: dropout rate inside ResBlocks (needs a 'dropout' rng when not deterministic).
    num_groups: max GroupNorm groups (reduced per layer to a divisor of the channels).
  """
  out_channels: int
  base_channels: int = 32
  channel_mults: Sequence[int] = (1, 2)
  num_res_blocks: int = 1
  emb_dim: int = 64
  dropout: float = 0.0
  num_groups: int = 8

  @property
  def num_levels(self) -> int:
    return len(self.channel_mults)

  @staticmethod
  def bottleneck_shape(h: int, w: int, num_levels: int) -> tuple[int, int]:
    """See module-level `bottleneck_shape`."""
    return bottleneck_shape(h, w, num_levels)

  @nn.compact
  def __call__(self, x: Array, tau: Array, external: Optional[Array] = None,
               inter: Optional[Array] = None, *, deterministic: bool = True) -> Array:
    """Predicts noise.

    Args:
      x: (B, H, W, Cin) noisy map concatenated with conditioning channels.
      tau: (B,) int32 diffusion step.
      external: (B, F) external features of the current slice, or None.
      inter: (B, Hd, Wd, Di) inter-map features on the bottleneck grid
        (`bottleneck_shape(H, W, len(channel_mults))`), or None.
      deterministic: disables dropout.
    Returns:
      (B, H, W, out_channels) float32.
    """
    if x.ndim != 4:
      raise ValueError(f"UNet: x must be (B, H, W, C), got shape {x.shape}")
    b, h, w, _ = x.shape
    if tau.shape != (b,):
      raise ValueError(f"UNet: tau must be (B,)=({b},), got shape {tau.shape}")
    levels = self.num_levels
    hd, wd = bottleneck_shape(h, w, levels)
    f = 2 ** (levels - 1)
    hp, wp = hd * f, wd * f
    if (hp, wp) != (h, w):
      x = jnp.pad(x, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)), mode="edge")

    emb = timestep_embedding(tau, self.emb_dim)
    emb = nn.Dense(self.emb_dim)(nn.silu(nn.Dense(self.emb_dim)(emb)))
    if external is not None:
      if external.ndim != 2 or external.shape[0] != b:
        raise ValueError(f"UNet: external must be (B={b}, F), got shape {external.shape}")
      e = nn.Dense(self.emb_dim)(external.astype(jnp.float32))
      emb = emb + nn.Dense(self.emb_dim)(nn.silu(e))

    block = lambda ch: ResBlock(ch, self.num_groups, self.dropout)
    hcur = nn.Conv(self.base_channels, (3, 3), name="conv_in")(x)
    skips = [hcur]
    for lvl, mult in enumerate(self.channel_mults):  # encoder: S_intra (eqs. 8, 11)
      for _ in range(self.num_res_blocks):
        hcur = block(self.base_channels * mult)(hcur, emb, deterministic=deterministic)
        skips.append(hcur)
      if lvl != levels - 1:
        hcur = nn.Conv(hcur.shape[-1], (3, 3), strides=(2, 2), name=f"down_{lvl}")(hcur)
        skips.append(hcur)

    ch = hcur.shape[-1]
    hcur = block(ch)(hcur, emb, deterministic=deterministic)
    if inter is not None:  # eq. 13: S_intra ⊕ S_inter
      if inter.shape[:3] != (b, hd, wd):
        raise ValueError(f"UNet: inter must be (B, Hd, Wd, Di) = ({b}, {hd}, {wd}, Di) for a "
                         f"{h}x{w} grid with {levels} levels, got shape {inter.shape}")
      hcur = jnp.concatenate([hcur, inter.astype(hcur.dtype)], axis=-1)
      hcur = nn.Conv(ch, (1, 1), name="fuse")(hcur)
    hcur = block(ch)(hcur, emb, deterministic=deterministic)

    for lvl in reversed(range(levels)):  # decoder (eq. 9)
      for _ in range(self.num_res_blocks + 1):
        hcur = jnp.concatenate([hcur, skips.pop()], axis=-1)
        hcur = block(self.base_channels * self.channel_mults[lvl])(
            hcur, emb, deterministic=deterministic)
      if lvl != 0:
        bb, hh, ww, cc = hcur.shape
        # nearest x2 (= jax.image.resize 'nearest'), as a broadcast: no gather on CPU
        hcur = jnp.broadcast_to(hcur[:, :, None, :, None, :], (bb, hh, 2, ww, 2, cc)
                                ).reshape(bb, hh * 2, ww * 2, cc)
        hcur = nn.Conv(cc, (3, 3), name=f"up_{lvl}")(hcur)
    assert not skips

    hcur = nn.silu(GroupNorm(num_groups=group_count(hcur.shape[-1], self.num_groups))(hcur))
    out = nn.Conv(self.out_channels, (3, 3), name="conv_out")(hcur)
    return out[:, :h, :w, :]
