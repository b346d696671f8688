"""Training and sampling speed of diffrecon_jax, side by side with a PyTorch eager twin.

  python -m benchmarks.run --out benchmarks/results [--quick | --tiny] [--device cpu|gpu]
                           [--no-torch]

Writes <out>/results.json, <out>/results.md and, when matplotlib is installed, <out>/scaling.png.

Sections (each row: JAX, PyTorch eager twin from benchmarks/torch_twin.py, ratio):
  train       Diffusion-C step (stage_c), Diffusion-F step (stage_f), joint step: median step
              time after warm-up (jax.block_until_ready), samples/s, compile time, FLOPs per step
              from XLA's cost analysis and the achieved FLOP/s, compiled memory; the same fixed
              batch (drawn once from the real nytaxi train split) is fed to both frameworks, with
              parameters copied from flax into the twin (counts and outputs checked first).
  components  (full mode) each sub-network alone, forward and forward + backward.
  sampling    Diffusion-C completion then Diffusion-F inference of a batch of windows, n samples
              each, DDIM with S steps and DDPM with T steps: fine maps/s (all samples counted);
              the config's ensemble (one completion per window, or one per member).
  split       (full mode) the real `DiffReconMethod.reconstruct` over the whole nytaxi test
              split for all nine evaluation patterns with the config's sampler.
  scaling     (full mode) joint step time against grid size (nytaxi, paper 8x8 -> 32x32, UrbanFM
              32x32 -> 128x128), history length and batch size; sampling time against samples.
  default     the default config (configs/nytaxi.py, what a user runs: climatology prior, x0
              prediction), JAX only: its train steps, its own sampler and (full mode) the whole
              split; quick mode: its sampler only.

Modes: full (default), --quick (joint step + DDIM sampling, the default config's sampler; a few
minutes on CPU), --tiny (every section above on shrunk configs, two calls per timed case and a
handful of slices: about a minute on 2 CPU cores, mostly compiles; it checks the suite against
the package's API, its numbers mean nothing; tests/test_benchmarks.py runs it).

Ratios are speed-ups, JAX / PyTorch in throughput (= PyTorch time / JAX time): > 1 means JAX is
faster. Weights are random (the timing does not depend on them); the train step runs on a fixed
batch (`sample_batch` replaced by the identity) so both frameworks see the same inputs.

Modules: timing (helpers), cases (sizes, parameters, batches), jax_side and torch_side (one
framework's measurement each), sections (one results.json section each), report (results.md,
scaling.png; re-renders a results.json on its own), this file (the command line).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import time

import jax

from benchmarks import cases as cases_lib
from benchmarks import report
from benchmarks import sections
from benchmarks.timing import load_average, log, machine_info
from diffrecon_jax.configs import nytaxi as nytaxi_config
from diffrecon_jax.diffrecon import model
from diffrecon_jax.data import pipeline

SECTIONS = ("train", "components", "sampling", "split", "scaling", "default")
# What --tiny sets when XLA_FLAGS does not choose an optimisation level: compile in a fraction of
# the time (the tests' flags; tests/_train_helpers.py), as tiny timings are not speeds anyway.
FAST_COMPILE_XLA_FLAGS = ("--xla_backend_optimization_level=0 "
                          "--xla_llvm_disable_expensive_passes=true")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default="benchmarks/results", help="output folder")
  mode = p.add_mutually_exclusive_group()
  mode.add_argument("--quick", action="store_true",
                    help="joint step + DDIM sampling, a few minutes on CPU")
  mode.add_argument("--tiny", action="store_true",
                    help="every section on a shrunk config, seconds: checks the suite runs")
  p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
  p.add_argument("--config", default=None, help="config variant: cpu (default on --device cpu) "
                 "or gpu (default on --device gpu)")
  p.add_argument("--batch", type=int, default=0, help="train batch (default: the config's)")
  p.add_argument("--no-torch", action="store_true", help="JAX only (no PyTorch twin)")
  p.add_argument("--skip", default="", help="comma list of sections to skip: "
                 + ",".join(SECTIONS))
  p.add_argument("--split-patterns", type=int, default=-1,
                 help="patterns to run in each whole-split timing (the paper architecture's "
                      "and the default config's; default: 1 on full runs, extrapolated to all 9; "
                      "0 = skip; quick mode: 0; tiny mode: 2)")
  p.add_argument("--torch-threads", type=int, default=0,
                 help="torch.set_num_threads (default: torch's own, = cores)")
  p.add_argument("--cudnn-attention", action="store_true",
                 help="GPU: ST-PointFormer with attention_impl='cudnn' (fused, bf16 q/k/v)")
  args = p.parse_args(argv)
  unknown = set(filter(None, args.skip.split(","))) - set(SECTIONS)
  if unknown:
    # A mistyped name would otherwise run the section it meant to skip (minutes of compiles).
    p.error(f"--skip: unknown section(s) {sorted(unknown)}; choose from {','.join(SECTIONS)} "
            "(the PyTorch twin is skipped with --no-torch)")
  return args


def setup_torch(args, results: dict) -> str | None:
  """Imports and configures PyTorch; returns its device ('cpu' | 'cuda'), or None when it is
  not wanted or not installed (a note says so)."""
  if args.no_torch:
    return None
  try:
    import torch
  except ImportError:
    results["notes"].append("torch not installed (pip install -e '.[bench]'): JAX only")
    return None
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  results["machine"]["torch"] = torch.__version__
  results["machine"]["torch_threads"] = torch.get_num_threads()
  device = "cuda" if args.device == "gpu" else "cpu"
  if device == "cuda":
    # XLA uses TF32 for f32 convs/matmuls on Ampere+ by default; let torch do the same.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
  return device


def plan(args, config, default_config) -> dict:
  """What each section runs in the chosen mode (full, quick or tiny), from the args and the two
  configs: repetitions, train phases, sampling windows and samplers, split patterns, scaling,
  and the parts of the default config's section."""
  ddim, ddpm = ("ddim", int(config.sampling.steps)), ("ddpm", int(config.diffusion.num_steps))
  d = default_config
  # The default config's own sampler (DDIM on the CPU config, DDPM on the gpu one): what a user's
  # evaluation runs.
  own = [("ddim", int(d.sampling.steps)) if d.sampling.sampler == "ddim"
         else ("ddpm", int(d.diffusion.num_steps))]
  # A members ensemble needs a spread (model.SamplingSettings): 2 samples or more.
  fewest = 2 if config.sampling.get("ensemble", "shared_completion") == "members" else 1
  if args.tiny:
    # One call of each section's functions per config and size: each train step is its own
    # compile (4-10 s even here), so one phase, one scaling point, one sampler; the default
    # config's stage_f step compiles in about half the joint step's time.
    return {"mode": "tiny", "reps": {"warmup": 1, "min_reps": 2, "max_reps": 2, "min_time": 0.0},
            "phases": ("joint",), "fused": 1, "components": True, "windows": 4,
            "samplers": [ddim], "split": 2, "scaling": True,
            "scaling_rounds": 2,  # the alternation's code path, at the cost of 2 more reps
            "samples": (max(2, fewest),),
            "default_phases": ("stage_f",), "default_samplers": own, "default_split": 2}
  if args.quick:
    return {"mode": "quick", "reps": {"warmup": 1, "min_reps": 3, "max_reps": 3, "min_time": 0.0},
            "phases": ("joint",), "fused": 1, "components": False, "windows": 16,
            "samplers": [ddim], "split": 0, "scaling": False, "scaling_rounds": 1, "samples": (),
            # Its sampler only: each train phase is one more ~40 s CPU compile.
            "default_phases": (), "default_samplers": own, "default_split": 0}
  return {"mode": "full", "reps": {"warmup": 1, "min_reps": 5, "max_reps": 20, "min_time": 5.0},
          "phases": model.PHASES, "fused": min(10, int(config.train.steps_per_call)),
          "components": True,
          "windows": 32 if args.device == "cpu" else int(config.eval.batch_size),
          "samplers": [ddim, ddpm], "split": 1, "scaling": True, "samples": (fewest, 16),
          # JAX and PyTorch alternate over 3 rounds per scaling point (sections.bench_scaling).
          "scaling_rounds": 3,
          "default_phases": model.PHASES, "default_samplers": own, "default_split": 1}


