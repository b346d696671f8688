"""Does Diffusion-F stay on distribution when its history is a sampled completion?

Diffusion-F is trained on windows of TRUE coarse maps; at sampling time an ensemble member
feeds it a window of its own Diffusion-C completions (hidden cells sampled). If sampled
histories were off the training distribution, the member's fine map would split its coarse
totals worse than a fine map conditioned on the true window. This measures it on the
VALIDATION split of a trained workdir: for each pattern, Diffusion-F's one-pass estimate
(`diffrecon.point_fine`) of the same slices conditioned on
  true     the true coarse window (what it was trained on),
  point    the window of the one-pass posterior completions (the point estimate's input),
  members  each member's window of sampled completions (`sample_coarse_members`),
and scores two things against the true fine maps:
  split MAE  every N x N block of the estimate rescaled to the TRUE block value first, so only
             how the block is split among its fine cells counts (the input's level is removed),
  fine MAE   the estimate as it is (the input's coarse error included).
Equal split MAEs under `true` and `members` say Diffusion-F splits sampled histories as well as
true ones, so training it on sampled completions has nothing to gain there. Writes
`<out>/stage2_inputs.json`.

  python -m benchmarks.stage2_inputs --workdir=runs/nytaxi --out=benchmarks/results
"""
from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np


def rescaled_to_truth(fine: np.ndarray, truth_coarse: np.ndarray, scale: int,
                      aggregation: str) -> np.ndarray:
  """fine (n,NI,NJ,C) with each N x N block rescaled so that it pools to truth_coarse
  (n,I,J,C); a block whose estimate pools to ~0 is spread evenly."""
  from diffrecon_jax.data import coarsen
  pooled = coarsen.coarsen(fine, scale, aggregation)
  up = lambda a: np.repeat(np.repeat(a, scale, axis=1), scale, axis=2)
  even = up(truth_coarse if aggregation == "mean" else truth_coarse / scale**2)
  ok = np.abs(pooled) > 1e-6
  factor = np.where(ok, truth_coarse / np.where(ok, pooled, 1.0), 0.0)
  return np.where(up(ok), fine * up(factor), even)


def score(estimate: np.ndarray, truth: np.ndarray, truth_coarse: np.ndarray, hidden: np.ndarray,
          scale: int, aggregation: str) -> dict:
  """split / fine MAE of estimate (n,NI,NJ,C) against truth, all cells and under hidden
  coarse cells (hidden: (n,NI,NJ,1) bool, `metrics.hidden_fine_cells`)."""
  split = np.abs(rescaled_to_truth(estimate, truth_coarse, scale, aggregation) - truth)
  fine = np.abs(estimate - truth)
  ok = np.isfinite(truth)
  h = np.broadcast_to(hidden, truth.shape) & ok
  return {"split_mae": float(split[ok].mean()), "split_mae_hidden": float(split[h].mean()),
          "fine_mae": float(fine[ok].mean()), "fine_mae_hidden": float(fine[h].mean())}


def study(workdir: str, patterns: tuple, n_slices: int, seed: int) -> dict:
  import jax
  from diffrecon_jax.configs import default
  from diffrecon_jax import evaluate, metrics, run
  from diffrecon_jax.diffrecon import model
  from diffrecon_jax.data import patterns as patterns_lib
  config = default.get_config()
  config.calibration.enabled = False  # the raw members: their inputs are what is measured
  config.eval.split = "val"
  config.sampling.ensemble = "members"
  _, task, method = run.load_method(config, workdir)
  h, n_scale = task.history, task.scale
  aggregation = task.series.aggregation
  lo, _ = task.split.range("val")
  current = np.arange(lo + 2 * h, lo + 2 * h + n_slices)
  span = np.arange(current[0] - h, current[-1] + 1)  # every slice a current window touches
  win = np.arange(len(current))[:, None] + np.arange(0, h + 1)[None, :]   # into span
  idx = current[:, None] + np.arange(-h, 1)[None, :]                      # into the series
  # s: the windows' slots (B, t); Diffusion-F reads the current slice's, as `DiffReconMethod`.
  point_f = jax.jit(lambda p, c, e, s: model.point_fine(method.models, p, c, e, s[:, -1],
                                                            method.settings.consistent))
  truth = task.fine_phys[current]
  truth_c = task.coarse_phys[current]
  out = {}
  for spec in patterns:
    mask, _ = evaluate.eval_mask(task, patterns_lib.parse_pattern(spec), seed)
    view = evaluate.observe(task, mask, spec)
    rec = method.reconstruct(view, span)           # member completions of every span slice
    slots = method.slots(view)
    norm = lambda phys: np.asarray(task.coarse_norm.apply(phys), np.float32)
    inputs = {"true": task.coarse[idx], "point": norm(rec["coarse"])[win]}
    members = norm(rec["coarse_samples"])           # (S, len(span), I, J, C)
    fine_of = lambda windows: task.fine_norm.inverse(np.concatenate([
        np.asarray(point_f(method.params["f"], windows[b:b + 64], view.external[idx[b:b + 64]],
                           slots[idx[b:b + 64]]))
        for b in range(0, len(windows), 64)]))
    hidden = metrics.hidden_fine_cells(mask[current], n_scale)
    row = {name: score(fine_of(w), truth, truth_c, hidden, n_scale, aggregation)
           for name, w in inputs.items()}
    per_member = [score(fine_of(members[s][win]), truth, truth_c, hidden, n_scale, aggregation)
                  for s in range(len(members))]
    row["members"] = {k: float(np.mean([m[k] for m in per_member])) for k in per_member[0]}
    out[spec] = row
    print(spec, json.dumps(row))
  return {"workdir": workdir, "split": "val", "slices": int(n_slices), "mask_seed": seed,
          "n_members": int(method.settings.n_samples), "patterns": out}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", default="benchmarks/results")
  parser.add_argument("--patterns", default="fixed:0.4,fixed:0.8,random:0.4,large_scale:0.25")
  parser.add_argument("--slices", type=int, default=336, help="validation slices scored")
  parser.add_argument("--seed", type=int, default=0, help="mask seed")
  args = parser.parse_args(argv)
  result = study(args.workdir, tuple(args.patterns.split(",")), args.slices, args.seed)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "stage2_inputs.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
