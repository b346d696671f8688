"""Short series: DiffRecon and its references on a few weeks of data, as a user's own grid.

  python -m diffrecon_jax.short_series --workdir=runs/short_series          # 4 grids x 20 days
  python -m diffrecon_jax.short_series --workdir=DIR --cases=nybike:last --days=20
  python -m diffrecon_jax.short_series --workdir=DIR --smoke                # wiring, minutes

Users often have only weeks of data. Each case writes the first or last `--days` days of an
embedded dataset (nytaxi, nybike) as a NetCDF grid file (`data.example_grid`) and runs the
README's custom-grid command on it (`configs/custom.py`, the default CPU config: chronological
train / val / test halves and quarters, so 20 days train on 10), which trains DiffRecon and
scores it beside `prior`, `climatology` (its calendar table chosen on the validation split) and
`interp` on the same masks, all nine patterns. Per case: DIR/<dataset>_<first|last>/ holds the
grid file and the run's workdir; DIR/short_series.md / .json summarise every case: mean MAE and
RMSE per method, the patterns where DiffRecon's MAE / RMSE is below both `prior` and
`climatology`, and its mean-MAE margin over the better of the two. A case whose results exist
is not run again; an interrupted one resumes from its checkpoints.
"""
from __future__ import annotations

import json
import pathlib
from typing import Dict, List, Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections

from diffrecon_jax import console
from diffrecon_jax import parallel
from diffrecon_jax import run as run_lib
from diffrecon_jax import smoke
from diffrecon_jax.data import example_grid

CASES = ("nytaxi:first", "nytaxi:last", "nybike:first", "nybike:last")
# What a DiffRecon workdir scores beside it (`run.references_for`).
REFERENCES = ("prior",) + run_lib.reference_names()
SLICES_PER_DAY = 48  # both embedded datasets are at 30 minutes


def parse_case(case: str) -> tuple:
  """"nybike:last" -> ("nybike", "last"); a clear error otherwise."""
  dataset, _, end = case.partition(":")
  if dataset not in example_grid.DATASETS or end not in ("first", "last"):
    raise ValueError(f"case {case!r}: expected DATASET:first or DATASET:last with DATASET one "
                     f"of {sorted(example_grid.DATASETS)}")
  return dataset, end


def case_dir(workdir: pathlib.Path, case: str) -> pathlib.Path:
  dataset, end = parse_case(case)
  return workdir / f"{dataset}_{end}"


def write_case_grid(case: str, days: int, folder: pathlib.Path) -> pathlib.Path:
  """The case's grid file: the first or last `days` days of its dataset, fine maps, no NaN."""
  dataset, end = parse_case(case)
  n = days * SLICES_PER_DAY
  series = example_grid.example_series(dataset=dataset, **{end: n})
  return example_grid.write_grid(series, folder / "grid.nc")


def case_config(base: ml_collections.ConfigDict, grid: pathlib.Path) -> ml_collections.ConfigDict:
  """`base` (configs/custom.py's) reading `grid`: the README's custom-grid flags."""
  c = base.copy_and_resolve_references()
  c.data.path = str(grid)
  c.data.variable = "flow"
  c.data.aggregation = "sum"
  return c


def _finished(wd: pathlib.Path) -> bool:
  return all((wd / f"results_{m}.json").is_file() for m in ("diffrecon",) + REFERENCES)


def run_case(base: ml_collections.ConfigDict, workdir: pathlib.Path, case: str,
             days: int) -> Dict[str, dict]:
  """Trains and evaluates one case (or reads its finished results) -> {method: results doc}."""
  folder = case_dir(workdir, case)
  wd = folder / "run"
  if not _finished(wd):
    grid = folder / "grid.nc"
    if not grid.is_file():
      write_case_grid(case, days, folder)
    logging.info("short series %s: %d days from %s", case, days, grid)
    run_lib.run(case_config(base, grid), str(wd), "train_and_evaluate")
  return {m: json.loads((wd / f"results_{m}.json").read_text())
          for m in ("diffrecon",) + REFERENCES}


