"""DiffRecon as an evaluated method: stage 1 completes, stage 2 infers (paper Sec. IV-A).

Reconstruction of the slices `slices` from what the evaluation lets a method see
(`evaluate.ObservedTask`: the coarse series with its hidden cells NaN, the mask, the external
features; nothing else of the task is read at sampling time):
  1. Diffusion-C completes the coarse map of every slice the windows need (the slices themselves
     and the `history` slices before the first one), each from its own window of *incomplete*
     observations; observed cells are imposed at every reverse step and exactly at the end
     (`diffusion._impose`). The per-cell median of the samples is the completed coarse map.
  2. Diffusion-F draws fine samples for each slice conditioned on the window of completed coarse
     maps (through T-PatternNet) and the external features; the median is the point estimate.
     With `diffusion.fine_consistent` every sample pools exactly (sum or mean) to the completed
     coarse map, and so does the point estimate: the per-cell median of more than two samples
     is not linear, so its residual is projected back onto the block constraint.
Both chains run as one compiled function per stage on fixed-size batches (the last batch is padded),
so nothing recompiles across batches, patterns or splits. On CPU several batches run at once from
a small thread pool (`eval.concurrent_batches`): XLA:CPU keeps about one core busy with one
sampler program of many small ops, so two programs side by side on a 2-core machine halve the
time per batch (measured 2150 -> 1073 ms per Diffusion-F batch; benchmarks/README.md).
"""
from __future__ import annotations

import concurrent.futures
import functools
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from diffrecon_jax import diffusion
from diffrecon_jax.data import pipeline


