"""DiffUFlow (Zheng, Zhong, Wang, Yang, Gu, Zhang, Wang: "DiffUFlow: Robust fine-grained urban
flow inference with denoising diffusion model", CIKM 2023; the paper's ref. [25]) as a baseline.

DiffUFlow is a conditional diffusion model of the fine-grained flow map: a spatio-temporal
feature extractor (its STFormer) encodes the coarse map and its recent history, a semantic
extractor (its ELFetcher) embeds the external factors, and a denoiser conditioned on both removes
the noise from the fine map. Here:
  - condition: the interp-completed coarse maps of the current slice and the `history` slices
    before it (the paper's preprocessing of the baselines that do not handle missing data,
    Sec. V-A.4; each map completed from its own window of observations, never a future one),
    z-scored with the train split's coarse normaliser; the current one is also upsampled to the
    fine grid as an input channel of the denoiser;
  - spatio-temporal features: a per-cell Dense over the window's stacked maps, then two 3x3
    convolutions on the coarse grid, upsampled (repeated) to the fine grid;
  - semantic features: the current slice's external (calendar) features through the U-Net's
    embedding (`models.unet.UNet`, added to the diffusion-step embedding);
  - denoiser: a small `UNet` on [x_tau, upsampled coarse, spatio-temporal features] predicting
    the noise; training uses `diffusion.eps_loss`, sampling `diffusion.sample_many` (DDIM).
The fine map comes back as the median (`point`; or the mean) of the samples; the samples are
returned for the CRPS. Training reads the train split only: its complete coarse maps and one
interp completion per training pattern (`supervised.training_inputs`), so the inputs look like
the scored ones.
Missing data (`use_mask`; the paper lists DiffUFlow among the methods that handle it): the
observation mask of every map of the window enters beside the completed maps, in the
spatio-temporal features and, upsampled, as an input channel of the denoiser, so the network
knows which coarse values are observed and which are interp's guesses.

Simplified or guessed (the description gives no sizes for these): STFormer's attention replaced
by the Dense + convolutions above; ELFetcher's embeddings by the U-Net's two dense layers; the
diffusion target is, by default (`residual`), the fine map minus the uniform upsampling of the
completed coarse map, divided by its train-split std per channel (the plain z-scored fine map
with `residual` False); `n2_normalize` rescales every N x N block of each sample to its
completed coarse cell (UrbanFM's N^2-Normalization, which the DiffUFlow description does not
state; a switch); sizes, steps and sample counts are set for the CPU budget (configs/default.py).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from diffrecon_jax import batching
from diffrecon_jax.models import diffusion
from diffrecon_jax.baselines import adam, interp, supervised
from diffrecon_jax.models.unet import UNet

Array = jax.Array


def upsample(coarse: Array, scale: int) -> Array:
  """(B, I, J, C) -> (B, N*I, N*J, C), each coarse value repeated over its block."""
  return jnp.repeat(jnp.repeat(coarse, scale, axis=1), scale, axis=2)


def block_rescale(fine: Array, coarse: Array, scale: int, aggregation: str) -> Array:
  """N^2 rescaling: each N x N block of `fine` (B, N*I, N*J, C) scaled to pool exactly to its
  `coarse` cell (B, I, J, C), physical units. Shares are the block's non-negative parts over
  their sum (flows are counts); a block with nothing positive is split evenly."""
  b, h, w, c = fine.shape
  n = scale
  pos = jnp.maximum(fine, 0.0).reshape(b, h // n, n, w // n, n, c)
  total = pos.sum(axis=(2, 4), keepdims=True)
  share = jnp.where(total > 0, pos / jnp.where(total > 0, total, 1.0), 1.0 / (n * n))
  cell = coarse.reshape(b, h // n, 1, w // n, 1, c) * (n * n if aggregation == "mean" else 1.0)
  return (share * cell).reshape(b, h, w, c)


class DiffUFlowDenoiser(nn.Module):
  """Noise predictor: (x_tau (B, H, W, C), tau (B,), cond) -> eps_hat (B, H, W, C).

  cond: {"window": (B, t, I, J, C) z-scored completed coarse maps, current slice last;
         "external": (B, F) external features of the current slice;
         "mask" (optional): (B, t, I, J) 1 where the window's coarse cell is observed}.
  """
  scale: int
  features: int = 16
  base_channels: int = 16
  channel_mults: tuple = (1, 2)
  num_res_blocks: int = 1
  emb_dim: int = 32

  @nn.compact
  def __call__(self, x: Array, tau: Array, cond: dict) -> Array:
    window = cond["window"].astype(jnp.float32)
    current = window[:, -1]
    if "mask" in cond:  # the missing-data path: which values are observed
      mask = cond["mask"].astype(jnp.float32)[..., None]
      window = jnp.concatenate([window, mask], -1)
      current = jnp.concatenate([current, mask[:, -1]], -1)
    b, t, i, j, c = window.shape
    # Spatio-temporal features of the window: mix each cell's history, then its neighbourhood.
    st = jnp.transpose(window, (0, 2, 3, 1, 4)).reshape(b, i, j, t * c)
    st = nn.silu(nn.Dense(self.features, name="st_time")(st))
    st = nn.silu(nn.Conv(self.features, (3, 3), name="st_conv_0")(st))
    st = nn.Conv(self.features, (3, 3), name="st_conv_1")(st)
    h = jnp.concatenate([x, upsample(current, self.scale), upsample(st, self.scale)], -1)
    unet = UNet(out_channels=x.shape[-1], base_channels=self.base_channels,
                channel_mults=tuple(self.channel_mults), num_res_blocks=self.num_res_blocks,
                emb_dim=self.emb_dim)
    return unet(h, tau, cond["external"].astype(jnp.float32))


class DiffUFlowMethod:
  """DiffUFlow as an evaluated method (see the module docstring).

  Args:
    features, base_channels, channel_mults, num_res_blocks, emb_dim: network sizes.
    history: past coarse maps in the condition; -1 = the task's `history`.
    num_train_steps, schedule, beta_start, beta_end: the diffusion (`diffusion.make_schedule`).
    steps, batch_size, lr: Adam training budget.
    sampling_steps, eta, n_samples: DDIM sampler (S <= num_train_steps steps; eta 0 is
      deterministic given the initial noise), samples per map.
    point: the point estimate from the samples: "median" (per value) or "mean".
    use_mask: the observation masks of the window enter the condition (the missing-data path).
    residual: diffuse the fine map minus the completed coarse map's uniform upsampling (scaled
      by its train std) instead of the z-scored fine map.
    n2_normalize: rescale every sample's blocks to the completed coarse cells (`block_rescale`).
    x0_clip_factor: clip each reverse step's estimate of the target to this times its largest
      |value| on the train split (0 = no clip).
    train_patterns, time_weight: training patterns and interp's time weight.
    eval_batch: maps per sampler call (the last batch padded); workers: batches run at once.
    seed: initialisation, batches and sampler noise. log_every: 0 = silent.
  """

  name = "diffuflow"

  def __init__(self, *, features: int = 16, base_channels: int = 16,
               channel_mults: tuple = (1, 2), num_res_blocks: int = 1, emb_dim: int = 32,
               history: int = -1, num_train_steps: int = 50, schedule: str = "quad",
               beta_start: float = 1e-4, beta_end: float = 0.5, steps: int = 1000,
               batch_size: int = 32, lr: float = 1e-3, sampling_steps: int = 10,
               eta: float = 1.0, n_samples: int = 4, point: str = "median",
               use_mask: bool = True, residual: bool = True,
               n2_normalize: bool = True, x0_clip_factor: float = 1.2,
               train_patterns: tuple = (), time_weight: float = 0.1, eval_batch: int = 64,
               workers: int = 1, seed: int = 0, log_every: int = 0):
    checks = {"features": features, "base_channels": base_channels, "emb_dim": emb_dim,
              "steps": steps, "batch_size": batch_size, "sampling_steps": sampling_steps,
              "n_samples": n_samples, "eval_batch": eval_batch, "workers": workers,
              "num_train_steps": num_train_steps}
    for key, value in checks.items():
      if int(value) != value or value < 1:
        raise ValueError(f"diffuflow: {key} must be a positive integer, got {value!r}")
    if not 1 <= sampling_steps <= num_train_steps:
      raise ValueError(f"diffuflow: sampling_steps must be in [1, num_train_steps="
                       f"{num_train_steps}], got {sampling_steps}")
    if point not in ("median", "mean"):
      raise ValueError(f"diffuflow: point must be 'median' or 'mean', got {point!r}")
    if lr <= 0 or eta < 0 or x0_clip_factor < 0 or history < -1 or not channel_mults:
      raise ValueError(f"diffuflow: need lr > 0, eta >= 0, x0_clip_factor >= 0, history >= -1 "
                       f"and channel_mults non-empty, got lr={lr}, eta={eta}, x0_clip_factor="
                       f"{x0_clip_factor}, history={history}, channel_mults={channel_mults}")
    self.schedule = diffusion.make_schedule(schedule, int(num_train_steps), beta_start, beta_end)
    self.net_kwargs = dict(features=int(features), base_channels=int(base_channels),
                           channel_mults=tuple(int(m) for m in channel_mults),
                           num_res_blocks=int(num_res_blocks), emb_dim=int(emb_dim))
    self.history = int(history)
    self.steps, self.batch_size, self.lr = int(steps), int(batch_size), float(lr)
    self.sampling_steps, self.eta, self.n_samples = int(sampling_steps), float(eta), int(n_samples)
    self.point, self.use_mask = str(point), bool(use_mask)
    self.residual, self.n2_normalize = bool(residual), bool(n2_normalize)
    self.x0_clip_factor = float(x0_clip_factor)
    self.train_patterns, self.time_weight = tuple(train_patterns), float(time_weight)
    self.eval_batch, self.workers = int(eval_batch), int(workers)
    self.seed, self.log_every = int(seed), int(log_every)
    self.sampler = {"name": "ddim", "steps": self.sampling_steps, "eta": self.eta,
                    "n_samples": self.n_samples, "point": self.point}
    self._key = None
    self.params = self.losses = None

  # -- target encoding -------------------------------------------------------------------------
  def _base(self, coarse_norm: Array) -> Array:
    """Physical fine first guess from z-scored completed coarse maps (B, I, J, C)."""
    phys = coarse_norm * self._stats["coarse_std"] + self._stats["coarse_mean"]
    up = upsample(phys, self._scale)
    return up / (self._scale ** 2) if self._aggregation == "sum" else up

  def _encode(self, fine: Array, coarse_norm: Array) -> Array:
    """Physical fine maps (B, H, W, C) -> diffusion targets (B, H, W, C)."""
    s = self._stats
    if self.residual:
      return (fine - self._base(coarse_norm)) / s["target_std"]
    return (fine - s["fine_mean"]) / s["fine_std"]

  def _decode(self, x0: Array, coarse_norm: Array) -> Array:
    """Inverse of `_encode`: targets (..., B, H, W, C) -> physical fine maps."""
    s = self._stats
    if self.residual:
      return self._base(coarse_norm) + x0 * s["target_std"]
    return x0 * s["fine_std"] + s["fine_mean"]

  # -- training --------------------------------------------------------------------------------
  def _t(self, view) -> int:
    """Window length: the current slice and its history."""
    return (view.history if self.history < 0 else self.history) + 1

  def fit(self, view) -> None:
    """Trains on `view`'s train split (once per distinct train split)."""
    key = supervised.train_key(view)
    if key == self._key:
      return
    v0 = int(view.split.val_start)
    t = self._t(view)
    if v0 < t:
      raise ValueError(f"diffuflow: the train split has {v0} slices, fewer than a window ({t})")
    self._scale, self._aggregation = int(view.scale), view.aggregation
    coarse, masks = supervised.training_inputs(view, self.train_patterns, self.seed,
                                               self.time_weight, with_masks=True)
    x, _ = supervised.finite_or_zero(view.coarse_norm.apply(coarse))        # (P+1, T, I, J, C)
    fine, w = supervised.finite_or_zero(np.asarray(view.train_fine, np.float32))
    ext = np.asarray(view.external[:v0], np.float32)
    true_coarse, _ = supervised.finite_or_zero(view.coarse_norm.apply(view.train_coarse))
    self._stats = {k: jnp.asarray(v, jnp.float32) for k, v in (
        ("coarse_mean", view.coarse_norm.mean), ("coarse_std", view.coarse_norm.std),
        ("fine_mean", view.fine_norm.mean), ("fine_std", view.fine_norm.std))}
    # Scale of the residual target (per channel, where the fine truth exists).
    resid = (fine - np.asarray(self._base(jnp.asarray(true_coarse)))) * w
    std = np.sqrt((resid ** 2).sum((0, 1, 2)) / np.maximum(w.sum((0, 1, 2)), 1.0))
    self._stats["target_std"] = jnp.asarray(np.where(std > 0, std, 1.0), jnp.float32)
    # The sampler's clip: the largest |target| over every training input copy.
    largest = max(float(np.abs(np.asarray(self._encode(jnp.asarray(fine), jnp.asarray(xc)))
                               * w).max()) for xc in x)
    self._clip = self.x0_clip_factor * largest if self.x0_clip_factor > 0 else None

    self.net = DiffUFlowDenoiser(scale=self._scale, **self.net_kwargs)
    n_copies, h = x.shape[0], t - 1
    key_init, key_batch = jax.random.split(jax.random.PRNGKey(self.seed))
    dummy = self._cond(jnp.zeros((1, t) + x.shape[2:]), jnp.zeros((1, ext.shape[1])),
                       jnp.ones((1, t) + x.shape[2:4]))
    params = self.net.init(key_init, jnp.zeros((1,) + fine.shape[1:]), jnp.zeros((1,), jnp.int32),
                           dummy)
    data = tuple(jnp.asarray(a) for a in (x, masks, fine, w, ext))
    sched, bs = self.schedule, self.batch_size

    def loss_fn(params, data, rng):
      x, masks, fine, w, ext = data
      k_copy, k_slice, k_tau, k_noise = jax.random.split(rng, 4)
      p = jax.random.randint(k_copy, (bs,), 0, n_copies)
      s = jax.random.randint(k_slice, (bs,), h, v0)
      span = (p[:, None], s[:, None] + jnp.arange(-h, 1)[None, :])
      window = x[span]                                                   # (B, t, I, J, C)
      cond = self._cond(window, ext[s], masks[span])
      x0 = self._encode(fine[s], window[:, -1]) * w[s]
      tau = diffusion.sample_tau(k_tau, bs, sched.num_steps)
      noise = jax.random.normal(k_noise, x0.shape)
      x_tau = diffusion.q_sample(sched, x0, tau, noise)
      return diffusion.eps_loss(self.net.apply(params, x_tau, tau, cond), noise, w[s])

    logging.info("diffuflow: training %d steps on %d train maps (%d input copies)", self.steps,
                 v0, n_copies)
    self.params, self.losses = adam.minimise(params, loss_fn, data, steps=self.steps, lr=self.lr,
                                             key=key_batch, log_every=self.log_every,
                                             name="diffuflow")
    self._sample = jax.jit(self._sample_batch)
    self._key = key

  def _cond(self, window: Array, external: Array, mask: Array) -> dict:
    """The denoiser's condition; the mask (B, t, I, J) only with `use_mask`."""
    cond = {"window": window, "external": external}
    return dict(cond, mask=mask) if self.use_mask else cond

  # -- sampling --------------------------------------------------------------------------------
  def _sample_batch(self, params, window: Array, external: Array, mask: Array,
                    rng: Array) -> Array:
    """(B, t, I, J, C) z-scored completed windows, (B, F), (B, t, I, J) masks -> (S, B, H, W, C)
    physical samples."""
    b, _, i, j, c = window.shape
    shape = (b, i * self._scale, j * self._scale, c)
    out = diffusion.sample_many(
        lambda x, tau, cond: self.net.apply(params, x, tau, cond),
        self._cond(window, external, mask), self.schedule, shape, rng,
        n_samples=self.n_samples, method="ddim", num_steps=self.sampling_steps, eta=self.eta,
        return_samples=True, x0_clip=self._clip)
    fine = self._decode(out["samples"], window[:, -1])
    if self.n2_normalize:
      coarse = window[:, -1] * self._stats["coarse_std"] + self._stats["coarse_mean"]
      fine = jax.vmap(lambda f: block_rescale(f, coarse, self._scale, self._aggregation))(fine)
    return fine

  def sample(self, view, windows: np.ndarray, external: np.ndarray, masks: np.ndarray,
             rng) -> np.ndarray:
    """Samples for z-scored completed windows (n, t, I, J, C), external features (n, F) and the
    windows' masks (n, t, I, J): (S, n, H, W, C) float32 physical. Batches of `eval_batch` (the
    last one padded by repeating its last map, so one compiled shape), batch k drawn with
    `fold_in(rng, k)`; trains first."""
    self.fit(view)
    (samples,) = batching.run_batched(
        lambda *part: self._sample(self.params, *part), [windows, external, masks],
        min(self.eval_batch, windows.shape[0]), rng=rng, workers=self.workers, out_axis=1)
    return samples.astype(np.float32)

  def reconstruct(self, view, slices: np.ndarray) -> dict:
    """view: evaluate.ObservedTask; slices (n,) -> dict(coarse (n, I, J, C) interp-completed
    observed maps, fine (n, N*I, N*J, C) median (or mean: `point`) of the samples, samples
    (S, n, N*I, N*J, C)), all float32 physical. Deterministic given `seed` and the first
    slice."""
    self.fit(view)
    slices = np.asarray(slices, np.int64)
    h = self._t(view) - 1
    # Every slice the windows touch, each completed from its own past (slice 0 repeats at the
    # start of the series).
    span = np.arange(slices[0] - h, slices[-1] + 1)
    need = np.unique(np.maximum(np.concatenate([span, slices]), 0))
    completed = interp.nearest_fill(view.coarse_obs, view.mask, need, view.history,
                                    self.time_weight, fallback=view.coarse_norm.mean)
    windows = np.maximum(slices[:, None] + np.arange(-h, 1)[None, :], 0)  # (n, t)
    pos = np.searchsorted(need, windows)
    norm, _ = supervised.finite_or_zero(view.coarse_norm.apply(completed))
    rng = jax.random.fold_in(jax.random.PRNGKey(self.seed + 1), int(slices[0]))
    masks = np.asarray(view.mask, np.float32)[windows]
    samples = self.sample(view, norm[pos], np.asarray(view.external, np.float32)[slices], masks,
                          rng)
    point = np.median(samples, axis=0) if self.point == "median" else samples.mean(axis=0)
    return {"coarse": completed[pos[:, -1]].astype(np.float32),
            "fine": point.astype(np.float32), "samples": samples}


