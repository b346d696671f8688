"""Training and sampling speed of diffrecon_jax, side by side with a PyTorch eager twin.

  python -m benchmarks.run --out benchmarks/results [--quick] [--device cpu|gpu]

Writes <out>/results.json, <out>/results.md and, when matplotlib is installed, <out>/scaling.png.

Sections (each row: JAX, PyTorch eager twin from benchmarks/torch_twin.py, ratio):
  train     Diffusion-C step (stage_c), Diffusion-F step (stage_f), joint step: median step time
            after warm-up (jax.block_until_ready), samples/s, compile time, FLOPs per step from
            XLA's cost analysis and the achieved FLOP/s, compiled memory; the same fixed batch
            (drawn once from the real nytaxi train split) is fed to both frameworks, with
            parameters copied from flax into the twin (counts and outputs checked first).
  sampling  Diffusion-C completion then Diffusion-F inference of a batch of windows, n samples
            each, DDIM with S steps and DDPM with T steps: fine maps/s (all samples counted).
  split     (full CPU mode) the real `DiffReconMethod.reconstruct` over the whole nytaxi test
            split for all nine evaluation patterns with the config's DDIM sampler.
  scaling   joint step time against grid size (nytaxi, paper 8x8 -> 32x32, UrbanFM
            32x32 -> 128x128), history length and batch size; sampling time against samples.

Ratios are speed-ups, JAX / PyTorch in throughput (= PyTorch time / JAX time): > 1 means JAX is
faster. Weights are random (the timing does not depend on them); the train step runs on a fixed
batch (`sample_batch` replaced by the identity) so both frameworks see the same inputs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from configs import default as default_config
from diffrecon_jax import parallel, train
from diffrecon_jax.data import patterns as patterns_lib
from diffrecon_jax.data import pipeline

PHASES = ("stage_c", "stage_f", "joint")


# ------------------------------------------------------------------------------------------
# Timing helpers
# ------------------------------------------------------------------------------------------
def timed_reps(fn: Callable[[], Any], *, warmup: int, min_reps: int, max_reps: int,
               min_time: float) -> dict:
  """Runs fn (which must block until its work is done) warmup + repeated times.

  Repeats until min_reps runs and min_time seconds are reached, or max_reps runs.
  Returns {'median_s', 'min_s', 'max_s', 'reps'}.
  """
  for _ in range(warmup):
    fn()
  times, start = [], time.perf_counter()
  while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < min_time):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
          "reps": len(times)}


def cost_flops(compiled) -> Optional[float]:
  """FLOPs of a compiled XLA executable (cost_analysis is a dict, or a list of dicts)."""
  try:
    ca = compiled.cost_analysis()
  except Exception:  # some backends do not implement it
    return None
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  f = (ca or {}).get("flops")
  return float(f) if f is not None and f >= 0 else None


def memory_bytes(compiled) -> Optional[dict]:
  """Compiled buffer sizes: arguments, outputs, temporaries, and their live total estimate."""
  try:
    m = compiled.memory_analysis()
  except Exception:
    return None
  if m is None:
    return None
  arg, out, tmp = m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes
  alias = m.alias_size_in_bytes
  return {"argument": int(arg), "output": int(out), "temp": int(tmp), "alias": int(alias),
          "total": int(arg + out + tmp - alias)}


def device_peak_bytes() -> Optional[int]:
  stats = jax.devices()[0].memory_stats() or {}
  v = stats.get("peak_bytes_in_use")
  return int(v) if v is not None else None


def machine_info(device: str) -> dict:
  info = {"python": sys.version.split()[0], "platform": platform.platform(),
          "cpu_count": os.cpu_count(), "jax": jax.__version__,
          "jax_backend": jax.default_backend(), "jax_device": str(jax.devices()[0])}
  try:
    import flax
    info["flax"] = flax.__version__
  except ImportError:
    pass
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    info["cpu_model"] = names[0] if names else platform.processor()
  except OSError:
    info["cpu_model"] = platform.processor()
  try:
    with open("/proc/meminfo") as f:
      info["ram_gb"] = round(int(f.readline().split()[1]) / 2 ** 20, 1)
  except (OSError, ValueError, IndexError):
    pass
  if device == "gpu":
    info["gpu"] = getattr(jax.devices()[0], "device_kind", "?")
  return info


def load_average() -> Optional[list]:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


# ------------------------------------------------------------------------------------------
# Cases: shapes, parameters, batches
# ------------------------------------------------------------------------------------------
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
  return {"coarse_shape": list(coarse), "fine_shape": [coarse[0] * scale, coarse[1] * scale],
          "channels": channels, "external_dim": external_dim, "window": window, "scale": scale}


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
      fan = a.shape[0] if (len(a.shape) == 3 and parent != "out") else int(np.prod(a.shape[:-1]))
      return rs.standard_normal(a.shape).astype(np.float32) / np.sqrt(max(fan, 1))
    if name == "scale":
      return np.ones(a.shape, np.float32)
    if name == "bias":
      return np.zeros(a.shape, np.float32)
    return (0.02 * rs.standard_normal(a.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def abstract_params(models: train.Models, shapes: dict) -> Any:
  return jax.eval_shape(lambda k: train.init_params(models, shapes, k), jax.random.PRNGKey(0))


def synthetic_batch(shapes: dict, batch_size: int, seed: int, ratio: float = 0.5) -> dict:
  """A train batch of the right shapes (random values, random masks at the given ratio)."""
  rs = np.random.RandomState(seed)
  b, t = batch_size, int(shapes["window"])
  (i, j), (ni, nj) = shapes["coarse_shape"], shapes["fine_shape"]
  c, f = int(shapes["channels"]), int(shapes["external_dim"])
  coarse = rs.standard_normal((b, t, i, j, c)).astype(np.float32)
  mask = (rs.random_sample((b, t, i, j)) >= ratio).astype(np.float32)
  return {"obs": coarse * mask[..., None], "mask": mask, "coarse": coarse,
          "external": rs.random_sample((b, t, f)).astype(np.float32),
          "fine": rs.standard_normal((b, ni, nj, c)).astype(np.float32)}


def real_batch(task: pipeline.TaskData, batch_size: int, seed: int) -> dict:
  """One train batch drawn from the real task exactly as the train step draws it."""
  kinds, ratios = patterns_lib.encode_train_patterns(task.patterns_train)
  out = pipeline.sample_train_batch(
      task.device_arrays(), jax.random.PRNGKey(seed), batch_size=batch_size,
      history=task.history, index_range=task.train_range, patterns=(kinds, ratios))
  return {k: np.asarray(v) for k, v in out.items()}


# ------------------------------------------------------------------------------------------
# JAX side
# ------------------------------------------------------------------------------------------
def _fixed_batch(arrays, rng, **unused):
  """`sample_batch` stand-in: the 'arrays' argument already is the batch."""
  del rng, unused
  return arrays


def jax_train_bench(case: Case, models: train.Models, params: Any, batch: dict, phase: str,
                    steps_per_call: int, reps: dict, mem_limit: Optional[float] = None) -> dict:
  """Compiles and times `train.make_train_step` (fused `steps_per_call` steps) on a fixed batch."""
  cfg = case.config
  mesh = parallel.make_mesh()
  opt = train.make_optimizer(phase, cfg.train)
  spec = train.BatchSpec(case.batch_size, case.window - 1, (0, 1), ((0,), (0.5,)))
  step = train.make_train_step(phase, models, opt, cfg.train, spec, mesh, steps_per_call,
                               sample_batch=_fixed_batch)
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
    return out
  holder = [state]

  def run():
    s, metrics = compiled(holder[0], arrays)
    jax.block_until_ready((s, metrics))
    holder[0] = s

  r = timed_reps(run, **reps)
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


def jax_sampler(case: Case, models: train.Models, params: Any, method: str, steps: int,
                n_samples: int):
  """The compiled stage functions of `DiffReconMethod` for this sampler; returns the method."""
  from diffrecon_jax.diffrecon_method import DiffReconMethod
  cfg = case.config.copy_and_resolve_references()
  cfg.diffusion.sampler = method
  cfg.diffusion.sampler_steps = steps
  cfg.diffusion.n_samples = n_samples
  return DiffReconMethod(cfg, params, models)


def jax_sampling_bench(case: Case, models: train.Models, params: Any, batch: dict, method: str,
                       steps: int, n_samples: int, reps: dict) -> dict:
  """Diffusion-C completion + Diffusion-F inference of batch windows (n_samples each)."""
  m = jax_sampler(case, models, params, method, steps, n_samples)
  obs, mask, ext, coarse = (jnp.asarray(batch[k]) for k in ("obs", "mask", "external", "coarse"))
  rng = jax.random.PRNGKey(0)
  out = {}
  t0 = time.perf_counter()
  comp_c = m._stage_c.lower(params["c"], obs, mask, ext, rng).compile()
  t1 = time.perf_counter()
  comp_f = m._stage_f.lower(params["f"], coarse, ext, rng).compile()
  t2 = time.perf_counter()
  out.update(compile_c_s=t1 - t0, compile_f_s=t2 - t1)

  def run():
    done = comp_c(params["c"], obs, mask, ext, rng)
    win = jnp.concatenate([coarse[:, :-1], done[:, None]], axis=1)
    jax.block_until_ready(comp_f(params["f"], win, ext, rng))

  r = timed_reps(run, **reps)
  maps = obs.shape[0] * n_samples
  out.update(time_s=r["median_s"], reps=r["reps"], fine_maps_per_s=maps / r["median_s"],
             flops=(cost_flops(comp_c) or 0) + (cost_flops(comp_f) or 0) or None,
             memory_c=memory_bytes(comp_c), memory_f=memory_bytes(comp_f))
  return out


# ------------------------------------------------------------------------------------------
# PyTorch side
# ------------------------------------------------------------------------------------------
class TorchSide:
  """Twins for one case, loaded with the same parameters, on cpu or cuda."""

  def __init__(self, case: Case, models: train.Models, params: Any, device: str):
    import torch
    from benchmarks import torch_twin as tt
    self.torch, self.tt, self.device = torch, tt, device
    s = case.shapes
    kw = dict(t=case.window, grid=tuple(s["coarse_shape"]), channels=int(s["channels"]),
              external_dim=int(s["external_dim"]))
    self.c = tt.DiffusionCNet(**kw, **case.config.model_c.to_dict())
    self.f = tt.DiffusionFNet(**kw, scale=int(s["scale"]), **case.config.model_f.to_dict())
    self.counts = {"c": (_count(params["c"]), tt.count_params(self.c)),
                   "f": (_count(params["f"]), tt.count_params(self.f))}
    for name, (nj, nt) in self.counts.items():
      if nj != nt:
        raise RuntimeError(f"parameter count mismatch for Diffusion-{name.upper()}: flax {nj}, "
                           f"torch twin {nt}; the twin no longer mirrors the flax module")
    tt.load_flax_params(self.c, jax.device_get(params["c"]))
    tt.load_flax_params(self.f, jax.device_get(params["f"]))
    self.c.to(device)
    self.f.to(device)
    self.schedule = tt.Schedule(models.schedule, device)

  def tensors(self, batch: dict) -> dict:
    return {k: self.torch.as_tensor(np.asarray(v), device=self.device) for k, v in batch.items()}

  def sync(self):
    if self.device != "cpu":
      self.torch.cuda.synchronize()

  def check_outputs(self, models: train.Models, params: Any, batch: dict) -> dict:
    """Max |flax - torch| of both denoisers on the batch (tau spread over [0, T))."""
    b = batch["obs"].shape[0]
    tau = (np.arange(b) * models.schedule.num_steps // max(b, 1)).astype(np.int32)
    cond_c = {k: batch[k] for k in ("obs", "mask", "external")}
    cond_f = {"coarse": batch["coarse"], "external": batch["external"]}
    x_c, x_f = batch["coarse"][:, -1], batch["fine"]
    jc = np.asarray(models.c.apply({"params": params["c"]}, x_c, jnp.asarray(tau), cond_c))
    jf = np.asarray(models.f.apply({"params": params["f"]}, x_f, jnp.asarray(tau), cond_f))
    tb = self.tensors({"x_c": x_c, "x_f": x_f, "tau": tau.astype(np.int64), **batch})
    with self.torch.no_grad():
      pc = self.c(tb["x_c"], tb["tau"], {k: tb[k] for k in cond_c}).cpu().numpy()
      pf = self.f(tb["x_f"], tb["tau"], {k: tb[k] for k in cond_f}).cpu().numpy()
    return {"max_abs_diff_c": float(np.max(np.abs(pc - jc))),
            "max_abs_diff_f": float(np.max(np.abs(pf - jf))),
            "max_abs_out": float(max(np.max(np.abs(jc)), np.max(np.abs(jf))))}

  def train_bench(self, case: Case, batch: dict, phase: str, reps: dict) -> dict:
    tb = self.tensors(batch)
    step = self.tt.TrainStep(phase, self.c, self.f, self.schedule, case.config.train)

    def run():
      step(tb)
      self.sync()

    if self.device != "cpu":
      self.torch.cuda.reset_peak_memory_stats()
    r = timed_reps(run, **reps)
    out = {"step_ms": 1e3 * r["median_s"], "reps": r["reps"],
           "samples_per_s": case.batch_size / r["median_s"]}
    if self.device != "cpu":
      out["device_peak_bytes"] = int(self.torch.cuda.max_memory_allocated())
    return out

  def sampling_bench(self, case: Case, batch: dict, method: str, steps: int, n_samples: int,
                     eta: float, reps: dict) -> dict:
    tb = self.tensors(batch)
    tt, s = self.tt, self.schedule
    c = int(case.shapes["channels"])
    n = int(case.shapes["scale"])

    def run():
      done = tt.sample_many(self.c, {k: tb[k] for k in ("obs", "mask", "external")}, s,
                            tuple(tb["obs"][:, -1].shape), n_samples=n_samples, method=method,
                            num_steps=steps, eta=eta, known=tb["obs"][:, -1],
                            known_mask=tb["mask"][:, -1, ..., None])
      win = self.torch.cat([tb["coarse"][:, :-1], done[:, None]], dim=1)
      b, _, i, j, _ = win.shape
      tt.sample_many(self.f, {"coarse": win, "external": tb["external"]}, s,
                     (b, n * i, n * j, c), n_samples=n_samples, method=method, num_steps=steps,
                     eta=eta)
      self.sync()

    r = timed_reps(run, **reps)
    maps = batch["obs"].shape[0] * n_samples
    return {"time_s": r["median_s"], "reps": r["reps"], "fine_maps_per_s": maps / r["median_s"]}


def _count(tree: Any) -> int:
  return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))


# ------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------
def log(msg: str) -> None:
  print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ratio(t_torch: Optional[float], t_jax: Optional[float]) -> Optional[float]:
  if not t_torch or not t_jax:
    return None
  return t_torch / t_jax


def bench_train(case, models, params, batch, torch_side, phases, fused, reps, results):
  rows = []
  for phase in phases:
    log(f"train {phase}: JAX compile + time")
    j = jax_train_bench(case, models, params, batch, phase, 1, reps)
    row = {"phase": phase, "batch": case.batch_size, "jax": j}
    if fused > 1 and phase == "joint":
      log(f"train {phase}: JAX fused x{fused}")
      row["jax_fused"] = jax_train_bench(case, models, params, batch, phase, fused, reps)
    if torch_side is not None:
      log(f"train {phase}: PyTorch eager")
      row["torch"] = torch_side.train_bench(case, batch, phase, reps)
      row["speedup_jax_over_torch"] = ratio(row["torch"]["step_ms"], j["step_ms"])
    log(f"train {phase}: jax {j['step_ms']:.1f} ms"
        + (f", torch {row['torch']['step_ms']:.1f} ms" if "torch" in row else ""))
    rows.append(row)
    results["train"] = rows
  return rows


def bench_sampling(case, models, params, batch, torch_side, samplers, n_samples, reps, results):
  rows = []
  eta = float(case.config.diffusion.ddim_eta)
  for method, steps in samplers:
    log(f"sampling {method} {steps} steps, {batch['obs'].shape[0]} windows x {n_samples}")
    j = jax_sampling_bench(case, models, params, batch, method, steps, n_samples, reps)
    row = {"method": method, "steps": steps, "windows": int(batch["obs"].shape[0]),
           "n_samples": n_samples, "jax": j}
    if torch_side is not None:
      row["torch"] = torch_side.sampling_bench(case, batch, method, steps, n_samples, eta, reps)
      row["speedup_jax_over_torch"] = ratio(row["torch"]["time_s"], j["time_s"])
    rows.append(row)
    results["sampling"] = rows
  return rows


def bench_split(config, task, params, models, results, max_patterns: int) -> dict:
  """Wall time of `DiffReconMethod.reconstruct` over the test split for the evaluation patterns
  (compile included once, as in a real evaluation); extrapolated when max_patterns < 9."""
  from diffrecon_jax import evaluate as evaluate_lib
  from diffrecon_jax.diffrecon_method import DiffReconMethod
  method = DiffReconMethod(config, params, models)
  lo, hi = task.split.range(config.eval.split)
  slices = np.arange(lo, hi)
  specs = list(config.patterns.eval)
  per = []
  t_all = time.perf_counter()
  for spec in specs[:max_patterns]:
    p = patterns_lib.parse_pattern(spec)
    mask, _ = evaluate_lib.eval_mask(task, p, int(config.patterns.eval_mask_seed))
    t0 = time.perf_counter()
    view = evaluate_lib.observe(task, mask)
    method.reconstruct(view, slices)
    per.append({"pattern": p.label, "time_s": time.perf_counter() - t0})
    log(f"split {p.label}: {per[-1]['time_s']:.1f} s")
  total = time.perf_counter() - t_all
  steady = [r["time_s"] for r in per[1:]] or [per[0]["time_s"]]
  est = total + statistics.median(steady) * (len(specs) - len(per))
  out = {"slices": int(len(slices)), "patterns_run": len(per), "patterns_total": len(specs),
         "sampler": method.sampler, "eval_batch": int(config.eval.batch_size),
         "per_pattern": per, "measured_s": total, "all_patterns_s": est,
         "extrapolated": len(per) < len(specs),
         "fine_maps_per_s": len(slices) * len(per) * method.n_samples / total}
  results["split"] = out
  return out


def scaling_cases(base: Any, device: str, batch: int) -> list:
  """(axis, value, Case) points; sizes beyond the base case only."""
  pts = []

  def case(name, coarse, scale, window, b):
    c = base.copy_and_resolve_references()
    c.data.scale_factor = scale
    c.data.history = window - 1
    c.train.batch_size = b
    return Case(name, c, make_shapes(coarse, scale, 2, 8, window), b)

  w = int(base.data.history) + 1
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


def bench_scaling(base, device, batch, torch_device, reps, results, mem_limit):
  rows = []
  for axis, value, case in scaling_cases(base, device, batch):
    log(f"scaling {axis}={value}")
    # Synthetic grids have no normalisation stats: time the plain fine target (the residual
    # parameterisation adds one elementwise subtraction).
    cfg = case.config.copy_and_resolve_references()
    cfg.diffusion.fine_residual = False
    models = train.build_models(cfg, case.shapes["scale"])
    params = jax.device_put(fill_params(abstract_params(models, case.shapes), 0))
    b = synthetic_batch(case.shapes, case.batch_size, 1)
    row = {"axis": axis, "value": value, "batch": case.batch_size,
           "coarse": case.shapes["coarse_shape"], "fine": case.shapes["fine_shape"],
           "window": case.window, "st_points": case.window * int(np.prod(case.shapes["coarse_shape"]))}
    try:
      row["jax"] = jax_train_bench(case, models, params, b, "joint", 1, reps, mem_limit)
      if torch_device and "skipped" not in row["jax"]:
        ts = TorchSide(case, models, params, torch_device)
        row["torch"] = ts.train_bench(case, b, "joint", reps)
        row["speedup_jax_over_torch"] = ratio(row["torch"]["step_ms"], row["jax"]["step_ms"])
    except Exception as e:  # one failing size (e.g. out of memory) must not lose the others
      row["error"] = f"{type(e).__name__}: {e}"[:300]
    rows.append(row)
    results["scaling"] = rows
  return rows


def bench_samples_scaling(case, models, params, batch, torch_side, counts, reps, results):
  rows = []
  d = case.config.diffusion
  for n in counts:
    log(f"scaling n_samples={n}")
    row = {"axis": "n_samples", "value": n,
           "jax": jax_sampling_bench(case, models, params, batch, "ddim", int(d.sampler_steps), n,
                                     reps)}
    if torch_side is not None:
      row["torch"] = torch_side.sampling_bench(case, batch, "ddim", int(d.sampler_steps), n,
                                               float(d.ddim_eta), reps)
      row["speedup_jax_over_torch"] = ratio(row["torch"]["time_s"], row["jax"]["time_s"])
    rows.append(row)
    results["scaling_samples"] = rows
  return rows


def component_inputs(case: Case, batch: dict) -> dict:
  """Inputs of each sub-network as the denoisers feed them (random inter features)."""
  s, cfg = case.shapes, case.config
  b = case.batch_size
  rs = np.random.RandomState(3)
  (i, j), (ni, nj) = s["coarse_shape"], s["fine_shape"]
  c = int(s["channels"])
  lv_c, lv_f = len(cfg.model_c.channel_mults), len(cfg.model_f.channel_mults)
  dc = -(-i // 2 ** (lv_c - 1)), -(-j // 2 ** (lv_c - 1))
  df = -(-ni // 2 ** (lv_f - 1)), -(-nj // 2 ** (lv_f - 1))
  r = lambda *shape: rs.standard_normal(shape).astype(np.float32)
  tau = (np.arange(b) % int(cfg.diffusion.num_steps)).astype(np.int32)
  ext = batch["external"]
  return {
      "unet_c": (r(b, i, j, 2 * c + 1), tau, ext[:, -1], r(b, *dc, int(cfg.model_c.inter_dim))),
      "unet_f": (r(b, ni, nj, 2 * c), tau, ext[:, -1], r(b, *df, int(cfg.model_f.inter_dim))),
      "st_pointformer": (batch["obs"], batch["mask"], ext),
      "t_patternnet": (batch["coarse"], ext)}


def bench_components(case, models, params, batch, torch_side, reps, results):
  """Forward + backward (grad of mean(out^2) w.r.t. the sub-network's parameters) of each
  sub-network alone, JAX jit vs PyTorch eager: where the train-step time goes."""
  from diffrecon_jax.models.st_pointformer import STPointFormer
  from diffrecon_jax.models.t_patternnet import TPatternNet
  from diffrecon_jax.models.unet import UNet
  mc, mf = case.config.model_c, case.config.model_f
  c = int(case.shapes["channels"])
  unet_kw = lambda m: dict(out_channels=c, base_channels=m.base_channels,
                           channel_mults=tuple(m.channel_mults), num_res_blocks=m.num_res_blocks,
                           emb_dim=m.emb_dim)
  nets = {
      "unet_c": (UNet(**unet_kw(mc)), params["c"]["UNet_0"], "c", "UNet_0"),
      "unet_f": (UNet(**unet_kw(mf)), params["f"]["UNet_0"], "f", "UNet_0"),
      "st_pointformer": (STPointFormer(d_model=mc.d_model, num_heads=mc.num_heads,
                                       num_layers=mc.num_layers, ff_dim=mc.ff_dim,
                                       attention_impl=mc.get("attention_impl", None)),
                         params["c"]["STPointFormer_0"], "c", "STPointFormer_0"),
      "t_patternnet": (TPatternNet(d_model=mf.d_model, d_ff=mf.d_ff, top_k=mf.top_k,
                                   num_blocks=mf.num_blocks, num_kernels=mf.num_kernels,
                                   out_channels=mf.encoder_channels),
                       params["f"]["TPatternNet_0"], "f", "TPatternNet_0")}
  inputs = component_inputs(case, batch)
  rows = []
  for name, (net, p, which, attr) in nets.items():
    log(f"component {name}")
    args = tuple(jnp.asarray(a) for a in inputs[name])
    loss = lambda p, *a, net=net: jnp.mean(jnp.square(net.apply({"params": p}, *a)))
    fwd = jax.jit(lambda p, *a, net=net: net.apply({"params": p}, *a))
    grad = jax.jit(jax.value_and_grad(loss))
    t0 = time.perf_counter()
    g_comp = grad.lower(p, *args).compile()
    compile_s = time.perf_counter() - t0
    f_comp = fwd.lower(p, *args).compile()
    rg = timed_reps(lambda: jax.block_until_ready(g_comp(p, *args)), **reps)
    rf = timed_reps(lambda: jax.block_until_ready(f_comp(p, *args)), **reps)
    row = {"component": name, "params": _count(p), "jax_fwd_ms": 1e3 * rf["median_s"],
           "jax_fwd_bwd_ms": 1e3 * rg["median_s"], "jax_compile_s": compile_s,
           "jax_gflops_fwd_bwd": (cost_flops(g_comp) or 0) / 1e9 or None}
    if torch_side is not None:
      torch = torch_side.torch
      mod = getattr(getattr(torch_side, which), attr)
      targs = [torch.as_tensor(np.asarray(a), device=torch_side.device) for a in inputs[name]]
      if name.startswith("unet"):
        targs[1] = targs[1].long()

      def t_fwd():
        with torch.no_grad():
          mod(*targs)
        torch_side.sync()

      def t_grad():
        mod.zero_grad(set_to_none=True)
        torch.mean(torch.square(mod(*targs))).backward()
        torch_side.sync()

      row["torch_fwd_ms"] = 1e3 * timed_reps(t_fwd, **reps)["median_s"]
      row["torch_fwd_bwd_ms"] = 1e3 * timed_reps(t_grad, **reps)["median_s"]
      row["speedup_fwd_bwd"] = ratio(row["torch_fwd_bwd_ms"], row["jax_fwd_bwd_ms"])
      row["speedup_fwd"] = ratio(row["torch_fwd_ms"], row["jax_fwd_ms"])
    rows.append(row)
    results["components"] = rows
  return rows


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------
def _f(x, fmt="{:.1f}") -> str:
  return "-" if x is None else fmt.format(x)


def _table(title: str, columns: list, rows: list) -> list:
  """Markdown lines of a titled table; rows are lists of cell strings, one per column."""
  return ([f"## {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
          + ["| " + " | ".join(row) + " |" for row in rows] + [""])


def markdown(results: dict) -> str:
  m = results["machine"]
  lines = [f"# diffrecon_jax benchmarks ({results['mode']}, device {results['device']})", "",
           f"Machine: {m.get('cpu_model')} ({m.get('cpu_count')} cores, {m.get('ram_gb')} GB)"
           + (f", GPU {m['gpu']}" if m.get("gpu") else "")
           + f"; jax {m['jax']} ({m['jax_backend']}), torch {m.get('torch', '-')}; load average "
           f"at start {results.get('load_start')}, at end {results.get('load_end')}.",
           f"Config: `{results['config']}`; speed-up = PyTorch time / JAX time (> 1: JAX faster).",
           ""]
  chk = results.get("twin_check")
  if chk:
    lines += [f"Twin check: parameters Diffusion-C {chk['params_c']}, Diffusion-F "
              f"{chk['params_f']} (equal in both); max |flax - torch| of eps_hat: "
              f"{chk['max_abs_diff_c']:.1e} (C), {chk['max_abs_diff_f']:.1e} (F).", ""]
  if results.get("train"):
    rows = []
    for r in results["train"]:
      j, t = r["jax"], r.get("torch", {})
      fused = r.get("jax_fused", {})
      mem = (j.get("memory") or {}).get("total")
      rows.append([
          r["phase"], str(r["batch"]), _f(j.get("step_ms")), _f(j.get("samples_per_s")),
          _f(fused.get("step_ms")) + (" (x%d)" % fused["steps_per_call"] if fused else ""),
          _f(j.get("compile_s")), _f((j.get("flops_per_step") or 0) / 1e9 or None, "{:.2f}"),
          _f(j.get("achieved_gflops")), _f(mem / 2**20 if mem else None, "{:.0f}"),
          _f(t.get("step_ms")), _f(t.get("samples_per_s")),
          _f(r.get("speedup_jax_over_torch"), "{:.2f}")])
    lines += _table("Train step", [
        "step", "batch", "JAX ms", "JAX samples/s", "JAX fused ms/step", "compile s",
        "GFLOP/step", "achieved GFLOP/s", "JAX mem MiB", "torch ms", "torch samples/s",
        "speed-up"], rows)
  if results.get("components"):
    rows = [[r["component"], str(r["params"]), _f(r["jax_fwd_ms"]), _f(r.get("torch_fwd_ms")),
             _f(r.get("speedup_fwd"), "{:.2f}"), _f(r["jax_fwd_bwd_ms"]),
             _f(r.get("torch_fwd_bwd_ms")), _f(r.get("speedup_fwd_bwd"), "{:.2f}"),
             _f(r["jax_compile_s"]), _f(r.get("jax_gflops_fwd_bwd"), "{:.2f}")]
            for r in results["components"]]
    lines += _table("Where the time goes: sub-networks alone (forward / forward+backward)", [
        "sub-network", "params", "JAX fwd ms", "torch fwd ms", "fwd speed-up", "JAX fwd+bwd ms",
        "torch fwd+bwd ms", "fwd+bwd speed-up", "JAX compile s", "GFLOP fwd+bwd"], rows)
  if results.get("sampling"):
    rows = []
    for r in results["sampling"]:
      j, t = r["jax"], r.get("torch", {})
      rows.append([r["method"], str(r["steps"]), f"{r['windows']} x {r['n_samples']}",
                   _f(j["time_s"], "{:.2f}"), _f(j["fine_maps_per_s"]),
                   _f(j["compile_c_s"] + j["compile_f_s"]), _f(t.get("time_s"), "{:.2f}"),
                   _f(t.get("fine_maps_per_s")), _f(r.get("speedup_jax_over_torch"), "{:.2f}")])
    lines += _table("Sampling (Diffusion-C completion + Diffusion-F inference)", [
        "sampler", "steps", "windows x samples", "JAX s", "JAX fine maps/s", "compile C+F s",
        "torch s", "torch fine maps/s", "speed-up"], rows)
  if results.get("split"):
    s = results["split"]
    lines += ["## Whole test split, all evaluation patterns (real `reconstruct`)", "",
              f"{s['slices']} slices x {s['patterns_total']} patterns, sampler {s['sampler']}, "
              f"eval batch {s['eval_batch']}: {s['all_patterns_s']:.0f} s"
              + (f" (extrapolated from {s['patterns_run']} pattern(s), measured "
                 f"{s['measured_s']:.0f} s)" if s["extrapolated"] else " (measured)")
              + f"; {s['fine_maps_per_s']:.0f} fine maps/s. Target: < 120 s.", ""]
  if results.get("scaling"):
    rows = []
    for r in results["scaling"]:
      j, t = r.get("jax", {}), r.get("torch", {})
      mem = (j.get("memory") or {}).get("total")
      note = j.get("skipped") or r.get("error")
      rows.append([str(r["axis"]), str(r["value"]), str(r["batch"]),
                   f"{r['coarse']} -> {r['fine']}", str(r["window"]), str(r["st_points"]),
                   _f(j.get("step_ms")) if not note else str(note), _f(j.get("compile_s")),
                   _f(mem / 2**20 if mem else None, "{:.0f}"), _f(t.get("step_ms")),
                   _f(r.get("speedup_jax_over_torch"), "{:.2f}")])
    lines += _table("Scaling: joint train step", [
        "axis", "value", "batch", "coarse -> fine", "window", "ST-points", "JAX ms", "compile s",
        "JAX mem MiB", "torch ms", "speed-up"], rows)
  if results.get("scaling_samples"):
    rows = [[str(r["value"]), _f(r["jax"]["time_s"], "{:.2f}"), _f(r["jax"]["fine_maps_per_s"]),
             _f(r.get("torch", {}).get("time_s"), "{:.2f}"),
             _f(r.get("speedup_jax_over_torch"), "{:.2f}")] for r in results["scaling_samples"]]
    lines += _table("Scaling: samples per map (DDIM)",
                    ["samples", "JAX s", "JAX fine maps/s", "torch s", "speed-up"], rows)
  for note in results.get("notes", []):
    lines.append(f"- {note}")
  return "\n".join(lines) + "\n"


def plot(results: dict, out: pathlib.Path) -> Optional[str]:
  """Time against each scaling axis; returns a note when matplotlib is missing."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return "matplotlib is not installed: scaling plot skipped (tables above hold the numbers)"
  rows = results.get("scaling", []) + results.get("scaling_samples", [])
  axes = [a for a in ("grid", "history", "batch", "n_samples") if any(r["axis"] == a for r in rows)]
  if not axes:
    return None
  fig, ax = plt.subplots(1, len(axes), figsize=(4 * len(axes), 3.2))
  ax = np.atleast_1d(ax)
  for k, a in zip(ax, axes):
    pts = [r for r in rows if r["axis"] == a and "jax" in r and "skipped" not in r["jax"]]
    xs = [r.get("st_points", r["value"]) if a == "grid" else r["value"] for r in pts]
    key = "time_s" if a == "n_samples" else "step_ms"
    for fw in ("jax", "torch"):
      ys = [r.get(fw, {}).get(key) for r in pts]
      good = [(x, y) for x, y in zip(xs, ys) if y]
      if good:
        k.plot(*zip(*good), "o-", label=fw)
    k.set_xlabel("ST-points" if a == "grid" else a)
    k.set_ylabel("s per sampling call" if a == "n_samples" else "ms per joint step")
    k.set_xscale("log")
    k.set_yscale("log")
    k.legend()
  fig.tight_layout()
  fig.savefig(out / "scaling.png", dpi=120)
  return None


# ------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------
def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default="benchmarks/results", help="output folder")
  p.add_argument("--quick", action="store_true",
                 help="joint step + DDIM sampling + a two-point scaling, a few minutes on CPU")
  p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
  p.add_argument("--config", default=None, help="config variant: cpu (default on --device cpu) "
                 "or gpu (default on --device gpu)")
  p.add_argument("--batch", type=int, default=0, help="train batch (default: the config's)")
  p.add_argument("--no-torch", action="store_true", help="JAX only")
  p.add_argument("--skip", default="", help="comma list of sections to skip: "
                 "train,components,sampling,split,scaling")
  p.add_argument("--split-patterns", type=int, default=-1,
                 help="patterns to run in the whole-split timing (default: 1 on full CPU runs, "
                      "extrapolated to all 9; 0 = skip; quick mode: 0)")
  p.add_argument("--torch-threads", type=int, default=0,
                 help="torch.set_num_threads (default: torch's own, = cores)")
  p.add_argument("--cudnn-attention", action="store_true",
                 help="GPU: ST-PointFormer with attention_impl='cudnn' (fused, bf16 q/k/v)")
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  backend = jax.default_backend()
  if args.device == "gpu" and backend != "gpu":
    raise SystemExit(f"--device gpu but JAX's backend is {backend!r}; install jax[cuda12]")
  variant = args.config or args.device
  config = default_config.get_config(variant)
  if args.cudnn_attention:
    config.model_c.attention_impl = "cudnn"
  if args.batch:
    config.train.batch_size = args.batch
  quick, skip = args.quick, set(filter(None, args.skip.split(",")))
  torch_device = None
  results: dict = {"mode": "quick" if quick else "full", "device": args.device,
                   "config": f"configs/nytaxi.py:{variant}"
                             + (" + cudnn attention" if args.cudnn_attention else ""),
                   "machine": machine_info(args.device), "load_start": load_average(),
                   "started": time.strftime("%Y-%m-%d %H:%M:%S"), "notes": []}
  if not args.no_torch:
    try:
      import torch
      if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
      results["machine"]["torch"] = torch.__version__
      results["machine"]["torch_threads"] = torch.get_num_threads()
      torch_device = "cuda" if args.device == "gpu" else "cpu"
      if torch_device == "cuda":
        # XLA uses TF32 for f32 convs/matmuls on Ampere+ by default; let torch do the same.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    except ImportError:
      results["notes"].append("torch not installed (pip install -e '.[bench]'): JAX only")
  reps = ({"warmup": 1, "min_reps": 3, "max_reps": 3, "min_time": 0.0} if quick else
          {"warmup": 1, "min_reps": 5, "max_reps": 20, "min_time": 5.0})
  ram = results["machine"].get("ram_gb")
  mem_limit = 0.6 * ram * 2 ** 30 if (args.device == "cpu" and ram) else None

  def save():
    results["load_end"] = load_average()
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "results.md").write_text(markdown(results))

  log(f"machine {results['machine']}")
  task = pipeline.prepare_task(config)
  case = Case("nytaxi", config, dict(task.shapes), int(config.train.batch_size))
  models = train.build_models(config, task.scale, task.stats, task.series.aggregation)
  t0 = time.perf_counter()
  params = jax.device_put(fill_params(abstract_params(models, case.shapes), 0))
  results["params_setup_s"] = time.perf_counter() - t0
  batch = real_batch(task, case.batch_size, 0)
  torch_side = None
  if torch_device:
    torch_side = TorchSide(case, models, params, torch_device)
    chk = torch_side.check_outputs(models, params, batch)
    results["twin_check"] = {"params_c": torch_side.counts["c"][0],
                             "params_f": torch_side.counts["f"][0], **chk}
    if max(chk["max_abs_diff_c"], chk["max_abs_diff_f"]) > 1e-3 * max(1.0, chk["max_abs_out"]):
      raise RuntimeError(f"the torch twin computes something else than the flax model: {chk}")
    log(f"twin check {results['twin_check']}")
  save()

  if "train" not in skip:
    fused = 1 if quick else min(10, int(config.train.steps_per_call))
    bench_train(case, models, params, batch, torch_side, ("joint",) if quick else PHASES,
                fused, reps, results)
    save()
  if "components" not in skip and not quick:
    bench_components(case, models, params, batch, torch_side, reps, results)
    save()
  d = config.diffusion
  n_samples = int(d.n_samples)
  if "sampling" not in skip:
    nwin = 16 if quick else (32 if args.device == "cpu" else int(config.eval.batch_size))
    sbatch = real_batch(task, nwin, 1)
    samplers = [("ddim", int(d.sampler_steps))] + ([] if quick else [("ddpm", int(d.num_steps))])
    bench_sampling(case, models, params, sbatch, torch_side, samplers, n_samples, reps, results)
    save()
  n_split = args.split_patterns if args.split_patterns >= 0 else (0 if quick else 1)
  if "split" not in skip and n_split > 0:
    bench_split(config, task, params, models, results, n_split)
    save()
  if quick:
    results["notes"].append("quick mode: scaling section skipped (each size is one more ~1 min "
                            "CPU compile); run without --quick for it")
  elif "scaling" not in skip:
    bench_scaling(config, args.device, case.batch_size, torch_device, reps, results,
                  mem_limit)
    save()
    if "sampling" not in skip:
      bench_samples_scaling(case, models, params, sbatch, torch_side, (1, 16), reps, results)
    save()
    note = plot(results, out)
    if note:
      results["notes"].append(note)
  results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
  save()
  log(f"wrote {out / 'results.json'} and {out / 'results.md'}")
  print((out / "results.md").read_text())
  return results


if __name__ == "__main__":
  main()
