"""The sections of results.json, one function each: the JAX measurement (`jax_side`), the
PyTorch twin's on the same inputs when a `TorchSide` is given (`torch_side`), and their ratio.

Each function stores its rows into `results` after every row, so a run stopped half-way (or one
size failing) keeps what was measured.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from benchmarks import cases as cases_lib
from benchmarks import jax_side
from benchmarks.timing import log, ratio, timed_reps
from diffrecon_jax.diffrecon import model


def twin_check(torch_side, models: model.Models, params: Any, batch: dict) -> dict:
  """The `twin_check` entry: parameter counts and max |flax - torch| of eps_hat; raises
  RuntimeError above 1e-3 of the largest output (the twin then computes something else)."""
  chk = torch_side.check_outputs(models, params, batch)
  out = {"params_c": torch_side.counts["c"][0], "params_f": torch_side.counts["f"][0], **chk}
  if max(chk["max_abs_diff_c"], chk["max_abs_diff_f"]) > 1e-3 * max(1.0, chk["max_abs_out"]):
    raise RuntimeError(f"the torch twin computes something else than the flax model: {chk}")
  return out


def bench_train(case, models, params, batch, torch_side, phases, fused, reps, results,
                joint: model.JointSettings) -> list:
  """`train` rows: each phase's step, one per call (and the joint step fused x`fused`)."""
  rows = []
  for phase in phases:
    log(f"train {phase}: JAX compile + time")
    j = jax_side.train_bench(case, models, params, batch, phase, 1, reps, joint)
    row = {"phase": phase, "batch": case.batch_size, "jax": j}
    if fused > 1 and phase == "joint":
      log(f"train {phase}: JAX fused x{fused}")
      row["jax_fused"] = jax_side.train_bench(case, models, params, batch, phase, fused, reps,
                                              joint)
    if torch_side is not None:
      log(f"train {phase}: PyTorch eager")
      row["torch"] = torch_side.train_bench(case, batch, phase, reps, joint.x0_clip)
      row["speedup_jax_over_torch"] = ratio(row["torch"]["step_ms"], j["step_ms"])
    log(f"train {phase}: jax {j['step_ms']:.1f} ms"
        + (f", torch {row['torch']['step_ms']:.1f} ms" if "torch" in row else ""))
    rows.append(row)
    results["train"] = rows
  return rows


def bench_components(case, models, params, batch, torch_side, reps, results) -> list:
  """`components` rows: forward + backward (grad of mean(out^2) w.r.t. the sub-network's
  parameters) of each sub-network alone, JAX jit vs PyTorch eager: where the step time goes."""
  nets = jax_side.component_nets(models, params, int(case.shapes["channels"]))
  inputs = cases_lib.component_inputs(case, params, batch)
  rows = []
  for name, (net, p, path) in nets.items():
    log(f"component {name}")
    row = {"component": name, **jax_side.component_bench(net, p, inputs[name], reps)}
    if torch_side is not None:
      row.update(torch_side.component_bench(path, inputs[name], reps))
      row["speedup_fwd_bwd"] = ratio(row["torch_fwd_bwd_ms"], row["jax_fwd_bwd_ms"])
      row["speedup_fwd"] = ratio(row["torch_fwd_ms"], row["jax_fwd_ms"])
    rows.append(row)
    results["components"] = rows
  return rows


def _torch_sampling(torch_side, case, batch, settings, reps, row: dict) -> None:
  """The twin's timing of the same sampler into `row` (with the speed-up), when there is a twin
  and it runs the same ensemble: it completes each window once for every sample, so a members
  ensemble (`jax_side.ensemble`) gets a note instead of an unlike comparison."""
  if torch_side is None:
    return
  if jax_side.ensemble(settings) != "shared_completion":
    row["torch_note"] = (f"twin not timed: it has no '{jax_side.ensemble(settings)}' ensemble "
                         "(one shared completion per window only)")
    return
  row["torch"] = torch_side.sampling_bench(case, batch, settings, reps)
  row["speedup_jax_over_torch"] = ratio(row["torch"]["time_s"], row["jax"]["time_s"])


def bench_sampling(case, models, params, batch, torch_side, samplers, n_samples, reps, results,
                   clip: tuple) -> list:
  """`sampling` rows: stage 1 + stage 2 of the batch's windows for each (sampler, steps)."""
  rows = []
  rng = jax_side.sampling_key(case.config)
  for method, steps in samplers:
    settings = jax_side.sampling_settings(case.config, method, steps, n_samples)
    log(f"sampling {method} {settings.steps} steps, {batch['obs'].shape[0]} windows x "
        f"{n_samples}")
    j = jax_side.sampling_bench(models, params, batch, settings, clip, rng, reps)
    row = {"method": method, "steps": settings.steps, "windows": int(batch["obs"].shape[0]),
           "n_samples": n_samples, "sampler": settings.describe(), "jax": j}
    _torch_sampling(torch_side, case, batch, settings, reps, row)
    rows.append(row)
    results["sampling"] = rows
  return rows


def bench_samples_scaling(case, models, params, batch, torch_side, counts, reps, results,
                          clip: tuple) -> list:
  """`scaling_samples` rows: the config's DDIM sampler against the number of samples."""
  rows = []
  rng = jax_side.sampling_key(case.config)
  steps = int(case.config.sampling.steps)
  for n in counts:
    log(f"scaling n_samples={n}")
    settings = jax_side.sampling_settings(case.config, "ddim", steps, n)
    row = {"axis": "n_samples", "value": n,
           "jax": jax_side.sampling_bench(models, params, batch, settings, clip, rng, reps)}
    _torch_sampling(torch_side, case, batch, settings, reps, row)
    rows.append(row)
    results["scaling_samples"] = rows
  return rows


