"""Training and sampling speed of diffrecon_jax, side by side with a PyTorch eager twin.

  python -m benchmarks.run --out benchmarks/results [--quick] [--device cpu|gpu] [--no-torch]

Writes <out>/results.json, <out>/results.md and, when matplotlib is installed, <out>/scaling.png.

Sections (each row: JAX, PyTorch eager twin from benchmarks/torch_twin.py, ratio):
  train       Diffusion-C step (stage_c), Diffusion-F step (stage_f), joint step: median step
              time after warm-up (jax.block_until_ready), samples/s, compile time, FLOPs per step
              from XLA's cost analysis and the achieved FLOP/s, compiled memory; the same fixed
              batch (drawn once from the real nytaxi train split) is fed to both frameworks, with
              parameters copied from flax into the twin (counts and outputs checked first).
  components  (full mode) each sub-network alone, forward and forward + backward.
  sampling    Diffusion-C completion then Diffusion-F inference of a batch of windows, n samples
              each, DDIM with S steps and DDPM with T steps: fine maps/s (all samples counted).
  split       (full CPU mode) the real `DiffReconMethod.reconstruct` over the whole nytaxi test
              split for all nine evaluation patterns with the config's sampler.
  scaling     (full mode) joint step time against grid size (nytaxi, paper 8x8 -> 32x32, UrbanFM
              32x32 -> 128x128), history length and batch size; sampling time against samples.

Ratios are speed-ups, JAX / PyTorch in throughput (= PyTorch time / JAX time): > 1 means JAX is
faster. Weights are random (the timing does not depend on them); the train step runs on a fixed
batch (`sample_batch` replaced by the identity) so both frameworks see the same inputs.

Modules: timing (helpers), cases (sizes, parameters, batches), jax_side and torch_side (one
framework's measurement each), sections (one results.json section each), report (results.md,
scaling.png; re-renders a results.json on its own), this file (the command line).
"""
from __future__ import annotations

import argparse
import pathlib
import time

import jax

from benchmarks import cases as cases_lib
from benchmarks import report
from benchmarks import sections
from benchmarks.timing import load_average, log, machine_info
from configs import nytaxi as nytaxi_config
from diffrecon_jax import diffrecon
from diffrecon_jax import train
from diffrecon_jax.data import pipeline

SECTIONS = ("train", "components", "sampling", "split", "scaling")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default="benchmarks/results", help="output folder")
  p.add_argument("--quick", action="store_true",
                 help="joint step + DDIM sampling, a few minutes on CPU")
  p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
  p.add_argument("--config", default=None, help="config variant: cpu (default on --device cpu) "
                 "or gpu (default on --device gpu)")
  p.add_argument("--batch", type=int, default=0, help="train batch (default: the config's)")
  p.add_argument("--no-torch", action="store_true", help="JAX only (no PyTorch twin)")
  p.add_argument("--skip", default="", help="comma list of sections to skip: "
                 + ",".join(SECTIONS))
  p.add_argument("--split-patterns", type=int, default=-1,
                 help="patterns to run in the whole-split timing (default: 1 on full CPU runs, "
                      "extrapolated to all 9; 0 = skip; quick mode: 0)")
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


def main(argv=None) -> dict:
  args = parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  backend = jax.default_backend()
  if args.device == "gpu" and backend != "gpu":
    raise SystemExit(f"--device gpu but JAX's backend is {backend!r}; install jax[cuda12]")
  variant = args.config or args.device
  # The PyTorch twin mirrors the paper's architecture, so both sides time that (`:paper`); the
  # climatology prior of the default model adds one input channel and a few elementwise ops.
  variant = variant if "paper" in variant.split(",") else variant + ",paper"
  config = nytaxi_config.get_config(variant)
  if args.cudnn_attention:
    config.model_c.attention_impl = "cudnn"
  if args.batch:
    config.train.batch_size = args.batch
  quick, skip = args.quick, set(filter(None, args.skip.split(",")))
  results: dict = {"mode": "quick" if quick else "full", "device": args.device,
                   "config": f"configs/nytaxi.py:{variant}"
                             + (" + cudnn attention" if args.cudnn_attention else ""),
                   "machine": machine_info(args.device), "load_start": load_average(),
                   "started": time.strftime("%Y-%m-%d %H:%M:%S"), "notes": []}
  torch_device = setup_torch(args, results)
  reps = ({"warmup": 1, "min_reps": 3, "max_reps": 3, "min_time": 0.0} if quick else
          {"warmup": 1, "min_reps": 5, "max_reps": 20, "min_time": 5.0})
  ram = results["machine"].get("ram_gb")
  mem_limit = 0.6 * ram * 2 ** 30 if (args.device == "cpu" and ram) else None

  def save():
    results["load_end"] = load_average()
    report.write(results, out)

  log(f"machine {results['machine']}")
  task = pipeline.prepare_task(config)
  case = cases_lib.Case("nytaxi", config, dict(task.shapes), int(config.train.batch_size))
  models = diffrecon.build_models_for_task(config, task)
  t0 = time.perf_counter()
  params = cases_lib.random_params(models, case.shapes)
  results["params_setup_s"] = time.perf_counter() - t0
  batch = cases_lib.real_batch(task, case.batch_size, 0)
  # What training and evaluation use: the joint objective's clip and the samplers' clips.
  joint = train.joint_settings(config, task, models)
  clip = diffrecon.x0_clip_bounds(float(config.sampling.x0_clip_factor), task, models)
  torch_side = None
  if torch_device:
    from benchmarks.torch_side import TorchSide
    torch_side = TorchSide(case, models, params, torch_device)
    results["twin_check"] = sections.twin_check(torch_side, models, params, batch)
    log(f"twin check {results['twin_check']}")
  save()

  if "train" not in skip:
    fused = 1 if quick else min(10, int(config.train.steps_per_call))
    sections.bench_train(case, models, params, batch, torch_side,
                         ("joint",) if quick else diffrecon.PHASES, fused, reps, results, joint)
    save()
  if "components" not in skip and not quick:
    sections.bench_components(case, models, params, batch, torch_side, reps, results)
    save()
  s = config.sampling
  n_samples = int(s.n_samples)
  if "sampling" not in skip:
    nwin = 16 if quick else (32 if args.device == "cpu" else int(config.eval.batch_size))
    sbatch = cases_lib.real_batch(task, nwin, 1)
    samplers = [("ddim", int(s.steps))] + ([] if quick else
                                           [("ddpm", int(config.diffusion.num_steps))])
    sections.bench_sampling(case, models, params, sbatch, torch_side, samplers, n_samples, reps,
                            results, clip)
    save()
  n_split = args.split_patterns if args.split_patterns >= 0 else (0 if quick else 1)
  if "split" not in skip and n_split > 0:
    sections.bench_split(config, task, params, models, clip, results, n_split)
    save()
  if quick:
    results["notes"].append("quick mode: scaling section skipped (each size is one more ~1 min "
                            "CPU compile); run without --quick for it")
  elif "scaling" not in skip:
    sections.bench_scaling(config, args.device, case.batch_size, torch_device, reps, results,
                           mem_limit)
    save()
    if "sampling" not in skip:
      sections.bench_samples_scaling(case, models, params, sbatch, torch_side, (1, 16), reps,
                                     results, clip)
    save()
    note = report.plot(results, out)
    if note:
      results["notes"].append(note)
  results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
  save()
  log(f"wrote {out / 'results.json'} and {out / 'results.md'}")
  print((out / "results.md").read_text())
  return results


if __name__ == "__main__":
  main()
