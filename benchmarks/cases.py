"""The benchmark cases and their inputs: problem sizes, random parameters, batches.

A `Case` is one problem size (config, shapes as `TaskData.shapes`, train batch). The nytaxi cases
(`build_real`: the paper's architecture and the default config) draw their batches from the real
train split; the scaling cases (`scaling_cases`) use synthetic batches of the right shapes.
Parameters are random (`random_params`): the timing does not depend on their values. `make_tiny`
shrinks a config for the `--tiny` run.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import numpy as np

from diffrecon_jax.diffrecon import model
from diffrecon_jax.diffrecon import settings
from diffrecon_jax.diffrecon import train
from diffrecon_jax.data import pipeline
from diffrecon_jax.models.unet import bottleneck_shape


@dataclasses.dataclass
class Case:
  """One problem size: config (model sizes, diffusion), shapes (as TaskData.shapes), batch."""
  name: str
  config: Any
  shapes: dict
  batch_size: int

  @property
  def window(self) -> int:
    return int(self.shapes["window"])


def make_shapes(coarse: tuple, scale: int, channels: int, external_dim: int, window: int) -> dict:
  """`TaskData.shapes` of a synthetic grid: coarse (I, J), fine (N*I, N*J)."""
  return {"coarse_shape": list(coarse), "fine_shape": [coarse[0] * scale, coarse[1] * scale],
          "channels": channels, "external_dim": external_dim, "window": window, "scale": scale}


def make_tiny(config: Any) -> Any:
  """Shrinks `config` in place to the smallest models and runs that still take every path of
  the suite (`--tiny`): history 2, T = 10, DDIM with 2 steps, one-level U-Nets of width 8,
  batches of 4, 4 scored slices. The sizes of the tests' tiny config (tests/_train_helpers.py);
  what it times means nothing, it checks the suite against the package's current API."""
  config.data.history = 2
  config.diffusion.num_steps = 10
  config.sampling.steps = 2
  config.sampling.n_samples = 2
  for m in (config.model_c, config.model_f):
    m.base_channels = 8
    m.channel_mults = (1,)
    m.num_res_blocks = 1
    m.emb_dim = 8
    m.d_model = 8
    m.inter_dim = 8
  config.model_c.num_heads = 2
  config.model_c.num_layers = 1
  config.model_c.ff_dim = 8
  config.model_f.d_ff = 8
  config.model_f.top_k = 1
  config.model_f.num_blocks = 1
  config.model_f.num_kernels = 1
  config.model_f.encoder_channels = 2
  config.train.batch_size = 4
  config.train.steps_per_call = 1
  config.eval.batch_size = 4
  config.eval.max_slices = 4
  return config


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------
def abstract_params(models: model.Models, shapes: dict) -> Any:
  """ShapeDtypeStructs of `diffrecon.init_params` (nothing is computed)."""
  return jax.eval_shape(lambda k: model.init_params(models, shapes, k),
                        jax.random.PRNGKey(0))


def fill_params(abstract: Any, seed: int) -> Any:
  """Random parameters of the right shapes without running flax `init` (slow to jit on CPU).

  Kernels ~ N(0, 1/fan_in), norm scales 1, biases 0, tables/tokens N(0, 0.02): the scale of
  flax's default initialisers, which is all the timing needs.
  """
  rs = np.random.RandomState(seed)

  def fill(path, a):
    name = getattr(path[-1], "key", str(path[-1]))
    if name == "kernel":
      parent = getattr(path[-2], "key", "")
      # DenseGeneral q/k/v kernels (d, heads, head_dim) fan in over d; 'out' over heads*head_dim.
      fan = a.shape[0] if (len(a.shape) == 3 and parent != "out") else int(np.prod(a.shape[:-1]))
      return rs.standard_normal(a.shape).astype(np.float32) / np.sqrt(max(fan, 1))
    if name == "scale":
      return np.ones(a.shape, np.float32)
    if name == "bias":
      return np.zeros(a.shape, np.float32)
    return (0.02 * rs.standard_normal(a.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def random_params(models: model.Models, shapes: dict, seed: int = 0) -> Any:
  """{'c', 'f'} parameters of `models` for `shapes`, random (`fill_params`), on the device."""
  return jax.device_put(fill_params(abstract_params(models, shapes), seed))


def count_params(tree: Any) -> int:
  return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))


# --------------------------------------------------------------------------------------------
# A config on the real task
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Built:
  """A config's models on the real task, as training and evaluation build them, with random
  parameters: the joint objective's settings and the samplers' x0 clip bounds included."""
  case: Case
  models: model.Models
  params: Any
  clip: tuple
  joint: model.JointSettings
  params_setup_s: float


