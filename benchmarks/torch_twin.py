"""PyTorch eager twins of the flax denoisers, for side-by-side timing (benchmarks only).

Same layers, same order, same parameter names as the flax modules in diffrecon_jax/models
(UNet, STPointFormer, TPatternNet, DiffusionCNet, DiffusionFNet): every torch submodule is
registered under the flax module's name (e.g. `UNet_0.ResBlock_3.Conv_1`), so
`load_flax_params(net, params)` copies a flax parameter tree into the twin leaf by leaf, and
`count_params` must equal the flax count. Inputs and outputs use the flax layouts
((B, H, W, C) maps, (B, t, I, J, C) windows); the convolutions run in torch's native NCHW.

Also here: the training objective (eps-MSE, joint loss through x0_hat), AdamW + global-norm
clipping + EMA step, and the DDPM / DDIM reverse chain with observed-cell imposition, all
written like their JAX counterparts in diffrecon_jax/diffrecon/model.py (losses, samplers),
diffrecon_jax/diffrecon/train.py (step) and diffrecon_jax/models/diffusion.py (reverse chain). The suite that
drives them is benchmarks/torch_side.py.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor
# flax GroupNorm / LayerNorm default epsilon.
_EPS = 1e-6


def group_count(channels: int, max_groups: int) -> int:
  """Largest number of GroupNorm groups <= max_groups dividing `channels` (as unet.group_count)."""
  for g in range(min(max_groups, channels), 0, -1):
    if channels % g == 0:
      return g
  return 1


def bottleneck_shape(h: int, w: int, num_levels: int) -> tuple[int, int]:
  f = 2 ** (num_levels - 1)
  return (-(-int(h) // f), -(-int(w) // f))


def timestep_embedding(tau: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
  """Sinusoidal embedding: tau (B,) -> (B, dim) float32."""
  half = dim // 2
  freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                         device=tau.device) / max(half, 1))
  args = tau.float()[:, None] * freqs[None, :]
  emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
  if dim % 2:
    emb = F.pad(emb, (0, 1))
  return emb


class Conv(nn.Conv2d):
  """flax nn.Conv with 'SAME' padding (stride 1 or 2) on NCHW tensors.

  Stride 2 pads like XLA's SAME (the extra row/column at the bottom/right), not symmetrically.
  """

  def __init__(self, cin: int, cout: int, k: int, stride: int = 1):
    super().__init__(cin, cout, k, stride=stride, padding=(k // 2 if stride == 1 else 0))
    self.k_, self.s_ = k, stride

  def forward(self, x: Tensor) -> Tensor:
    if self.s_ == 1:
      return super().forward(x)
    h, w = x.shape[-2:]
    ph = max((-(-h // self.s_) - 1) * self.s_ + self.k_ - h, 0)
    pw = max((-(-w // self.s_) - 1) * self.s_ + self.k_ - w, 0)
    x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
    return super().forward(x)


class ResBlock(nn.Module):
  """Twin of unet.ResBlock: GN-SiLU-Conv, FiLM(emb), GN, scale-shift, SiLU, Conv, skip."""

  def __init__(self, cin: int, cout: int, emb_dim: int, num_groups: int = 8):
    super().__init__()
    self.GroupNorm_0 = nn.GroupNorm(group_count(cin, num_groups), cin, eps=_EPS)
    self.Conv_0 = Conv(cin, cout, 3)
    self.Dense_0 = nn.Linear(emb_dim, 2 * cout)
    self.GroupNorm_1 = nn.GroupNorm(group_count(cout, num_groups), cout, eps=_EPS)
    self.Conv_1 = Conv(cout, cout, 3)
    self.skip = Conv(cin, cout, 1) if cin != cout else None

  def forward(self, x: Tensor, emb: Tensor) -> Tensor:
    h = self.Conv_0(F.silu(self.GroupNorm_0(x)))
    scale, shift = self.Dense_0(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
    h = self.GroupNorm_1(h) * (1.0 + scale) + shift
    h = self.Conv_1(F.silu(h))
    return (x if self.skip is None else self.skip(x)) + h


class UNet(nn.Module):
  """Twin of unet.UNet; forward takes (B, H, W, Cin) and returns (B, H, W, out_channels)."""

  def __init__(self, in_channels: int, out_channels: int, base_channels: int = 32,
               channel_mults: Sequence[int] = (1, 2), num_res_blocks: int = 1, emb_dim: int = 64,
               num_groups: int = 8, external_dim: int = 0, inter_dim: int = 0):
    super().__init__()
    self.levels, self.emb_dim, self.nrb = len(channel_mults), emb_dim, num_res_blocks
    # flax names the outer Dense of Dense(Dense(x)) first: emb = Dense_0(silu(Dense_1(temb))).
    self.Dense_0 = nn.Linear(emb_dim, emb_dim)
    self.Dense_1 = nn.Linear(emb_dim, emb_dim)
    if external_dim:
      self.Dense_2 = nn.Linear(external_dim, emb_dim)
      self.Dense_3 = nn.Linear(emb_dim, emb_dim)
    self.conv_in = Conv(in_channels, base_channels, 3)
    n = 0
    cur, skips = base_channels, [base_channels]
    self.enc = []
    for lvl, mult in enumerate(channel_mults):
      for _ in range(num_res_blocks):
        self.enc.append(self._block(n, cur, base_channels * mult, num_groups))
        n, cur = n + 1, base_channels * mult
        skips.append(cur)
      if lvl != self.levels - 1:
        self.add_module(f"down_{lvl}", Conv(cur, cur, 3, stride=2))
        self.enc.append(getattr(self, f"down_{lvl}"))
        skips.append(cur)
    self.mid1 = self._block(n, cur, cur, num_groups)
    self.fuse = Conv(cur + inter_dim, cur, 1) if inter_dim else None
    self.mid2 = self._block(n + 1, cur, cur, num_groups)
    n += 2
    self.dec = []
    for lvl in reversed(range(self.levels)):
      for _ in range(num_res_blocks + 1):
        ch = base_channels * channel_mults[lvl]
        self.dec.append(self._block(n, cur + skips.pop(), ch, num_groups))
        n, cur = n + 1, ch
      if lvl != 0:
        self.add_module(f"up_{lvl}", Conv(cur, cur, 3))
        self.dec.append(getattr(self, f"up_{lvl}"))
    self.GroupNorm_0 = nn.GroupNorm(group_count(cur, num_groups), cur, eps=_EPS)
    self.conv_out = Conv(cur, out_channels, 3)

  def _block(self, n: int, cin: int, cout: int, groups: int) -> ResBlock:
    self.add_module(f"ResBlock_{n}", ResBlock(cin, cout, self.emb_dim, groups))
    return getattr(self, f"ResBlock_{n}")

  def forward(self, x: Tensor, tau: Tensor, external: Optional[Tensor] = None,
              inter: Optional[Tensor] = None) -> Tensor:
    """x (B, H, W, Cin), tau (B,), external (B, F), inter (B, Hd, Wd, Di) -> (B, H, W, C)."""
    b, h, w, _ = x.shape
    hd, wd = bottleneck_shape(h, w, self.levels)
    f = 2 ** (self.levels - 1)
    x = x.permute(0, 3, 1, 2)
    if (hd * f, wd * f) != (h, w):
      x = F.pad(x, (0, wd * f - w, 0, hd * f - h), mode="replicate")
    emb = self.Dense_0(F.silu(self.Dense_1(timestep_embedding(tau, self.emb_dim))))
    if external is not None:
      emb = emb + self.Dense_3(F.silu(self.Dense_2(external.float())))
    hcur = self.conv_in(x)
    skips = [hcur]
    for m in self.enc:
      hcur = m(hcur, emb) if isinstance(m, ResBlock) else m(hcur)
      skips.append(hcur)
    hcur = self.mid1(hcur, emb)
    if inter is not None:
      hcur = self.fuse(torch.cat([hcur, inter.permute(0, 3, 1, 2)], dim=1))
    hcur = self.mid2(hcur, emb)
    for m in self.dec:
      if isinstance(m, ResBlock):
        hcur = m(torch.cat([hcur, skips.pop()], dim=1), emb)
      else:  # up: nearest x2 then conv (jax.image.resize 'nearest' at exactly 2x)
        hcur = m(F.interpolate(hcur, scale_factor=2, mode="nearest"))
    out = self.conv_out(F.silu(self.GroupNorm_0(hcur)))
    return out[:, :, :h, :w].permute(0, 2, 3, 1)


class EncoderLayer(nn.Module):
  """Twin of st_pointformer.EncoderLayer (post-LN, FFN residual)."""

  def __init__(self, d_model: int, num_heads: int, ff_dim: int):
    super().__init__()
    self.h = num_heads
    self.query = nn.Linear(d_model, d_model)
    self.key = nn.Linear(d_model, d_model)
    self.value = nn.Linear(d_model, d_model)
    self.out = nn.Linear(d_model, d_model)
    self.ln_attn = nn.LayerNorm(d_model, eps=_EPS)
    self.ff1 = nn.Linear(d_model, ff_dim)
    self.ff2 = nn.Linear(ff_dim, d_model)
    self.ln_ff = nn.LayerNorm(d_model, eps=_EPS)

  def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
    """x (B, L, d); key_mask (B, 1, 1, L) bool, True = may be attended to."""
    b, l, d = x.shape
    split = lambda y: y.view(b, l, self.h, d // self.h).transpose(1, 2)  # (B, h, L, hd)
    a = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)),
                                       split(self.value(x)), attn_mask=key_mask)
    x = self.ln_attn(x + self.out(a.transpose(1, 2).reshape(b, l, d)))
    f = F.relu(self.ff2(F.relu(self.ff1(x))))
    return self.ln_ff(x + f)


class STPointFormer(nn.Module):
  """Twin of st_pointformer.STPointFormer: values (B,t,I,J,C) -> (B,t,I,J,d_model)."""

  def __init__(self, t: int, grid: tuple[int, int], channels: int, external_dim: int,
               d_model: int = 64, num_heads: int = 8, num_layers: int = 2, ff_dim: int = 128,
               seq_multiple: int = 8):
    super().__init__()
    self.d, self.seq_multiple = d_model, seq_multiple
    self.value_embed = nn.Linear(channels, d_model)
    self.missing_token = nn.Parameter(torch.zeros(d_model))
    self.pos_time = nn.Parameter(torch.zeros(t, d_model))
    self.pos_space = nn.Parameter(torch.zeros(*grid, d_model))
    self.external_embed = nn.Linear(external_dim, d_model) if external_dim else None
    self.register_token = nn.Parameter(torch.zeros(d_model))
    for k in range(num_layers):
      self.add_module(f"layer_{k}", EncoderLayer(d_model, num_heads, ff_dim))
    self.num_layers = num_layers

  def forward(self, values: Tensor, mask: Tensor, external: Optional[Tensor]) -> Tensor:
    b, t, i, j, _ = values.shape
    obs = mask > 0.5
    x = self.value_embed(torch.where(obs[..., None], values, torch.zeros((), dtype=values.dtype)))
    x = torch.where(obs[..., None], x, self.missing_token)
    x = x + self.pos_time[None, :, None, None, :] + self.pos_space[None, None]
    if external is not None and self.external_embed is not None:
      x = x + self.external_embed(external)[:, :, None, None, :]
    n = t * i * j
    n_pad = (-(n + 1)) % max(1, self.seq_multiple)
    x = torch.cat([x.reshape(b, n, self.d), self.register_token.expand(b, 1, self.d),
                   x.new_zeros(b, n_pad, self.d)], dim=1)
    key_mask = torch.cat([obs.reshape(b, n), obs.new_ones(b, 1), obs.new_zeros(b, n_pad)],
                         dim=1)[:, None, None, :]
    for k in range(self.num_layers):
      x = getattr(self, f"layer_{k}")(x, key_mask)
    return x[:, :n].reshape(b, t, i, j, self.d)


def candidate_periods(t: int) -> tuple[int, ...]:
  return tuple(math.ceil(t / f) for f in range(1, t // 2 + 1))


class InceptionBlock(nn.Module):
  """Twin of t_patternnet.InceptionBlock: mean of 'SAME' convs with kernels 1, 3, .., 2n-1."""

  def __init__(self, cin: int, cout: int, num_kernels: int = 6):
    super().__init__()
    self.names = [f"conv_{2 * n + 1}" for n in range(num_kernels)]
    for n, name in enumerate(self.names):
      self.add_module(name, Conv(cin, cout, 2 * n + 1))

  def forward(self, x: Tensor) -> Tensor:  # NCHW
    return torch.stack([getattr(self, n)(x) for n in self.names], dim=0).mean(dim=0)


class TimesBlock(nn.Module):
  """Twin of t_patternnet.TimesBlock: every distinct candidate period, FFT-amplitude weights."""

  def __init__(self, t: int, d_model: int, d_ff: int, top_k: int, num_kernels: int):
    super().__init__()
    self.inception_in = InceptionBlock(d_model, d_ff, num_kernels)
    self.inception_out = InceptionBlock(d_ff, d_model, num_kernels)
    per_freq = candidate_periods(t)
    self.periods = tuple(sorted(set(per_freq), reverse=True))
    onehot = np.zeros((len(per_freq), len(self.periods)), np.float32)
    for f_idx, p in enumerate(per_freq):
      onehot[f_idx, self.periods.index(p)] = 1.0
    self.register_buffer("onehot", torch.from_numpy(onehot), persistent=False)
    self.top_k = top_k

  def branch(self, x: Tensor, period: int) -> Tensor:
    b, t, d = x.shape
    rows = -(-t // period)
    x2 = F.pad(x, (0, 0, 0, rows * period - t)).reshape(b, rows, period, d).permute(0, 3, 1, 2)
    y2 = self.inception_out(F.gelu(self.inception_in(x2)))
    return y2.permute(0, 2, 3, 1).reshape(b, rows * period, d)[:, :t]

  def forward(self, x: Tensor) -> Tensor:
    t = x.shape[1]
    amps = torch.fft.rfft(x, dim=1).abs().mean(dim=-1)[:, 1:t // 2 + 1]
    nf = amps.shape[1]
    k = max(1, min(self.top_k, nf))
    top_amp, top_idx = torch.topk(amps, k, dim=-1)
    w = torch.zeros_like(amps).scatter(1, top_idx, torch.softmax(top_amp, dim=-1))
    period_w = w @ self.onehot
    out = torch.zeros_like(x)
    for idx, period in enumerate(self.periods):
      out = out + period_w[:, idx, None, None] * self.branch(x, period)
    return out + x


class _Embedding(nn.Module):
  def __init__(self, t: int, in_features: int, external_dim: int, d_model: int):
    super().__init__()
    self.value_embed = nn.Linear(in_features, d_model)
    self.pos_time = nn.Parameter(torch.zeros(t, d_model))
    self.external_embed = nn.Linear(external_dim, d_model) if external_dim else None

  def forward(self, series: Tensor, external: Optional[Tensor]) -> Tensor:
    b, t = series.shape[:2]
    x = self.value_embed(series.reshape(b, t, -1)) + self.pos_time[None]
    if external is not None and self.external_embed is not None:
      x = x + self.external_embed(external)
    return x


class _Head(nn.Module):
  def __init__(self, d_model: int, grid: tuple[int, int], out_channels: int):
    super().__init__()
    self.grid, self.out_channels = grid, out_channels
    self.project = nn.Linear(d_model, grid[0] * grid[1] * out_channels)

  def forward(self, x: Tensor) -> Tensor:
    b, t, _ = x.shape
    return self.project(x).reshape(b, t, *self.grid, self.out_channels)


class TPatternNet(nn.Module):
  """Twin of t_patternnet.TPatternNet: series (B,t,I,J,C) -> (B,t,I,J,out_channels)."""

  def __init__(self, t: int, grid: tuple[int, int], channels: int, external_dim: int,
               d_model: int = 32, d_ff: int = 32, top_k: int = 3, num_blocks: int = 2,
               num_kernels: int = 6, out_channels: int = 4):
    super().__init__()
    self.embed = _Embedding(t, grid[0] * grid[1] * channels, external_dim, d_model)
    for k in range(num_blocks):
      self.add_module(f"blocks_{k}", TimesBlock(t, d_model, d_ff, top_k, num_kernels))
      self.add_module(f"norms_{k}", nn.LayerNorm(d_model, eps=_EPS))
    self.head = _Head(d_model, grid, out_channels)
    self.num_blocks = num_blocks

  def forward(self, series: Tensor, external: Optional[Tensor] = None) -> Tensor:
    x = self.embed(series, external)
    for k in range(self.num_blocks):
      x = getattr(self, f"norms_{k}")(getattr(self, f"blocks_{k}")(x))
    return self.head(x)


def _fit_axis(x: Tensor, axis: int, n_down: int) -> Tensor:
  n = x.shape[axis]
  if n < n_down:
    idx = torch.as_tensor((np.arange(n_down) * n) // n_down, device=x.device)
    return torch.index_select(x, axis, idx)
  target = -(-n // n_down) * n_down
  if target == n:
    return x
  pad = [0, 0] * (x.ndim - 1 - axis) + [0, target - n]
  return F.pad(x, pad)


def stack_to_grid(x: Tensor, down_shape: tuple[int, int]) -> Tensor:
  """Twin of grid_stack.stack_to_grid: (B,t,I,J,D) -> (B,Id,Jd,t*bi*bj*D)."""
  b, t, _, _, d = x.shape
  i_down, j_down = down_shape
  x = _fit_axis(_fit_axis(x, 2, i_down), 3, j_down)
  bi, bj = x.shape[2] // i_down, x.shape[3] // j_down
  x = x.reshape(b, t, i_down, bi, j_down, bj, d).permute(0, 2, 4, 1, 3, 5, 6)
  return x.reshape(b, i_down, j_down, t * bi * bj * d)


def _stacked(t: int, i: int, j: int, d: int, down: tuple[int, int]) -> int:
  return t * max(1, -(-i // down[0])) * max(1, -(-j // down[1])) * d


class DiffusionCNet(nn.Module):
  """Twin of denoisers.DiffusionCNet; forward(x_tau (B,I,J,C), tau (B,), cond) -> (B,I,J,C)."""

  def __init__(self, t: int, grid: tuple[int, int], channels: int, external_dim: int,
               base_channels: int = 32, channel_mults: Sequence[int] = (1, 2),
               num_res_blocks: int = 1, emb_dim: int = 64, num_groups: int = 8, d_model: int = 64,
               num_heads: int = 8, num_layers: int = 2, ff_dim: int = 128, inter_dim: int = 64,
               use_inter: bool = True, **unused: Any):
    super().__init__()
    self.down = bottleneck_shape(*grid, len(channel_mults))
    if use_inter:
      self.STPointFormer_0 = STPointFormer(t, grid, channels, external_dim, d_model, num_heads,
                                           num_layers, ff_dim)
      self.inter_proj = nn.Linear(_stacked(t, *grid, d_model, self.down), inter_dim)
    self.use_inter = use_inter
    self.UNet_0 = UNet(2 * channels + 1, channels, base_channels, channel_mults, num_res_blocks,
                       emb_dim, num_groups, external_dim, inter_dim if use_inter else 0)

  def encode(self, cond: Mapping[str, Tensor]) -> Optional[Tensor]:
    """S_inter (B, Hd, Wd, inter_dim): reads only the conditioning (see denoisers.py)."""
    if not self.use_inter:
      return None
    enc = self.STPointFormer_0(cond["obs"], cond["mask"].float(), cond.get("external"))
    return self.inter_proj(stack_to_grid(enc, self.down))

  def forward(self, x_tau: Tensor, tau: Tensor, cond: Mapping[str, Tensor],
              inter: Optional[Tensor] = None) -> Tensor:
    obs, mask, ext = cond["obs"], cond["mask"].float(), cond.get("external")
    if inter is None:
      inter = self.encode(cond)
    x_in = torch.cat([x_tau, obs[:, -1], mask[:, -1, ..., None]], dim=-1)
    return self.UNet_0(x_in, tau, None if ext is None else ext[:, -1], inter)


class DiffusionFNet(nn.Module):
  """Twin of denoisers.DiffusionFNet; forward(x_tau (B,NI,NJ,C), tau, cond) -> (B,NI,NJ,C)."""

  def __init__(self, t: int, grid: tuple[int, int], channels: int, external_dim: int,
               scale: int, base_channels: int = 32, channel_mults: Sequence[int] = (1, 2),
               num_res_blocks: int = 1, emb_dim: int = 64, num_groups: int = 8, d_model: int = 32,
               d_ff: int = 32, top_k: int = 3, num_blocks: int = 2, num_kernels: int = 6,
               encoder_channels: int = 4, inter_dim: int = 64, use_inter: bool = True,
               **unused: Any):
    super().__init__()
    self.n = int(scale)
    fine = (self.n * grid[0], self.n * grid[1])
    self.down = bottleneck_shape(*fine, len(channel_mults))
    if use_inter:
      self.TPatternNet_0 = TPatternNet(t, grid, channels, external_dim, d_model, d_ff, top_k,
                                       num_blocks, num_kernels, encoder_channels)
      self.inter_proj = nn.Linear(_stacked(t, *grid, encoder_channels, self.down), inter_dim)
    self.use_inter = use_inter
    self.UNet_0 = UNet(2 * channels, channels, base_channels, channel_mults, num_res_blocks,
                       emb_dim, num_groups, external_dim, inter_dim if use_inter else 0)

  def encode(self, cond: Mapping[str, Tensor]) -> Optional[Tensor]:
    """S_inter (B, Hd, Wd, inter_dim): reads only the conditioning (see denoisers.py)."""
    if not self.use_inter:
      return None
    return self.inter_proj(stack_to_grid(self.TPatternNet_0(cond["coarse"], cond.get("external")),
                                         self.down))

  def forward(self, x_tau: Tensor, tau: Tensor, cond: Mapping[str, Tensor],
              inter: Optional[Tensor] = None) -> Tensor:
    coarse, ext = cond["coarse"], cond.get("external")
    if inter is None:
      inter = self.encode(cond)
    up = coarse[:, -1].repeat_interleave(self.n, dim=1).repeat_interleave(self.n, dim=2)
    x_in = torch.cat([x_tau, up], dim=-1)
    return self.UNet_0(x_in, tau, None if ext is None else ext[:, -1], inter)


# ------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------
def count_params(module: nn.Module) -> int:
  return sum(p.numel() for p in module.parameters())


def _to_torch_leaf(path: tuple, value: np.ndarray) -> np.ndarray:
  """A flax leaf in the torch layout of the twin's parameter."""
  name = path[-1]
  v = np.asarray(value, np.float32)
  if name == "kernel":
    if v.ndim == 4:  # conv (kh, kw, in, out) -> (out, in, kh, kw)
      return v.transpose(3, 2, 0, 1)
    if v.ndim == 3:  # DenseGeneral: qkv (d, h, hd) -> (h*hd, d); out (h, hd, d) -> (d, h*hd)
      return (v.reshape(-1, v.shape[-1]) if path[-2] == "out" else v.reshape(v.shape[0], -1)).T
    return v.T  # Dense (in, out) -> (out, in)
  if name == "bias":
    return v.reshape(-1)
  return v  # GroupNorm/LayerNorm scale, position tables, tokens


