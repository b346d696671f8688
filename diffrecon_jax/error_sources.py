"""Where a trained DiffRecon's fine error comes from, on the validation split.

  python -m diffrecon_jax.error_sources --config=configs/nytaxi.py --workdir=runs/nytaxi
  python -m diffrecon_jax.error_sources ... --max_slices=192     # a quicker look

Two questions decide what can still be won over the prior the networks correct:
  1. Per evaluation pattern, how the fine MAE of DiffRecon's point estimate and of its prior
     alone (`prior` method) splits between fine cells under observed coarse cells (only the
     split of a known total is wrong there) and under hidden ones (the completion's error
     too), and the share of the summed error each group holds.
  2. The split alone, with the true coarse map given (no cell hidden): the prior's shares,
     Diffusion-F's one-pass correction of them (at weight 1 and at the point weight chosen on
     validation), and for sum-aggregated counts the binomial floor: the MAE that would remain
     if each fine cell were a binomial draw of its block's total at the prior's share, the
     noise no split removes. The gap between the prior's split and that floor bounds what a
     better stage 2 can win under observed cells.
Writes WORKDIR/error_sources.md and .json (or --out). Reads the validation split (--split=test
only for a final table).
"""
from __future__ import annotations

import json
import pathlib
from typing import Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np
from ml_collections import config_flags

from diffrecon_jax import console
from diffrecon_jax import parallel
from diffrecon_jax import evaluate as evaluate_lib
from diffrecon_jax import run as run_lib
from diffrecon_jax.data import patterns as patterns_lib
from diffrecon_jax.diffrecon.prior_method import PriorMethod

# Binomial draws per fine cell for the floor: its Monte Carlo error is ~1% of the floor / sqrt(S).
FLOOR_DRAWS = 64


def _abs_sums(estimate: np.ndarray, truth: np.ndarray, cells: np.ndarray) -> tuple:
  """(summed |estimate - truth|, count) over finite truth where `cells` (broadcastable) holds."""
  keep = np.isfinite(truth) & np.broadcast_to(cells, truth.shape)
  return float(np.abs(np.asarray(estimate, np.float64) - truth)[keep].sum()), int(keep.sum())


def fine_cells_under(mask: np.ndarray, scale: int) -> np.ndarray:
  """Coarse mask (n, I, J) -> (n, N*I, N*J, 1) bool: True under observed coarse cells."""
  up = np.repeat(np.repeat(np.asarray(mask) > 0.5, scale, axis=1), scale, axis=2)
  return up[..., None]