def bench_split(config, task, params, models, clip: tuple, results, max_patterns: int) -> dict:
  """`split`: the real `reconstruct` over the evaluation split (`jax_side.split_bench`)."""
  out = jax_side.split_bench(config, task, params, models, clip, max_patterns)
  results["split"] = out
  return out


def bench_default(label: str, config, task, phases: tuple, fused: int, samplers: list,
                  windows: int, n_split: int, reps: dict, results: dict,
                  save=lambda: None) -> dict:
  """`default`: the default config (what `python -m diffrecon_jax.main
  --config=configs/nytaxi.py` trains and evaluates: climatology prior, x0 prediction, one-pass
  point estimate), JAX only, since the PyTorch twin mirrors the paper's architecture.

  Its train steps (`phases`, fused x`fused`), its samplers (`samplers`, `windows` windows) and
  its whole-split reconstruction (`n_split` patterns), each with the function of the matching
  section above, into results['default'] with the config's `label` (an empty tuple / list / 0
  skips a part); `save` is called after each part.
  """
  out = {"config": label}
  results["default"] = out
  b = cases_lib.build_real("nytaxi default", config, task)
  out["params_setup_s"] = b.params_setup_s
  if phases:
    batch = cases_lib.real_batch(config, task, b.models, b.case.batch_size, 0)
    bench_train(b.case, b.models, b.params, batch, None, phases, fused, reps, out, b.joint)
    save()
  if samplers:
    sbatch = cases_lib.real_batch(config, task, b.models, windows, 1)
    bench_sampling(b.case, b.models, b.params, sbatch, None, samplers,
                   int(config.sampling.n_samples), reps, out, b.clip)
    save()
  if n_split > 0:
    bench_split(config, task, b.params, b.models, b.clip, out, n_split)
    save()
  return out


def fastest_round(rounds: list) -> dict:
  """The `timed_reps` result with the lowest median among `rounds`."""
  return min(rounds, key=lambda r: r["median_s"])


def bench_scaling(base, device: str, batch: int, torch_device: Optional[str], reps: dict,
                  results: dict, mem_limit: Optional[float], tiny: bool = False,
                  rounds: int = 1) -> list:
  """`scaling` rows: the joint step at each point of `cases.scaling_cases` (synthetic batches;
  `tiny`: its small points).

  Each side is timed in `rounds` rounds of `reps` that alternate JAX, PyTorch, JAX, ... and
  keeps its fastest round's median: a load that comes and goes on a shared machine then costs
  both sides alike instead of whichever happened to run under it (rows record every round's
  median, `round_ms`). A point whose compiled buffers exceed `mem_limit` bytes is skipped; one
  that fails (e.g. out of memory) records its error and the others still run.
  """
  if rounds < 1:
    raise ValueError(f"bench_scaling: rounds must be at least 1, got {rounds}")
  from benchmarks.torch_side import TorchSide
  rows = []
  for axis, value, case in cases_lib.scaling_cases(base, device, batch, tiny):
    log(f"scaling {axis}={value}")
    # Synthetic grids have no normalisation stats or calendar: time the plain targets (the
    # residual parameterisations add a few elementwise ops).
    cfg = case.config.copy_and_resolve_references()
    cfg.diffusion.fine_residual = False
    cfg.diffusion.coarse_residual = False
    models = model.build_models(cfg, case.shapes["scale"])
    params = cases_lib.random_params(models, case.shapes)
    b = cases_lib.synthetic_batch(case.shapes, case.batch_size, 1)
    joint = jax_side.joint_settings_for(cfg, b["coarse"])
    row = {"axis": axis, "value": value, "batch": case.batch_size,
           "coarse": case.shapes["coarse_shape"], "fine": case.shapes["fine_shape"],
           "window": case.window,
           "st_points": case.window * int(np.prod(case.shapes["coarse_shape"]))}
    try:
      jax_out, jax_run = jax_side.compile_train_step(case, models, params, b, "joint", 1, joint,
                                                     mem_limit)
      row["jax"] = jax_out
      if jax_run is not None:
        ts = TorchSide(case, models, params, torch_device) if torch_device else None
        torch_run = ts.train_runner(case, b, "joint", joint.x0_clip) if ts else None
        jax_rounds, torch_rounds = [], []
        for _ in range(rounds):
          jax_rounds.append(timed_reps(jax_run, **reps))
          if torch_run is not None:
            torch_rounds.append(timed_reps(torch_run, **reps))
        row["jax"] = jax_side.with_timing(jax_out, case, fastest_round(jax_rounds))
        row["jax"]["round_ms"] = [1e3 * r["median_s"] for r in jax_rounds]
        if ts is not None:
          row["torch"] = ts.with_timing(case, fastest_round(torch_rounds))
          row["torch"]["round_ms"] = [1e3 * r["median_s"] for r in torch_rounds]
          row["speedup_jax_over_torch"] = ratio(row["torch"]["step_ms"], row["jax"]["step_ms"])
    except Exception as e:  # one failing size (e.g. out of memory) must not lose the others
      row["error"] = f"{type(e).__name__}: {e}"[:300]
    rows.append(row)
    results["scaling"] = rows
  return rows