def main(argv=None) -> dict:
  args = parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  notes = []
  if args.tiny and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    # Read when JAX starts its backend (below), so this has no effect on a process that has
    # already run JAX code.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                               + FAST_COMPILE_XLA_FLAGS).strip()
    notes.append(f"tiny mode: XLA_FLAGS={FAST_COMPILE_XLA_FLAGS} (compiles in seconds)")
  backend = jax.default_backend()
  if args.device == "gpu" and backend != "gpu":
    raise SystemExit(f"--device gpu but JAX's backend is {backend!r}; install jax[cuda12]")
  variant = args.config or args.device
  parts = [v for v in variant.split(",") if v]
  # The PyTorch twin mirrors the paper's architecture, so both sides time that (`:paper`); the
  # default config (no `paper`: climatology prior, x0 prediction) is timed apart, JAX only.
  variant = ",".join(parts if "paper" in parts else parts + ["paper"])
  default_variant = ",".join(v for v in parts if v != "paper") or "cpu"
  config = nytaxi_config.get_config(variant)
  default_config = nytaxi_config.get_config(default_variant)
  for c in (config, default_config):
    if args.tiny:
      cases_lib.make_tiny(c)
    if args.cudnn_attention:
      c.model_c.attention_impl = "cudnn"
    if args.batch:
      c.train.batch_size = args.batch
  run = plan(args, config, default_config)
  mode, reps, skip = run["mode"], run["reps"], set(filter(None, args.skip.split(",")))
  suffix = ((" + cudnn attention" if args.cudnn_attention else "")
            + (" (tiny)" if args.tiny else ""))
  results: dict = {"mode": mode, "device": args.device,
                   "config": f"configs/nytaxi.py:{variant}" + suffix,
                   "machine": machine_info(args.device), "load_start": load_average(),
                   "started": time.strftime("%Y-%m-%d %H:%M:%S"), "notes": notes}
  torch_device = setup_torch(args, results)
  ram = results["machine"].get("ram_gb")
  mem_limit = 0.6 * ram * 2 ** 30 if (args.device == "cpu" and ram) else None

  def save():
    results["load_end"] = load_average()
    report.write(results, out)

  log(f"machine {results['machine']}")
  # Both configs read the same data (the `paper` variant changes the models only).
  task = pipeline.prepare_task(config)
  built = cases_lib.build_real("nytaxi", config, task)
  case, models, params = built.case, built.models, built.params
  results["params_setup_s"] = built.params_setup_s
  batch = cases_lib.real_batch(config, task, models, case.batch_size, 0)
  torch_side = None
  if torch_device:
    from benchmarks.torch_side import TorchSide
    torch_side = TorchSide(case, models, params, torch_device)
    results["twin_check"] = sections.twin_check(torch_side, models, params, batch)
    log(f"twin check {results['twin_check']}")
  save()

  if "train" not in skip:
    sections.bench_train(case, models, params, batch, torch_side, run["phases"], run["fused"],
                         reps, results, built.joint)
    save()
  if "components" not in skip and run["components"]:
    sections.bench_components(case, models, params, batch, torch_side, reps, results)
    save()
  n_samples = int(config.sampling.n_samples)
  sbatch = cases_lib.real_batch(config, task, models, run["windows"], 1)
  if "sampling" not in skip:
    sections.bench_sampling(case, models, params, sbatch, torch_side, run["samplers"],
                            n_samples, reps, results, built.clip)
    save()
  n_split = args.split_patterns if args.split_patterns >= 0 else run["split"]
  if "split" not in skip and n_split > 0:
    sections.bench_split(config, task, params, models, built.clip, results, n_split)
    save()
  if not run["scaling"]:
    results["notes"].append("quick mode: scaling section skipped (each size is one more ~1 min "
                            "CPU compile); run without --quick for it")
  elif "scaling" not in skip:
    sections.bench_scaling(config, args.device, case.batch_size, torch_device, reps, results,
                           mem_limit, tiny=args.tiny, rounds=run["scaling_rounds"])
    save()
    if "sampling" not in skip:
      sections.bench_samples_scaling(case, models, params, sbatch, torch_side, run["samples"],
                                     reps, results, built.clip)
    save()
    note = report.plot(results, out)
    if note:
      results["notes"].append(note)
  if "default" not in skip:
    # --skip train / sampling / split skip that part of this section too.
    d_split = args.split_patterns if args.split_patterns >= 0 else run["default_split"]
    sections.bench_default(
        f"configs/nytaxi.py:{default_variant}" + suffix, default_config, task,
        run["default_phases"] if "train" not in skip else (),
        min(run["fused"], int(default_config.train.steps_per_call)),
        run["default_samplers"] if "sampling" not in skip else [], run["windows"],
        d_split if "split" not in skip else 0, reps, results, save)
    save()
  results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
  save()
  log(f"wrote {out / 'results.json'} and {out / 'results.md'}")
  print((out / "results.md").read_text())
  return results


if __name__ == "__main__":
  main()
