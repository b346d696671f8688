"""The two noise predictors of DiffRecon: Diffusion-C (stage 1) and Diffusion-F (stage 2).

Both follow eq. 13: a U-Net encodes the current map (S_intra), a sequence encoder encodes the
window (S_inter), the per-point encodings are stacked onto the U-Net bottleneck grid
(eqs. 24-25, `grid_stack.stack_to_grid`), reduced by a Dense to `inter_dim` channels, and fused
at the bottleneck. Call convention (as `diffusion.EpsFn` after closing over params and cond):
`model.apply(params, x_tau, tau, cond) -> eps_hat`.

The sequence encoders read only the conditioning, never x_tau or tau, so S_inter is the same at
every reverse step and for every sample of one input. Samplers compute it once per input with
`model.apply(params, None, None, cond, inter_only=True)` and pass it back as `inter=` at each step
(`method.py`): on the CPU config this removes the ST-PointFormer from the DDIM loop.

All shapes (t, I, J, C, N) are read from the inputs, so one class serves every dataset; a set of
parameters is tied to the shapes it was initialised with (the sequence encoders' position tables
fix t, I, J).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffrecon_jax.diffrecon import grid_stack
from diffrecon_jax.diffrecon.st_pointformer import STPointFormer
from diffrecon_jax.diffrecon.t_patternnet import TPatternNet
from diffrecon_jax.models.unet import UNet, bottleneck_shape

Array = jax.Array


def _require(cond: Mapping[str, Any], key: str, who: str) -> Array:
  if key not in cond or cond[key] is None:
    raise ValueError(f"{who}: cond is missing {key!r} (got keys {sorted(cond)})")
  return cond[key]


def _external(cond: Mapping[str, Any], b: int, t: int, who: str) -> Optional[Array]:
  """cond['external'] (B, t, F) or None; F == 0 is treated as None."""
  ext = cond.get("external")
  if ext is None:
    return None
  if ext.ndim != 3 or ext.shape[:2] != (b, t):
    raise ValueError(f"{who}: cond['external'] must be (B={b}, t={t}, F), got {ext.shape}")
  return None if ext.shape[-1] == 0 else ext


def _unet(denoiser: nn.Module, out_channels: int) -> UNet:
  """The denoiser's U-Net, from the U-Net fields both denoisers share. Call inside the
  denoiser's compact `__call__` so the submodule keeps its name (UNet_0)."""
  return UNet(out_channels=out_channels, base_channels=denoiser.base_channels,
              channel_mults=tuple(denoiser.channel_mults),
              num_res_blocks=denoiser.num_res_blocks, emb_dim=denoiser.emb_dim,
              dropout=denoiser.dropout, num_groups=denoiser.num_groups)


def _extra_inputs(denoiser: nn.Module, cond: Mapping[str, Any], b: int, h: int, w: int,
                  c: int, who: str) -> list:
  """Input channels beside x_tau that the U-Net sees at every cell (ours; `diffrecon` docstring):
  cond['prior'] (B, H, W, C), the first guess the stage's target is a residual over, when given;
  a learned per-cell location embedding (H, W, location_dim) when location_dim > 0 (a U-Net is
  translation-equivariant, but how a block's total splits over its cells is specific to each
  place: a river cell stays empty)."""
  extra = []
  prior = cond.get("prior")
  if prior is not None:
    if prior.shape != (b, h, w, c):
      raise ValueError(f"{who}: cond['prior'] must be (B, H, W, C) = {(b, h, w, c)}, "
                       f"got {prior.shape}")
    extra.append(prior.astype(jnp.float32))
  if denoiser.location_dim > 0:
    loc = denoiser.param("location", nn.initializers.normal(0.1), (h, w, denoiser.location_dim))
    extra.append(jnp.broadcast_to(loc[None], (b, h, w, denoiser.location_dim)))
  return extra


def _check_inter(inter: Optional[Array], denoiser: nn.Module, lead: tuple, who: str
                 ) -> Optional[Array]:
  """A precomputed S_inter must have the (B, Hd, Wd, inter_dim) shape the encoder would give;
  it is ignored (None) when the denoiser has no inter branch."""
  if not denoiser.use_inter:
    return None
  want = tuple(lead) + (denoiser.inter_dim,)
  if inter.shape != want:
    raise ValueError(f"{who}: inter must be (B, Hd, Wd, inter_dim) = {want} (from an "
                     f"inter_only call on the same cond), got {inter.shape}")
  return inter