def build(config) -> DiffUFlowMethod:
  """DiffUFlow with its fields from `config.diffuflow` (steps -1: `config.train.steps_f`), seed
  `config.seed`, training patterns `config.patterns.train` (when `train_masked`) and batches run
  at once as DiffRecon's sampler (`eval.concurrent_batches`)."""
  d = config.diffuflow
  return DiffUFlowMethod(
      features=int(d.features), base_channels=int(d.base_channels),
      channel_mults=tuple(d.channel_mults), num_res_blocks=int(d.num_res_blocks),
      emb_dim=int(d.emb_dim), history=int(d.history), num_train_steps=int(d.num_train_steps),
      schedule=d.schedule, beta_start=float(d.beta_start), beta_end=float(d.beta_end),
      steps=supervised.as_diffrecons(d.steps, config.train.steps_f), batch_size=d.batch_size,
      lr=float(d.lr), sampling_steps=d.sampling_steps,
      eta=float(d.eta), n_samples=d.n_samples, point=str(d.point), use_mask=bool(d.use_mask),
      residual=bool(d.residual),
      n2_normalize=bool(d.n2_normalize), x0_clip_factor=float(d.x0_clip_factor),
      train_patterns=tuple(config.patterns.train) if d.train_masked else (),
      time_weight=float(d.interp_time_weight), eval_batch=d.eval_batch,
      workers=batching.concurrent_batches(config), seed=int(config.seed),
      log_every=int(d.log_every))
