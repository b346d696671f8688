"""The DiffRecon model: its two denoisers, its losses and its samplers (paper Sec. IV).

Everything the paper's equations define lives here, in the order data flows through it:
  - `build_models`: Diffusion-C (U-Net + ST-PointFormer, Sec. IV-C, eqs. 14-25) and Diffusion-F
    (U-Net + T-PatternNet, Sec. IV-D, eqs. 26-34) with the shared noise schedule (Sec. IV-B);
  - the stage losses `loss_c` / `loss_f` (MSE of the noise predicted from s_tau of eq. 4 by the
    encoder-decoder of eqs. 8-13; the paper gives no loss formula, this is DDPM's) and the joint
    objective `joint_loss` of Sec. IV-E (w_c L_C + w_f L_F, with L_F conditioned on Diffusion-C's
    differentiable completion, so the gradient of L_F reaches Diffusion-C);
  - our additions, each a config switch: the climatology prior (`prior.py`): Diffusion-C diffuses
    the residual over a climatological first guess (`diffusion.coarse_residual`) with its loss on
    the hidden cells (`train.loss_c_on_hidden`), Diffusion-F the residual over a base that splits
    the coarse map by the climatology's shares (`diffusion.fine_base = "climatology"`; "uniform"
    spreads it evenly), each fed its first guess as an input channel; learned per-cell location
    embeddings (`model_c/model_f.location_dim`); exactly consistent fine maps
    (`block_mean_zero`, `sampling.consistent`);
  - the samplers `sample_coarse` (stage 1: completion with observed cells imposed at every reverse
    step) and `sample_fine` (stage 2: fine samples and their point estimate), and the one clipping
    rule for x0 estimates (`x0_clip_bound`).
The training loop, state and checkpoints are in `train.py`; batching a split through the
samplers is `method.DiffReconMethod`.
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

from diffrecon_jax.models import diffusion
from diffrecon_jax.data.coarsen import block_mean_zero
from diffrecon_jax.diffrecon import prior as prior_lib
from diffrecon_jax.diffrecon import settings as settings_lib
from diffrecon_jax.diffrecon.settings import SamplingSettings
from diffrecon_jax import calendar_choice

Array = jax.Array
# Training phases in order (Sec. IV-E): pre-train each stage, then train both jointly.
PHASES = ("stage_c", "stage_f", "joint")


# --------------------------------------------------------------------------------------------
# The two denoisers
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Models:
  """The two denoisers, the shared noise schedule and the first guesses they correct.

  fine_base: optional (coarse_now (B,I,J,C) normalised, slot_now (B,) int) -> (B,NI,NJ,C)
    normalised fine map implied by the coarse map (`uniform_fine_base` or
    `prior.fine_base`); when set, Diffusion-F diffuses the residual fine - fine_base instead of
    the fine map itself.
  prior: the fitted climatology (`prior.Prior`) when a stage uses it, else None.
  coarse_residual: Diffusion-C diffuses coarse - `prior.coarse_guess` (needs `prior`).
  feed_prior_f: Diffusion-F gets its base as an input channel (cond['prior']).
  loss_c_on_hidden: Diffusion-C's loss covers the hidden cells of the current slice only.
  residual_scaling: the residuals over the prior's first guesses are divided by their train-split
    std (`prior.residual_stats`) before diffusion, so they have the unit scale the noise
    schedule assumes.
  prediction: what the denoisers output: "eps" (the noise, DDPM; the paper) or "x0" (the clean
    target itself; the samplers derive the noise from it). An x0-predictor evaluated on pure
    noise is a regression of the target on the conditioning, i.e. a one-pass estimate of the
    posterior mean (`SamplingSettings.point`); an eps-predictor's x0 there is amplified
    1/sqrt(abar_T) ~ 170 times.
  point_fraction: share of each training batch drawn at the last step tau = T - 1 instead of
    uniformly: there an x0-predictor's loss is the regression loss of the posterior-mean
    estimate, which uniform draws train on 1 row in T.
  point_loss: the loss of an x0-predictor at the last step tau = T - 1, where its output is the
    point estimate: "l2" (squared error: the posterior mean) or "l1" (absolute error: the
    posterior median, which minimises the MAE of skewed counts) or "l1_physical" (the absolute
    error in the data's units, `point_scale`); every other step keeps the squared error the
    sampler's noise derivation needs.
  """
  c: nn.Module
  f: nn.Module
  schedule: diffusion.Schedule
  fine_base: Optional[Callable] = None
  prior: Optional[prior_lib.Prior] = None
  coarse_residual: bool = False
  feed_prior_f: bool = False
  loss_c_on_hidden: bool = False
  residual_scaling: bool = False
  prediction: str = "eps"
  point_fraction: float = 0.0
  point_loss: str = "l2"

  @property
  def needs_slots(self) -> bool:
    """Whether batches must carry each slice's climatology slot (batch['slot'] (B, t))."""
    return self.prior is not None

  def point_scale(self, stage: str):
    """Per-cell weights of the point step's absolute error, (H, W, C) jnp or 1.0.

    With point_loss "l1_physical" and a residual target: the stage's residual scale times the
    data's per-channel std (what one unit of the network's output is in the data's units),
    divided by its mean, so the point rows weigh in the loss as much as with "l1". The
    median the point step learns is the same either way; the weights decide which cells a
    network of limited size gets right: with plain "l1" on per-cell scaled residuals the quiet
    cells count as much as the busy ones, whose errors make most of the MAE. Measured on
    nytaxi (4,000 / 4,000 / 500 steps, validation): Diffusion-F's one-pass split of the true
    coarse map 2.626 against 2.690 for the prior's shares, where "l1" at 16,000 steps gave
    2.780 (WORKSPACE.md, "Where the fine error comes from")."""
    scale = self.residual_scale(stage)
    if self.point_loss != "l1_physical" or isinstance(scale, float):  # no residual scaling
      return 1.0
    level = "coarse" if stage == "c" else "fine"
    weights = scale * jnp.asarray(self.prior.stats[level]["std"], jnp.float32)
    return weights / jnp.mean(weights)

  def residual_scale(self, stage: str):
    """What stage "c" or "f" divides its residual target by: (C,) or per cell (H, W, C) jnp,
    or 1.0."""
    use = self.coarse_residual if stage == "c" else self.feed_prior_f
    if not (self.residual_scaling and use):
      return 1.0
    return jnp.asarray(getattr(self.prior, f"residual_std_{stage}"), jnp.float32)


def uses_prior(config: ml_collections.ConfigDict) -> bool:
  """Whether the config's model needs the climatology prior (`prior.fit_prior`)."""
  return settings_lib.PriorSettings.from_config(config).uses_prior


def build_models(config: ml_collections.ConfigDict, scale: int, stats: Optional[dict] = None,
                 aggregation: str = "sum", prior: Optional[prior_lib.Prior] = None) -> Models:
  """Diffusion-C / Diffusion-F from config.model_c / config.model_f, the rest of the model from
  `settings.ModelSettings` of the config (read here, once).

  With diffusion.fine_residual and the task's normalisation `stats`, Diffusion-F works on the
  residual over `fine_base` ("uniform": the coarse map's even spread; "climatology": its split
  by the prior's shares); with diffusion.coarse_residual Diffusion-C works on the residual over
  the prior's first guess. `prior` (`prior.fit_prior` of the task, or loaded from a workdir) is
  required when `uses_prior(config)`.
  """
  return _build(settings_lib.ModelSettings.from_config(config), config, scale, stats,
                aggregation, prior)


def _build(ms: settings_lib.ModelSettings, config: ml_collections.ConfigDict, scale: int,
           stats: Optional[dict], aggregation: str, prior: Optional[prior_lib.Prior]) -> Models:
  from diffrecon_jax.diffrecon import denoisers  # local: the model zoo is heavy to import.
  d, p = ms.diffusion, ms.prior
  schedule = diffusion.make_schedule(d.schedule, d.num_steps, d.beta_start, d.beta_end)
  if p.uses_prior and prior is None:
    raise ValueError("this config uses the climatology prior (diffusion.coarse_residual or "
                     "diffusion.fine_base='climatology') but none was given: pass "
                     "prior=prior.fit_prior(task), or train again if the workdir lacks "
                     f"{prior_lib.PRIOR_FILE}")
  base, feed_f = None, False
  if p.fine_residual:
    if stats is None:
      raise ValueError("diffusion.fine_residual needs the task's normalisation stats")
    if p.fine_base == "uniform":
      base = functools.partial(uniform_fine_base, stats=stats, scale=int(scale),
                               aggregation=aggregation)
    else:  # "climatology" (the choices are checked by `PriorSettings`)
      base, feed_f = functools.partial(prior_lib.fine_base, prior), True
  return Models(c=denoisers.DiffusionCNet(**config.model_c.to_dict()),
                f=denoisers.DiffusionFNet(scale=int(scale), **config.model_f.to_dict()),
                schedule=schedule, fine_base=base, prior=prior if p.uses_prior else None,
                coarse_residual=p.coarse_residual, feed_prior_f=feed_f,
                loss_c_on_hidden=ms.loss.loss_c_on_hidden,
                residual_scaling=p.residual_scaling != "", prediction=d.prediction,
                point_fraction=ms.loss.point_fraction, point_loss=ms.loss.point_loss)


def build_models_for_task(config: ml_collections.ConfigDict, task) -> Models:
  """`build_models` for a prepared `pipeline.TaskData`, fitting the prior on its train split
  when the config uses one."""
  ms = settings_lib.ModelSettings.from_config(config)
  p = ms.prior
  prior = prior_lib.fit_prior(
      task, per_cell=p.residual_scaling == "cell", local=p.guess_local_level,
      local_sigma=p.guess_local_sigma, local_shrink=p.guess_local_shrink,
      slot_sigma_minutes=p.slot_sigma_minutes, cross_fit_folds=p.cross_fit_folds,
      table=calendar_choice.resolve_table(config, task)["table"]
  ) if p.uses_prior else None
  # Through `build_models` by name: tests swap in stand-in denoisers there.
  return build_models(config, task.scale, task.stats, task.series.aggregation, prior)


def dummy_inputs(shapes: dict, batch_size: int = 1, models: Optional[Models] = None) -> tuple:
  """Zero inputs for `init`, from `TaskData.shapes` (with the first-guess channels `models`
  feeds its denoisers).

  Returns ((x_c (B,I,J,C), cond_c), (x_f (B,NI,NJ,C), cond_f)) with B = batch_size.
  """
  b, t = batch_size, int(shapes["window"])
  (i, j), (ni, nj) = shapes["coarse_shape"], shapes["fine_shape"]
  c, f = int(shapes["channels"]), int(shapes["external_dim"])
  z = lambda *s: jnp.zeros(s, jnp.float32)
  cond_c = {"obs": z(b, t, i, j, c), "mask": jnp.ones((b, t, i, j), jnp.float32),
            "external": z(b, t, f)}
  cond_f = {"coarse": z(b, t, i, j, c), "external": z(b, t, f)}
  if models is not None and models.coarse_residual:
    cond_c["prior"] = z(b, i, j, c)
    cond_c["anomaly"] = z(b, t, i, j, c)
  if models is not None and models.feed_prior_f:
    cond_f["prior"] = z(b, ni, nj, c)
  return (z(b, i, j, c), cond_c), (z(b, ni, nj, c), cond_f)


def init_params(models: Models, shapes: dict, rng: Array, prng_impl: str = "rbg") -> dict:
  """Initial {'c': ..., 'f': ...} parameters (pure; call under jit).

  rng: raw (2,) uint32 key. The per-parameter initialiser draws use `prng_impl` keys seeded
  from it: with the default "rbg" (XLA's RngBitGenerator; splits / fold_in still hash with
  threefry) the init compiles ~3x faster on CPU than with threefry, whose ~100 inlined copies
  dominate the compile time of the init; pass "threefry2x32" for backend-independent values.
  """
  (xc, cc), (xf, cf) = dummy_inputs(shapes, models=models)
  if prng_impl != "threefry2x32":
    rng = jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl=prng_impl)
  k_c, k_f = jax.random.split(rng)
  tau = jnp.zeros((xc.shape[0],), jnp.int32)
  return {"c": models.c.init({"params": k_c}, xc, tau, cc, deterministic=True)["params"],
          "f": models.f.init({"params": k_f}, xf, tau, cf, deterministic=True)["params"]}


