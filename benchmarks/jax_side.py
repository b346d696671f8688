"""The JAX side of each measurement, through the package's public functions only.

  train       `train.make_train_step` (one step per call, or fused with `lax.scan`) on a fixed
              batch: `sample_batch` is replaced by `fixed_batch`, so both frameworks see the
              same inputs.
  sampling    `diffrecon.sample_coarse` then `diffrecon.sample_fine` (or their members variants
              for a members ensemble), each under `jax.jit` as `DiffReconMethod` compiles them,
              climatology slots included.
  components  each sub-network of the denoisers alone (forward, forward + backward), built with
              the fields of the denoiser the config builds.
  split       `DiffReconMethod.reconstruct` over the evaluation split, as `evaluate` calls it.

Every timed call ends in `jax.block_until_ready`; compile time is measured apart (`lower` then
`compile`).
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.cases import Case, count_params
from benchmarks.timing import (cost_flops, device_peak_bytes, log, memory_bytes, timed_reps)
from diffrecon_jax import parallel
from diffrecon_jax.diffrecon import model
from diffrecon_jax.diffrecon import settings
from diffrecon_jax.diffrecon import train


# --------------------------------------------------------------------------------------------
# Train step
# --------------------------------------------------------------------------------------------
def fixed_batch(arrays, rng, **unused):
  """`sample_batch` stand-in: the 'arrays' argument already is the batch."""
  del rng, unused
  return arrays


def joint_settings_for(config, coarse: np.ndarray) -> model.JointSettings:
  """The joint objective of `config.train` with its x0 clip taken from `coarse` (any shape):
  `train.joint_settings` for a case without a task (synthetic batches)."""
  tc = config.train
  return model.JointSettings(
      weight_c=float(tc.joint_weight_c), weight_f=float(tc.joint_weight_f),
      x0_clip=model.x0_clip_bound(float(tc.get("joint_x0_clip_factor", 0.0)), coarse))


def train_bench(case: Case, models: model.Models, params: Any, batch: dict, phase: str,
                steps_per_call: int, reps: dict, joint: model.JointSettings,
                mem_limit: Optional[float] = None) -> dict:
  """Compiles and times `train.make_train_step` (`steps_per_call` fused steps) on `batch`.

  Returns lower_s, compile_s, flops_per_call, memory, and unless the compiled buffers exceed
  `mem_limit` bytes ('skipped' then says why): step_ms, call_ms, reps, samples_per_s,
  flops_per_step, achieved_gflops, device_peak_bytes (GPU).
  """
  out, run = compile_train_step(case, models, params, batch, phase, steps_per_call, joint,
                                mem_limit)
  if run is None:
    return out
  return with_timing(out, case, timed_reps(run, **reps))


def compile_train_step(case: Case, models: model.Models, params: Any, batch: dict, phase: str,
                       steps_per_call: int, joint: model.JointSettings,
                       mem_limit: Optional[float] = None) -> tuple:
  """(out, run): the compile half of `train_bench`. `out` has lower_s, compile_s,
  flops_per_call, memory (and 'skipped' when the buffers exceed `mem_limit` bytes; `run` is
  then None); `run()` makes one blocking call of the compiled step, for `timing.timed_reps`.
  Split from the timing so that a caller can alternate it with another side's runs."""
  cfg = case.config
  mesh = parallel.make_mesh()
  tc = settings.TrainSettings.from_config(cfg)
  opt = train.make_optimizer(phase, tc)
  # Unused by `fixed_batch`; only its batch size is checked against the mesh.
  spec = train.BatchSpec(case.batch_size, case.window - 1, (0, 1), ((0,), (0.5,)))
  step = train.make_train_step(phase, models, opt, tc, spec, mesh, steps_per_call,
                               joint=joint, sample_batch=fixed_batch)
  start = jax.jit(lambda p: train.phase_start_state(
      opt, p, jax.tree_util.tree_map(jnp.copy, p), jax.random.PRNGKey(1)),
                  out_shardings=parallel.replicated(mesh))
  state = start(params)
  arrays = parallel.put_replicated(batch, mesh)
  t0 = time.perf_counter()
  lowered = step.lower(state, arrays)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  out = {"lower_s": t1 - t0, "compile_s": t2 - t1, "steps_per_call": steps_per_call,
         "flops_per_call": cost_flops(compiled), "memory": memory_bytes(compiled)}
  if mem_limit and out["memory"] and out["memory"]["total"] > mem_limit:
    out["skipped"] = f"compiled buffers need {out['memory']['total'] / 2**30:.1f} GiB"
    return out, None
  holder = [state]  # the state is donated: every call continues from the last one's output

  def run():
    s, metrics = compiled(holder[0], arrays)
    jax.block_until_ready((s, metrics))
    holder[0] = s

  return out, run