def _flax_leaves(tree: Mapping, prefix: tuple = ()) -> list:
  out = []
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out += _flax_leaves(v, prefix + (k,))
    else:
      out.append((prefix + (k,), v))
  return out


def load_flax_params(module: nn.Module, params: Mapping) -> None:
  """Copies a flax parameter tree into the twin (names must match one to one).

  Raises ValueError on a missing, extra or mis-shaped leaf, which is the twin/flax layer check.
  """
  own = dict(module.named_parameters())
  seen = set()
  for path, value in _flax_leaves(params):
    tname = ".".join(path[:-1] + ({"scale": "weight", "kernel": "weight"}.get(path[-1],
                                                                               path[-1]),))
    if path[-1] not in ("kernel", "bias", "scale"):
      tname = ".".join(path)
    if tname not in own:
      raise ValueError(f"torch twin has no parameter {tname!r} for flax leaf {'/'.join(path)}")
    arr = _to_torch_leaf(path, np.asarray(value))
    if tuple(own[tname].shape) != arr.shape:
      raise ValueError(f"shape mismatch at {tname}: torch {tuple(own[tname].shape)} vs flax "
                       f"{arr.shape} (from {np.shape(value)})")
    with torch.no_grad():
      own[tname].copy_(torch.from_numpy(np.array(arr, dtype=np.float32, copy=True)))
    seen.add(tname)
  missing = sorted(set(own) - seen)
  if missing:
    raise ValueError(f"torch twin parameters without a flax leaf: {missing[:5]} ...")