# --------------------------------------------------------------------------------------------
# Losses (noise prediction on eq. 4 per stage; the joint objective of Sec. IV-E)
# --------------------------------------------------------------------------------------------
def denoise(models: Models, out: Array, x_tau: Array, tau: Array) -> tuple:
  """(eps_hat, x0_hat) from a denoiser's output under `models.prediction` (shapes of x_tau)."""
  s = models.schedule
  if models.prediction == "x0":
    eps = ((x_tau - diffusion.broadcast_to(s.sqrt_alpha_bars[tau], x_tau) * out)
           / diffusion.broadcast_to(s.sqrt_one_minus_alpha_bars[tau], x_tau))
    return eps, out
  return out, diffusion.predict_x0(s, x_tau, tau, out)


def stage_loss(models: Models, out: Array, x0: Array, noise: Array, tau: Array,
               weights=None, point_scale=1.0) -> Array:
  """The denoising loss of one stage: MSE of the output against its target (the noise for an
  eps-predictor, DDPM's simple loss; x0 for an x0-predictor), optionally cell-weighted; with
  an x0-predictor and `models.point_loss` "l1" / "l1_physical" the rows at tau = T - 1 count
  their absolute error instead, times `point_scale` (`Models.point_scale`). out, x0, noise
  (B, ...); tau (B,); weights and point_scale broadcastable to out."""
  if models.prediction != "x0":
    return diffusion.eps_loss(out, noise, weights)
  if models.point_loss == "l2":
    return diffusion.eps_loss(out, x0, weights)
  err = out.astype(jnp.float32) - x0.astype(jnp.float32)
  last = diffusion.broadcast_to(tau == models.schedule.num_steps - 1, err)
  return diffusion.weighted_mean(jnp.where(last, jnp.abs(err) * point_scale, jnp.square(err)),
                                weights)


