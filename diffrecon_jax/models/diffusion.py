"""Gaussian diffusion core: noise schedules, forward process, loss and samplers (eqs. 2-7).

Index convention: the paper numbers diffusion steps 1..T; here a step is a 0-based index
`tau` in [0, T), so array entry `schedule.betas[tau]` is the paper's beta_{tau+1} and
`x_tau = q_sample(schedule, x0, tau, noise)` is the paper's s_{tau+1}. "Level -1" is clean data.

Denoiser call convention (keeps the samplers generic): an `eps_fn(x_tau, tau) -> eps_hat`
takes x_tau of any shape (B, ...) and tau (B,) int32 and returns the predicted noise of the same
shape. It is a closure over parameters and conditioning built by the caller, e.g.
`lambda x, t: model.apply(params, x, t, cond)`. `sample_many` builds it from a
`denoise_fn(x_tau, tau, cond)` and tiles the conditioning for several samples per input.

The samplers are plain traceable functions: call them inside `jax.jit` (shapes, `num_steps`,
`eta` and `n_samples` are static); the reverse chain is one `lax.scan`, so the graph size does
not grow with T.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = jax.Array
EpsFn = Callable[[Array, Array], Array]
SCHEDULE_KINDS = ("linear", "quad", "cosine")


@struct.dataclass
class Schedule:
  """A variance schedule and the quantities derived from it, all (T,) float32.

  Attributes:
    betas: beta_tau, the per-step noise variance (eq. 2).
    alphas: 1 - beta_tau.
    alpha_bars: prod_{i<=tau} alpha_i (eq. 4).
    alpha_bars_prev: alpha_bars shifted right by one with 1.0 at index 0 (clean data).
    sqrt_alpha_bars, sqrt_one_minus_alpha_bars: the eq. 4 coefficients.
    sqrt_recip_alphas: 1 / sqrt(alpha_tau).
    eps_coefs: beta_tau / sqrt(1 - alpha_bar_tau), the noise coefficient of the reverse mean.
    posterior_variance: beta_tilde_tau = (1 - abar_{tau-1}) / (1 - abar_tau) * beta_tau, the
      variance of q(s_{tau-1} | s_tau, s_0); 0 at tau = 0.
    num_steps: T (static, not a pytree leaf).
  """
  betas: Array
  alphas: Array
  alpha_bars: Array
  alpha_bars_prev: Array
  sqrt_alpha_bars: Array
  sqrt_one_minus_alpha_bars: Array
  sqrt_recip_alphas: Array
  eps_coefs: Array
  posterior_variance: Array
  num_steps: int = struct.field(pytree_node=False, default=0)


def _betas(kind: str, num_steps: int, beta_start: float, beta_end: float) -> np.ndarray:
  if kind == "linear":
    return np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
  if kind == "quad":
    # CSDI's "quad" schedule: linear in sqrt(beta).
    return np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps, dtype=np.float64) ** 2
  # "cosine" (Nichol & Dhariwal 2021); beta_start / beta_end are ignored, betas capped at 0.999.
  s = 0.008
  grid = np.arange(num_steps + 1, dtype=np.float64) / num_steps
  f = np.cos((grid + s) / (1 + s) * math.pi / 2) ** 2
  return np.clip(1.0 - f[1:] / f[:-1], 0.0, 0.999)


def make_schedule(kind: str = "quad", num_steps: int = 50, beta_start: float = 1e-4,
                  beta_end: float = 0.5) -> Schedule:
  """Builds a `Schedule`, computed in float64 numpy and cast to float32 once.

  Args:
    kind: "linear" (betas linear from beta_start to beta_end), "quad" (CSDI: sqrt(beta) linear,
      so the endpoints are exactly beta_start and beta_end) or "cosine" (ignores the betas).
    num_steps: T >= 1.
    beta_start, beta_end: 0 < beta_start <= beta_end < 1.
  """
  if kind not in SCHEDULE_KINDS:
    raise ValueError(f"make_schedule: unknown kind {kind!r}; use one of {SCHEDULE_KINDS}")
  if int(num_steps) != num_steps or num_steps < 1:
    raise ValueError(f"make_schedule: num_steps must be a positive integer, got {num_steps!r}")
  if kind != "cosine" and not 0.0 < beta_start <= beta_end < 1.0:
    raise ValueError(f"make_schedule: need 0 < beta_start <= beta_end < 1, got "
                     f"beta_start={beta_start}, beta_end={beta_end}")
  num_steps = int(num_steps)
  betas = _betas(kind, num_steps, float(beta_start), float(beta_end))
  alphas = 1.0 - betas
  alpha_bars = np.cumprod(alphas)
  alpha_bars_prev = np.concatenate([[1.0], alpha_bars[:-1]])
  posterior_variance = betas * (1.0 - alpha_bars_prev) / (1.0 - alpha_bars)
  f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)
  return Schedule(
      betas=f32(betas), alphas=f32(alphas), alpha_bars=f32(alpha_bars),
      alpha_bars_prev=f32(alpha_bars_prev), sqrt_alpha_bars=f32(np.sqrt(alpha_bars)),
      sqrt_one_minus_alpha_bars=f32(np.sqrt(1.0 - alpha_bars)),
      sqrt_recip_alphas=f32(1.0 / np.sqrt(alphas)),
      eps_coefs=f32(betas / np.sqrt(1.0 - alpha_bars)),
      posterior_variance=f32(posterior_variance), num_steps=num_steps)


def broadcast_to(coef: Array, x: Array) -> Array:
  """(B,) -> (B, 1, ..., 1) to broadcast against x (B, ...)."""
  return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


def sample_tau(rng: Array, batch_size: int, num_steps: int) -> Array:
  """Uniform training steps tau (B,) int32 in [0, T)."""
  return jax.random.randint(rng, (batch_size,), 0, num_steps, dtype=jnp.int32)


def q_sample(schedule: Schedule, x0: Array, tau: Array, noise: Array) -> Array:
  """Forward process, eq. 4: x_tau = sqrt(abar_tau) x0 + sqrt(1 - abar_tau) noise.

  Args:
    x0: (B, ...) clean data. tau: (B,) int32 in [0, T). noise: like x0, standard normal.
  Returns: (B, ...) noisy data.
  """
  tau = jnp.asarray(tau, jnp.int32)
  return (broadcast_to(schedule.sqrt_alpha_bars[tau], x0) * x0
          + broadcast_to(schedule.sqrt_one_minus_alpha_bars[tau], x0) * noise)


def predict_x0(schedule: Schedule, x_tau: Array, tau: Array, eps_hat: Array) -> Array:
  """One-step differentiable estimate of s_0 from x_tau and predicted noise (eq. 10 generalised).

  x0_hat = (x_tau - sqrt(1 - abar_tau) eps_hat) / sqrt(abar_tau). Shapes as in `q_sample`.
  """
  tau = jnp.asarray(tau, jnp.int32)
  return ((x_tau - broadcast_to(schedule.sqrt_one_minus_alpha_bars[tau], x_tau) * eps_hat)
          / broadcast_to(schedule.sqrt_alpha_bars[tau], x_tau))


def eps_loss(eps_hat: Array, eps: Array, weights: Optional[Array] = None) -> Array:
  """Mean squared error between predicted and true noise (the DDPM simple loss).

  Args:
    eps_hat, eps: (B, ...) same shape.
    weights: optional, broadcastable to eps (e.g. a (B, I, J, 1) cell mask); the loss is then
      sum(w * err^2) / sum(w), 0 when all weights are 0.
  Returns: scalar float32.
  """
  if eps_hat.shape != eps.shape:
    raise ValueError(f"eps_loss: eps_hat shape {eps_hat.shape} != eps shape {eps.shape}")
  return weighted_mean(jnp.square(eps_hat.astype(jnp.float32) - eps.astype(jnp.float32)),
                       weights)


def weighted_mean(values: Array, weights: Optional[Array] = None) -> Array:
  """mean(values), or sum(w * values) / sum(w) with weights broadcastable to values (0 when all
  weights are 0). Scalar float32."""
  if weights is None:
    return jnp.mean(values)
  w = jnp.broadcast_to(jnp.asarray(weights, jnp.float32), values.shape)
  return jnp.sum(w * values) / jnp.maximum(jnp.sum(w), 1e-8)


def _check_known(shape, known, known_mask):
  if (known is None) != (known_mask is None):
    raise ValueError("sampler: pass both `known` and `known_mask` or neither")
  if known is not None:
    if tuple(known.shape) != tuple(shape):
      raise ValueError(f"sampler: known shape {known.shape} != sample shape {tuple(shape)}")
    try:
      jnp.broadcast_shapes(known_mask.shape, tuple(shape))
    except ValueError:
      raise ValueError(f"sampler: known_mask shape {known_mask.shape} does not broadcast to "
                       f"sample shape {tuple(shape)}") from None


def _impose(schedule: Schedule, x: Array, level: Array, rng: Array, known, known_mask,
            draw: Callable[[Array], Array]) -> Array:
  """Replaces observed cells of x (at noise level `level`, -1 = clean) by noised known values.

  RePaint / CSDI-style replacement: at level >= 0 observed cells get q_sample(known, level) with
  fresh noise, at level -1 they get `known` exactly, so the final sample holds them exactly.
  draw: key -> noise of x's shape (`_noise_drawer`), the chain's own noise.
  """
  if known is None:
    return x
  b = x.shape[0]
  safe = jnp.maximum(level, 0)
  noised = q_sample(schedule, known, jnp.full((b,), safe, jnp.int32), draw(rng).astype(x.dtype))
  target = jnp.where(level >= 0, noised, known)
  # `where`, not m * target + (1 - m) * x: exact values even if x were inf / nan.
  return jnp.where(jnp.asarray(known_mask) > 0.5, target.astype(x.dtype), x)


def sample_ddpm(eps_fn: EpsFn, schedule: Schedule, shape, rng: Array,
                known: Optional[Array] = None, known_mask: Optional[Array] = None,
                x_init: Optional[Array] = None, x0_clip: Optional[float] = None,
                noise_groups: int = 0) -> Array:
  """Ancestral sampling over all T steps (eqs. 6-7), one `lax.scan`.

  p(s_{tau-1} | s_tau) = N(sqrt_recip_alpha (s_tau - eps_coef eps_hat), beta_tilde_tau), starting
  from s_T ~ N(0, I); no noise is added at the last step.

  Args:
    eps_fn: (x (B, ...), tau (B,) int32) -> eps_hat (B, ...).
    shape: static sample shape (B, ...).
    rng: PRNG key.
    known, known_mask: optional (B, ...) values and mask (1 = observed, broadcastable to shape);
      observed cells are re-imposed after every step (see `_impose`) and exact at the end.
    x_init: optional (B, ...) starting noise s_T (default: drawn from rng).
    x0_clip: optional bound c: the estimate of s_0 at every step is clipped to [-c, c] and the
      noise estimate made consistent with it (standard DDPM/DDIM practice; it keeps a poorly
      trained model's chain from diverging, since s_0 = (s - sqrt(1-abar) eps) / sqrt(abar)
      amplifies errors by 1/sqrt(abar_T), about 170x for the quad schedule).
    noise_groups: 0 = independent noise for every row; G > 0 = the B rows are G groups of B/G
      consecutive rows that share every noise draw (`_noise_drawer`).
  Returns: (B, ...) float32 samples.
  """
  shape = tuple(shape)
  _check_known(shape, known, known_mask)
  t = schedule.num_steps
  taus = jnp.arange(t - 1, -1, -1, dtype=jnp.int32)
  return _reverse_chain(
      eps_fn, schedule, shape, rng, known, known_mask, x_init, x0_clip, taus,
      prev_levels=taus - 1,
      ab_t=schedule.alpha_bars[taus], ab_prev=schedule.alpha_bars_prev[taus],
      sigma=jnp.sqrt(schedule.posterior_variance[taus]), noise_groups=noise_groups)


def ddim_timesteps(num_train_steps: int, num_steps: int) -> np.ndarray:
  """S evenly spaced step indices from T-1 down to 0 (descending, distinct), S <= T."""
  if not 1 <= num_steps <= num_train_steps:
    raise ValueError(f"ddim: num_steps must be in [1, T={num_train_steps}], got {num_steps}")
  return np.round(np.linspace(num_train_steps - 1, 0, num_steps)).astype(np.int32)


def sample_ddim(eps_fn: EpsFn, schedule: Schedule, shape, rng: Array, num_steps: int,
                eta: float = 0.0, known: Optional[Array] = None,
                known_mask: Optional[Array] = None, x_init: Optional[Array] = None,
                x0_clip: Optional[float] = None, noise_groups: int = 0) -> Array:
  """DDIM sampling (Song et al. 2021) with S <= T evenly spaced steps of the same trained model.

  x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z, with
  sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev). eta = 0 is
  deterministic given the initial noise; S = T with eta = 1 is exactly ancestral sampling
  (`sample_ddpm` with the same rng gives the same samples up to float rounding).

  Args: as `sample_ddpm`, plus num_steps S (static) and eta (float >= 0).
  Returns: (B, ...) float32 samples.
  """
  shape = tuple(shape)
  _check_known(shape, known, known_mask)
  seq = ddim_timesteps(schedule.num_steps, int(num_steps))
  prev = np.concatenate([seq[1:], [-1]]).astype(np.int32)
  taus, prev_levels = jnp.asarray(seq), jnp.asarray(prev)
  ab_t = schedule.alpha_bars[taus]
  ab_prev = jnp.where(prev_levels >= 0, schedule.alpha_bars[jnp.maximum(prev_levels, 0)], 1.0)
  sigma = eta * jnp.sqrt((1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev))
  return _reverse_chain(eps_fn, schedule, shape, rng, known, known_mask, x_init, x0_clip, taus,
                        prev_levels, ab_t, ab_prev, sigma, noise_groups)


def _noise_drawer(shape: tuple, groups: int):
  """key -> standard normal noise of `shape`; with groups G > 0 the leading axis (B rows) is G
  groups of B/G consecutive rows drawing the same noise: (G, 1, ...) broadcast to (G, B/G, ...).

  Ensemble members sampled for many time slices at once use it so that one member's draws are
  the same at every slice: its completions of neighbouring slices then differ only where the
  conditioning does, i.e. they are coherent in time (a member is one trajectory, not independent
  draws per slice)."""
  if groups <= 0:
    return lambda key: jax.random.normal(key, shape, jnp.float32)
  if shape[0] % groups:
    raise ValueError(f"sampler: {shape[0]} rows do not split into {groups} noise groups")
  one = (groups, 1) + tuple(shape[1:])
  full = (groups, shape[0] // groups) + tuple(shape[1:])
  return lambda key: jnp.broadcast_to(jax.random.normal(key, one, jnp.float32),
                                      full).reshape(shape)


def _reverse_chain(eps_fn, schedule, shape, rng, known, known_mask, x_init, x0_clip, taus,
                   prev_levels, ab_t, ab_prev, sigma, noise_groups: int = 0) -> Array:
  """Shared reverse loop in DDIM form; every per-step coefficient is a (S,) array scanned over.

  With prev = tau - 1 and sigma^2 = beta_tilde this update equals the DDPM posterior mean
  sqrt_recip_alpha (x - eps_coef eps) plus sigma z, so one loop serves both samplers and the
  same rng gives the same draws in both.
  """
  init_rng, loop_rng = jax.random.split(rng)
  x_rng, k_rng = jax.random.split(init_rng)
  draw = _noise_drawer(shape, noise_groups)
  if x_init is None:
    x = draw(x_rng)
  elif tuple(x_init.shape) != shape:
    raise ValueError(f"sampler: x_init shape {x_init.shape} != sample shape {shape}")
  else:
    x = jnp.asarray(x_init, jnp.float32)
  x = _impose(schedule, x, taus[0], k_rng, known, known_mask, draw)
  b = shape[0]

  def step(x, inp):
    i, tau, prev, a_t, a_prev, sig = inp
    eps = eps_fn(x, jnp.full((b,), tau, jnp.int32)).astype(jnp.float32)
    x0_hat = (x - jnp.sqrt(1.0 - a_t) * eps) / jnp.sqrt(a_t)
    if x0_clip is not None:
      x0_hat = jnp.clip(x0_hat, -x0_clip, x0_clip)
      eps = (x - jnp.sqrt(a_t) * x0_hat) / jnp.sqrt(1.0 - a_t)
    z_rng, k_rng = jax.random.split(jax.random.fold_in(loop_rng, i))
    dir_coef = jnp.sqrt(jnp.maximum(1.0 - a_prev - sig ** 2, 0.0))
    noise = jnp.where(prev >= 0, sig, 0.0) * draw(z_rng)
    x = jnp.sqrt(a_prev) * x0_hat + dir_coef * eps + noise
    x = _impose(schedule, x, prev, k_rng, known, known_mask, draw)
    return x, None

  idx = jnp.arange(taus.shape[0], dtype=jnp.int32)
  x, _ = jax.lax.scan(step, x, (idx, taus, prev_levels, ab_t, ab_prev, sigma))
  return x


def summarize(samples: Array) -> dict[str, Array]:
  """Per-cell statistics over the sample axis.

  Args: samples (S, B, ...).
  Returns: dict of (B, ...) arrays: median, mean, q05, q95 (linear interpolation, as numpy).
  """
  q = jnp.quantile(samples, jnp.asarray([0.05, 0.5, 0.95], samples.dtype), axis=0)
  return {"median": q[1], "mean": jnp.mean(samples, axis=0), "q05": q[0], "q95": q[2]}


def tile_batch(tree: Any, n: int) -> Any:
  """Repeats every leaf's leading axis n times, sample-major: (B, ...) -> (n*B, ...).

  Row s*B + b is copy s of input b, so `x.reshape(n, B, ...)` recovers (S, B, ...).
  """
  return jax.tree_util.tree_map(
      lambda a: jnp.tile(a, (n,) + (1,) * (jnp.ndim(a) - 1)), tree)


def sample_many(denoise_fn: Callable[[Array, Array, Any], Array], cond: Any,
                schedule: Schedule, shape, rng: Array, *, n_samples: int,
                method: str = "ddim", num_steps: Optional[int] = None, eta: float = 0.0,
                known: Optional[Array] = None, known_mask: Optional[Array] = None,
                return_samples: bool = False,
                x0_clip: Optional[float] = None,
                share_noise_over_batch: bool = False) -> dict[str, Array]:
  """Draws n_samples per input in ONE batched chain and summarises them in the same graph.

  Args:
    denoise_fn: (x_tau (S*B, ...), tau (S*B,), cond tiled to S*B) -> eps_hat (S*B, ...), e.g.
      `lambda x, t, c: model.apply(params, x, t, c)`.
    cond: pytree of (B, ...) conditioning arrays (or None), tiled here with `tile_batch`.
    shape: per-input sample shape (B, ...).
    n_samples: S (static).
    method: "ddim" (num_steps S' <= T, default T; eta) or "ddpm" (all T steps).
    known, known_mask: optional (B, ...) observed values / mask, tiled like cond.
    return_samples: also return the raw samples (S, B, ...) under "samples".
    x0_clip: optional bound on the per-step estimate of s_0 (see `sample_ddpm`).
    share_noise_over_batch: sample s of every input draws the same noise (members coherent
      across the inputs of a batch, e.g. consecutive time slices; `_noise_drawer`).
  Returns: `summarize` dict of (B, ...) arrays (+ "samples").
  """
  if n_samples < 1:
    raise ValueError(f"sample_many: n_samples must be >= 1, got {n_samples}")
  shape = tuple(shape)
  big = (n_samples * shape[0],) + shape[1:]
  cond_t = tile_batch(cond, n_samples)
  known_t = None if known is None else tile_batch(known, n_samples)
  mask_t = None
  if known_mask is not None:
    mask_t = tile_batch(jnp.broadcast_to(known_mask, shape), n_samples)
  eps_fn = lambda x, tau: denoise_fn(x, tau, cond_t)
  groups = n_samples if share_noise_over_batch else 0
  if method == "ddpm":
    flat = sample_ddpm(eps_fn, schedule, big, rng, known_t, mask_t, x0_clip=x0_clip,
                       noise_groups=groups)
  elif method == "ddim":
    flat = sample_ddim(eps_fn, schedule, big, rng, num_steps or schedule.num_steps, eta,
                       known_t, mask_t, x0_clip=x0_clip, noise_groups=groups)
  else:
    raise ValueError(f"sample_many: method must be 'ddim' or 'ddpm', got {method!r}")
  samples = flat.reshape((n_samples,) + shape)
  out = summarize(samples)
  if return_samples:
    out["samples"] = samples
  return out
