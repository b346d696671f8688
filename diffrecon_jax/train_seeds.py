"""DiffRecon's spread over training seeds and mask seeds, beside its prior and the climatology.

  python -m diffrecon_jax.train_seeds --config=configs/nytaxi.py:full --workdir=runs/train_seeds \\
      --train_seeds=0,1 --mask_seeds=0,1
  python -m diffrecon_jax.train_seeds --config=configs/nytaxi.py --workdir=DIR --smoke   # wiring

One number from one training run does not say how much of a margin is the model and how much
the draw of its initialisation and batches. For each training seed t (`config.seed`) this
trains DiffRecon in DIR/seed_<t> (resumable; a finished training is not run again) and scores
it with its references (`prior`, `climatology`, `interp`: `run.references_for`) on the masks of
every mask seed m, into DIR/seed_<t>/mask_seed_<m>/ (results.json, results_<method>.json,
results.md; a finished one is read back, not scored again). Then DIR/train_seeds.md / .json:
per pattern DiffRecon's MAE and RMSE under every (training seed, mask seed), the mean over the
mask seeds for each training seed, the spread (max - min) between training seeds, and the
references' MAE (they do not depend on the training seed); per training seed the mean MAE and
the margin over the better of `prior` and `climatology`.
"""
from __future__ import annotations

import json
import pathlib
from typing import Dict, List, Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections
import numpy as np
from ml_collections import config_flags

from diffrecon_jax import console
from diffrecon_jax import parallel
from diffrecon_jax import provenance
from diffrecon_jax import run as run_lib
from diffrecon_jax import smoke

# What a DiffRecon workdir scores beside it (`run.references_for`).
REFERENCES = ("prior",) + run_lib.reference_names()
METHODS = ("diffrecon",) + REFERENCES


def parse_seeds(text: str, what: str) -> List[int]:
  """"0,1" -> [0, 1]; a clear error for an empty, negative, repeated or non-integer entry."""
  try:
    seeds = [int(s) for s in str(text).split(",") if s.strip()]
  except ValueError:
    raise ValueError(f"--{what}={text!r}: expected comma-separated integers") from None
  if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
    raise ValueError(f"--{what}={text!r}: expected distinct non-negative integers")
  return seeds


def seed_dir(workdir: pathlib.Path, train_seed: int) -> pathlib.Path:
  return workdir / f"seed_{train_seed}"


def mask_dir(workdir: pathlib.Path, train_seed: int, mask_seed: int) -> pathlib.Path:
  return seed_dir(workdir, train_seed) / f"mask_seed_{mask_seed}"


def _scored(folder: pathlib.Path) -> bool:
  return all((folder / f"results_{m}.json").is_file() for m in METHODS)


def train_and_score(config: ml_collections.ConfigDict, workdir: pathlib.Path, train_seed: int,
                    mask_seeds: Sequence[int]) -> Dict[int, Dict[str, dict]]:
  """Trains DiffRecon with `train_seed` (or resumes / finds it trained) and scores it on every
  mask seed -> {mask seed: {method: results doc}}."""
  wd = seed_dir(workdir, train_seed)
  todo = [m for m in mask_seeds if not _scored(mask_dir(workdir, train_seed, m))]
  if todo:
    c = config.copy_and_resolve_references()
    c.seed = int(train_seed)
    logging.info("training seed %d: training (resumes; nothing to do when finished) in %s",
                 train_seed, wd)
    run_lib.run(c, str(wd), "train")
    for m in todo:
      c.patterns.eval_mask_seed = int(m)
      saved, task, method = run_lib.load_method(c, str(wd))
      logging.info("training seed %d: scoring on mask seed %d", train_seed, m)
      run_lib.evaluate_methods(saved, str(mask_dir(workdir, train_seed, m)), task,
                               [method] + run_lib.references_for(method, task),
                               {"trained_on": list(saved.patterns.train)}, figures=False,
                               origin=provenance.collect(mode="evaluate"))
  return {m: {name: json.loads((mask_dir(workdir, train_seed, m) /
                                f"results_{name}.json").read_text()) for name in METHODS}
          for m in mask_seeds}


def summarise(docs: Dict[int, Dict[int, Dict[str, dict]]]) -> dict:
  """{training seed: {mask seed: {method: doc}}} -> the table's numbers (module docstring).

  Returns dict(train_seeds, mask_seeds, patterns: [{pattern, missing_ratio,
  diffrecon: {metric: {"t<t>_m<m>": value, "t<t>": mean over mask seeds}}, spread: {metric:
  max - min over training seeds of those means}, prior / climatology / interp: {metric: mean
  over mask seeds}}], per_seed: [{train_seed, mean_mae, mean_rmse, margin_percent (vs the
  better of prior and climatology, negative = DiffRecon lower), mae_wins, rmse_wins}]).
  """
  t_seeds = sorted(docs)
  m_seeds = sorted(next(iter(docs.values())))
  first = docs[t_seeds[0]][m_seeds[0]]
  n_pat = len(first["diffrecon"]["results"])
  rows = []
  for k in range(n_pat):
    res = lambda t, m, name: docs[t][m][name]["results"][k]
    row = {"pattern": res(t_seeds[0], m_seeds[0], "diffrecon")["pattern"],
           "missing_ratio": res(t_seeds[0], m_seeds[0], "diffrecon")["missing_ratio"],
           "diffrecon": {}, "spread": {}}
    for metric in ("mae", "rmse"):
      vals = {}
      for t in t_seeds:
        for m in m_seeds:
          vals[f"t{t}_m{m}"] = float(res(t, m, "diffrecon")[metric])
        vals[f"t{t}"] = float(np.mean([vals[f"t{t}_m{m}"] for m in m_seeds]))
      row["diffrecon"][metric] = vals
      means = [vals[f"t{t}"] for t in t_seeds]
      row["spread"][metric] = float(max(means) - min(means))
    for name in REFERENCES:
      row[name] = {metric: float(np.mean([res(t_seeds[0], m, name)[metric] for m in m_seeds]))
                   for metric in ("mae", "rmse")}
    rows.append(row)
  per_seed = []
  for t in t_seeds:
    mean = lambda metric, name=None: float(np.mean(
        [r["diffrecon"][metric][f"t{t}"] if name is None else r[name][metric] for r in rows]))
    best_ref = min(mean("mae", "prior"), mean("mae", "climatology"))
    wins = lambda metric: sum(r["diffrecon"][metric][f"t{t}"] <
                              min(r["prior"][metric], r["climatology"][metric]) for r in rows)
    per_seed.append({"train_seed": t, "mean_mae": mean("mae"), "mean_rmse": mean("rmse"),
                     "margin_percent": 100.0 * (mean("mae") / best_ref - 1.0),
                     "mae_wins": wins("mae"), "rmse_wins": wins("rmse")})
  return {"dataset": first["diffrecon"]["dataset"], "units": first["diffrecon"].get("units", ""),
          "train_seeds": t_seeds, "mask_seeds": m_seeds, "patterns": rows,
          "per_seed": per_seed}


