"""Scores methods by the evaluation contract (EVALUATION.md) and writes results.json / results.md.

A *method* is any object with `name`, `sampler` (dict or None) and
`reconstruct(task, mask (T,I,J), slices (n,)) -> {"coarse": (n,I,J,C), "fine": (n,NI,NJ,C),
"samples": (S,n,NI,NJ,C) or None}` in physical units. The evaluation draws every pattern's mask
over the whole series (history windows included) from a recorded seed, saves it under
`workdir/masks/`, hides the masked coarse cells from the method (it receives the mask and reads
coarse values only where the mask is 1), and pools the metrics over the split.
"""
from __future__ import annotations

import json
import os
import pathlib
import time
import zlib

import numpy as np
from absl import logging

from diffrecon_jax import metrics as metrics_lib
from diffrecon_jax.data import patterns as patterns_lib


def pattern_seed(base_seed: int, kind: str) -> int:
  """The mask seed of a pattern kind, stable across runs, machines and methods.

  One seed per *kind* (not per ratio) makes the masks of one kind nested: the cells hidden at
  ratio 0.2 are also hidden at 0.4, and so on, so errors across ratios compare like with like.
  """
  return (int(base_seed) * 1_000_003 + zlib.crc32(kind.encode())) % (2 ** 31)


def eval_mask(task, pattern: patterns_lib.Pattern, base_seed: int) -> tuple:
  """(mask (T,I,J) with NaN coarse cells marked missing, seed used)."""
  seed = pattern_seed(base_seed, pattern.kind)
  mask = patterns_lib.make_eval_mask(pattern, task.fine.shape[0], task.coarse_shape, seed)
  return mask * task.coarse_valid, seed


def hide(task, mask: np.ndarray) -> np.ndarray:
  """The coarse series a method may see: physical values where observed, NaN elsewhere."""
  return np.where(mask[..., None] > 0, task.coarse_phys, np.nan).astype(np.float32)


def evaluate_method(task, method, pattern_specs, *, seed: int, split: str = "test",
                    max_slices: int = 0, chunk: int = 0, workdir=None) -> list:
  """Scores `method` on every pattern; returns the contract's `results` entries.

  `chunk` > 0 hands the split to the method in pieces of that many slices (bounded memory for
  large grids); 0 hands it over whole (fewest padded batches).
  """
  lo, hi = task.split.range(split)
  if max_slices:
    hi = min(hi, lo + int(max_slices))
  slices_all = np.arange(lo, hi)
  chunk = chunk if chunk > 0 else len(slices_all)
  out = []
  for spec in pattern_specs:
    pattern = patterns_lib.parse_pattern(spec)
    mask, mseed = eval_mask(task, pattern, seed)
    if workdir is not None:
      mdir = pathlib.Path(workdir) / "masks"
      mdir.mkdir(parents=True, exist_ok=True)
      np.savez_compressed(mdir / f"{file_label(pattern.label)}.npz", mask=mask.astype(np.uint8),
                          seed=mseed)
    fine_m, comp_m = metrics_lib.PooledMetrics(), metrics_lib.PooledMetrics()
    start = time.perf_counter()
    for c0 in range(0, len(slices_all), chunk):
      sl = slices_all[c0:c0 + chunk]
      rec = method.reconstruct(task, mask, sl)
      fine_m.update(rec["fine"], task.fine_phys[sl], samples=rec.get("samples"))
      comp_m.update(rec["coarse"], task.coarse_phys[sl], where=(mask[sl] == 0)[..., None])
    seconds = time.perf_counter() - start
    missing = 1.0 - mask[slices_all].mean()
    entry = {
        "pattern": pattern.kind,
        "missing_ratio": pattern.ratio if pattern.kind != "file" else round(float(missing), 4),
        "mae": fine_m.mae, "rmse": fine_m.rmse,
        "completion_mae": comp_m.mae, "completion_rmse": comp_m.rmse,
        "crps": fine_m.crps,
        "n_test_slices": int(len(slices_all)),
        "seconds": seconds,
        "maps_per_second": len(slices_all) / seconds if seconds > 0 else None,
        "mask_seed": mseed,
        "observed_missing_ratio": round(float(missing), 4),
    }
    if pattern.kind == "file":
      entry["mask_file"] = pattern.path
    logging.info("%s %s: MAE %.4f RMSE %.4f completion MAE %s (%.1f s)", method.name,
                 pattern.label, entry["mae"], entry["rmse"],
                 f"{entry['completion_mae']:.4f}" if entry["completion_mae"] is not None else "-",
                 seconds)
    out.append(entry)
  return out