class DiffReconMethod:
  """`reconstruct(view, slices)` with trained (EMA) parameters; see module docstring."""

  name = "diffrecon"

  def __init__(self, config, params: dict, models, x0_clip: tuple = (None, None)):
    """x0_clip: (coarse, fine) bounds on each reverse step's estimate of s_0, normalised units
    (`x0_clip_bounds`: computed from the train split when the method is built), or None for no
    clip."""
    self.config = config
    self.x0_clip = tuple(x0_clip)
    # Fine maps that pool exactly to the completed coarse map (residual parameterisation only).
    self.consistent = bool(config.diffusion.get("fine_consistent", False))
    self.params = params
    self.models = models
    d = config.diffusion
    self.method = d.sampler
    self.steps = int(d.sampler_steps) if d.sampler == "ddim" else int(d.num_steps)
    self.eta = float(d.ddim_eta)
    self.n_samples = int(d.n_samples)
    self.batch = int(config.eval.batch_size)
    self.workers = concurrent_batches(config)
    self._compiled = set()  # (stage, batch size) pairs already compiled
    self.sampler = {"name": self.method, "steps": self.steps, "n_samples": self.n_samples}
    if self.method == "ddim":
      self.sampler["eta"] = self.eta
    # Sampler noise: `diffusion.sampling_prng_impl` ("rbg" on the default configs: measured
    # faster on CPU than threefry) or JAX's default when unset.
    self._rng = jax.random.key(int(config.seed) + 1,
                               impl=config.diffusion.get("sampling_prng_impl", None))
    self._stage_c = jax.jit(self._sample_c)
    self._stage_f = jax.jit(self._sample_f)

  # -- compiled stages -------------------------------------------------------------------------
  def _sample(self, net, params, cond, shape, rng, clip, known=None, known_mask=None):
    apply = functools.partial(net.apply, {"params": params}, deterministic=True)
    # The sequence encoder reads only the conditioning: run it once per input here, not at
    # every reverse step for every sample (denoisers module docstring).
    inputs = {"cond": cond, "inter": apply(None, None, cond, inter_only=True)}
    return diffusion.sample_many(
        lambda x, t, c: apply(x, t, c["cond"], inter=c["inter"]), inputs,
        self.models.schedule, shape, rng, n_samples=self.n_samples, method=self.method,
        num_steps=self.steps, eta=self.eta, known=known, known_mask=known_mask,
        return_samples=True, x0_clip=clip)

  def _sample_c(self, params, obs, mask, external, rng):
    """obs (B,t,I,J,C), mask (B,t,I,J), external (B,t,F) -> median completion (B,I,J,C)."""
    cond = {"obs": obs, "mask": mask, "external": external}
    out = self._sample(self.models.c, params, cond, obs[:, -1].shape, rng, self.x0_clip[0],
                       known=obs[:, -1], known_mask=mask[:, -1, ..., None])
    return out["median"]

  def _sample_f(self, params, coarse, external, rng):
    """coarse (B,t,I,J,C) completed window, external (B,t,F) -> (median (B,NI,NJ,C),
    samples (B,S,NI,NJ,C); batch-major so every output of a stage is split along axis 0)."""
    b, _, i, j, c = coarse.shape
    n = self.models.f.scale
    out = self._sample(self.models.f, params, {"coarse": coarse, "external": external},
                       (b, n * i, n * j, c), rng, self.x0_clip[1])
    samples = out["samples"]                                  # (S, B, NI, NJ, C)
    if self.models.fine_base is None:
      return jnp.median(samples, axis=0), jnp.swapaxes(samples, 0, 1)
    base = self.models.fine_base(coarse[:, -1])               # residual parameterisation
    if self.consistent:
      samples = jax.vmap(lambda r: pipeline.block_mean_zero(r, n))(samples)
    samples = samples + base[None]
    median = jnp.median(samples, axis=0)
    if self.consistent and self.n_samples > 2:
      # The median of one or two samples is their mean and pools exactly already; a per-cell
      # median of more is not linear, so its residual's block means are removed again (the
      # nearest map, in L2, that pools exactly to the completed coarse map).
      median = pipeline.block_mean_zero(median - base, n) + base
    return median, jnp.swapaxes(samples, 0, 1)

  # -- host loop -------------------------------------------------------------------------------
  def _batched(self, stage: str, fn, arrays: list, rng) -> list:
    """Runs `fn(*batch, rng_k)` over fixed-size batches along axis 0 (padding the last batch so
    the compiled function sees one shape) and concatenates each output along axis 0.

    Batch k always gets `fold_in(rng, k)`, so results do not depend on how many batches run at
    once. The first batch of a stage at a new batch size runs alone (it compiles), then
    `self.workers` at a time.
    """
    n = arrays[0].shape[0]
    size = balanced_batch_size(n, self.batch, BALANCE_BATCHES_FOR)
    starts = list(range(0, n, size))

    def one(k: int) -> list:
      part = [a[starts[k]:starts[k] + size] for a in arrays]
      real = part[0].shape[0]
      if real < size:
        part = [np.concatenate([p, np.repeat(p[-1:], size - real, axis=0)]) for p in part]
      res = fn(*part, jax.random.fold_in(rng, k))
      return [np.asarray(r)[:real] for r in (res if isinstance(res, tuple) else (res,))]

    outs = []
    if (stage, size) not in self._compiled:
      outs.append(one(0))
      self._compiled.add((stage, size))
    rest = range(len(outs), len(starts))
    if self.workers > 1 and len(rest) > 1:
      with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
        outs += list(pool.map(one, rest))
    else:
      outs += [one(k) for k in rest]
    return [np.concatenate(parts, axis=0) for parts in zip(*outs)]

  def _compile_f_aside(self, view, n: int):
    """With several workers, when stage 2 has not run at this batch size yet: compiles it (one
    call on zeros of its batch shape) in a background thread while stage 1 compiles and runs,
    instead of afterwards on one core (saves its ~6 s compile on the 2-core CPU).
    Returns (future, batch size), or None."""
    size = balanced_batch_size(n, self.batch, BALANCE_BATCHES_FOR)
    if ("f", size) in self._compiled or self.workers < 2:
      return None
    window = (size, view.window)
    coarse = np.zeros(window + tuple(view.coarse_shape) + (view.channels,), np.float32)
    external = np.zeros(window + tuple(view.external.shape[1:]), view.external.dtype)
    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(lambda: jax.block_until_ready(
        self._stage_f(self.params["f"], coarse, external, self._rng)))
    pool.shutdown(wait=False)
    return future, size

  def reconstruct(self, view, slices: np.ndarray) -> dict:
    """view: evaluate.ObservedTask; slices (n,) contiguous current-slice indices.

    Returns physical-unit dict: coarse (n,I,J,C) completed maps, fine (n,NI,NJ,C) medians,
    samples (S,n,NI,NJ,C).
    """
    h = view.history
    slices = np.asarray(slices)
    if slices[0] < 2 * h:
      raise ValueError(f"slice {slices[0]} has too little history (needs {2 * h} slices before)")
    rng = jax.random.fold_in(self._rng, int(slices[0]))
    k_c, k_f = jax.random.split(rng)
    warm_f = self._compile_f_aside(view, len(slices))  # (future, size) or None
    # Stage 1 on every slice the stage-2 windows touch, from observed values only (0 = hidden).
    need = np.arange(slices[0] - h, slices[-1] + 1)
    idx = need[:, None] + np.arange(-h, 1)[None, :]
    (completed,) = self._batched("c", functools.partial(self._stage_c, self.params["c"]),
                                 [view.coarse_obs_norm[idx], view.mask[idx],
                                  view.external[idx]], k_c)
    if warm_f is not None:
      warm_f[0].result()
      self._compiled.add(("f", warm_f[1]))
    # Stage 2: windows of completed maps, current slice last.
    win = np.arange(len(slices))[:, None] + np.arange(0, h + 1)[None, :]
    fine, samples = self._batched("f", functools.partial(self._stage_f, self.params["f"]),
                                  [completed[win], view.external[slices[:, None] +
                                                                 np.arange(-h, 1)[None, :]]], k_f)
    return {"coarse": view.coarse_norm.inverse(completed[h:]),
            "fine": view.fine_norm.inverse(fine),
            "samples": view.fine_norm.inverse(np.swapaxes(samples, 0, 1))}