def block_totals(a: np.ndarray, scale: int) -> np.ndarray:
  """(n, N*I, N*J, C) -> the same shape, every cell holding its N x N block's sum (NaN = 0)."""
  b, h, w, c = a.shape
  blocks = a.reshape(b, h // scale, scale, w // scale, scale, c)
  sums = np.nansum(blocks, axis=(2, 4), keepdims=True)
  return np.broadcast_to(sums, blocks.shape).reshape(a.shape)


def binomial_floor(totals: np.ndarray, shares: np.ndarray, truth: np.ndarray, seed: int = 0,
                   draws: int = FLOOR_DRAWS) -> float:
  """MAE of the best per-cell guess (the median) when each fine cell is Binomial(T, p): T the
  block's true total (rounded), p the prior's share; all (n, NI, NJ, C) broadcast, summed over
  finite `truth`. The noise of counts split at random by the shares, which no split removes."""
  rng = np.random.default_rng(seed)
  keep = np.isfinite(truth)
  t = np.clip(np.rint(totals[keep]), 0, None).astype(np.int64)
  p = np.clip(shares[keep], 0.0, 1.0)
  x = rng.binomial(t[None], p[None], size=(draws,) + t.shape)
  return float(np.abs(x - np.median(x, axis=0)).mean())


def pattern_rows(method, prior_method: PriorMethod, task, specs: Sequence[str], slices,
                 seed: int) -> list:
  """Question 1: one dict per pattern spec (module docstring), slices (n,) of the val split."""
  scale = int(task.scale)
  rows = []
  for spec in specs:
    mask, _ = evaluate_lib.eval_mask(task, patterns_lib.parse_pattern(spec), seed)
    view = evaluate_lib.observe(task, mask, spec)
    sums = {k: [0.0, 0] for k in ("dr_obs", "dr_hid", "pr_obs", "pr_hid")}
    for sl in evaluate_lib.contiguous_pieces(slices):
      fine, base = method.point_and_base(view, sl)
      point = base + method.fine_weight * (fine - base)
      prior_fine = prior_method.reconstruct(view, sl)["fine"]
      truth = task.fine_phys[sl]
      under_obs = fine_cells_under(view.mask[sl], scale)
      for key, est in (("dr", point), ("pr", prior_fine)):
        for group, cells in (("obs", under_obs), ("hid", ~under_obs)):
          s, c = _abs_sums(est, truth, cells)
          sums[f"{key}_{group}"][0] += s
          sums[f"{key}_{group}"][1] += c
    mae = {k: (s / c if c else float("nan")) for k, (s, c) in sums.items()}
    total = lambda who: sums[f"{who}_obs"][0] + sums[f"{who}_hid"][0]
    count = sums["dr_obs"][1] + sums["dr_hid"][1]
    rows.append({
        "pattern": spec, "fine_cells": count,
        "share_under_hidden": sums["dr_hid"][1] / max(count, 1),
        "mae": total("dr") / max(count, 1), "prior_mae": total("pr") / max(count, 1),
        "mae_under_observed": mae["dr_obs"], "prior_mae_under_observed": mae["pr_obs"],
        "mae_under_hidden": mae["dr_hid"], "prior_mae_under_hidden": mae["pr_hid"],
        "error_share_under_hidden": sums["dr_hid"][0] / max(total("dr"), 1e-12)})
  return rows


def split_alone(method, task, slices, seed: int = 0) -> dict:
  """Question 2 (module docstring): MAE of the fine map from the TRUE coarse map."""
  full = np.ones_like(task.coarse_valid)
  view = evaluate_lib.observe(task, full, "")
  sums = {k: [0.0, 0] for k in ("prior", "net", "net_weighted")}
  floor_sum, floor_n = 0.0, 0
  aggregation = str(task.series.aggregation)
  n = int(task.scale)
  for sl in evaluate_lib.contiguous_pieces(slices):
    fine, base = method.point_and_base(view, sl)
    truth = task.fine_phys[sl]
    for key, est in (("prior", base), ("net", fine),
                     ("net_weighted", base + method.fine_weight * (fine - base))):
      s, c = _abs_sums(est, truth, True)
      sums[key][0] += s
      sums[key][1] += c
    if aggregation == "sum":
      base_total = block_totals(base, n)
      ok = np.abs(base_total) > 1e-6
      shares = np.where(ok, base / np.where(ok, base_total, 1.0), 1.0 / (n * n))
      k = int(np.isfinite(truth).sum())
      floor_sum += binomial_floor(block_totals(truth, n), shares, truth, seed) * k
      floor_n += k
  out = {f"{k}_mae": s / c for k, (s, c) in sums.items()}
  out["fine_weight"] = float(method.fine_weight)
  out["binomial_floor_mae"] = floor_sum / floor_n if floor_n else None
  return out


def markdown(rows: list, alone: dict, meta: dict) -> str:
  """The report of `run` as markdown."""
  pct = lambda a, b: f"{100.0 * (a / b - 1.0):+.1f}%"
  lines = [f"# Where the fine error comes from ({meta['split']} split, {meta['slices']} slices)",
           "", f"Workdir `{meta['workdir']}`; point weights C {meta['coarse_weight']:.2f}, "
           f"F {meta['fine_weight']:.2f}; mask seed {meta['seed']}.", "",
           "| pattern | MAE | prior MAE | change | under observed: MAE / prior | under hidden: "
           "MAE / prior | cells under hidden | error under hidden |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['pattern']} | {r['mae']:.4f} | {r['prior_mae']:.4f} | "
        f"{pct(r['mae'], r['prior_mae'])} | {r['mae_under_observed']:.4f} / "
        f"{r['prior_mae_under_observed']:.4f} | {r['mae_under_hidden']:.4f} / "
        f"{r['prior_mae_under_hidden']:.4f} | {r['share_under_hidden']:.2f} | "
        f"{r['error_share_under_hidden']:.2f} |")
  lines += ["", "The split alone (the true coarse map given, nothing hidden):", "",
            "| fine map | MAE | vs the prior's split |", "|---|---|---|",
            f"| the prior's shares | {alone['prior_mae']:.4f} | |",
            f"| Diffusion-F, weight 1 | {alone['net_mae']:.4f} | "
            f"{pct(alone['net_mae'], alone['prior_mae'])} |",
            f"| Diffusion-F, weight {alone['fine_weight']:.2f} (chosen) | "
            f"{alone['net_weighted_mae']:.4f} | "
            f"{pct(alone['net_weighted_mae'], alone['prior_mae'])} |"]
  if alone.get("binomial_floor_mae") is not None:
    lines.append(f"| binomial floor (counts split at random by the prior's shares) | "
                 f"{alone['binomial_floor_mae']:.4f} | "
                 f"{pct(alone['binomial_floor_mae'], alone['prior_mae'])} |")
  return "\n".join(lines) + "\n"


def run(config, workdir: str, *, split: str = "val", max_slices: int = 0,
        out: Optional[str] = None) -> dict:
  """Loads the trained model of `workdir` (its calibration and point weights, fitted first if
  missing), answers the module docstring's two questions on `split` ("val"; "test" only for a
  final table) and writes error_sources.md / .json to `out` (default: the workdir)."""
  _, task, method = run_lib.load_method(config, workdir)
  prior = getattr(method.models, "prior", None)
  if prior is None:
    raise ValueError(f"{workdir}: the model has no climatology prior (a :paper model?); "
                     f"error_sources compares the networks with the prior they correct")
  slices, _ = evaluate_lib.evaluation_slices(task, split, max_slices)
  seed = int(config.patterns.eval_mask_seed)
  specs = list(config.patterns.eval)
  rows = pattern_rows(method, PriorMethod(prior, task.history), task, specs, slices, seed)
  alone = split_alone(method, task, slices, seed)
  meta = {"workdir": str(workdir), "split": split, "slices": int(len(slices)), "seed": seed,
          "coarse_weight": float(method.coarse_weight), "fine_weight": float(method.fine_weight)}
  doc = {"meta": meta, "patterns": rows, "split_alone": alone}
  folder = pathlib.Path(out or workdir)
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "error_sources.json").write_text(json.dumps(doc, indent=1))
  (folder / "error_sources.md").write_text(markdown(rows, alone, meta))
  logging.info("error sources written to %s", folder / "error_sources.md")
  return doc


def define_flags() -> None:
  """The command line's flags, defined only when this module runs as the program, so that
  importing it beside `experiments` (which has its own --config and --workdir) defines nothing
  twice."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
  flags.DEFINE_string("workdir", None, "A trained DiffRecon workdir.")
  flags.DEFINE_enum("split", "val", list(evaluate_lib.EVAL_SPLITS), "Split to read.")
  flags.DEFINE_integer("max_slices", 0, "Score the first this many slices (0 = all).")
  flags.DEFINE_string("out", None, "Folder of the report (default: the workdir).")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  args = flags.FLAGS
  workdir = run_lib.resolve_workdir(args.workdir)
  log_path = console.setup(args.out or workdir, parallel.process_index_for_logs())
  with console.errors_end_the_program("diffrecon_jax.error_sources", log_path):
    doc = run(args.config, workdir, split=args.split, max_slices=args.max_slices, out=args.out)
  print(markdown(doc["patterns"], doc["split_alone"], doc["meta"]))


if __name__ == "__main__":
  define_flags()
  app.run(main)