# ------------------------------------------------------------------------------------------
# Diffusion: schedule, losses, train step, samplers
# ------------------------------------------------------------------------------------------
class Schedule:
  """torch copy of a diffusion.Schedule's (T,) float32 arrays."""

  def __init__(self, jax_schedule, device: str = "cpu"):
    names = ("betas", "alpha_bars", "alpha_bars_prev", "sqrt_alpha_bars",
             "sqrt_one_minus_alpha_bars", "posterior_variance")
    for n in names:
      setattr(self, n, torch.tensor(np.array(getattr(jax_schedule, n)), device=device))
    self.num_steps = int(jax_schedule.num_steps)


def _b(coef: Tensor, x: Tensor) -> Tensor:
  return coef.reshape(coef.shape + (1,) * (x.ndim - 1))


def q_sample(s: Schedule, x0: Tensor, tau: Tensor, noise: Tensor) -> Tensor:
  return _b(s.sqrt_alpha_bars[tau], x0) * x0 + _b(s.sqrt_one_minus_alpha_bars[tau], x0) * noise


def _diffuse(s: Schedule, x0: Tensor) -> tuple:
  tau = torch.randint(0, s.num_steps, (x0.shape[0],), device=x0.device)
  noise = torch.randn_like(x0)
  return tau, noise, q_sample(s, x0, tau, noise)