def with_timing(out: dict, case: Case, r: dict) -> dict:
  """`compile_train_step`'s `out` with the fields of one `timed_reps` result `r` (seconds per
  call): step_ms, call_ms, reps, samples_per_s, flops_per_step, achieved_gflops and on GPU
  device_peak_bytes."""
  out = dict(out)
  steps_per_call = out["steps_per_call"]
  step_s = r["median_s"] / steps_per_call
  out.update({"step_ms": 1e3 * step_s, "call_ms": 1e3 * r["median_s"], "reps": r["reps"],
              "samples_per_s": case.batch_size / step_s})
  if out["flops_per_call"]:
    out["flops_per_step"] = out["flops_per_call"] / steps_per_call
    out["achieved_gflops"] = out["flops_per_call"] / r["median_s"] / 1e9
  peak = device_peak_bytes()
  if peak is not None:
    out["device_peak_bytes"] = peak
  return out


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------
def sampling_settings(config, sampler: str, steps: int,
                      n_samples: int) -> model.SamplingSettings:
  """`config.sampling` with another sampler, step count and sample count."""
  c = config.copy_and_resolve_references()
  c.sampling.sampler, c.sampling.steps, c.sampling.n_samples = sampler, int(steps), int(n_samples)
  return settings.SamplingSettings.from_config(c)


def sampling_key(config) -> jax.Array:
  """The sampler's PRNG key with `sampling.prng_impl`, as `DiffReconMethod` draws its noise."""
  return jax.random.key(int(config.seed) + 1, impl=config.sampling.get("prng_impl", "") or None)


def ensemble(settings: model.SamplingSettings) -> str:
  """The settings' `ensemble` ("shared_completion": one completion per window for every sample;
  "members": each member its own completion and fine map), "shared_completion" when the
  package has no such setting."""
  return str(getattr(settings, "ensemble", "shared_completion"))