def summarise(case: str, docs: Dict[str, dict]) -> dict:
  """Mean MAE / RMSE per method, where DiffRecon beats both the prior and the climatology, and
  its mean-MAE margin (%) over the better of the two (negative = DiffRecon lower)."""
  mean = lambda m, k: sum(r[k] for r in docs[m]["results"]) / len(docs[m]["results"])
  rows = list(zip(*(docs[m]["results"] for m in ("diffrecon", "prior", "climatology"))))
  wins = lambda k: sum(d[k] < min(p[k], c[k]) for d, p, c in rows)
  best_ref = min(mean("prior", "mae"), mean("climatology", "mae"))
  table = docs["climatology"].get("calendar_table", {}).get("table", "")
  return {"case": case, "patterns": len(rows), "calendar_table": table,
          "mean_mae": {m: mean(m, "mae") for m in docs},
          "mean_rmse": {m: mean(m, "rmse") for m in docs},
          "mae_wins": wins("mae"), "rmse_wins": wins("rmse"),
          "margin_percent": 100.0 * (mean("diffrecon", "mae") / best_ref - 1.0)}


def markdown(summaries: List[dict]) -> str:
  """The summary table of every case."""
  head = ("| case | calendar table | DiffRecon MAE | prior MAE | climatology MAE | interp MAE "
          "| DiffRecon vs better of prior / climatology | patterns won MAE / RMSE |")
  lines = ["# Short series: each case as a user's custom grid (test split, mean over the "
           "patterns)", "", head, "|" + "---|" * 8]
  for s in summaries:
    m = s["mean_mae"]
    lines.append(f"| {s['case']} | {s['calendar_table']} | {m['diffrecon']:.3f} | "
                 f"{m['prior']:.3f} | {m['climatology']:.3f} | {m['interp']:.3f} | "
                 f"{s['margin_percent']:+.1f}% | {s['mae_wins']} / {s['rmse_wins']} of "
                 f"{s['patterns']} |")
  return "\n".join(lines) + "\n"


def run_cases(base: ml_collections.ConfigDict, workdir, cases: Sequence[str],
              days: int) -> List[dict]:
  """Every case in turn; writes workdir/short_series.md / .json after each (nothing is lost
  when a later case stops)."""
  workdir = pathlib.Path(workdir)
  for case in cases:
    parse_case(case)  # refuse a bad case before hours of training
  summaries = []
  for case in cases:
    summaries.append(summarise(case, run_case(base, workdir, case, days)))
    (workdir / "short_series.json").write_text(json.dumps(summaries, indent=1))
    (workdir / "short_series.md").write_text(markdown(summaries))
    logging.info("short series %s: DiffRecon %+.1f%% against the better of prior / "
                 "climatology; MAE below both on %d of %d patterns", case,
                 summaries[-1]["margin_percent"], summaries[-1]["mae_wins"],
                 summaries[-1]["patterns"])
  return summaries


def define_flags() -> None:
  """The command line's flags; defined when run as a program only, so that importing this
  module beside `experiments` (which has its own --workdir) defines nothing twice."""
  flags.DEFINE_string("workdir", None, "Folder of every case's grid, run and the table.")
  flags.DEFINE_string("cases", ",".join(CASES), "Comma-separated DATASET:first|last.")
  flags.DEFINE_integer("days", 20, "Days of data per case (train on half of them).")
  flags.DEFINE_string("variant", "cpu", "Variant of configs/custom.py every case runs with "
                      "(`cpu`: the default config a user's custom grid runs with, that of the "
                      "committed table; `full`: the longer budget of the other tables).")
  flags.DEFINE_bool("smoke", False, "Tiny models, a few steps and slices: checks the wiring "
                    "in minutes; the numbers mean nothing.")
  flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from diffrecon_jax.configs import custom  # the README's custom-grid config
  args = flags.FLAGS
  try:
    base = custom.get_config(args.variant)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if args.smoke:
    base = smoke.smoke_config(base)
  try:
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for case in cases:
      parse_case(case)
    if args.days < 8:
      raise ValueError(f"--days={args.days}: at least 8 days are needed (train on half, "
                       f"validate and test on a quarter each, with a week's calendar)")
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  workdir = run_lib.resolve_workdir(args.workdir)
  log_path = console.setup(workdir, parallel.process_index_for_logs())
  with console.errors_end_the_program("diffrecon_jax.short_series", log_path):
    run_cases(base, workdir, cases, args.days)


if __name__ == "__main__":
  define_flags()
  app.run(main)