class DiffusionCNet(nn.Module):
  """Diffusion-C noise predictor (coarse completion): U-Net + ST-PointFormer.

  Attributes:
    base_channels, channel_mults, num_res_blocks, emb_dim, dropout, num_groups: U-Net.
    d_model, num_heads, num_layers, ff_dim, attention_impl: ST-PointFormer.
    inter_dim: channels of S_inter after the Dense that reduces the stacked encodings.
    use_inter: False drops the ST-PointFormer branch (ablation: U-Net on the current map only).
    location_dim: channels of the learned per-cell location embedding (0 = none).
  """
  base_channels: int = 32
  channel_mults: Sequence[int] = (1, 2)
  num_res_blocks: int = 1
  emb_dim: int = 64
  dropout: float = 0.0
  num_groups: int = 8
  d_model: int = 64
  num_heads: int = 8
  num_layers: int = 2
  ff_dim: int = 128
  attention_impl: Optional[str] = None
  inter_dim: int = 64
  use_inter: bool = True
  location_dim: int = 0

  @nn.compact
  def __call__(self, x_tau: Optional[Array], tau: Optional[Array], cond: Mapping[str, Any], *,
               deterministic: bool = True, inter: Optional[Array] = None,
               inter_only: bool = False) -> Optional[Array]:
    """Predicts the noise of the current coarse map.

    Args:
      x_tau: (B, I, J, C) noisy current coarse map (unused, may be None, when inter_only).
      tau: (B,) int32 diffusion step (unused when inter_only).
      cond: 'obs' (B, t, I, J, C) masked normalised coarse window, current slice LAST, missing
        entries 0; 'mask' (B, t, I, J) float, 1 = observed; 'external' (B, t, F) or None;
        optional 'prior' (B, I, J, C) first guess of the current map and 'anomaly'
        (B, t, I, J, C) the observed deviations from it (joined to the values the
        ST-PointFormer reads, and the current slice's to the U-Net input).
      deterministic: disables dropout.
      inter: S_inter (B, Hd, Wd, inter_dim) from an `inter_only` call on the same cond; the
        ST-PointFormer is then skipped (same output, see module docstring).
      inter_only: return S_inter (eqs. 14-25 and the reducing Dense), or None when use_inter is
        False, without running the U-Net.
    Returns:
      eps_hat (B, I, J, C) float32, or S_inter when inter_only.
    """
    who = "DiffusionCNet"
    obs = _require(cond, "obs", who)
    mask = _require(cond, "mask", who)
    if obs.ndim != 5:
      raise ValueError(f"{who}: cond['obs'] must be (B, t, I, J, C), got {obs.shape}")
    b, t, i, j, c = obs.shape
    if mask.shape != (b, t, i, j):
      raise ValueError(f"{who}: cond['mask'] must be (B, t, I, J) = {(b, t, i, j)}, "
                       f"got {mask.shape}")
    external = _external(cond, b, t, who)
    mask = mask.astype(jnp.float32)
    down = bottleneck_shape(i, j, len(self.channel_mults))

    anomaly = cond.get("anomaly")
    if anomaly is not None and anomaly.shape != obs.shape:
      raise ValueError(f"{who}: cond['anomaly'] must be (B, t, I, J, C) = {obs.shape}, "
                       f"got {anomaly.shape}")
    if inter is None and self.use_inter:  # eqs. 12, 14-25
      values = obs if anomaly is None else jnp.concatenate([obs, anomaly], axis=-1)
      enc = STPointFormer(d_model=self.d_model, num_heads=self.num_heads,
                          num_layers=self.num_layers, ff_dim=self.ff_dim, dropout=self.dropout,
                          attention_impl=self.attention_impl)(
                              values, mask, external, deterministic=deterministic)
      inter = nn.Dense(self.inter_dim, name="inter_proj")(grid_stack.stack_to_grid(enc, down))
    if inter_only:
      return inter
    inter = _check_inter(inter, self, (b,) + down, who)
    if x_tau is None or x_tau.shape != (b, i, j, c):
      raise ValueError(f"{who}: x_tau must be (B, I, J, C) = {(b, i, j, c)} to match "
                       f"cond['obs'] {obs.shape}, got "
                       f"{None if x_tau is None else x_tau.shape}")
    unet = _unet(self, c)
    extra = _extra_inputs(self, cond, b, i, j, c, who)
    if anomaly is not None:
      extra.append(anomaly[:, -1])
    x_in = jnp.concatenate([x_tau, obs[:, -1], mask[:, -1, ..., None]] + extra, axis=-1)
    ext_now = None if external is None else external[:, -1]
    return unet(x_in, tau, ext_now, inter, deterministic=deterministic)