def diffuse(schedule: diffusion.Schedule, x0: Array, rng: Array,
            point_fraction: float = 0.0) -> tuple:
  """Uniform tau (B,) (a share `point_fraction` at T - 1 instead), noise like x0, and
  x_tau = q_sample (eq. 4)."""
  k_tau, k_eps = jax.random.split(rng)
  tau = diffusion.sample_tau(k_tau, x0.shape[0], schedule.num_steps)
  if point_fraction > 0:
    last = jax.random.uniform(jax.random.fold_in(k_tau, 1), tau.shape) < point_fraction
    tau = jnp.where(last, schedule.num_steps - 1, tau)
  noise = jax.random.normal(k_eps, x0.shape, x0.dtype)
  return tau, noise, diffusion.q_sample(schedule, x0, tau, noise)


def coarse_condition(models: Models, obs: Array, mask: Array, external: Array,
                     slots: Optional[Array]) -> tuple:
  """Diffusion-C's conditioning and the first guess its target is taken over.

  obs (B,t,I,J,C), mask (B,t,I,J), external (B,t,F), slots (B,t) or None -> (cond dict,
  guess (B,I,J,C) normalised, or 0. without `models.coarse_residual`). With the prior, cond
  also holds 'prior' (the guess) and 'anomaly' (B,t,I,J,C): the observed deviations from the
  level-scaled climatology in residual units (`prior.coarse_first_guess`).
  """
  cond = {"obs": obs, "mask": mask, "external": external}
  if not models.coarse_residual:
    return cond, 0.0
  if slots is None:
    raise ValueError("Diffusion-C with the climatology prior needs the window's slots")
  guess, anomaly = prior_lib.coarse_first_guess(models.prior, obs, mask, slots)
  cond["prior"] = guess
  cond["anomaly"] = anomaly / models.residual_scale("c")
  return cond, guess