def sampling_bench(models: model.Models, params: Any, batch: dict,
                   settings: model.SamplingSettings, clip: tuple, rng: jax.Array,
                   reps: dict) -> dict:
  """Diffusion-C completion + Diffusion-F inference of the batch's windows (n samples each).

  batch: obs (B,t,I,J,C), mask (B,t,I,J), external (B,t,F), coarse (B,t,I,J,C), and slot (B,t)
  when the models use the climatology prior (`cases.real_batch`); the completed current map
  replaces the window's last slice before stage 2, as `DiffReconMethod` does. With the members
  ensemble (`ensemble`) stage 1 is `diffrecon.sample_coarse_members` and stage 2
  `diffrecon.sample_fine_members` on each member's window (its completion last).
  clip: (coarse, fine) x0 bounds (`diffrecon.x0_clip_bounds`) or (None, None).
  Returns compile_c_s, compile_f_s, time_s, reps, fine_maps_per_s (every sample counted),
  flops, memory_c, memory_f.
  """
  obs, mask, ext, coarse = (jnp.asarray(batch[k]) for k in ("obs", "mask", "external", "coarse"))
  slots = jnp.asarray(batch["slot"] if "slot" in batch else np.zeros(obs.shape[:2], np.int32))
  # The stage functions exactly as `DiffReconMethod` jits them: slots ride along (zeros for a
  # model without the prior, which ignores them) and stage 2 reads the current slice's.
  if ensemble(settings) == "members":
    stage_c = jax.jit(lambda p, obs, mask, ext, slots, rng: model.sample_coarse_members(
        models, p, obs, mask, ext, rng, settings, clip[0], slots))
    stage_f = jax.jit(lambda p, point_win, member_win, ext, slots, rng:
                      model.sample_fine_members(models, p, point_win, member_win, ext, rng,
                                                    settings, clip[1], slots[:, -1]))
    # Every member's window keeps the batch's history slices (`DiffReconMethod` puts each
    # member's own completions there: the same shapes and work).
    history = jnp.broadcast_to(coarse[:, None, :-1],
                               (coarse.shape[0], settings.n_samples) + coarse[:, :-1].shape[1:])

    def stage_f_args(done):  # (point (B,I,J,C), members (B,S,I,J,C)) -> stage 2's arrays
      point, members = done
      return (jnp.concatenate([coarse[:, :-1], point[:, None]], axis=1),
              jnp.concatenate([history, members[:, :, None]], axis=2), ext, slots, rng)
  else:
    stage_c = jax.jit(lambda p, obs, mask, ext, slots, rng: model.sample_coarse(
        models, p, obs, mask, ext, rng, settings, clip[0], slots))
    stage_f = jax.jit(lambda p, coarse, ext, slots, rng: model.sample_fine(
        models, p, coarse, ext, rng, settings, clip[1], slots[:, -1]))

    def stage_f_args(done):  # the completed map (B,I,J,C) -> stage 2's arrays
      return jnp.concatenate([coarse[:, :-1], done[:, None]], axis=1), ext, slots, rng
  out = {}
  t0 = time.perf_counter()
  comp_c = stage_c.lower(params["c"], obs, mask, ext, slots, rng).compile()
  t1 = time.perf_counter()
  # Stage 2's input shapes from stage 1's output shapes (nothing is computed).
  f_args = jax.eval_shape(stage_f_args, comp_c.out_info)
  comp_f = stage_f.lower(params["f"], *f_args).compile()
  t2 = time.perf_counter()
  out.update(compile_c_s=t1 - t0, compile_f_s=t2 - t1)

  def run():
    done = comp_c(params["c"], obs, mask, ext, slots, rng)
    jax.block_until_ready(comp_f(params["f"], *stage_f_args(done)))

  r = timed_reps(run, **reps)
  maps = obs.shape[0] * settings.n_samples
  out.update(time_s=r["median_s"], reps=r["reps"], fine_maps_per_s=maps / r["median_s"],
             flops=(cost_flops(comp_c) or 0) + (cost_flops(comp_f) or 0) or None,
             memory_c=memory_bytes(comp_c), memory_f=memory_bytes(comp_f))
  return out


# --------------------------------------------------------------------------------------------
# Sub-networks
# --------------------------------------------------------------------------------------------
def _fields_of(module_cls, denoiser, **extra) -> dict:
  """Keyword arguments of `module_cls` that `denoiser` (a built DiffusionCNet / DiffusionFNet)
  also has, with their values there, plus `extra`: the sub-network as the denoiser builds it."""
  names = {f.name for f in dataclasses.fields(module_cls)} - {"parent", "name"}
  kw = {n: getattr(denoiser, n) for n in names if hasattr(denoiser, n)}
  if "channel_mults" in kw:
    kw["channel_mults"] = tuple(kw["channel_mults"])
  return dict(kw, **extra)


def component_nets(models: model.Models, params: dict, channels: int) -> dict:
  """{name: (flax module, its parameters, (model 'c'|'f', submodule name))} of the four
  sub-networks, built from the fields of the config's denoisers (`diffrecon.build_models`)."""
  from diffrecon_jax.diffrecon.st_pointformer import STPointFormer
  from diffrecon_jax.diffrecon.t_patternnet import TPatternNet
  from diffrecon_jax.models.unet import UNet
  mc, mf = models.c, models.f
  nets = {
      "unet_c": (UNet(**_fields_of(UNet, mc, out_channels=channels)), ("c", "UNet_0")),
      "unet_f": (UNet(**_fields_of(UNet, mf, out_channels=channels)), ("f", "UNet_0")),
      "st_pointformer": (STPointFormer(**_fields_of(STPointFormer, mc)),
                         ("c", "STPointFormer_0")),
      "t_patternnet": (TPatternNet(**_fields_of(TPatternNet, mf,
                                                out_channels=mf.encoder_channels)),
                       ("f", "TPatternNet_0"))}
  return {name: (net, params[which][attr], (which, attr))
          for name, (net, (which, attr)) in nets.items()}


