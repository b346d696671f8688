"""T-PatternNet: FFT periods + 2-D inception over folded series (paper Sec. IV-D, TimesNet-style).

The inter-map encoder of Diffusion-F. The completed coarse history (B, t, I, J, C) is read as one
series of length t with I * J * C channels, embedded (eq. 26), and passed through TimesBlocks:
  eq. 27   A = mean over channels of |FFT(X_1D)|, frequencies f = 1 .. t // 2;
  eq. 28   the top-k frequencies by amplitude;
  eq. 29   periods p = ceil(t / f);
  eq. 30   zero-pad to a multiple of p and fold to 2-D (ceil(t / p) rows x p columns, as TimesNet);
  eq. 31   Inception (multi-scale 2-D convs) -> GELU -> Inception;
  eq. 32   unfold and truncate to t;
  eqs. 33-34 sum the branches weighted by softmax of their amplitudes; plus a residual.
Finally every time step is projected back to one vector per spatial cell, (B, t, I, J, out), and the
caller stacks that onto the U-Net grid with `grid_stack.stack_to_grid`.

Static shapes for a data-dependent choice. The candidate periods depend only on t, so they are
static python ints. Which k of them are used depends on the data, so instead of picking periods on
the host (a recompile per new set), every candidate branch is computed and weighted: the softmax
over the top-k amplitudes for selected frequencies, exactly 0 for the others. This compiles once
and equals the dynamic choice. Frequencies whose periods coincide (t = 12: f = 4, 5 -> p = 3) share
one branch, with their weights summed (TimesNet would compute that branch twice, same result).
Cost: one branch per distinct period (t = 12: 5 branches for periods 12, 6, 4, 3, 2), so this suits
the short histories DiffRecon uses; for long t the branch count grows like 2 * sqrt(t).

Top-k is chosen per sample (TimesNet picks the frequencies from the batch-averaged amplitudes):
samples in one batch come from different times of day/week and can have different dominant
periods; per-sample choice also makes a sample's output independent of its batch mates.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=None)
def candidate_periods(t: int) -> tuple[int, ...]:
  """Periods ceil(t / f) of the candidate frequencies f = 1 .. t // 2 (eq. 29); static."""
  if t < 2:
    raise ValueError(f"T-PatternNet needs a history of at least 2 slices to look for periods, "
                     f"got t={t}")
  return tuple(math.ceil(t / f) for f in range(1, t // 2 + 1))


@functools.lru_cache(maxsize=None)
def period_groups(t: int) -> tuple[tuple[int, ...], np.ndarray]:
  """Distinct candidate periods (descending) and a (nf, n_periods) 0/1 matrix freq -> period."""
  per_freq = candidate_periods(t)
  unique = tuple(sorted(set(per_freq), reverse=True))
  onehot = np.zeros((len(per_freq), len(unique)), np.float32)
  for f_idx, p in enumerate(per_freq):
    onehot[f_idx, unique.index(p)] = 1.0
  return unique, onehot


def _amplitudes(x: jnp.ndarray) -> jnp.ndarray:
  """eq. 27: (B, t, d) -> (B, t // 2) channel-averaged FFT amplitude at f = 1 .. t // 2."""
  if x.ndim != 3:
    raise ValueError(f"expected a series of shape (B, t, d), got shape {x.shape}")
  t = x.shape[1]
  candidate_periods(t)  # validates t
  amp = jnp.abs(jnp.fft.rfft(x, axis=1)).mean(axis=-1)  # (B, t // 2 + 1)
  return amp[:, 1:t // 2 + 1]


def fft_period_weights(x: jnp.ndarray, top_k: int
                       ) -> tuple[jnp.ndarray, jnp.ndarray, tuple[int, ...]]:
  """eqs. 27-29, 33 for every candidate frequency at once (jit-friendly).

  Args:
    x: (B, t, d) series.
    top_k: frequencies to keep per sample (clipped to t // 2).

  Returns:
    amps: (B, nf) amplitudes of f = 1 .. nf, nf = t // 2.
    weights: (B, nf) softmax over the top-k amplitudes at the selected frequencies, 0 elsewhere;
      each row sums to 1.
    periods: static tuple of nf python ints, periods[f - 1] = ceil(t / f).
  """
  amps = _amplitudes(x)
  nf = amps.shape[1]
  k = max(1, min(int(top_k), nf))
  top_amp, top_idx = jax.lax.top_k(amps, k)  # eq. 28, per sample
  top_w = jax.nn.softmax(top_amp, axis=-1)  # eq. 33
  weights = jnp.sum(jax.nn.one_hot(top_idx, nf, dtype=top_w.dtype) * top_w[..., None], axis=1)
  return amps, weights, candidate_periods(x.shape[1])


def detect_periods(x: jnp.ndarray, top_k: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Top-k periods of a series (analysis helper).

  Args:
    x: (B, t, d) series (the DC term f = 0 is never a candidate).
    top_k: how many.

  Returns:
    periods: (B, k) int32, ceil(t / f) of the k strongest frequencies, strongest first.
    amplitudes: (B, k) their channel-averaged amplitudes.
  """
  amps = _amplitudes(x)
  k = max(1, min(int(top_k), amps.shape[1]))
  top_amp, top_idx = jax.lax.top_k(amps, k)
  periods = jnp.asarray(candidate_periods(x.shape[1]), jnp.int32)[top_idx]
  return periods, top_amp


class InceptionBlock(nn.Module):
  """TimesNet Inception_Block_V1: mean of `num_kernels` 'SAME' Conv2D, kernels 1, 3, .., 2n - 1.

  (B, H, W, C_in) -> (B, H, W, features).
  """
  features: int
  num_kernels: int = 6

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # kaiming, as TimesNet
    outs = [nn.Conv(self.features, (2 * n + 1, 2 * n + 1), padding="SAME", kernel_init=init,
                    name=f"conv_{2 * n + 1}")(x) for n in range(self.num_kernels)]
    return jnp.mean(jnp.stack(outs, axis=0), axis=0)


class TimesBlock(nn.Module):
  """One TimesBlock (eqs. 27-34) over all candidate periods; (B, t, d_model) -> same.

  The two inception blocks are shared by all periods (as TimesNet).
  """
  d_model: int
  d_ff: int
  top_k: int = 3
  num_kernels: int = 6

  def setup(self):
    self.inception_in = InceptionBlock(self.d_ff, self.num_kernels)
    self.inception_out = InceptionBlock(self.d_model, self.num_kernels)

  def branch(self, x: jnp.ndarray, period: int) -> jnp.ndarray:
    """eqs. 30-32 for one static period: pad, fold, inception, unfold, truncate; (B, t, d)."""
    b, t, d = x.shape
    rows = -(-t // period)
    x2 = jnp.pad(x, ((0, 0), (0, rows * period - t), (0, 0))).reshape(b, rows, period, d)
    y2 = self.inception_out(nn.gelu(self.inception_in(x2), approximate=False))
    return y2.reshape(b, rows * period, d)[:, :t]

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """x: (B, t, d_model) -> (B, t, d_model): weighted sum of period branches + x (eq. 34)."""
    if x.ndim != 3 or x.shape[-1] != self.d_model:
      raise ValueError(f"TimesBlock expects (B, t, d_model={self.d_model}), got {x.shape}")
    _, freq_w, _ = fft_period_weights(x, self.top_k)
    periods, onehot = period_groups(x.shape[1])
    period_w = freq_w @ jnp.asarray(onehot, freq_w.dtype)  # (B, n_periods), dedupe
    out = jnp.zeros_like(x)
    for idx, period in enumerate(periods):
      out = out + period_w[:, idx, None, None] * self.branch(x, period)
    return out + x


class _Embedding(nn.Module):
  """eq. 26: Dense(I*J*C -> d_model) + learnable temporal table (t, d_model) + Dense(external)."""
  d_model: int

  @nn.compact
  def __call__(self, series: jnp.ndarray, external: jnp.ndarray | None) -> jnp.ndarray:
    b, t = series.shape[:2]
    x = nn.Dense(self.d_model, name="value_embed")(series.reshape(b, t, -1))
    if self.has_variable("params", "pos_time"):
      found = self.get_variable("params", "pos_time").shape
      if found != (t, self.d_model):
        raise ValueError(f"T-PatternNet was initialised for a history of {found[0]} slices, "
                         f"got t={t}; re-initialise for this history length")
    pos = self.param("pos_time", nn.initializers.normal(0.02), (t, self.d_model))
    x = x + pos[None]
    if external is not None:
      if external.ndim != 3 or external.shape[:2] != (b, t):
        raise ValueError(f"T-PatternNet: external must be (B={b}, t={t}, F), got {external.shape}")
      x = x + nn.Dense(self.d_model, name="external_embed")(external)
    return x


class _Head(nn.Module):
  """Per time step Dense d_model -> I*J*out_channels, reshaped to (B, t, I, J, out_channels)."""
  out_channels: int

  @nn.compact
  def __call__(self, x: jnp.ndarray, grid: tuple[int, int]) -> jnp.ndarray:
    b, t, _ = x.shape
    y = nn.Dense(grid[0] * grid[1] * self.out_channels, name="project")(x)
    return y.reshape(b, t, grid[0], grid[1], self.out_channels)


class TPatternNet(nn.Module):
  """Inter-map encoder of Diffusion-F: completed coarse history -> per-point temporal features.

  Parameters fix t (temporal table) and I * J * C (embedding, head) at init.

  Attributes:
    d_model: width of the embedded series.
    d_ff: width inside the inception blocks.
    top_k: frequencies used per sample per block (eq. 28).
    num_blocks: stacked TimesBlocks, each followed by a LayerNorm (as TimesNet; one LayerNorm per
      block rather than TimesNet's single shared one).
    num_kernels: kernels per inception block.
    out_channels: features per spatial cell and time step in the output.
  """
  d_model: int = 32
  d_ff: int = 32
  top_k: int = 3
  num_blocks: int = 2
  num_kernels: int = 6
  out_channels: int = 4

  def setup(self):
    self.embed = _Embedding(self.d_model)
    self.blocks = [TimesBlock(self.d_model, self.d_ff, self.top_k, self.num_kernels)
                   for _ in range(self.num_blocks)]
    self.norms = [nn.LayerNorm() for _ in range(self.num_blocks)]
    self.head = _Head(self.out_channels)

  def __call__(self, series: jnp.ndarray, external: jnp.ndarray | None = None) -> jnp.ndarray:
    """Encodes the history.

    Args:
      series: (B, t, I, J, C) completed coarse history (normalised, no missing values), t >= 2.
      external: optional (B, t, F) per-slice external features (pass it at init too if used).

    Returns:
      (B, t, I, J, out_channels).
    """
    if series.ndim != 5:
      raise ValueError(f"TPatternNet: series must be (B, t, I, J, C), got shape {series.shape}")
    x = self.embed(series, external)
    for block, norm in zip(self.blocks, self.norms):
      x = norm(block(x))
    return self.head(x, series.shape[2:4])