def markdown(summary: dict) -> str:
  """The tables of `summarise`'s output."""
  t_seeds, m_seeds = summary["train_seeds"], summary["mask_seeds"]
  cols = [f"t{t}_m{m}" for t in t_seeds for m in m_seeds]
  lines = [f"# {summary['dataset']}: DiffRecon over training seeds {t_seeds} and mask seeds "
           f"{m_seeds} (test split, MAE / RMSE{', ' + summary['units'] if summary['units'] else ''})",
           "", "Column tT_mM: DiffRecon trained with seed T, scored on the masks of seed M; "
           "tT: its mean over the mask seeds; spread: max - min of those means over the "
           "training seeds; the references: mean over the mask seeds.", ""]
  head = (["pattern", "metric"] + cols + [f"t{t}" for t in t_seeds] +
          ["spread", "prior", "climatology", "interp"])
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in summary["patterns"]:
    for metric in ("mae", "rmse"):
      d = r["diffrecon"][metric]
      cells = ([f"{r['pattern']}:{r['missing_ratio']:g}", metric.upper()] +
               [f"{d[c]:.3f}" for c in cols] + [f"{d[f't{t}']:.3f}" for t in t_seeds] +
               [f"{r['spread'][metric]:.3f}"] +
               [f"{r[name][metric]:.3f}" for name in REFERENCES])
      lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "| training seed | mean MAE | mean RMSE | vs better of prior / climatology "
            "| patterns below both, MAE / RMSE |", "|---|---|---|---|---|"]
  n = len(summary["patterns"])
  for s in summary["per_seed"]:
    lines.append(f"| {s['train_seed']} | {s['mean_mae']:.3f} | {s['mean_rmse']:.3f} | "
                 f"{s['margin_percent']:+.1f}% | {s['mae_wins']} / {s['rmse_wins']} of {n} |")
  return "\n".join(lines) + "\n"


def run_seeds(config: ml_collections.ConfigDict, workdir, train_seeds: Sequence[int],
              mask_seeds: Sequence[int]) -> dict:
  """Every training seed in turn; writes workdir/train_seeds.md / .json at the end."""
  workdir = pathlib.Path(workdir)
  docs = {t: train_and_score(config, workdir, t, mask_seeds) for t in train_seeds}
  summary = summarise(docs)
  (workdir / "train_seeds.json").write_text(json.dumps(summary, indent=1))
  (workdir / "train_seeds.md").write_text(markdown(summary))
  for s in summary["per_seed"]:
    logging.info("training seed %d: mean MAE %.4f, %+.1f%% against the better of prior / "
                 "climatology", s["train_seed"], s["mean_mae"], s["margin_percent"])
  return summary


def define_flags() -> None:
  """The command line's flags; defined when run as a program only (beside `experiments` in
  one process, a second --config / --workdir would clash)."""
  config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file (a DiffRecon "
                                  "config), e.g. configs/nytaxi.py:full.", lock_config=False)
  flags.DEFINE_string("workdir", None, "Folder of every training seed's run and the tables.")
  flags.DEFINE_string("train_seeds", "0,1", "Comma-separated training seeds (config.seed).")
  flags.DEFINE_string("mask_seeds", "0,1", "Comma-separated mask seeds of the evaluation.")
  flags.DEFINE_bool("smoke", False, "Tiny models, a few steps and slices: checks the wiring "
                    "in minutes; the numbers mean nothing.")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  args = flags.FLAGS
  config = args.config
  if str(config.method) != "diffrecon" or str(config.ablation):
    raise app.UsageError(f"--config must be a DiffRecon config (method 'diffrecon', no "
                         f"ablation), got method {config.method!r} ablation {config.ablation!r}")
  try:
    train_seeds = parse_seeds(args.train_seeds, "train_seeds")
    mask_seeds = parse_seeds(args.mask_seeds, "mask_seeds")
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if args.smoke:
    config = smoke.smoke_config(config)
  workdir = run_lib.resolve_workdir(args.workdir)
  run_lib.resolve_data_paths(config)
  log_path = console.setup(workdir, parallel.process_index_for_logs())
  with console.errors_end_the_program("diffrecon_jax.train_seeds", log_path):
    run_seeds(config, workdir, train_seeds, mask_seeds)


if __name__ == "__main__":
  define_flags()
  app.run(main)