def component_bench(net, p: Any, inputs: tuple, reps: dict) -> dict:
  """Forward and forward + backward (grad of mean(out^2) w.r.t. p) of one sub-network, jitted.

  Returns params, jax_fwd_ms, jax_fwd_bwd_ms, jax_compile_s (of the backward),
  jax_gflops_fwd_bwd.
  """
  args = tuple(jnp.asarray(a) for a in inputs)
  fwd = jax.jit(lambda p, *a: net.apply({"params": p}, *a))
  grad = jax.jit(jax.value_and_grad(
      lambda p, *a: jnp.mean(jnp.square(net.apply({"params": p}, *a)))))
  t0 = time.perf_counter()
  g_comp = grad.lower(p, *args).compile()
  compile_s = time.perf_counter() - t0
  f_comp = fwd.lower(p, *args).compile()
  rg = timed_reps(lambda: jax.block_until_ready(g_comp(p, *args)), **reps)
  rf = timed_reps(lambda: jax.block_until_ready(f_comp(p, *args)), **reps)
  return {"params": count_params(p), "jax_fwd_ms": 1e3 * rf["median_s"],
          "jax_fwd_bwd_ms": 1e3 * rg["median_s"], "jax_compile_s": compile_s,
          "jax_gflops_fwd_bwd": (cost_flops(g_comp) or 0) / 1e9 or None}


# --------------------------------------------------------------------------------------------
# The whole evaluation split
# --------------------------------------------------------------------------------------------
def split_bench(config, task, params: dict, models: model.Models, clip: tuple,
                max_patterns: int) -> dict:
  """Wall time of `DiffReconMethod.reconstruct` over the evaluation split for the evaluation
  patterns, compile included once as in a real evaluation; extrapolated to every pattern (the
  median of the steady patterns) when max_patterns is fewer.

  The method gets the scored slices in contiguous pieces and an `evaluate.observe` view, as
  `evaluate.evaluate_method` hands them; scoring is not timed.
  """
  from diffrecon_jax import evaluate as evaluate_lib
  from diffrecon_jax.data import patterns as patterns_lib
  from diffrecon_jax.diffrecon.method import DiffReconMethod
  method = DiffReconMethod(config, params, models, clip)
  slices, _ = evaluate_lib.evaluation_slices(task, config.eval.split,
                                             int(config.eval.max_slices))
  pieces = evaluate_lib.contiguous_pieces(slices, int(config.eval.get("chunk_slices", 0)))
  specs = list(config.patterns.eval)
  per = []
  t_all = time.perf_counter()
  for spec in specs[:max_patterns]:
    p = patterns_lib.parse_pattern(spec)
    mask, _ = evaluate_lib.eval_mask(task, p, int(config.patterns.eval_mask_seed))
    t0 = time.perf_counter()
    view = evaluate_lib.observe(task, mask)
    for piece in pieces:
      method.reconstruct(view, piece)
    per.append({"pattern": p.label, "time_s": time.perf_counter() - t0})
    log(f"split {p.label}: {per[-1]['time_s']:.1f} s")
  total = time.perf_counter() - t_all
  steady = [r["time_s"] for r in per[1:]] or [per[0]["time_s"]]
  est = total + statistics.median(steady) * (len(specs) - len(per))
  return {"slices": int(len(slices)), "patterns_run": len(per), "patterns_total": len(specs),
          "sampler": method.sampler, "eval_batch": int(config.eval.batch_size),
          "per_pattern": per, "measured_s": total, "all_patterns_s": est,
          "extrapolated": len(per) < len(specs),
          "fine_maps_per_s": len(slices) * len(per) * method.n_samples / total}