def loss_c(models: Models, params_c, batch: dict, rng: Array) -> tuple:
  """Diffusion-C loss: eps-MSE on the current pseudo-complete coarse map (or its residual over
  the first guess, `models.coarse_residual`), over every cell or the hidden ones only
  (`models.loss_c_on_hidden`, as CSDI and PriSTI weight their targets).

  x0 = batch['coarse'][:, -1] (B, I, J, C); condition: obs (B,t,I,J,C), mask (B,t,I,J),
  external (B,t,F) (and slot (B,t) with the prior). Returns (L_C scalar, x0_hat (B, I, J, C))
  where x0_hat is Diffusion-C's one-step differentiable estimate of the coarse map (first guess
  added back; `diffusion.predict_x0`).
  """
  k_diff, k_drop = jax.random.split(rng)
  cond, guess = coarse_condition(models, batch["obs"], batch["mask"], batch["external"],
                                 batch.get("slot"))
  scale = models.residual_scale("c")
  x0 = (batch["coarse"][:, -1] - guess) / scale
  tau, noise, x_tau = diffuse(models.schedule, x0, k_diff, models.point_fraction)
  out = models.c.apply({"params": params_c}, x_tau, tau, cond, deterministic=False,
                       rngs={"dropout": k_drop})
  x0_hat = denoise(models, out, x_tau, tau)[1] * scale + guess
  weights = (1.0 - batch["mask"][:, -1, ..., None]) if models.loss_c_on_hidden else None
  return stage_loss(models, out, x0, noise, tau, weights, models.point_scale("c")), x0_hat


