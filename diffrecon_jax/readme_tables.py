"""The README's result tables, rendered from the committed results files in docs/results.

Each generated table in README.md sits between a line `<!-- table:NAME -->` and, after the
table and one blank line (which ends the table for every Markdown renderer), `<!-- /table -->`;
`TABLES[NAME]` renders it from files alone, so a number in a table is the file's number.
tests/test_readme_tables.py checks that every marked table equals its rendering (and that the
main tables are marked); after a new run, copy its results files into docs/results and rewrite
the tables with

  python -m diffrecon_jax.readme_tables --write

(`--check` exits 1 naming every table that differs.)
"""
from __future__ import annotations

import argparse
import csv
import json
import pathlib
import re
import sys
from typing import Callable, Dict, List

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "docs" / "results"
README = REPO_ROOT / "README.md"
BLOCK = re.compile(r"(<!-- table:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)

# How the README names the methods of the experiments' tables (results files use the registry's).
DISPLAY = {"srcnn": "SRCNN", "srresnet": "SRResNet", "urbanfm": "UrbanFM", "fode": "FODE",
           "stcf": "STCF", "urbansta": "UrbanSTA", "diffuflow": "DiffUFlow",
           "diffrecon": "DiffRecon", "diffrecon vs best other": "DiffRecon vs best other",
           "diffrecon_paper": "DiffRecon (paper)", "prior": "prior"}
ABLATION_DISPLAY = {"diffrecon": "DiffRecon", "diffrecon-noPre": "noPre",
                    "diffrecon-noJoint": "noJoint",
                    "diffrecon-noSTPointFormer": "noSTPointFormer",
                    "diffrecon-noTPatternNet": "noTPatternNet",
                    "diffc-srcnn": "noFG: Diffusion-C + SRCNN",
                    "diffc-urbanfm": "noFG: Diffusion-C + UrbanFM",
                    "diffc-fode": "noFG: Diffusion-C + FODE",
                    "diffc-stcf": "noFG: Diffusion-C + STCF"}


def _results(stem: str, method: str) -> List[dict]:
  """The per-pattern entries of docs/results/<stem>_<method>.json (DiffRecon: _results.json)."""
  name = "results" if method == "diffrecon" else method
  path = RESULTS / f"{stem}_{name}.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing: the README table needs it (copy the run's "
                            f"results files into docs/results)")
  return json.loads(path.read_text())["results"]


def _row(cells) -> str:
  return "| " + " | ".join(cells) + " |"


def _rule(n: int) -> str:
  """The header separator of an n-column table."""
  return "|" + "---|" * n


def _bold_min(values: List[float], fmt: str) -> List[str]:
  best = min(values)
  return [f"**{v:{fmt}}**" if v == best else f"{v:{fmt}}" for v in values]


MAIN_HEADER = ("pattern", "missing", "DiffRecon MAE", "prior MAE", "climatology MAE",
               "interp MAE", "DiffRecon RMSE", "prior RMSE", "climatology RMSE",
               "DiffRecon completion MAE", "prior completion MAE", "DiffRecon CRPS",
               "CRPS / climatology MAE", "50% cov.", "90% cov.", "90% cov. hidden",
               "spread-skill", "raw 90% cov.", "raw spread-skill")


def main_table(stem: str) -> str:
  """DiffRecon beside its prior and the references, with the calibration columns, per pattern
  (docs/results/<stem>_{results,prior,climatology,interp}.json). Bold: the lowest of DiffRecon,
  prior and climatology."""
  d, p, c, i = (_results(stem, m) for m in ("diffrecon", "prior", "climatology", "interp"))
  lines = [_row(MAIN_HEADER), _rule(len(MAIN_HEADER))]
  for rd, rp, rc, ri in zip(d, p, c, i):
    if not rd["pattern"] == rp["pattern"] == rc["pattern"] == ri["pattern"]:
      raise ValueError(f"{stem}: the results files list the patterns in different orders")
    lines.append(_row(
        [rd["pattern"], str(rd["missing_ratio"])]
        + _bold_min([rd["mae"], rp["mae"], rc["mae"]], ".3f") + [f"{ri['mae']:.2f}"]
        + _bold_min([rd["rmse"], rp["rmse"], rc["rmse"]], ".3f")
        + _bold_min([rd["completion_mae"], rp["completion_mae"]], ".3f")
        + [f"{rd['crps']:.3f}", f"{rd['crps'] / rc['mae']:.2f}"]
        + [f"{rd[k]:.2f}" for k in ("coverage_50", "coverage_90", "coverage_90_hidden",
                                    "spread_skill", "coverage_90_raw", "spread_skill_raw")]))
  return "\n".join(lines) + "\n"


