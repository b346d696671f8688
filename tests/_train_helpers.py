"""Shared pieces of the training tests: a tiny config and the embedded task, prepared once."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from diffrecon_jax.configs import default


def tiny_config(steps=(4, 4, 4), batch_size: int = 8, steps_per_call: int = 2,
                checkpoint_every: int = 2) -> ml_collections.ConfigDict:
  """The embedded nytaxi task with the smallest models that still exercise every path."""
  c = default.get_config()
  c.data.history = 2
  c.patterns.train = ("random:0.4", "large_scale:0.25")
  c.diffusion.num_steps = 10
  for m in (c.model_c, c.model_f):
    m.base_channels = 8
    m.channel_mults = (1,)
    m.emb_dim = 8
    m.d_model = 8
    m.inter_dim = 8
  c.model_c.num_heads = 2
  c.model_c.ff_dim = 8
  c.model_f.d_ff = 8
  c.model_f.top_k = 1
  c.model_f.num_blocks = 1
  c.model_f.num_kernels = 1
  c.model_f.encoder_channels = 2
  c.train.batch_size = batch_size
  c.train.steps_c, c.train.steps_f, c.train.steps_joint = steps
  c.train.steps_per_call = steps_per_call
  c.train.checkpoint_every = checkpoint_every
  c.train.log_every = checkpoint_every
  c.train.keep_checkpoints = 2
  c.train.ema_decay = 0.9
  c.sampling.n_samples = 2          # the smallest ensemble: every sampling path, least time
  c.calibration.val_slices = 8      # a few validation slices: the fit's path, not its quality
  return c


@functools.lru_cache(maxsize=None)
def tiny_task():
  """`pipeline.TaskData` of `tiny_config()` (embedded nytaxi, history 2), built once."""
  from diffrecon_jax.data import pipeline
  return pipeline.prepare_task(tiny_config())


# ---- stand-in denoisers: same call convention as diffrecon/denoisers.py, compile in ~1 s ----
# The real denoisers take ~1 min to compile a train step on 2 CPU cores; tests of the training
# logic itself (optimizers, EMA, gradient flow, NaN checks) use these instead.
class StandInC(nn.Module):
  @nn.compact
  def __call__(self, x, tau, cond, deterministic=True, inter=None, inter_only=False):
    if inter_only:  # no sequence encoder: nothing to precompute
      return None
    emb = nn.Dense(8)(jnp.sin(tau[:, None].astype(jnp.float32) / 3.0 + jnp.arange(4.0)))
    h = jnp.concatenate([x, cond["obs"][:, -1], cond["mask"][:, -1, ..., None]], -1)
    h = nn.Conv(8, (3, 3))(h) + emb[:, None, None]
    h = h + nn.Dense(8)(cond["external"].mean(1))[:, None, None]
    return nn.Conv(x.shape[-1], (3, 3))(nn.silu(h))


class StandInF(nn.Module):
  scale: int = 2

  @nn.compact
  def __call__(self, x, tau, cond, deterministic=True, inter=None, inter_only=False):
    if inter_only:
      return None
    emb = nn.Dense(8)(jnp.sin(tau[:, None].astype(jnp.float32) / 3.0 + jnp.arange(4.0)))
    up = jnp.repeat(jnp.repeat(cond["coarse"][:, -1], self.scale, 1), self.scale, 2)
    h = nn.Conv(8, (3, 3))(jnp.concatenate([x, up], -1)) + emb[:, None, None]
    return nn.Conv(x.shape[-1], (3, 3))(nn.silu(h))


def standin_models(config, scale, stats=None, aggregation="sum", prior=None):
  """`diffrecon.Models` with the stand-in denoisers and the config's schedule (plain fine
  target: the stand-ins test the training logic, not the residual parameterisation). Same
  signature as `diffrecon.build_models`, so `loading.load_for_sampling` takes it too."""
  del stats, aggregation, prior
  from diffrecon_jax.diffrecon import model
  from diffrecon_jax.models import diffusion
  d = config.diffusion
  return model.Models(StandInC(), StandInF(scale=scale),
                      diffusion.make_schedule(d.schedule, d.num_steps, d.beta_start, d.beta_end),
                      prediction=d.prediction)


FAST_COMPILE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


@functools.lru_cache(maxsize=None)
def _real_params(models_json: str, scale: int, shapes_json: str, seed: int):
  """Fresh parameters of the real denoisers, initialised once per process (the jitted init of
  the real models takes ~5-10 s to compile on 2 cores). They depend on the model fields
  (`models_json`: {"model_c": ..., "model_f": ...}) and the shapes only, not on the
  aggregation, the statistics or the sampler."""
  import dataclasses
  import json
  import jax
  from diffrecon_jax.diffrecon import checkpoints, model
  config = tiny_config()
  fields = checkpoints.config_from_json(models_json)
  config.model_c, config.model_f = fields.model_c, fields.model_f
  feeds = json.loads(models_json)["feeds"]
  # The residual targets change no parameter; the first-guess input channels do.
  config.diffusion.fine_residual = False
  config.diffusion.coarse_residual = False
  models = dataclasses.replace(model.build_models(config, scale),
                               coarse_residual=feeds[0], feed_prior_f=feeds[1])
  shapes = json.loads(shapes_json)
  return jax.jit(lambda k: model.init_params(models, shapes, k))(jax.random.PRNGKey(seed))


def tiny_diffrecon(config=None, task=None, seed: int = 0, devices=None):
  """`DiffReconMethod` with the real denoisers of `config` (default `tiny_config()` sampling with
  3 DDIM steps, batches of 8), freshly initialised from `seed`, clip bounds from `task`'s train
  split (default `tiny_task()`). Untrained, so its samples are noisy and differ from each other:
  what the sampling-path tests need. `devices`: where its batches run (default: every local
  device)."""
  import json
  from diffrecon_jax.diffrecon import model
  from diffrecon_jax.diffrecon import method as diffrecon_method
  if config is None:
    config = tiny_config()
    config.sampling.steps = 3
    config.eval.batch_size = 8
  task = tiny_task() if task is None else task
  models = model.build_models_for_task(config, task)
  models_json = json.dumps({"model_c": config.model_c.to_dict(),
                            "model_f": config.model_f.to_dict(),
                            "feeds": [models.coarse_residual, models.feed_prior_f]},
                           sort_keys=True)
  params = _real_params(models_json, int(task.scale), json.dumps(task.shapes, sort_keys=True),
                        int(seed))
  clip = model.x0_clip_bounds(float(config.sampling.x0_clip_factor), models, task)
  return diffrecon_method.DiffReconMethod(config, params, models, clip, devices=devices)