def file_label(label: str) -> str:
  """A pattern label usable as a file name: "random:0.4" -> "random_0.4"."""
  return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in label)


def results_document(task, method, results: list, seed: int, extra: dict = None) -> dict:
  """The results.json document of EVALUATION.md."""
  doc = {
      "dataset": task.series.name,
      "method": method.name,
      "scale_factor": task.scale,
      "coarse_shape": list(task.coarse_shape),
      "fine_shape": list(task.fine_shape),
      "channels": task.channels,
      "aggregation": task.series.aggregation,
      "sampler": method.sampler,
      "seed": seed,
      "results": results,
  }
  if extra:
    doc.update(extra)
  return doc


def _fmt(x) -> str:
  return "-" if x is None else f"{x:.3f}"


def results_markdown(docs: list) -> str:
  """A table laid out like the paper's Tables II/III: one row per pattern, ratio and metric,
  one column per method (the first document is the main method)."""
  d0 = docs[0]
  lines = [f"# {d0['dataset']}: {d0['coarse_shape'][0]}x{d0['coarse_shape'][1]} -> "
           f"{d0['fine_shape'][0]}x{d0['fine_shape'][1]} (N={d0['scale_factor']}, "
           f"{d0['aggregation']}), {d0['results'][0]['n_test_slices']} test slices", ""]
  for d in docs:
    s = d.get("sampler")
    desc = "deterministic" if not s else ", ".join(f"{k}={v}" for k, v in s.items())
    lines.append(f"- `{d['method']}`: {desc}; mask seed base {d['seed']}"
                 + (f"; trained on {d['trained_on']}" if d.get("trained_on") else ""))
  lines += ["", "| pattern | missing | metric | " + " | ".join(d["method"] for d in docs) + " |",
            "|---|---|---|" + "---|" * len(docs)]
  metrics = [("MAE", "mae"), ("RMSE", "rmse"), ("completion MAE", "completion_mae"),
             ("completion RMSE", "completion_rmse"), ("CRPS", "crps")]
  for k, r0 in enumerate(d0["results"]):
    for title, key in metrics:
      vals = [d["results"][k].get(key) if k < len(d["results"]) else None for d in docs]
      if key == "crps" and all(v is None for v in vals):
        continue
      lines.append(f"| {r0['pattern']} | {r0['missing_ratio']:g} | {title} | "
                   + " | ".join(_fmt(v) for v in vals) + " |")
  lines += ["", "| method | pattern | missing | seconds | maps/s |", "|---|---|---|---|---|"]
  for d in docs:
    for r in d["results"]:
      lines.append(f"| {d['method']} | {r['pattern']} | {r['missing_ratio']:g} | "
                   f"{r['seconds']:.2f} | {_fmt(r['maps_per_second'])} |")
  return "\n".join(lines) + "\n"


def write_results(workdir, docs: list) -> None:
  """results.json (main method), results_<method>.json (every method), results.md (all)."""
  wd = pathlib.Path(workdir)
  wd.mkdir(parents=True, exist_ok=True)
  for i, d in enumerate(docs):
    names = [f"results_{d['method']}.json"] + (["results.json"] if i == 0 else [])
    for n in names:
      tmp = wd / (n + ".tmp")
      tmp.write_text(json.dumps(d, indent=1))
      os.replace(tmp, wd / n)
  (wd / "results.md").write_text(results_markdown(docs))