class DiffusionFNet(nn.Module):
  """Diffusion-F noise predictor (fine inference): U-Net + T-PatternNet.

  Attributes:
    scale: N, the fine/coarse upscaling factor (fine grid = (N*I, N*J)).
    base_channels, channel_mults, num_res_blocks, emb_dim, dropout, num_groups: U-Net.
    d_model, d_ff, top_k, num_blocks, num_kernels, encoder_channels: T-PatternNet
      (encoder_channels is its per-point output width).
    inter_dim: channels of S_inter after the Dense that reduces the stacked encodings.
    use_inter: False drops the T-PatternNet branch (ablation).
    location_dim: channels of the learned per-cell location embedding (0 = none).
  """
  scale: int
  base_channels: int = 32
  channel_mults: Sequence[int] = (1, 2)
  num_res_blocks: int = 1
  emb_dim: int = 64
  dropout: float = 0.0
  num_groups: int = 8
  d_model: int = 32
  d_ff: int = 32
  top_k: int = 3
  num_blocks: int = 2
  num_kernels: int = 6
  encoder_channels: int = 4
  inter_dim: int = 64
  use_inter: bool = True
  location_dim: int = 0

  @nn.compact
  def __call__(self, x_tau: Optional[Array], tau: Optional[Array], cond: Mapping[str, Any], *,
               deterministic: bool = True, inter: Optional[Array] = None,
               inter_only: bool = False) -> Optional[Array]:
    """Predicts the noise of the current fine map.

    Args:
      x_tau: (B, N*I, N*J, C) noisy current fine map (unused, may be None, when inter_only).
      tau: (B,) int32 diffusion step (unused when inter_only).
      cond: 'coarse' (B, t, I, J, C) completed normalised coarse window, current slice LAST
        (t >= 2 when use_inter); 'external' (B, t, F) or None; optional 'prior'
        (B, N*I, N*J, C) the base the target is a residual over.
      deterministic: disables dropout.
      inter: S_inter (B, Hd, Wd, inter_dim) from an `inter_only` call on the same cond; the
        T-PatternNet is then skipped (same output, see module docstring).
      inter_only: return S_inter (eqs. 26-34, stacking and the reducing Dense), or None when
        use_inter is False, without running the U-Net.
    Returns:
      eps_hat (B, N*I, N*J, C) float32, or S_inter when inter_only.
    """
    who = "DiffusionFNet"
    coarse = _require(cond, "coarse", who)
    if coarse.ndim != 5:
      raise ValueError(f"{who}: cond['coarse'] must be (B, t, I, J, C), got {coarse.shape}")
    n = int(self.scale)
    if n < 1:
      raise ValueError(f"{who}: scale must be a positive integer, got {self.scale}")
    b, t, i, j, c = coarse.shape
    external = _external(cond, b, t, who)
    down = bottleneck_shape(n * i, n * j, len(self.channel_mults))

    if inter is None and self.use_inter:  # eqs. 12, 26-34, then stacking as eq. 25
      enc = TPatternNet(d_model=self.d_model, d_ff=self.d_ff, top_k=self.top_k,
                        num_blocks=self.num_blocks, num_kernels=self.num_kernels,
                        out_channels=self.encoder_channels)(coarse, external)
      inter = nn.Dense(self.inter_dim, name="inter_proj")(grid_stack.stack_to_grid(enc, down))
    if inter_only:
      return inter
    inter = _check_inter(inter, self, (b,) + down, who)
    if x_tau is None or x_tau.shape != (b, n * i, n * j, c):
      raise ValueError(f"{who}: x_tau must be (B, N*I, N*J, C) = {(b, n * i, n * j, c)} for "
                       f"scale N={n} and cond['coarse'] {coarse.shape}, got "
                       f"{None if x_tau is None else x_tau.shape}")
    unet = _unet(self, c)
    # Nearest upsampling: each fine cell sees its parent coarse value.
    up = jnp.repeat(jnp.repeat(coarse[:, -1], n, axis=1), n, axis=2)
    x_in = jnp.concatenate([x_tau, up.astype(x_tau.dtype)]
                           + _extra_inputs(self, cond, b, n * i, n * j, c, who), axis=-1)
    ext_now = None if external is None else external[:, -1]
    return unet(x_in, tau, ext_now, inter, deterministic=deterministic)