def reference_table(stem: str, method: str) -> str:
  """One reference alone: MAE, RMSE and the completion errors per pattern."""
  lines = [_row(("pattern", "missing", "MAE", "RMSE", "completion MAE", "completion RMSE")),
           _rule(6)]
  for r in _results(stem, method):
    lines.append(_row([r["pattern"], str(r["missing_ratio"])]
                      + [f"{r[k]:.2f}" for k in ("mae", "rmse", "completion_mae",
                                                 "completion_rmse")]))
  return "\n".join(lines) + "\n"


def table_blocks(text: str) -> List[List[str]]:
  """The Markdown tables of `text`: each a run of consecutive lines starting with "|"."""
  blocks, current = [], []
  for line in text.splitlines() + [""]:
    if line.startswith("|"):
      current.append(line)
    elif current:
      blocks.append(current)
      current = []
  return blocks


def copied_table(md_name: str, index: int = 0) -> str:
  """The `index`-th table of a committed experiments file (docs/results/<md_name>: 0 the
  comparison, 1 the budgets when the run listed them), methods named as in the README."""
  rows = list(table_blocks((RESULTS / md_name).read_text())[index])
  header = [cell.strip() for cell in rows[0].strip("|").split("|")]
  rows[0] = _row([DISPLAY.get(h, h) for h in header])
  if index:  # the budget table names its methods in its first column
    rows[2:] = [_row([DISPLAY.get(c.strip(), c.strip()) if k == 0 else c.strip()
                      for k, c in enumerate(r.strip("|").split("|"))]) for r in rows[2:]]
  return "\n".join(rows) + "\n"


def ablation_means(csv_name: str, methods: List[str]) -> str:
  """Mean MAE and RMSE over the patterns of an ablations .csv (docs/results/<csv_name>), bold:
  the lowest."""
  with open(RESULTS / csv_name) as f:
    rows = list(csv.DictReader(f))
  lines = ["| | " + " | ".join(ABLATION_DISPLAY[m] for m in methods) + " |", _rule(len(methods) + 1)]
  for metric in ("mae", "rmse"):
    vals = [[float(r[m]) for r in rows if r["metric"] == metric] for m in methods]
    means = [sum(v) / len(v) for v in vals]
    lines.append(_row([f"mean {metric.upper()}"] + _bold_min(means, ".3f")))
  return "\n".join(lines) + "\n"


def datasets_table(stems: List[str]) -> str:
  """One row per dataset (docs/results/<stem>_*.json): mean MAE of DiffRecon, its prior and the
  references, the patterns where DiffRecon's MAE / RMSE is below both prior and climatology,
  and the range of its 90% coverage."""
  lines = [_row(("dataset", "DiffRecon mean MAE", "prior", "climatology", "interp",
                 "patterns where DiffRecon's MAE / RMSE is below prior and climatology",
                 "90% coverage")), _rule(7)]
  for stem in stems:
    d, p, c, i = (_results(stem, m) for m in ("diffrecon", "prior", "climatology", "interp"))
    mean = lambda rows: sum(r["mae"] for r in rows) / len(rows)
    wins = lambda k: sum(a[k] < min(b[k], e[k]) for a, b, e in zip(d, p, c))
    cov = [r["coverage_90"] for r in d]
    name = stem[:-len("_main")] if stem.endswith("_main") else stem
    lines.append(_row([f"`{name}`", f"{mean(d):.3f}", f"{mean(p):.3f}", f"{mean(c):.3f}",
                       f"{mean(i):.2f}", f"{wins('mae')} / {wins('rmse')} of {len(d)}",
                       f"{min(cov):.2f}-{max(cov):.2f}"]))
  return "\n".join(lines) + "\n"


