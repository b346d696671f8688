"""The DiffRecon model: its two denoisers, its losses and its samplers (paper Sec. IV).

Everything the paper's equations define lives here, in the order data flows through it:
  - `build_models`: Diffusion-C (U-Net + ST-PointFormer, Sec. IV-C, eqs. 14-25) and Diffusion-F
    (U-Net + T-PatternNet, Sec. IV-D, eqs. 26-34) with the shared noise schedule (Sec. IV-B);
  - the stage losses `loss_c` / `loss_f` (MSE of the noise predicted from s_tau of eq. 4 by the
    encoder-decoder of eqs. 8-13; the paper gives no loss formula, this is DDPM's) and the joint
    objective `joint_loss` of Sec. IV-E (w_c L_C + w_f L_F, with L_F conditioned on Diffusion-C's
    differentiable completion, so the gradient of L_F reaches Diffusion-C);
  - our additions to stage 2, each a config switch: the residual target over `fine_base`
    (`diffusion.fine_residual`) and exactly consistent fine maps (`block_mean_zero`,
    `sampling.consistent`);
  - the samplers `sample_coarse` (stage 1: completion with observed cells imposed at every reverse
    step) and `sample_fine` (stage 2: fine samples and their point estimate), and the one clipping
    rule for x0 estimates (`x0_clip_bound`).
The training loop, state and checkpoints are in `train.py`; batching a split through the
samplers is `diffrecon_method.DiffReconMethod`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffrecon_jax import diffusion

Array = jax.Array
# Training phases in order (Sec. IV-E): pre-train each stage, then train both jointly.
PHASES = ("stage_c", "stage_f", "joint")


# --------------------------------------------------------------------------------------------
# The two denoisers
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Models:
  """The two denoisers and the shared noise schedule.

  fine_base: optional (B,I,J,C) normalised coarse -> (B,NI,NJ,C) normalised fine map implied by
    the coarse map (`fine_base`); when set, Diffusion-F diffuses the residual
    fine - fine_base(coarse current) instead of the fine map itself.
  """
  c: nn.Module
  f: nn.Module
  schedule: diffusion.Schedule
  fine_base: Optional[Callable] = None


def build_models(config: ml_collections.ConfigDict, scale: int, stats: Optional[dict] = None,
                 aggregation: str = "sum") -> Models:
  """Diffusion-C / Diffusion-F from config.model_c / config.model_f, schedule from config.diffusion.

  With config.diffusion.fine_residual and the task's normalisation `stats`, Diffusion-F works on
  the residual over the coarse map's uniform upsampling (see `Models.fine_base`).
  """
  from diffrecon_jax.models import denoisers  # local: the model zoo is heavy to import.
  d = config.diffusion
  schedule = diffusion.make_schedule(d.schedule, int(d.num_steps), float(d.beta_start),
                                     float(d.beta_end))
  base = None
  if config.diffusion.get("fine_residual", False):
    if stats is None:
      raise ValueError("diffusion.fine_residual needs the task's normalisation stats")
    base = functools.partial(fine_base, stats=stats, scale=int(scale),
                             aggregation=aggregation)
  return Models(c=denoisers.DiffusionCNet(**config.model_c.to_dict()),
                f=denoisers.DiffusionFNet(scale=int(scale), **config.model_f.to_dict()),
                schedule=schedule, fine_base=base)


def dummy_inputs(shapes: dict, batch_size: int = 1) -> tuple:
  """Zero inputs for `init`, from `TaskData.shapes`.

  Returns ((x_c (B,I,J,C), cond_c), (x_f (B,NI,NJ,C), cond_f)) with B = batch_size.
  """
  b, t = batch_size, int(shapes["window"])
  (i, j), (ni, nj) = shapes["coarse_shape"], shapes["fine_shape"]
  c, f = int(shapes["channels"]), int(shapes["external_dim"])
  z = lambda *s: jnp.zeros(s, jnp.float32)
  cond_c = {"obs": z(b, t, i, j, c), "mask": jnp.ones((b, t, i, j), jnp.float32),
            "external": z(b, t, f)}
  cond_f = {"coarse": z(b, t, i, j, c), "external": z(b, t, f)}
  return (z(b, i, j, c), cond_c), (z(b, ni, nj, c), cond_f)


def init_params(models: Models, shapes: dict, rng: Array, prng_impl: str = "rbg") -> dict:
  """Initial {'c': ..., 'f': ...} parameters (pure; call under jit).

  rng: raw (2,) uint32 key. The per-parameter initialiser draws use `prng_impl` keys seeded
  from it: with the default "rbg" (XLA's RngBitGenerator; splits / fold_in still hash with
  threefry) the init compiles ~3x faster on CPU than with threefry, whose ~100 inlined copies
  dominate the compile time of the init; pass "threefry2x32" for backend-independent values.
  """
  (xc, cc), (xf, cf) = dummy_inputs(shapes)
  if prng_impl != "threefry2x32":
    rng = jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl=prng_impl)
  k_c, k_f = jax.random.split(rng)
  tau = jnp.zeros((xc.shape[0],), jnp.int32)
  return {"c": models.c.init({"params": k_c}, xc, tau, cc, deterministic=True)["params"],
          "f": models.f.init({"params": k_f}, xf, tau, cf, deterministic=True)["params"]}


# --------------------------------------------------------------------------------------------
# Losses (noise prediction on eq. 4 per stage; the joint objective of Sec. IV-E)
# --------------------------------------------------------------------------------------------
def diffuse(schedule: diffusion.Schedule, x0: Array, rng: Array) -> tuple:
  """Uniform tau (B,), noise like x0, and x_tau = q_sample (eq. 4)."""
  k_tau, k_eps = jax.random.split(rng)
  tau = diffusion.sample_tau(k_tau, x0.shape[0], schedule.num_steps)
  noise = jax.random.normal(k_eps, x0.shape, x0.dtype)
  return tau, noise, diffusion.q_sample(schedule, x0, tau, noise)


def loss_c(models: Models, params_c, batch: dict, rng: Array) -> tuple:
  """Diffusion-C loss: eps-MSE on the current pseudo-complete coarse map.

  x0 = batch['coarse'][:, -1] (B, I, J, C); condition: obs (B,t,I,J,C), mask (B,t,I,J),
  external (B,t,F). Returns (L_C scalar, x0_hat (B, I, J, C)) where x0_hat is Diffusion-C's
  one-step differentiable estimate of x0 (`diffusion.predict_x0`).
  """
  k_diff, k_drop = jax.random.split(rng)
  x0 = batch["coarse"][:, -1]
  tau, noise, x_tau = diffuse(models.schedule, x0, k_diff)
  cond = {"obs": batch["obs"], "mask": batch["mask"], "external": batch["external"]}
  eps_hat = models.c.apply({"params": params_c}, x_tau, tau, cond, deterministic=False,
                           rngs={"dropout": k_drop})
  x0_hat = diffusion.predict_x0(models.schedule, x_tau, tau, eps_hat)
  return diffusion.eps_loss(eps_hat, noise), x0_hat


def loss_f(models: Models, params_f, batch: dict, coarse_window: Array, rng: Array) -> Array:
  """Diffusion-F loss: eps-MSE on the current fine map batch['fine'] (B, NI, NJ, C), or on its
  residual over `models.fine_base(coarse_window[:, -1])` when that is set (in joint training the
  base then carries gradients to Diffusion-C too).

  Conditioned on coarse_window (B, t, I, J, C) and batch['external'] (B, t, F).
  """
  k_diff, k_drop = jax.random.split(rng)
  x0 = batch["fine"]
  if models.fine_base is not None:
    x0 = x0 - models.fine_base(coarse_window[:, -1])
  tau, noise, x_tau = diffuse(models.schedule, x0, k_diff)
  cond = {"coarse": coarse_window, "external": batch["external"]}
  eps_hat = models.f.apply({"params": params_f}, x_tau, tau, cond, deterministic=False,
                           rngs={"dropout": k_drop})
  return diffusion.eps_loss(eps_hat, noise)


def complete_current(batch: dict, x0_hat: Array, clip: Optional[float] = None) -> Array:
  """The window Diffusion-F sees in joint training: (B, t, I, J, C).

  Current slice: observed cells keep their values, missing cells take Diffusion-C's estimate,
  mask * obs + (1 - mask) * x0_hat. History slices stay pseudo-complete: completing them too would
  need one Diffusion-C pass per history slice (t times the cost) for conditioning that
  pre-training already made Diffusion-F rely on. `clip` bounds x0_hat to [-clip, clip]
  (x0_hat divides by sqrt(abar_tau), which is small at the noisiest steps).
  """
  if clip is not None:
    x0_hat = jnp.clip(x0_hat, -clip, clip)
  m = batch["mask"][:, -1, ..., None]
  current = m * batch["obs"][:, -1] + (1.0 - m) * x0_hat
  return batch["coarse"].at[:, -1].set(current)


@dataclasses.dataclass(frozen=True)
class JointSettings:
  """Static settings of the joint objective (hashable; closed over by the train step).

  weight_c, weight_f: loss = weight_c * L_C + weight_f * L_F (`train.joint_weight_c/_f`).
  x0_clip: bound on Diffusion-C's one-step estimate that completes the coarse window, normalised
    units (`x0_clip_bound`), or None.
  """
  weight_c: float = 1.0
  weight_f: float = 1.0
  x0_clip: Optional[float] = None


def phase_loss(phase: str, models: Models, params: dict, batch: dict, rng: Array,
               joint: JointSettings = JointSettings()) -> tuple:
  """(total loss, metrics dict) of one phase on one batch; differentiable in params."""
  k_c, k_f = jax.random.split(rng)
  if phase == "stage_c":
    l_c, _ = loss_c(models, params["c"], batch, k_c)
    return l_c, {"loss": l_c, "loss_c": l_c}
  if phase == "stage_f":
    l_f = loss_f(models, params["f"], batch, batch["coarse"], k_f)
    return l_f, {"loss": l_f, "loss_f": l_f}
  if phase != "joint":
    raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
  return joint_loss(models, params, batch, rng, joint)


def joint_loss(models: Models, params: dict, batch: dict, rng: Array,
               joint: JointSettings = JointSettings()) -> tuple:
  """The joint objective of Sec. IV-E, w_c L_C + w_f L_F, in one differentiable graph.

  L_C as in stage C; its x0_hat completes the current coarse map (`complete_current`), and L_F is
  computed with Diffusion-F conditioned on that window, so grad L_F reaches Diffusion-C's params.
  """
  k_c, k_f = jax.random.split(rng)
  l_c, x0_hat = loss_c(models, params["c"], batch, k_c)
  window = complete_current(batch, x0_hat, joint.x0_clip)
  l_f = loss_f(models, params["f"], batch, window, k_f)
  loss = joint.weight_c * l_c + joint.weight_f * l_f
  return loss, {"loss": loss, "loss_c": l_c, "loss_f": l_f}


# --------------------------------------------------------------------------------------------
# Stage 2: the residual base and consistent fine maps (ours)
# --------------------------------------------------------------------------------------------
def fine_base(coarse_now, stats: dict, scale: int, aggregation: str):
  """The fine map implied by a coarse map alone, in normalised fine units (jnp, jit-able).

  (B, I, J, C) normalised coarse -> (B, N*I, N*J, C) normalised fine: each coarse value spread
  evenly over its N x N cells (`coarsen.upsample_uniform`: value / N^2 for sums, the value for
  means), i.e. the `interp` baseline's upsampling. Diffusion-F learns the residual on top of it.
  """
  c_mean = jnp.asarray(stats["coarse"]["mean"], jnp.float32)
  c_std = jnp.asarray(stats["coarse"]["std"], jnp.float32)
  f_mean = jnp.asarray(stats["fine"]["mean"], jnp.float32)
  f_std = jnp.asarray(stats["fine"]["std"], jnp.float32)
  phys = coarse_now * c_std + c_mean
  up = jnp.repeat(jnp.repeat(phys, scale, axis=-3), scale, axis=-2)
  if aggregation == "sum":
    up = up / (scale * scale)
  return (up - f_mean) / f_std


def block_mean_zero(residual, scale: int):
  """Removes the mean of every N x N block: (B, NI, NJ, C) -> same shape.

  Added to `fine_base` output, the result pools (sum or mean) exactly to the coarse map, since
  the normalisation is affine per channel and the base is constant over each block.
  """
  b, h, w, c = residual.shape
  blocks = residual.reshape(b, h // scale, scale, w // scale, scale, c)
  return (blocks - blocks.mean(axis=(2, 4), keepdims=True)).reshape(b, h, w, c)


# --------------------------------------------------------------------------------------------
# Sampling (paper Sec. IV-B, eqs. 6-7; DDIM as the fast variant)
# --------------------------------------------------------------------------------------------
def x0_clip_bound(factor: float, train_values: np.ndarray) -> Optional[float]:
  """The one clipping rule for x0 estimates: `factor` times the largest |value| of the normalised
  train split (`train_values`, any shape), or None when factor <= 0.

  An eps-predictor's x0 estimate divides by sqrt(abar_tau) (~0.006 at the last step of the quad
  schedule): an early, poorly trained model otherwise diverges in the reverse chain and in the
  joint loss. Used by the sampler (`sampling.x0_clip_factor`) and the joint objective
  (`train.joint_x0_clip_factor`), each on its own stage's values.
  """
  if factor <= 0:
    return None
  return float(factor) * float(np.abs(train_values).max())


def x0_clip_bounds(factor: float, task, models: Models) -> tuple:
  """(coarse, fine) bounds of `x0_clip_bound` for the two samplers, from the train split of
  `task` (pipeline.TaskData) only; the fine bound applies to what Diffusion-F samples (the
  residual over `fine_base` when that is set)."""
  lo, hi = task.split.range("train")
  fine = task.fine[lo:hi]
  if models.fine_base is not None:
    fine = fine - np.asarray(models.fine_base(task.coarse[lo:hi]))
  return (x0_clip_bound(factor, task.coarse[lo:hi]), x0_clip_bound(factor, fine))


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  """The sampler, from `config.sampling` (hashable: static under jit).

  sampler: "ddim" (S = `steps` steps) or "ddpm" (ancestral, all T training steps).
  steps: S for DDIM (ignored by DDPM, which always takes T).
  eta: DDIM stochasticity (0 = deterministic chain, 1 = DDPM-like noise).
  n_samples: samples per input; the point estimate is their per-cell median.
  consistent: fine maps pool exactly to the completed coarse map (needs the residual target).
  """
  sampler: str = "ddim"
  steps: int = 10
  eta: float = 1.0
  n_samples: int = 2
  consistent: bool = True

  @classmethod
  def from_config(cls, sampling: ml_collections.ConfigDict, num_train_steps: int):
    if sampling.sampler not in ("ddim", "ddpm"):
      raise ValueError(f"sampling.sampler must be 'ddim' or 'ddpm', got {sampling.sampler!r}")
    steps = int(sampling.steps) if sampling.sampler == "ddim" else int(num_train_steps)
    return cls(sampler=str(sampling.sampler), steps=steps, eta=float(sampling.eta),
               n_samples=int(sampling.n_samples), consistent=bool(sampling.consistent))

  def describe(self) -> dict:
    """The `sampler` entry of results.json."""
    d = {"name": self.sampler, "steps": self.steps, "n_samples": self.n_samples}
    if self.sampler == "ddim":
      d["eta"] = self.eta
    return d


def _sample(models: Models, net: nn.Module, params, cond: dict, shape: tuple, rng: Array,
            settings: SamplingSettings, clip: Optional[float], known=None,
            known_mask=None) -> dict:
  apply = functools.partial(net.apply, {"params": params}, deterministic=True)
  # The sequence encoder reads only the conditioning: run it once per input here, not at every
  # reverse step for every sample (denoisers module docstring).
  inputs = {"cond": cond, "inter": apply(None, None, cond, inter_only=True)}
  return diffusion.sample_many(
      lambda x, t, c: apply(x, t, c["cond"], inter=c["inter"]), inputs, models.schedule, shape,
      rng, n_samples=settings.n_samples, method=settings.sampler, num_steps=settings.steps,
      eta=settings.eta, known=known, known_mask=known_mask, return_samples=True, x0_clip=clip)


def sample_coarse(models: Models, params_c, obs: Array, mask: Array, external: Array, rng: Array,
                  settings: SamplingSettings, clip: Optional[float] = None) -> Array:
  """Stage 1: Diffusion-C completes the current coarse map of each window.

  obs (B,t,I,J,C) normalised observations (0 where hidden), mask (B,t,I,J) 1 = observed,
  external (B,t,F) -> (B,I,J,C) the per-cell median of `settings.n_samples` completions. The
  observed cells of the current slice are imposed at every reverse step (q_sample of the known
  values at that step's level) and exactly at the end.
  """
  cond = {"obs": obs, "mask": mask, "external": external}
  out = _sample(models, models.c, params_c, cond, obs[:, -1].shape, rng, settings, clip,
                known=obs[:, -1], known_mask=mask[:, -1, ..., None])
  return out["median"]


def sample_fine(models: Models, params_f, coarse: Array, external: Array, rng: Array,
                settings: SamplingSettings, clip: Optional[float] = None) -> tuple:
  """Stage 2: Diffusion-F draws fine maps conditioned on a window of completed coarse maps.

  coarse (B,t,I,J,C) normalised completed window (current slice last), external (B,t,F) ->
  (point estimate (B,NI,NJ,C), samples (B,S,NI,NJ,C); batch-major so every output splits along
  axis 0). With the residual target the samples are base + residual; with
  `settings.consistent` every sample pools exactly (sum or mean) to the completed coarse map,
  and so does the point estimate: the per-cell median of more than two samples is not linear,
  so its residual is projected back onto the block constraint (the nearest map in L2).
  """
  b, _, i, j, c = coarse.shape
  n = models.f.scale
  out = _sample(models, models.f, params_f, {"coarse": coarse, "external": external},
                (b, n * i, n * j, c), rng, settings, clip)
  samples = out["samples"]                                  # (S, B, NI, NJ, C)
  if models.fine_base is None:
    return jnp.median(samples, axis=0), jnp.swapaxes(samples, 0, 1)
  base = models.fine_base(coarse[:, -1])
  if settings.consistent:
    samples = jax.vmap(lambda r: block_mean_zero(r, n))(samples)
  samples = samples + base[None]
  median = jnp.median(samples, axis=0)
  if settings.consistent and settings.n_samples > 2:
    # The median of one or two samples is their mean and pools exactly already.
    median = block_mean_zero(median - base, n) + base
  return median, jnp.swapaxes(samples, 0, 1)