def loss_f(models: Models, params_f, batch: dict, coarse_window: Array, rng: Array) -> Array:
  """Diffusion-F loss: eps-MSE on the current fine map batch['fine'] (B, NI, NJ, C), or on its
  residual over `models.fine_base(coarse_window[:, -1])` when that is set (in joint training the
  base then carries gradients to Diffusion-C too).

  Conditioned on coarse_window (B, t, I, J, C) and batch['external'] (B, t, F).
  """
  k_diff, k_drop = jax.random.split(rng)
  x0 = batch["fine"]
  cond = {"coarse": coarse_window, "external": batch["external"]}
  if models.fine_base is not None:
    slot = batch["slot"][:, -1] if models.needs_slots else None
    base = models.fine_base(coarse_window[:, -1], slot)
    x0 = (x0 - base) / models.residual_scale("f")
    if models.feed_prior_f:
      cond["prior"] = base
  tau, noise, x_tau = diffuse(models.schedule, x0, k_diff, models.point_fraction)
  out = models.f.apply({"params": params_f}, x_tau, tau, cond, deterministic=False,
                       rngs={"dropout": k_drop})
  return stage_loss(models, out, x0, noise, tau, point_scale=models.point_scale("f"))


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
    units (`x0_clip_bound` of `train.joint_x0_clip_factor`), or None.
  Built from `settings.TrainSettings` and the task by `train.joint_settings`.
  """
  weight_c: float
  weight_f: float
  x0_clip: Optional[float]


def phase_loss(phase: str, models: Models, params: dict, batch: dict, rng: Array,
               joint: Optional[JointSettings] = None) -> tuple:
  """(total loss, metrics dict) of one phase on one batch; differentiable in params. `joint`
  is needed by the joint phase only."""
  k_c, k_f = jax.random.split(rng)
  if phase == "stage_c":
    l_c, _ = loss_c(models, params["c"], batch, k_c)
    return l_c, {"loss": l_c, "loss_c": l_c}
  if phase == "stage_f":
    l_f = loss_f(models, params["f"], batch, batch["coarse"], k_f)
    return l_f, {"loss": l_f, "loss_f": l_f}
  if phase != "joint":
    raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
  if joint is None:
    raise ValueError("the joint phase needs its JointSettings (train.joint_settings)")
  return joint_loss(models, params, batch, rng, joint)


def joint_loss(models: Models, params: dict, batch: dict, rng: Array,
               joint: JointSettings) -> tuple:
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
def uniform_fine_base(coarse_now, slot_now=None, *, stats: dict, scale: int, aggregation: str):
  """The fine map implied by a coarse map alone, in normalised fine units (jnp, jit-able).

  (B, I, J, C) normalised coarse -> (B, N*I, N*J, C) normalised fine: each coarse value spread
  evenly over its N x N cells (`coarsen.upsample_uniform`: value / N^2 for sums, the value for
  means), i.e. the `interp` baseline's upsampling. Diffusion-F learns the residual on top of it.
  slot_now is ignored (the signature of `Models.fine_base`).
  """
  del slot_now
  c_mean = jnp.asarray(stats["coarse"]["mean"], jnp.float32)
  c_std = jnp.asarray(stats["coarse"]["std"], jnp.float32)
  f_mean = jnp.asarray(stats["fine"]["mean"], jnp.float32)
  f_std = jnp.asarray(stats["fine"]["std"], jnp.float32)
  phys = coarse_now * c_std + c_mean
  up = jnp.repeat(jnp.repeat(phys, scale, axis=-3), scale, axis=-2)
  if aggregation == "sum":
    up = up / (scale * scale)
  return (up - f_mean) / f_std


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


def _diffuses_prior_residual(models: Models, stage: str) -> bool:
  return bool(models.coarse_residual if stage == "c" else models.feed_prior_f)


def clip_bounds_need_train_split(models: Models) -> bool:
  """Whether `x0_clip_bounds` must read the train split: a stage that does not diffuse a residual
  over the prior has no measured maximum to take its bound from."""
  return not all(_diffuses_prior_residual(models, stage) for stage in ("c", "f"))


def x0_clip_bounds(factor: float, models: Models, task=None) -> tuple:
  """(coarse, fine) bounds of `x0_clip_bound` for the two samplers, in the units each chain
  samples. A stage that diffuses a residual over the prior takes the largest residual measured
  when the prior was fitted (`prior.residual_stats`, on the train split); any other stage reads
  the train split of `task` (pipeline.TaskData; needed only then: see
  `clip_bounds_need_train_split`): the normalised coarse maps, or the fine maps minus the uniform
  `fine_base` when that is set."""
  bounds = []
  for stage in ("c", "f"):
    if _diffuses_prior_residual(models, stage):
      absmax = getattr(models.prior, f"residual_absmax_{stage}")
      if not models.residual_scaling:  # the chain samples normalised units, not stds
        absmax = absmax * float(np.max(getattr(models.prior, f"residual_std_{stage}")))
      bounds.append(x0_clip_bound(factor, np.array([absmax])))
      continue
    if task is None:
      raise ValueError(f"the stage-{stage} clip bound of this model needs the task's train split")
    lo, hi = task.split.range("train")
    values = task.coarse[lo:hi]
    if stage == "f":
      values = task.fine[lo:hi]
      if models.fine_base is not None:
        values = values - np.asarray(models.fine_base(jnp.asarray(task.coarse[lo:hi]), None))
    bounds.append(x0_clip_bound(factor, values))
  return tuple(bounds)


def posterior_mean(models: Models, net: nn.Module, params, cond: dict, shape: tuple) -> Array:
  """One pass of an x0-predicting denoiser at the last step on x_T = 0 (the mean of pure
  noise, which carries no information about the target at abar_T ~ 3e-5): its estimate of
  E[target | cond], (B, ...) = shape."""
  if models.prediction != "x0":
    raise ValueError("sampling.point='posterior_mean' needs diffusion.prediction='x0' (an "
                     "eps-predictor's estimate at the last step is amplified ~170x)")
  tau = jnp.full((shape[0],), models.schedule.num_steps - 1, jnp.int32)
  return net.apply({"params": params}, jnp.zeros(shape, jnp.float32), tau, cond,
                   deterministic=True)


def _sample(models: Models, net: nn.Module, params, cond: dict, shape: tuple, rng: Array,
            settings: SamplingSettings, clip: Optional[float], known=None,
            known_mask=None, share_noise_over_batch: bool = False) -> dict:
  apply = functools.partial(net.apply, {"params": params}, deterministic=True)
  # The sequence encoder reads only the conditioning: run it once per input here, not at every
  # reverse step for every sample (denoisers module docstring).
  inputs = {"cond": cond, "inter": apply(None, None, cond, inter_only=True)}
  eps_fn = lambda x, t, c: denoise(models, apply(x, t, c["cond"], inter=c["inter"]), x, t)[0]
  return diffusion.sample_many(
      eps_fn, inputs, models.schedule, shape,
      rng, n_samples=settings.n_samples, method=settings.sampler, num_steps=settings.steps,
      eta=settings.eta, known=known, known_mask=known_mask, return_samples=True, x0_clip=clip,
      share_noise_over_batch=share_noise_over_batch)


def sample_coarse(models: Models, params_c, obs: Array, mask: Array, external: Array, rng: Array,
                  settings: SamplingSettings, clip: Optional[float] = None,
                  slots: Optional[Array] = None) -> Array:
  """Stage 1: Diffusion-C completes the current coarse map of each window.

  obs (B,t,I,J,C) normalised observations (0 where hidden), mask (B,t,I,J) 1 = observed,
  external (B,t,F), slots (B,t) climatology slots (with the prior) -> (B,I,J,C) the per-cell
  median of `settings.n_samples` completions (or the posterior-mean estimate, `settings.point`).
  The observed cells of the current slice are imposed at every reverse step (q_sample of the
  known values at that step's level) and exactly at the end. With `models.coarse_residual` the
  chain runs on the residual over the first guess, which is 0 on observed cells, and the guess
  is added back.
  """
  cond, guess = coarse_condition(models, obs, mask, external, slots)
  scale = models.residual_scale("c")
  known = (obs[:, -1] - guess) / scale
  m = mask[:, -1, ..., None]
  if settings.point == "posterior_mean":
    residual = posterior_mean(models, models.c, params_c, cond, obs[:, -1].shape)
    return jnp.where(m > 0.5, obs[:, -1], residual * scale + guess)
  out = _sample(models, models.c, params_c, cond, obs[:, -1].shape, rng, settings, clip,
                known=known, known_mask=m)
  return out["median"] * scale + guess


def fine_condition(models: Models, coarse: Array, external: Array,
                   slot_now: Optional[Array]) -> tuple:
  """Diffusion-F's conditioning and base: coarse (B,t,I,J,C) normalised window, external (B,t,F),
  slot_now (B,) or None -> (cond dict, base (B,NI,NJ,C) normalised or None)."""
  cond = {"coarse": coarse, "external": external}
  base = None
  if models.fine_base is not None:
    if models.needs_slots and slot_now is None:
      raise ValueError("Diffusion-F with the climatology base needs the current slot")
    base = models.fine_base(coarse[:, -1], slot_now)
    if models.feed_prior_f:
      cond["prior"] = base
  return cond, base


def sample_fine(models: Models, params_f, coarse: Array, external: Array, rng: Array,
                settings: SamplingSettings, clip: Optional[float] = None,
                slot_now: Optional[Array] = None) -> tuple:
  """Stage 2: Diffusion-F draws fine maps conditioned on a window of completed coarse maps.

  coarse (B,t,I,J,C) normalised completed window (current slice last), external (B,t,F),
  slot_now (B,) climatology slot of the current slice (with the prior) ->
  (point estimate (B,NI,NJ,C), samples (B,S,NI,NJ,C); batch-major so every output splits along
  axis 0). With the residual target the samples are base + residual; with
  `settings.consistent` every sample pools exactly (sum or mean) to the completed coarse map,
  and so does the point estimate: the per-cell median of more than two samples is not linear,
  so its residual is projected back onto the block constraint (the nearest map in L2); the
  posterior-mean estimate (`settings.point`) gets the same projection.
  """
  b, _, i, j, c = coarse.shape
  n = models.f.scale
  cond, base = fine_condition(models, coarse, external, slot_now)
  out = _sample(models, models.f, params_f, cond, (b, n * i, n * j, c), rng, settings, clip)
  samples = out["samples"]                                  # (S, B, NI, NJ, C)
  mean = None
  if settings.point == "posterior_mean":
    mean = posterior_mean(models, models.f, params_f, cond, (b, n * i, n * j, c))
  if base is None:
    point = jnp.median(samples, axis=0) if mean is None else mean
    return point, jnp.swapaxes(samples, 0, 1)
  # Back to normalised units first: with per-cell scales, removing the block means before
  # scaling would leave them non-zero.
  scale = models.residual_scale("f")
  samples = samples * scale
  if settings.consistent:
    samples = jax.vmap(lambda r: block_mean_zero(r, n))(samples)
  samples = samples + base[None]
  if mean is not None:
    mean = mean * scale
    point = (block_mean_zero(mean, n) if settings.consistent else mean) + base
  else:
    point = jnp.median(samples, axis=0)
    if settings.consistent and settings.n_samples > 2:
      # The median of one or two samples is their mean and pools exactly already.
      point = block_mean_zero(point - base, n) + base
  return point, jnp.swapaxes(samples, 0, 1)


# --------------------------------------------------------------------------------------------
# Ensemble members that carry the completion's uncertainty (`SamplingSettings.ensemble`)
# --------------------------------------------------------------------------------------------
def sample_coarse_members(models: Models, params_c, obs: Array, mask: Array, external: Array,
                          rng: Array, settings: SamplingSettings, clip: Optional[float] = None,
                          slots: Optional[Array] = None) -> tuple:
  """Stage 1 for an ensemble: the point completion and S member completions of each window.

  obs (B,t,I,J,C) normalised observations (0 where hidden), mask (B,t,I,J), external (B,t,F),
  slots (B,t) -> (point (B,I,J,C), members (B,S,I,J,C)), normalised. The point is the one-pass
  posterior estimate (`settings.point` "posterior_mean") or the per-cell median of the members.
  Member s draws the same noise for every window of the batch (and `rng` is meant to be the
  same for every batch of a run), so member s's completions of consecutive slices are one
  coherent trajectory: a window of member s's completions is a plausible history, not a
  patchwork of independent draws. Observed cells are exact in every member (eq. 5's imposition,
  `diffusion._impose`).
  """
  cond, guess = coarse_condition(models, obs, mask, external, slots)
  scale = models.residual_scale("c")
  m = mask[:, -1, ..., None]
  out = _sample(models, models.c, params_c, cond, obs[:, -1].shape, rng, settings, clip,
                known=(obs[:, -1] - guess) / scale, known_mask=m, share_noise_over_batch=True)
  members = jnp.where(m[None] > 0.5, obs[None, :, -1], out["samples"] * scale + guess)
  if settings.point == "posterior_mean":
    point = _posterior_completion(models, params_c, cond, guess, obs, m)
  else:
    point = jnp.median(members, axis=0)
  return point, jnp.swapaxes(members, 0, 1)


def _posterior_completion(models: Models, params_c, cond: dict, guess: Array, obs: Array,
                          m: Array) -> Array:
  """Diffusion-C's one-pass posterior completion (B,I,J,C): observed cells (m (B,I,J,1) = 1)
  exact, hidden ones the estimate over the first guess."""
  residual = posterior_mean(models, models.c, params_c, cond, obs[:, -1].shape)
  return jnp.where(m > 0.5, obs[:, -1], residual * models.residual_scale("c") + guess)


def point_coarse(models: Models, params_c, obs: Array, mask: Array, external: Array,
                 slots: Optional[Array] = None) -> Array:
  """Stage 1's point alone (`sample_coarse_members`' "posterior_mean" point, no members): obs
  (B,t,I,J,C) normalised, mask (B,t,I,J), external (B,t,F), slots (B,t) -> (B,I,J,C)."""
  cond, guess = coarse_condition(models, obs, mask, external, slots)
  return _posterior_completion(models, params_c, cond, guess, obs, mask[:, -1, ..., None])


def point_fine(models: Models, params_f, coarse: Array, external: Array,
               slot_now: Optional[Array] = None, consistent: bool = True) -> Array:
  """Diffusion-F's one-pass posterior estimate (x0-prediction) of the fine map of each window:
  coarse (B,t,I,J,C) normalised -> (B,NI,NJ,C) normalised; with the residual target and
  `consistent` it pools exactly to coarse[:, -1] (the same point as `sample_fine`'s)."""
  b, _, i, j, c = coarse.shape
  n = models.f.scale
  cond, base = fine_condition(models, coarse, external, slot_now)
  mean = posterior_mean(models, models.f, params_f, cond, (b, n * i, n * j, c))
  if base is None:
    return mean
  mean = mean * models.residual_scale("f")
  return (block_mean_zero(mean, n) if consistent else mean) + base


def sample_fine_members(models: Models, params_f, point_window: Array, member_windows: Array,
                        external: Array, rng: Array, settings: SamplingSettings,
                        clip: Optional[float] = None, slot_now: Optional[Array] = None) -> tuple:
  """Stage 2 for an ensemble: one fine map per member from the member's own completed window.

  point_window (B,t,I,J,C) the point completions' window, member_windows (B,S,t,I,J,C) each
  member's, external (B,t,F), slot_now (B,) -> (point (B,NI,NJ,C), members (B,S,NI,NJ,C)),
  normalised. Member s's fine map is one Diffusion-F draw conditioned on member s's window (and
  with `settings.consistent` pools exactly to member s's completion of the current slice). The
  point is `point_fine` on the point window ("posterior_mean"), or the per-cell median of the
  members projected onto the point completion's block constraint ("median").
  """
  b, s = member_windows.shape[:2]
  flat = member_windows.reshape((b * s,) + member_windows.shape[2:])
  rep = lambda a: None if a is None else jnp.repeat(a, s, axis=0)  # row b*S + s
  one = dataclasses.replace(settings, n_samples=1, point="median")
  _, samples = sample_fine(models, params_f, flat, rep(external), rng, one, clip, rep(slot_now))
  members = samples.reshape((b, s) + samples.shape[2:])
  if settings.point == "posterior_mean":
    return point_fine(models, params_f, point_window, external, slot_now,
                      settings.consistent), members
  point = jnp.median(members, axis=1)
  if settings.consistent and models.fine_base is not None:
    _, base = fine_condition(models, point_window, external, slot_now)
    point = block_mean_zero(point - base, models.f.scale) + base
  return point, members