def train_seeds_table(json_name: str) -> str:
  """One row per training seed of a `train_seeds` summary (docs/results/<json_name>): DiffRecon's
  mean MAE / RMSE over the patterns (each the mean over the mask seeds), the references' mean
  MAE, the margin over the better of them and the patterns won; a last row with the largest
  per-pattern spread of DiffRecon's MAE between training seeds."""
  s = json.loads((RESULTS / json_name).read_text())
  rows = s["patterns"]
  ref = lambda name: sum(r[name]["mae"] for r in rows) / len(rows)
  lines = [_row(("training seed", "DiffRecon mean MAE", "DiffRecon mean RMSE", "prior",
                 "climatology", "DiffRecon vs the better of the two",
                 "patterns where DiffRecon's MAE / RMSE is below both")), _rule(7)]
  for p in s["per_seed"]:
    lines.append(_row([str(p["train_seed"]), f"{p['mean_mae']:.3f}", f"{p['mean_rmse']:.3f}",
                       f"{ref('prior'):.3f}", f"{ref('climatology'):.3f}",
                       f"{p['margin_percent']:+.1f}%",
                       f"{p['mae_wins']} / {p['rmse_wins']} of {len(rows)}"]))
  widest = max(rows, key=lambda r: r["spread"]["mae"])
  lines.append(_row(["largest MAE spread between seeds",
                     f"{widest['spread']['mae']:.3f} ({widest['pattern']}:"
                     f"{widest['missing_ratio']:g})", "", "", "", "", ""]))
  return "\n".join(lines) + "\n"


TABLES: Dict[str, Callable[[], str]] = {
    "nytaxi_main": lambda: main_table("nytaxi_main"),
    "nytaxi_full": lambda: main_table("nytaxi_full"),
    "nybike_main": lambda: main_table("nybike_main"),
    "nytaxi_interp": lambda: reference_table("nytaxi_main", "interp"),
    "more_datasets": lambda: datasets_table(["bikenyc14_main", "ncep_air_main"]),
    "short_series": lambda: datasets_table(["nybike_last20", "nytaxi_last20", "nybike_first20",
                                            "nytaxi_first20"]),
    "nytaxi_comparison": lambda: copied_table("nytaxi_comparison.md"),
    "nytaxi_budgets": lambda: copied_table("nytaxi_comparison.md", 1),
    "nybike_comparison": lambda: copied_table("nybike_comparison.md"),
    "nybike_budgets": lambda: copied_table("nybike_comparison.md", 1),
    "nytaxi_ablations": lambda: ablation_means(
        "nytaxi_ablations.csv", ["diffrecon", "diffrecon-noPre", "diffrecon-noJoint",
                                 "diffrecon-noSTPointFormer", "diffrecon-noTPatternNet",
                                 "diffc-srcnn", "diffc-urbanfm", "diffc-fode", "diffc-stcf"]),
    "nytaxi_train_seeds": lambda: train_seeds_table("nytaxi_train_seeds.json"),
}


def marked(text: str) -> Dict[str, str]:
  """{name: body} of every marked table in `text`; unknown names are an error."""
  found = {m["name"]: m["body"] for m in BLOCK.finditer(text)}
  unknown = sorted(set(found) - set(TABLES))
  if unknown:
    raise ValueError(f"README marks tables no renderer knows: {unknown} (known: {sorted(TABLES)})")
  return found


def _body(name: str) -> str:
  """What stands between the markers: the rendered table and one blank line."""
  return TABLES[name]() + "\n"


def differing(text: str) -> List[str]:
  """Names of the marked tables whose body is not their rendering."""
  return [name for name, body in marked(text).items() if body != _body(name)]


def rewrite(text: str) -> str:
  """`text` with every marked table replaced by its rendering."""
  marked(text)
  return BLOCK.sub(lambda m: m.group(1) + _body(m["name"]) + m.group(4), text)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--write", action="store_true", help="rewrite README.md's tables")
  parser.add_argument("--check", action="store_true", help="exit 1 if a table differs")
  args = parser.parse_args(argv)
  text = README.read_text()
  if args.write:
    README.write_text(rewrite(text))
    print(f"rewrote {len(marked(text))} tables in {README}")
    return 0
  bad = differing(text)
  for name in bad:
    print(f"README table {name!r} differs from its results files (python -m "
          f"diffrecon_jax.readme_tables --write)")
  return 1 if (bad and args.check) else 0


if __name__ == "__main__":
  sys.exit(main())