def loss_c(net: DiffusionCNet, s: Schedule, batch: Mapping[str, Tensor]) -> tuple:
  """(L_C, x0_hat (B, I, J, C)) as diffrecon.loss_c."""
  x0 = batch["coarse"][:, -1]
  tau, noise, x_tau = _diffuse(s, x0)
  eps = net(x_tau, tau, {"obs": batch["obs"], "mask": batch["mask"],
                         "external": batch["external"]})
  x0_hat = (x_tau - _b(s.sqrt_one_minus_alpha_bars[tau], x_tau) * eps) / _b(
      s.sqrt_alpha_bars[tau], x_tau)
  return F.mse_loss(eps, noise), x0_hat


def loss_f(net: DiffusionFNet, s: Schedule, batch: Mapping[str, Tensor], window: Tensor) -> Tensor:
  tau, noise, x_tau = _diffuse(s, batch["fine"])
  eps = net(x_tau, tau, {"coarse": window, "external": batch["external"]})
  return F.mse_loss(eps, noise)


class TrainStep:
  """One eager train step of a phase: loss, backward, global-norm clip, AdamW, EMA of all params.

  Mirrors train.make_train_step with steps_per_call = 1 on a fixed batch: in 'stage_c' /
  'stage_f' only that model has an optimizer (optax.set_to_zero for the other); 'joint' trains
  both with L = w_c L_C + w_f L_F, L_F conditioned on the window completed with x0_hat
  (clipped to [-x0_clip, x0_clip] when given, as diffrecon.complete_current).
  """

  def __init__(self, phase: str, net_c: DiffusionCNet, net_f: DiffusionFNet, schedule: Schedule,
               train_cfg: Any, x0_clip: Optional[float] = None):
    self.phase, self.c, self.f, self.s = phase, net_c, net_f, schedule
    self.x0_clip = x0_clip
    lr = {"stage_c": (train_cfg.lr_c, None), "stage_f": (None, train_cfg.lr_f),
          "joint": (train_cfg.lr_joint_c, train_cfg.lr_joint_f)}[phase]
    groups = [{"params": list(m.parameters()), "lr": float(r)}
              for m, r in ((net_c, lr[0]), (net_f, lr[1])) if r is not None]
    self.trained = [p for g in groups for p in g["params"]]
    self.opt = torch.optim.AdamW(groups, weight_decay=float(train_cfg.weight_decay),
                                 foreach=True)
    self.clip = float(train_cfg.grad_clip)
    self.decay = float(train_cfg.ema_decay)
    self.w = (float(train_cfg.joint_weight_c), float(train_cfg.joint_weight_f))
    self.all_params = list(net_c.parameters()) + list(net_f.parameters())
    self.ema = [p.detach().clone() for p in self.all_params]

  def loss(self, batch: Mapping[str, Tensor]) -> Tensor:
    if self.phase == "stage_c":
      return loss_c(self.c, self.s, batch)[0]
    if self.phase == "stage_f":
      return loss_f(self.f, self.s, batch, batch["coarse"])
    l_c, x0_hat = loss_c(self.c, self.s, batch)
    if self.x0_clip is not None:
      x0_hat = torch.clamp(x0_hat, -self.x0_clip, self.x0_clip)
    m = batch["mask"][:, -1, ..., None]
    current = m * batch["obs"][:, -1] + (1.0 - m) * x0_hat
    window = torch.cat([batch["coarse"][:, :-1], current[:, None]], dim=1)
    return self.w[0] * l_c + self.w[1] * loss_f(self.f, self.s, batch, window)

  def __call__(self, batch: Mapping[str, Tensor]) -> Tensor:
    self.opt.zero_grad(set_to_none=True)
    loss = self.loss(batch)
    loss.backward()
    if self.clip > 0:
      torch.nn.utils.clip_grad_norm_(self.trained, self.clip, foreach=True)
    self.opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(self.ema, [p.detach() for p in self.all_params], 1.0 - self.decay)
    return loss.detach()