def build_real(name: str, config: Any, task: pipeline.TaskData) -> Built:
  """`Built` of `config` on `task`: `diffrecon.build_models_for_task` (fits the climatology prior
  when the config uses one), `train.joint_settings` and `diffrecon.x0_clip_bounds`."""
  case = Case(name, config, dict(task.shapes), int(config.train.batch_size))
  models = model.build_models_for_task(config, task)
  t0 = time.perf_counter()
  params = random_params(models, case.shapes)
  setup_s = time.perf_counter() - t0
  clip = model.x0_clip_bounds(float(config.sampling.x0_clip_factor), models, task)
  joint = train.joint_settings(settings.TrainSettings.from_config(config), task)
  return Built(case, models, params, clip, joint, setup_s)


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------
def synthetic_batch(shapes: dict, batch_size: int, seed: int, ratio: float = 0.5) -> dict:
  """A train batch of the right shapes (random values, random masks at the given ratio).

  Returns obs (B,t,I,J,C), mask (B,t,I,J), coarse (B,t,I,J,C), external (B,t,F),
  fine (B,NI,NJ,C), as `pipeline.sample_train_batch`.
  """
  rs = np.random.RandomState(seed)
  b, t = batch_size, int(shapes["window"])
  (i, j), (ni, nj) = shapes["coarse_shape"], shapes["fine_shape"]
  c, f = int(shapes["channels"]), int(shapes["external_dim"])
  coarse = rs.standard_normal((b, t, i, j, c)).astype(np.float32)
  mask = (rs.random_sample((b, t, i, j)) >= ratio).astype(np.float32)
  return {"obs": coarse * mask[..., None], "mask": mask, "coarse": coarse,
          "external": rs.random_sample((b, t, f)).astype(np.float32),
          "fine": rs.standard_normal((b, ni, nj, c)).astype(np.float32)}


def real_batch(config, task: pipeline.TaskData, models: model.Models, batch_size: int,
               seed: int) -> dict:
  """One train batch drawn from the real task exactly as the train step draws it (host numpy):
  the step's `train.BatchSpec` and arrays (`train.training_arrays`: with the climatology prior
  the batch also holds each slice's slot, batch['slot'] (B, t))."""
  spec = train.BatchSpec.from_task(config, task)
  out = pipeline.sample_train_batch(
      train.training_arrays(task, models), jax.random.PRNGKey(seed), batch_size=batch_size,
      history=spec.history, index_range=spec.index_range, patterns=spec.patterns)
  return {k: np.asarray(v) for k, v in out.items()}


def component_inputs(case: Case, params: dict, batch: dict) -> dict:
  """Inputs of each sub-network as the denoisers feed them (random maps and inter features).

  The U-Nets' input channels are read from their `conv_in` kernels and the bottleneck grid from
  `unet.bottleneck_shape`, so the inputs follow the denoisers rather than a copy of them.
  Returns {'unet_c', 'unet_f': (x (B,H,W,Cin), tau (B,), external (B,F), inter (B,Hd,Wd,Di)),
  'st_pointformer': (obs, mask, external), 't_patternnet': (coarse, external)}.
  """
  s, cfg = case.shapes, case.config
  b = case.batch_size
  rs = np.random.RandomState(3)
  (i, j), (ni, nj) = s["coarse_shape"], s["fine_shape"]
  r = lambda *shape: rs.standard_normal(shape).astype(np.float32)
  tau = (np.arange(b) % int(cfg.diffusion.num_steps)).astype(np.int32)
  ext = batch["external"]

  def unet_in(which, h, w, model_cfg):
    cin = int(params[which]["UNet_0"]["conv_in"]["kernel"].shape[2])
    down = bottleneck_shape(h, w, len(model_cfg.channel_mults))
    return (r(b, h, w, cin), tau, ext[:, -1], r(b, *down, int(model_cfg.inter_dim)))

  return {"unet_c": unet_in("c", i, j, cfg.model_c), "unet_f": unet_in("f", ni, nj, cfg.model_f),
          "st_pointformer": (batch["obs"], batch["mask"], ext),
          "t_patternnet": (batch["coarse"], ext)}


# --------------------------------------------------------------------------------------------
# Scaling points
# --------------------------------------------------------------------------------------------
def scaling_cases(base: Any, device: str, batch: int, tiny: bool = False) -> list:
  """(axis, value, Case) points of the scaling section: grid, history and batch size.

  On CPU the grid points run at batch 4 (the largest grid's step would not fit otherwise); on GPU
  every point at `batch`. `tiny`: one small grid point (`--tiny`: the section's code path, not
  its numbers; each point is one more train-step compile).
  """
  pts = []

  def case(name, coarse, scale, window, b):
    c = base.copy_and_resolve_references()
    c.data.scale_factor = scale
    c.data.history = window - 1
    c.train.batch_size = b
    return Case(name, c, make_shapes(coarse, scale, 2, 8, window), b)

  w = int(base.data.history) + 1
  if tiny:
    return [("grid", "tiny 4x4->8x8", case("tiny 4x4->8x8", (4, 4), 2, w, 2))]
  grid_b = batch if device == "gpu" else 4
  grids = [("nytaxi 8x6->16x12", (8, 6), 2), ("paper 8x8->32x32", (8, 8), 4),
           ("16x16->64x64", (16, 16), 4), ("UrbanFM 32x32->128x128", (32, 32), 4)]
  for name, coarse, n in grids:
    pts.append(("grid", name, case(name, coarse, n, w, grid_b)))
  for hist in (2, 12, 24):
    pts.append(("history", hist, case(f"history {hist}", (8, 6), 2, hist + 1, batch)))
  for b in ((4, 64) if device == "cpu" else (64, 256)):
    pts.append(("batch", b, case(f"batch {b}", (8, 6), 2, w, b)))
  return pts