# Batches are split for this many workers whatever `eval.concurrent_batches` is, so the batch
# partition, and with it every batch's random key, depends on the config alone: a run with 1
# worker reproduces a run with 2 exactly.
BALANCE_BATCHES_FOR = 2


def balanced_batch_size(n: int, max_batch: int, workers: int, multiple: int = 8) -> int:
  """Batch size <= max_batch splitting n items into a multiple of `workers` batches of (nearly)
  equal size; rounded up to `multiple` when that keeps the batch count (fewer distinct shapes).

  With 2 workers, 1080 slices at max 128 would be 9 batches (the 9th runs alone, padded with 72
  copies); 10 batches of 112 keep both workers busy to the end.
  """
  if n < 1 or max_batch < 1 or workers < 1:
    raise ValueError(f"balanced_batch_size: need n, max_batch, workers >= 1, got "
                     f"{n}, {max_batch}, {workers}")
  batches = -(-n // (max_batch * workers)) * workers
  size = -(-n // batches)
  rounded = -(-size // multiple) * multiple
  return rounded if rounded <= max_batch and -(-n // rounded) == batches else size


def concurrent_batches(config) -> int:
  """Sampler batches run at once: `config.eval.concurrent_batches`, or when it is 0, 2 on CPU
  (XLA:CPU leaves a core idle with one program; measured) and 1 on accelerators."""
  n = int(config.eval.get("concurrent_batches", 0))
  if n < 0:
    raise ValueError(f"eval.concurrent_batches must be >= 0 (0 = automatic), got {n}")
  if n == 0:
    n = 2 if jax.default_backend() == "cpu" else 1
  return n


def x0_clip_bounds(config, task) -> tuple:
  """(coarse, fine) clip bounds: config.diffusion.x0_clip_factor times the largest |value| of
  the normalised train split (task: pipeline.TaskData; nothing outside the train split is read);
  (None, None) when the factor is 0."""
  factor = float(config.diffusion.get("x0_clip_factor", 0.0))
  if factor <= 0:
    return (None, None)
  lo, hi = task.split.range("train")
  fine = task.fine[lo:hi]
  if config.diffusion.get("fine_residual", False):  # Diffusion-F samples the residual
    fine = fine - np.asarray(pipeline.fine_base(task.coarse[lo:hi], task.stats, task.scale,
                                                task.series.aggregation))
  return (factor * float(np.abs(task.coarse[lo:hi]).max()), factor * float(np.abs(fine).max()))


# Sampling settings: chosen at evaluate time; everything else comes from the checkpoint.
SAMPLING_FIELDS = ("sampler", "sampler_steps", "n_samples", "ddim_eta", "x0_clip_factor",
                   "fine_consistent", "sampling_prng_impl")


def load_trained(workdir: str) -> tuple:
  """(config, EMA params {'c','f'}, models, metadata) from a workdir with finished checkpoints."""
  from diffrecon_jax import train
  config, ema_params, meta = train.load_for_sampling(workdir)
  models = train.build_models(config, int(meta["scale"]), meta.get("stats"),
                              meta.get("aggregation", "sum"))
  return config, ema_params, models, meta


def run(config, workdir: str, mode: str) -> list:
  """train / evaluate / train_and_evaluate / reconstruct for method 'diffrecon'."""
  from diffrecon_jax import run as run_lib
  from diffrecon_jax import train
  train.setup_compilation_cache(config)
  if mode in ("train", "train_and_evaluate"):
    train.train(config, workdir)
    if mode == "train":
      return []
  saved_config, params, models, meta = load_trained(workdir)
  for key in ("eval", "patterns"):
    saved_config[key] = config[key]
  for key in SAMPLING_FIELDS:
    saved_config.diffusion[key] = config.diffusion.get(key, saved_config.diffusion.get(key))
  task = pipeline.prepare_task(saved_config)
  _check_task_matches(task, meta)
  method = DiffReconMethod(saved_config, params, models, x0_clip_bounds(saved_config, task))
  if mode == "reconstruct":
    return [_reconstruct_to_files(saved_config, workdir, task, method)]
  extra = {"trained_on": list(saved_config.patterns.train)}
  references = [run_lib.BASELINES[name]() for name in run_lib.REFERENCES]
  return run_lib.evaluate_methods(saved_config, workdir, task, [method] + references, extra)


def _check_task_matches(task, meta: dict) -> None:
  """The data at evaluate time must be the data the checkpoint was trained on."""
  if meta.get("shapes") and dict(task.shapes) != dict(meta["shapes"]):
    raise ValueError(f"data shapes {task.shapes} differ from the checkpoint's {meta['shapes']}")
  if meta.get("stats"):
    saved = np.asarray(meta["stats"]["fine"]["mean"], np.float32)
    if not np.allclose(saved, task.fine_norm.mean, rtol=1e-5):
      raise ValueError("normalisation statistics differ from the checkpoint's: different data?")


def _reconstruct_to_files(config, workdir, task, method) -> dict:
  """Writes reconstruction_<pattern>.npz (fine median, quantiles, completed coarse, mask).

  The method sees what an evaluation shows it (`evaluate.observe`), on a val or test split.
  """
  from diffrecon_jax import evaluate as evaluate_lib
  from diffrecon_jax.data import patterns as patterns_lib
  slices, _ = evaluate_lib.evaluation_slices(task, config.eval.split,
                                             int(config.eval.max_slices))
  written = {}
  for spec in config.patterns.eval:
    p = patterns_lib.parse_pattern(spec)
    mask, seed = evaluate_lib.eval_mask(task, p, int(config.patterns.eval_mask_seed))
    t0 = time.perf_counter()
    view = evaluate_lib.observe(task, mask)
    parts = [method.reconstruct(view, piece) for piece in evaluate_lib.contiguous_pieces(slices)]
    rec = {k: np.concatenate([r[k] for r in parts], axis=1 if k == "samples" else 0)
           for k in ("fine", "coarse", "samples")}
    path = pathlib.Path(workdir) / f"reconstruction_{evaluate_lib.file_label(p.label)}.npz"
    np.savez_compressed(path, fine=rec["fine"], coarse=rec["coarse"],
                        fine_q05=np.quantile(rec["samples"], 0.05, axis=0),
                        fine_q95=np.quantile(rec["samples"], 0.95, axis=0),
                        mask=mask[slices], slices=slices, timestamps=task.series.timestamps[slices],
                        mask_seed=seed)
    logging.info("wrote %s (%.1f s)", path, time.perf_counter() - t0)
    written[p.label] = str(path)
  return written