def _impose(s: Schedule, x: Tensor, level: int, known: Optional[Tensor],
            known_mask: Optional[Tensor]) -> Tensor:
  if known is None:
    return x
  if level >= 0:
    target = q_sample(s, known, torch.full((x.shape[0],), level, device=x.device),
                      torch.randn_like(x))
  else:
    target = known
  return torch.where(known_mask > 0.5, target, x)


@torch.inference_mode()
def sample_many(net: nn.Module, cond: Mapping[str, Tensor], s: Schedule, shape: tuple, *,
                n_samples: int, method: str = "ddim", num_steps: Optional[int] = None,
                eta: float = 0.0, known: Optional[Tensor] = None,
                known_mask: Optional[Tensor] = None) -> Tensor:
  """n_samples per input in one batched reverse chain (as diffusion.sample_many); -> median.

  shape: (B, ...) per-input sample shape. Returns the per-cell median (B, ...).
  """
  tile = lambda a: None if a is None else a.repeat((n_samples,) + (1,) * (a.ndim - 1))
  cond_t = {k: tile(v) for k, v in cond.items()}
  inter_t = tile(net.encode(cond))  # once per input, as diffrecon.sample_coarse / _fine do
  known_t = tile(known)
  mask_t = None if known_mask is None else tile(known_mask.expand(shape))
  big = (n_samples * shape[0],) + tuple(shape[1:])
  t = s.num_steps
  if method == "ddpm":
    taus = np.arange(t - 1, -1, -1)
    prevs = taus - 1
  else:
    taus = np.round(np.linspace(t - 1, 0, num_steps or t)).astype(np.int64)
    prevs = np.concatenate([taus[1:], [-1]])
  ab = s.alpha_bars
  x = _impose(s, torch.randn(big, device=ab.device), int(taus[0]), known_t, mask_t)
  for tau, prev in zip(taus.tolist(), prevs.tolist()):
    a_t = ab[tau]
    a_prev = ab[prev] if prev >= 0 else torch.ones((), device=ab.device)
    if method == "ddpm":
      sig = torch.sqrt(s.posterior_variance[tau])
    else:
      sig = eta * torch.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    eps = net(x, torch.full((big[0],), tau, device=x.device), cond_t, inter_t)
    x0_hat = (x - torch.sqrt(1 - a_t) * eps) / torch.sqrt(a_t)
    x = (torch.sqrt(a_prev) * x0_hat + torch.sqrt(torch.clamp(1 - a_prev - sig ** 2, min=0))
         * eps)
    if prev >= 0:
      x = x + sig * torch.randn_like(x)
    x = _impose(s, x, prev, known_t, mask_t)
  return torch.quantile(x.reshape((n_samples,) + tuple(shape)), 0.5, dim=0)
